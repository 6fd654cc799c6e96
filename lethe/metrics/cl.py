"""Continual-learning metrics as pure functions of a prediction store.

Conventions:
- ``R[i, j]``: accuracy on test experience j after the i-th learn experience (i, j from 0).
  Row i is "after training on experience i". Rows past the last test experience are allowed
  (more learn steps than test experiences, e.g. a repeated domain); every function below
  then takes all E experiences as seen.
- ``b[j]``: accuracy of the model before any training (for FWT).
- Forgetting is Chaudhry et al.'s max-based definition (Riemannian Walk, ECCV 2018):
  f_j(i) = max_{l < i} R[l, j] − R[i, j], averaged over j < i. Avalanche's "Forgetting"
  differs: it is first-value based (R[j, j] − R[i, j]), i.e. −BWT per experience.
- BWT and FWT as in Lopez-Paz & Ranzato (GEM, NeurIPS 2017), evaluated at step i:
  BWT = mean_{j<i} R[i, j] − R[j, j],  FWT = mean_{1≤j≤i} R[j−1, j] − b[j].
- Class-incremental accuracy as PyCIL / PILOT report it (Zhou et al., "PyCIL", 2023;
  Rebuffi et al., iCaRL, CVPR 2017): A_t = accuracy over all test samples of the experiences
  seen after step t (sample-weighted, not a mean of R[t, j]); "last" = A_t at the newest
  step, "average incremental accuracy" = mean_{t ≤ i} A_t.

Every function is a few tensor ops: no Python loop over samples or experiences.
"""
from __future__ import annotations

import torch


def correct(preds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Bool [P, N]: whether each evaluation point got each sample right."""
    return preds == targets.to(preds.device).unsqueeze(0)


def _group_accuracy(preds, targets, groups, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group hit sums [P, G] (float64) and group sizes [G] via one index_add."""
    preds = preds.reshape(-1, preds.shape[-1])
    groups = groups.to(preds.device)
    hits = correct(preds, targets).to(torch.float64)
    sums = torch.zeros(preds.shape[0], n_groups, dtype=torch.float64, device=preds.device)
    sums.index_add_(1, groups, hits)
    counts = torch.bincount(groups, minlength=n_groups).to(torch.float64)
    return sums, counts


def accuracy_matrix(preds: torch.Tensor, targets: torch.Tensor, exp: torch.Tensor,
                    n_experiences: int) -> torch.Tensor:
    """[P, E] accuracy of each evaluation point (row of ``preds``) on each experience.

    An experience without test samples gets 0 (there is nothing it could be right on).
    """
    sums, counts = _group_accuracy(preds, targets, exp, n_experiences)
    return sums / counts.clamp(min=1)


def seen_accuracy(preds: torch.Tensor, targets: torch.Tensor, exp: torch.Tensor, n_experiences: int,
                  n_seen: torch.Tensor) -> torch.Tensor:
    """[P] sample-weighted accuracy of each evaluation point on the test samples of
    experiences 0..n_seen[p]−1 (n_seen clamped to 1..E): PyCIL's per-step total accuracy."""
    sums, counts = _group_accuracy(preds, targets, exp, n_experiences)
    cum_hits, cum_counts = sums.cumsum(1), counts.cumsum(0)
    last = (torch.as_tensor(n_seen, device=sums.device).long().clamp(1, n_experiences) - 1)
    rows = torch.arange(sums.shape[0], device=sums.device)
    return cum_hits[rows, last] / cum_counts[last].clamp(min=1)


def per_class_accuracy(preds: torch.Tensor, targets: torch.Tensor, n_classes: int) -> torch.Tensor:
    """[P, C] accuracy per true class (NaN for classes absent from the targets)."""
    sums, counts = _group_accuracy(preds, targets, targets, n_classes)
    return sums / counts.where(counts > 0, torch.full_like(counts, float("nan")))


def average_accuracy(R: torch.Tensor, i: int, seen_only: bool = True) -> float:
    """Mean accuracy at step i over experiences 0..i (seen) or over all experiences."""
    row = R[i, : i + 1] if seen_only else R[i]
    return float(row.mean())


def forgetting_per_experience(R: torch.Tensor, i: int) -> torch.Tensor:
    """Chaudhry forgetting at step i of each experience j < i: max_{l<i} R[l,j] − R[i,j].

    When i ≥ E (more steps than experiences) every experience counts.
    """
    k = min(i, R.shape[1])
    if k == 0:
        return R.new_zeros(0)
    best = R[:i, :k].max(dim=0).values
    return best - R[i, :k]


def forgetting(R: torch.Tensor, i: int) -> float:
    """Mean Chaudhry forgetting at step i (0 at the first step)."""
    f = forgetting_per_experience(R, i)
    return float(f.mean()) if len(f) else 0.0


def bwt_per_experience(R: torch.Tensor, i: int) -> torch.Tensor:
    """R[i, j] − R[j, j] for each j < min(i, E)."""
    k = min(i, R.shape[1])
    return R[i, :k] - torch.diagonal(R)[:k]


def bwt(R: torch.Tensor, i: int) -> float:
    """Backward transfer at step i: mean_{j<i} R[i,j] − R[j,j] (negative = forgetting)."""
    d = bwt_per_experience(R, i)
    return float(d.mean()) if len(d) else 0.0


def fwt(R: torch.Tensor, b: torch.Tensor, i: int) -> float:
    """Forward transfer at step i: mean_{1≤j≤i} R[j−1, j] − b[j] (b: untrained model)."""
    k = min(i, R.shape[1] - 1)
    if k <= 0:
        return 0.0
    j = torch.arange(1, k + 1, device=R.device)
    return float((R[j - 1, j] - b.to(R.device)[j]).mean())
