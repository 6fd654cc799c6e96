"""lethe's LLM-unlearning metrics against the reference implementations' definitions.

Each test derives its expected value by hand from the paper / reference code's definition (in
the comment), or from a per-row plain-python re-implementation of the reference's loop (one
sample at a time, numpy, labels in the Hugging Face layout the references use), never from
lethe's own vectorised code. The smallest disagreeing cases of issue 19 are here.
"""
from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch

from lethe.metrics import mia
from lethe.metrics import tofu as M
from lethe.metrics.unlearning import mia_auc

IGN = -100


def _two_way_logits(probs, targets):
    """V = 2 logits whose softmax gives the target token probability p at each position."""
    p = torch.tensor(probs, dtype=torch.float64)
    t = targets.clamp(min=0)
    logits = torch.empty(p.shape[0], 2, p.shape[1], dtype=torch.float64)
    logits.scatter_(1, t.unsqueeze(1), p.log().unsqueeze(1))
    logits.scatter_(1, (1 - t).unsqueeze(1), (1 - p).log().unsqueeze(1))
    return logits


# --- Min-K% (issue 19, item 4) ---------------------------------------------------------------

def test_min_k_issue_example_drops_the_eos_and_floors():
    # answer log-probs [-0.02, -0.02, -5.02] then the EOS (-0.02). open-unlearning drops the EOS:
    # T = 3, n = max(1, int(0.4 · 3)) = 1 -> the lowest, -5.02. (lethe before: ceil(0.4 · 4) = 2
    # of the 4 with the EOS -> (-5.02 - 0.02) / 2 = -2.52)
    lp = torch.tensor([[-0.02, -0.02, -5.02, -0.02]], dtype=torch.float64)
    targets = torch.tensor([[1, 1, 1, 1]])
    assert M.min_k_prob(lp, targets, k=0.4).item() == pytest.approx(-5.02, abs=1e-12)
    assert M.min_k_prob(lp, targets).item() == pytest.approx(-5.02, abs=1e-12)   # default k = 0.4


# --- truth ratio as reported (item 2) ----------------------------------------------------

def test_truth_ratio_aggregates_as_tofu_reports_them():
    # R = P_pert / P_para per item; two items: R = 4 and R = 1/2.
    # TOFU forget: mean min(R, 1/R) = (1/4 + 1/2)/2 = 3/8; the mean of R would be 2.25.
    # Others: mean max(0, 1 - R) = (0 + 1/2)/2 = 1/4.
    para = torch.tensor([2.0, 1.0], dtype=torch.float64)                  # NLLs
    pert = torch.tensor([[2.0 - math.log(4)], [1.0 + math.log(2)]], dtype=torch.float64)
    R = M.truth_ratio(pert, para)
    assert R.tolist() == pytest.approx([4.0, 0.5])
    assert float(M.truth_closeness(R).mean()) == pytest.approx(3 / 8)
    assert float(M.truth_score(R).mean()) == pytest.approx(1 / 4)
    assert float(R.mean()) == pytest.approx(2.25)


# --- memorisation accuracy with and without EOS (item 5) ----------------------------------------

def test_memorisation_accuracy_variants_on_a_two_token_answer():
    # answer "x" + EOS; the model gets x right and the EOS wrong: Jang et al. (every position)
    # 1/2; open-unlearning's EM (EOS left out) 1/1 — 0.5 apart, as the issue reports
    preds, targets = torch.tensor([[5, 0]]), torch.tensor([[5, 9]])
    assert M.memorisation_accuracy(preds, targets).item() == 0.5
    assert M.memorisation_accuracy(preds, targets, drop_last=True).item() == 1.0


# --- extraction strength -----------------------------------------------------------------

def test_extraction_strength_by_hand():
    # 4 answer tokens then the EOS (left out): ES = 1 − k/4, k = first index whose suffix the
    # argmax reproduces; open-unlearning stops its search at k = T − 1 = 3
    t = [1, 2, 3, 4, 9]
    rows = [([1, 2, 3, 4, 9], 1.0),      # all right: k = 0
            ([0, 2, 3, 4, 9], 0.75),     # first wrong: k = 1
            ([1, 0, 3, 4, 9], 0.5),      # second wrong: k = 2
            ([1, 2, 3, 0, 9], 0.25),     # last answer token wrong: no suffix, k stops at 3
            ([1, 2, 3, 4, 0], 1.0)]      # only the EOS wrong: it is not counted
    preds = torch.tensor([p for p, _ in rows])
    targets = torch.tensor([t] * len(rows))
    assert mia.extraction_strength(preds, targets).tolist() == [es for _, es in rows]
    # prompt positions (-100) before the answer do not count
    padded = torch.tensor([[IGN, IGN, 1, 2, 3, 4, 9]])
    assert mia.extraction_strength(torch.tensor([[7, 7, 0, 2, 3, 4, 9]]), padded).item() == 0.75
    assert math.isnan(mia.extraction_strength(torch.tensor([[1]]), torch.tensor([[1]])).item())


def _reference_es(pred: list[int], label: list[int]) -> float:
    """open-unlearning's loop, one answer (EOS already left out)."""
    for k in range(len(label)):
        if pred[k:] == label[k:]:
            break
    return 1 - k / len(label)


def test_extraction_strength_matches_the_reference_loop_on_random_rows():
    g = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 3, (200, 6), generator=g)
    preds = torch.where(torch.rand(200, 6, generator=g) < 0.7, targets, (targets + 1) % 3)
    want = [_reference_es(p[:-1], t[:-1]) for p, t in zip(preds.tolist(), targets.tolist())]
    assert mia.extraction_strength(preds, targets).tolist() == pytest.approx(want, abs=1e-15)


