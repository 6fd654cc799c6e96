"""Membership-inference scores and extraction strength of LLM answers, as pure functions.

Definitions follow open-unlearning (Dorna et al., "OpenUnlearning", 2025), the reference most
published unlearning tables are computed with; every token statistic there leaves out the
answer's last labelled position (its EOS), and so do these (``drop_last``). Conventions as in
:mod:`lethe.metrics.tofu`: targets ``[B, L]`` aligned with the predicting positions, ``-100``
where a position does not count. Every score is oriented "higher = more likely a member"
except the loss-like ones (:func:`zlib_score`), which :func:`~lethe.metrics.unlearning.mia_auc`
takes as they are.

- LOSS attack (Yeom et al., CSF 2018): the answer's mean NLL (:func:`~lethe.metrics.tofu.answer_nll`).
- zlib attack (Carlini et al., "Extracting Training Data from Large Language Models", USENIX
  Security 2021): :func:`zlib_score` = mean NLL / zlib-compressed byte length of the text.
- Min-K%++ (Zhang et al., "Min-K%++: Improved Baseline for Detecting Pre-Training Data from
  Large Language Models", 2024): :func:`min_k_plus_plus` = mean of the lowest
  max(1, ⌊k·T⌋) per-token z-scores (log p(y_t) − μ_t) / σ_t, μ_t and σ_t² the mean and
  variance of log p(·) under the model's own next-token distribution (:func:`logprob_moments`).
- Extraction strength (Carlini et al., 2021; used for unlearning by Wang et al., "Towards
  Effective Evaluations and Comparisons for LLM Unlearning Methods", ICLR 2025):
  :func:`extraction_strength` = 1 − k/T, k = the shortest teacher-forced prefix after which
  the model's argmax reproduces the whole rest of the answer.
"""
from __future__ import annotations

import math
import zlib

import torch

from lethe.metrics.tofu import IGNORE, drop_last_counted, lowest_k_mean


def logprob_moments(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean μ and variance σ² [B, L] of log p(v) under p = softmax(logits) over the vocabulary
    (logits [B, V, L]): μ = Σ_v p_v log p_v, σ² = Σ_v p_v (log p_v)² − μ². Float32 on the
    logits' device, so an evaluator reduces each batch where its logits are."""
    logp = torch.log_softmax(logits.float(), 1)
    # in place: at 32k vocabulary a [B, V, L] temporary is a batch of logits more in flight
    term = logp.exp().mul_(logp)              # p · log p
    mu = term.sum(1)
    second = term.mul_(logp).sum(1)           # p · (log p)²
    return mu, second - mu.square()


def min_k_plus_plus(logprobs: torch.Tensor, mu: torch.Tensor, var: torch.Tensor,
                    targets: torch.Tensor, k: float = 0.4, drop_last: bool = True) -> torch.Tensor:
    """Min-K%++ per row [B] (float64): mean of the max(1, ⌊k·T⌋) lowest (log p(y_t) − μ_t) / σ_t
    over the counted positions, σ² clamped at 1e-6 (open-unlearning's guard); nan if T = 0.
    Higher = more likely a member (open-unlearning reports the negation as its score)."""
    if not 0 < k <= 1:
        raise ValueError(f"min_k_plus_plus: k must be in (0, 1], got {k}")
    mask = targets != IGNORE
    if drop_last:
        mask = drop_last_counted(mask)
    sigma = var.to(torch.float64).clamp(min=1e-6).sqrt()
    z = (logprobs.to(torch.float64) - mu.to(torch.float64)) / sigma
    return lowest_k_mean(z.masked_fill(~mask, 0.0), mask, k)


def zlib_score(mean_nll, texts: list[str]) -> torch.Tensor:
    """zlib attack score per row [N] (float64): mean answer NLL / len(zlib.compress(text as
    UTF-8)) (Carlini et al., 2021; open-unlearning's ``mia_zlib``). Lower = more likely a
    member, like a loss."""
    nll = torch.as_tensor(mean_nll, dtype=torch.float64)
    if len(nll) != len(texts):
        raise ValueError(f"zlib_score: {len(nll)} losses for {len(texts)} texts")
    size = torch.tensor([len(zlib.compress(t.encode("utf-8"))) for t in texts], dtype=torch.float64)
    return nll / size


def extraction_strength(preds: torch.Tensor, targets: torch.Tensor,
                        drop_last: bool = True) -> torch.Tensor:
    """Extraction strength per row [B] (float64) from teacher-forced argmax ids [B, L].

    Over the row's T counted positions y_0..y_{T−1} (the EOS left out with ``drop_last``):
    k = the first index whose suffix the model predicts entirely (pred_j = y_j for all j ≥ k)
    and ES = 1 − k/T, so 1 = the answer follows from the question alone. As open-unlearning's
    ``extraction_strength``, the search stops at k = T − 1, so a row without any such suffix
    scores 1/T (Wang et al.'s definition would give 0 there). nan if T = 0.
    """
    mask = targets != IGNORE
    if drop_last:
        mask = drop_last_counted(mask)
    hits = (preds == targets) | ~mask
    # suffix_ok[p]: every counted position from p on is predicted right
    suffix_ok = hits.flip(1).to(torch.int64).cumprod(1).flip(1).bool()
    T = mask.sum(1)
    index = mask.to(torch.int64).cumsum(1) - 1           # counted order of each position
    big = torch.iinfo(torch.int64).max
    first = torch.where(mask & suffix_ok, index, big).min(1).values
    k = torch.minimum(first, (T - 1).clamp(min=0)).to(torch.float64)
    es = 1 - k / T.to(torch.float64)
    return es.masked_fill(T == 0, math.nan)


__all__ = ["logprob_moments", "min_k_plus_plus", "zlib_score", "extraction_strength"]
