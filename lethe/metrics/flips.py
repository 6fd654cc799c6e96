"""Negative / positive flips between two models or evaluation points (pure functions).

Over a fixed evaluation set, old model f₁, new model f₂ (Yan et al., "Positive-Congruent
Training", CVPR 2021):
  NFR = mean[f₁ correct ∧ f₂ wrong]        PFR = mean[f₁ wrong ∧ f₂ correct]
  NFI = #negative flips / #errors of f₂     relative NFR = NFR / ((1 − acc₁) · acc₂)
"""
from __future__ import annotations

import torch


def flip_stats(old_pred: torch.Tensor, new_pred: torch.Tensor, targets: torch.Tensor) -> dict:
    """NFR, PFR, NFI and relative NFR of new vs old predictions (floats)."""
    targets = targets.to(new_pred.device)
    old_ok = old_pred.to(new_pred.device) == targets
    new_ok = new_pred == targets
    n = max(len(targets), 1)
    neg = (old_ok & ~new_ok).sum().item()
    pos = (~old_ok & new_ok).sum().item()
    errors = (~new_ok).sum().item()
    acc_old, acc_new = old_ok.float().mean().item(), new_ok.float().mean().item()
    nfr = neg / n
    denom = (1 - acc_old) * acc_new
    return {"nfr": nfr, "pfr": pos / n, "nfi": neg / errors if errors else 0.0,
            "rel_nfr": nfr / denom if denom > 0 else float("nan")}


def flip_stats_per_group(old_pred, new_pred, targets, groups: torch.Tensor, n_groups: int) -> dict:
    """NFR and PFR per group (experience or class): tensors of length n_groups."""
    targets = targets.to(new_pred.device)
    groups = groups.to(new_pred.device)
    old_ok = old_pred.to(new_pred.device) == targets
    new_ok = new_pred == targets
    counts = torch.bincount(groups, minlength=n_groups).clamp(min=1).to(torch.float64)

    def rate(mask):
        return torch.bincount(groups, weights=mask.to(torch.float64), minlength=n_groups) / counts

    return {"nfr": rate(old_ok & ~new_ok), "pfr": rate(~old_ok & new_ok)}


def nfr_matrix(preds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[P, P]: NFR[a, b] = share of samples point a got right and point b got wrong."""
    ok = (preds == targets.to(preds.device).unsqueeze(0)).to(torch.float64)
    return ok @ (1 - ok).T / max(preds.shape[1], 1)