# --- Min-K%++ ----------------------------------------------------------------------------

def test_logprob_moments_of_a_two_way_distribution():
    # p = (0.8, 0.2): μ = 0.8 ln 0.8 + 0.2 ln 0.2; σ² = p(1−p)(ln p − ln(1−p))² = 0.16 (ln 4)²
    logits = torch.log(torch.tensor([[[0.8], [0.2]]]))
    mu, var = mia.logprob_moments(logits)
    assert mu.item() == pytest.approx(0.8 * math.log(0.8) + 0.2 * math.log(0.2), abs=1e-6)
    assert var.item() == pytest.approx(0.16 * math.log(4) ** 2, abs=1e-6)


def test_min_k_plus_plus_by_hand():
    # V = 2, target probability p: z = (ln p − μ)/σ = sign(p − ½) · sqrt((1 − p)/p).
    # p = 0.8 -> ½; p = 0.2 -> −2; p = 0.9 -> ⅓; the EOS (p = 0.5) is left out. T = 3.
    targets = torch.tensor([[0, 1, 0, 1]])
    logits = _two_way_logits([[0.8, 0.2, 0.9, 0.5]], targets)
    lp = M.token_logprobs(logits, targets)
    mu, var = mia.logprob_moments(logits)
    # k = 0.4: n = max(1, int(1.2)) = 1 -> −2; k = 1: (½ − 2 + ⅓)/3 = −7/18
    assert mia.min_k_plus_plus(lp, mu, var, targets, 0.4).item() == pytest.approx(-2.0, abs=1e-5)
    assert mia.min_k_plus_plus(lp, mu, var, targets, 1.0).item() == pytest.approx(-7 / 18, abs=1e-5)


def _reference_min_k_pp(logits_row: np.ndarray, labels: list[int], k: float) -> float:
    """open-unlearning's MinKPlusPlusAttack.compute_score on one answer (HF layout: logits
    [L, V] at input positions, labels aligned with inputs, the last labelled token dropped),
    returned with the opposite sign (lethe: higher = member)."""
    logp = logits_row - np.log(np.exp(logits_row).sum(-1, keepdims=True))
    idx = [i for i, t in enumerate(labels) if t != IGN][:-1]
    rows = [i - 1 for i in idx]                      # position i - 1 predicts token i
    vocab = logp[rows]
    target = np.array([logp[r, labels[i]] for r, i in zip(rows, idx)])
    mu = (np.exp(vocab) * vocab).sum(-1)
    sigma = np.clip((np.exp(vocab) * vocab ** 2).sum(-1) - mu ** 2, 1e-6, None)
    scores = (target - mu) / np.sqrt(sigma)
    n = max(1, int(len(scores) * k))
    return float(np.mean(sorted(scores)[:n]))


def _reference_min_k(logits_row: np.ndarray, labels: list[int], k: float) -> float:
    logp = logits_row - np.log(np.exp(logits_row).sum(-1, keepdims=True))
    idx = [i for i, t in enumerate(labels) if t != IGN][:-1]
    lp = np.sort([logp[i - 1, labels[i]] for i in idx])
    return float(np.mean(lp[:max(1, int(len(lp) * k))]))


def test_min_k_and_min_k_plus_plus_match_the_reference_loops_on_random_logits():
    g = torch.Generator().manual_seed(1)
    B, V, L = 12, 7, 9
    logits = torch.randn(B, V, L, generator=g, dtype=torch.float64) * 2
    targets = torch.randint(0, V, (B, L), generator=g)
    for b in range(B):                               # a prompt of b % 3 positions, then the answer
        targets[b, :b % 3 + 1] = IGN
    lp = M.token_logprobs(logits, targets)
    mu, var = mia.logprob_moments(logits.double())
    for k in (0.2, 0.4, 1.0):
        got = mia.min_k_plus_plus(lp, mu.double(), var.double(), targets, k)
        got_mk = M.min_k_prob(logits, targets, k)
        for b in range(B):
            # HF layout: input ids x_0..x_L, labels[i] = x_i; lethe's targets[:, l] = x_{l+1}
            labels = [IGN] + targets[b].tolist()
            row = np.concatenate([logits[b].T.numpy(), np.zeros((1, V))])   # logits at x_0..x_L
            assert got[b].item() == pytest.approx(_reference_min_k_pp(row, labels, k), abs=1e-5), (k, b)
            assert got_mk[b].item() == pytest.approx(_reference_min_k(row, labels, k), abs=1e-12), (k, b)


# --- zlib ---------------------------------------------------------------------------------

def test_zlib_score_divides_the_loss_by_the_compressed_length():
    # Carlini et al.'s zlib entropy = bytes of zlib.compress(text); equal losses, and the less
    # compressible (longer) member text scores lower = more member-like
    member, other = "Kavel Mordane wrote The Hollow Lantern in 1980.", "yes yes yes yes"
    n_m, n_o = len(zlib.compress(member.encode())), len(zlib.compress(other.encode()))
    assert n_m > n_o
    got = mia.zlib_score([2.0, 2.0], [member, other])
    assert got.tolist() == pytest.approx([2.0 / n_m, 2.0 / n_o])
    # LOSS cannot separate them (a tie: AUC 0.5), zlib can (AUC 1)
    assert mia_auc([2.0], [2.0]) == 0.5
    assert mia_auc(got[:1], got[1:]) == 1.0
    with pytest.raises(ValueError, match="2 losses for 1 texts"):
        mia.zlib_score([1.0, 2.0], ["a"])
