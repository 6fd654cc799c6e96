"""Negative / positive flips between two models or evaluation points (pure functions).

Over a fixed evaluation set, old model f₁, new model f₂ (Yan et al., "Positive-Congruent
Training", CVPR 2021; NFI as in Xie et al., ACL 2021 / Cai et al. 2022):
  NFR = #[f₁ correct ∧ f₂ wrong] / N         PFR = #[f₁ wrong ∧ f₂ correct] / N
  NFI = #negative flips / #errors of f₂
  relative NFR = NFR / ((1 − ER₁) · ER₂)  (Yan et al. Eq. 11: the NFR two independent
                 models with these error rates would have)
Where a ratio's denominator is zero: NFI is 0 (no errors, so no negative flips) and
relative NFR is NaN (undefined: no flip could be expected).
"""
from __future__ import annotations

import torch


def _ok(pred: torch.Tensor, targets: torch.Tensor, device) -> torch.Tensor:
    return pred.to(device) == targets.to(device)


def flip_stats_per_group(old_pred: torch.Tensor, new_pred: torch.Tensor, targets: torch.Tensor,
                         groups: torch.Tensor, n_groups: int) -> dict[str, torch.Tensor]:
    """NFR, PFR, NFI and relative NFR per group (experience or class): float64 [n_groups].

    Rates are within each group (flips in the group / samples in the group); empty groups
    get 0 for NFR/PFR/NFI and NaN for relative NFR.
    """
    dev = new_pred.device
    old_ok, new_ok = _ok(old_pred, targets, dev), _ok(new_pred, targets, dev)
    groups = groups.to(dev)

    def count(mask):
        return torch.bincount(groups, weights=mask.to(torch.float64), minlength=n_groups)

    n = torch.bincount(groups, minlength=n_groups).to(torch.float64)
    neg, pos = count(old_ok & ~new_ok), count(~old_ok & new_ok)
    errors, old_right = count(~new_ok), count(old_ok)
    size = n.clamp(min=1)
    nfr = neg / size
    expected = (old_right / size) * (errors / size)     # (1 − ER₁) · ER₂
    nan = torch.full_like(nfr, float("nan"))
    return {"nfr": nfr, "pfr": pos / size,
            "nfi": torch.where(errors > 0, neg / errors.clamp(min=1), torch.zeros_like(nfr)),
            "rel_nfr": torch.where(expected > 0, nfr / expected.where(expected > 0, 1.0), nan)}


def flip_stats(old_pred: torch.Tensor, new_pred: torch.Tensor, targets: torch.Tensor) -> dict:
    """NFR, PFR, NFI and relative NFR of new vs old predictions over all samples (floats)."""
    groups = torch.zeros(len(targets), dtype=torch.long, device=new_pred.device)
    per = flip_stats_per_group(old_pred, new_pred, targets, groups, 1)
    return {k: float(v[0]) for k, v in per.items()}


def nfr_matrix(preds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[P, P]: NFR[a, b] = share of samples point a got right and point b got wrong
    (the NFR of b with a as the old model). Its transpose is the PFR matrix."""
    ok = (preds == targets.to(preds.device).unsqueeze(0)).to(torch.float64)
    return ok @ (1 - ok).T / max(preds.shape[1], 1)


def pfr_matrix(preds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[P, P]: PFR[a, b] = share of samples point a got wrong and point b got right."""
    return nfr_matrix(preds, targets).T


def between(store, old: str, new: str) -> dict:
    """Flips of evaluation point ``new`` against point ``old`` of a prediction store.

    Returns ``{"all": {nfr, pfr, nfi, rel_nfr} floats, "per_experience": {...} tensors [E]}``;
    labels name store rows (the last row of that name when repeated).
    """
    o, n = store.row(old), store.row(new)
    return {"all": flip_stats(o, n, store.targets),
            "per_experience": flip_stats_per_group(o, n, store.targets, store.exp,
                                                   store.n_experiences)}
