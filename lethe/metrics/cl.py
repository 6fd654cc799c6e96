"""Continual-learning metrics as pure functions of a prediction store.

Conventions (see docs in the README's metrics section):
- ``R[i, j]``: accuracy on test experience j after the i-th learn experience
  (i, j from 0). Row i is "after training on experience i".
- ``b[j]``: accuracy of the model before any training (for FWT).
- Forgetting is Chaudhry et al.'s max-based definition (ECCV 2018 / RWalk):
  f_j(i) = max_{l < i} R[l, j] − R[i, j], averaged over j < i. Avalanche's
  "Forgetting" is first-value based (R[j, j] − R[i, j]) = −BWT per experience.
- BWT and FWT as in Lopez-Paz & Ranzato (GEM, NeurIPS 2017), evaluated at step i.
"""
from __future__ import annotations

import torch


def correct(preds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Bool [P, N]: whether each evaluation point got each sample right."""
    return preds == targets.to(preds.device).unsqueeze(0)


def accuracy_matrix(preds: torch.Tensor, targets: torch.Tensor, exp: torch.Tensor,
                    n_experiences: int) -> torch.Tensor:
    """[P, E] accuracy of each evaluation point (row of ``preds``) on each experience."""
    preds = preds.reshape(-1, preds.shape[-1])
    exp = exp.to(preds.device)
    hits = correct(preds, targets).to(torch.float64)
    sums = torch.zeros(preds.shape[0], n_experiences, dtype=torch.float64, device=preds.device)
    sums.index_add_(1, exp, hits)
    counts = torch.bincount(exp, minlength=n_experiences).to(torch.float64)
    return sums / counts.clamp(min=1)


def per_class_accuracy(preds: torch.Tensor, targets: torch.Tensor, n_classes: int) -> torch.Tensor:
    """[P, C] accuracy per true class (NaN for classes absent from the targets)."""
    preds = preds.reshape(-1, preds.shape[-1])
    targets = targets.to(preds.device)
    hits = correct(preds, targets).to(torch.float64)
    sums = torch.zeros(preds.shape[0], n_classes, dtype=torch.float64, device=preds.device)
    sums.index_add_(1, targets, hits)
    counts = torch.bincount(targets, minlength=n_classes).to(torch.float64)
    return sums / counts.where(counts > 0, torch.tensor(float("nan"), dtype=torch.float64,
                                                          device=counts.device))


def average_accuracy(R: torch.Tensor, i: int, seen_only: bool = True) -> float:
    """Mean accuracy at step i over experiences 0..i (seen) or over all experiences."""
    row = R[i, : i + 1] if seen_only else R[i]
    return float(row.mean())


def forgetting_per_experience(R: torch.Tensor, i: int) -> torch.Tensor:
    """Chaudhry forgetting of each experience j < i at step i: max_{l<i} R[l,j] − R[i,j]."""
    if i == 0:
        return R.new_zeros(0)
    best = R[:i, :i].max(dim=0).values
    return best - R[i, :i]


def forgetting(R: torch.Tensor, i: int) -> float:
    f = forgetting_per_experience(R, i)
    return float(f.mean()) if len(f) else 0.0


def bwt(R: torch.Tensor, i: int) -> float:
    """Backward transfer at step i: mean_{j<i} R[i,j] − R[j,j] (negative = forgetting)."""
    if i == 0:
        return 0.0
    diag = torch.diagonal(R)[:i]
    return float((R[i, :i] - diag).mean())


def fwt(R: torch.Tensor, b: torch.Tensor, i: int) -> float:
    """Forward transfer at step i: mean_{1≤j≤i} R[j−1, j] − b[j] (b: untrained model)."""
    if i == 0:
        return 0.0
    j = torch.arange(1, i + 1, device=R.device)
    return float((R[j - 1, j] - b.to(R.device)[j]).mean())
