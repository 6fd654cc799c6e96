"""LLM unlearning metrics (lethe.metrics.tofu) against hand-worked examples and plain-python
references."""
from __future__ import annotations

import math

import pytest
import torch

from lethe.metrics import tofu as M

IGN = -100


# ---------------------------------------------------------------- NLL, probability

def _loop_nll(logits, targets):
    """Plain-python reference: mean over counted positions of −log softmax(logits)[target]."""
    B, V, L = logits.shape
    out = []
    for b in range(B):
        terms = []
        for pos in range(L):
            t = int(targets[b, pos])
            if t == IGN:
                continue
            col = [float(logits[b, v, pos]) for v in range(V)]
            log_z = math.log(sum(math.exp(c) for c in col))
            terms.append(log_z - col[t])
        out.append(sum(terms) / len(terms) if terms else math.nan)
    return out


def test_answer_nll_matches_python_loop_and_ignores_masked_positions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 5, generator=g, dtype=torch.float64) * 3
    targets = torch.randint(0, 7, (3, 5), generator=g)
    targets[0, :2] = IGN                  # prompt positions
    targets[1, 4] = IGN                   # padding
    targets[2, :] = IGN                   # nothing counts -> nan
    got = M.answer_nll(logits, targets)
    ref = _loop_nll(logits, targets)
    assert got.dtype == torch.float64
    for a, b in zip(got.tolist()[:2], ref[:2]):
        assert abs(a - b) < 1e-12
    assert math.isnan(got[2])
    # float32 logits (a real model's) agree to float32 precision
    got32 = M.answer_nll(logits.float(), targets)
    assert torch.allclose(got32[:2], got[:2], atol=1e-5)


def test_uniform_logits_give_probability_one_over_vocab():
    # all-zero logits over V = 4: every counted token has NLL log 4 -> p = exp(-log 4) = 1/4
    logits = torch.zeros(1, 4, 6)
    targets = torch.tensor([[IGN, IGN, 0, 3, 1, IGN]])
    nll = M.answer_nll(logits, targets)
    assert abs(nll.item() - math.log(4)) < 1e-6
    assert abs(M.probability(nll).item() - 0.25) < 1e-6


# ---------------------------------------------------------------- ROUGE-L

def test_rouge_l_recall_on_the_cat_sat():
    # LCS("the cat sat", "the cat sat on the mat") = 3 of 6 reference words
    assert M.rouge_l_recall("the cat sat", "the cat sat on the mat") == 0.5
    # case and punctuation are dropped by the tokeniser: 3 / 3
    assert M.rouge_l_recall("The cat, sat!", "the cat sat") == 1.0
    # "sat the cat" vs "the cat sat": LCS = "the cat" -> 2 / 3
    assert M.rouge_l_recall("sat the cat", "the cat sat") == pytest.approx(2 / 3)
    # subsequence, not substring: "the ... sat" with words between -> LCS 2, reference 2
    assert M.rouge_l_recall("the big black cat quietly sat", "the sat") == 1.0
    # recall, not precision: a longer prediction containing the reference scores 1
    assert M.rouge_l_recall("yes the cat sat down", "cat sat") == 1.0
    assert M.rouge_l_recall("", "the cat sat") == 0.0
    assert M.rouge_l_recall("the cat sat", "") == 0.0
    assert M.rouge_l_recall("dog ran", "the cat sat") == 0.0


def test_rouge_is_stemmed_as_the_references():
    # Porter stemmer (rouge-score, use_stemmer=True, as TOFU / open-unlearning / ReLearn):
    # "books" -> "book" (step 1a drops the plural s): 1 of 1; unstemmed it would be 0
    assert M.rouge_l_recall("book", "books") == 1.0
    # "running" -> "run" (1b: -ing, then the double n undoubled), "runs" -> "run": LCS 2 / 2
    assert M.rouge_l_recall("dogs running", "dog runs") == 1.0


def test_rouge1_recall_and_rouge_l_f1_by_hand():
    got = M.rouge_scores("the cat sat", "the cat sat on the mat")
    # ROUGE-1 recall: reference unigrams the×2, cat, sat, on, mat (6); clipped overlap
    # the×1 + cat + sat = 3 -> 3/6. ROUGE-L: P = 3/3, R = 3/6 -> F1 = 2·1·0.5 / 1.5 = 2/3
    assert got == pytest.approx({"rougeL_recall": 0.5, "rouge1_recall": 0.5, "rougeL_f1": 2 / 3})
    # order matters for L, not for 1: "sat the cat" vs "the cat sat": unigrams 3/3, LCS 2/3
    # (P = R = 2/3 -> F1 = 2/3)
    got = M.rouge_scores("sat the cat", "the cat sat")
    assert got == pytest.approx({"rougeL_recall": 2 / 3, "rouge1_recall": 1.0, "rougeL_f1": 2 / 3})


# ---------------------------------------------------------------- truth ratio, utility

def test_truth_ratio_with_nan_padding_and_truth_score():
    nan = math.nan
    pert = torch.tensor([[1.0, 2.0, 3.0], [0.5, nan, nan], [nan, nan, nan]])
    para = torch.tensor([1.5, 1.0, 1.0])
    r = M.truth_ratio(pert, para)
    # item 0: geometric mean of exp(-1), exp(-2), exp(-3) = exp(-2); / exp(-1.5) = exp(-0.5)
    gm = (math.exp(-1) * math.exp(-2) * math.exp(-3)) ** (1 / 3)
    assert abs(r[0].item() - gm / math.exp(-1.5)) < 1e-12
    assert abs(r[0].item() - math.exp(-0.5)) < 1e-12
    # item 1: one perturbed answer only: exp(-0.5) / exp(-1.0) = exp(0.5)
    assert abs(r[1].item() - math.exp(0.5)) < 1e-12
    assert math.isnan(r[2])                      # no perturbed answer at all
    s = M.truth_score(r)
    assert abs(s[0].item() - (1 - math.exp(-0.5))) < 1e-12      # 0.3935
    assert s[1].item() == 0.0                                   # 1 - e^0.5 < 0 -> 0
    # the forget-set aggregate min(R, 1/R): e^-0.5 and e^0.5 are both e^-0.5 from 1
    c = M.truth_closeness(r)
    assert abs(c[0].item() - math.exp(-0.5)) < 1e-12 and abs(c[1].item() - math.exp(-0.5)) < 1e-12
    assert math.isnan(c[2]) and M.truth_closeness(torch.tensor([1.0])).item() == 1.0


def test_model_utility_is_the_harmonic_mean():
    # 3 / (1/0.5 + 1/0.25 + 1/1) = 3 / 7
    assert M.model_utility([0.5, 0.25, 1.0]) == pytest.approx(3 / 7)
    assert M.model_utility(torch.tensor([0.5, 0.25, 1.0])) == pytest.approx(3 / 7)
    assert M.model_utility([0.9, 0.0, 0.8]) == 0.0
    assert math.isnan(M.model_utility([]))
    with pytest.raises(ValueError):
        M.model_utility([0.5, -0.1])


# ---------------------------------------------------------------- forget quality

def test_forget_quality_is_one_for_identical_samples():
    r = [0.3, 0.5, 0.7, 0.9, 1.1]
    assert M.forget_quality(r, list(r)) == 1.0


def test_forget_quality_exact_small_samples():
    # a = {1,2,3}, b = {4,5,6}: D = 1. Under H0 each of the C(6,3) = 20 orderings is equally
    # likely; only the two fully separated ones reach D = 1, so the exact p-value is 2/20.
    assert M.forget_quality([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == pytest.approx(0.1)


def test_forget_quality_is_scipy_ks_p_value_with_hand_statistic():
    from scipy.stats import ks_2samp

    a = [0.1, 0.2, 0.3, 0.4]
    b = [0.25, 0.35, 0.5, 0.6, 0.7]
    # F_a - F_b after each point of the merged order:
    # 0.1: 1/4 - 0 = .25; 0.2: .5 - 0 = .5; 0.25: .5 - .2 = .3; 0.3: .75 - .2 = .55;
    # 0.35: .75 - .4 = .35; 0.4: 1 - .4 = .6; then F_a = 1 and F_b rises -> D = 0.6
    res = ks_2samp(a, b)
    assert res.statistic == pytest.approx(0.6)
    assert M.forget_quality(a, b) == pytest.approx(res.pvalue, abs=1e-15)
    # nan truth ratios (items without perturbed answers) are dropped, not compared
    assert M.forget_quality(a + [math.nan], b) == pytest.approx(res.pvalue, abs=1e-15)


# ---------------------------------------------------------------- memorisation accuracy

def test_memorisation_accuracy_from_ids_and_from_logits():
    preds = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8], [1, 1, 1, 1]])
    targets = torch.tensor([[1, 0, 3, IGN],          # 2 hits of 3 counted
                            [IGN, IGN, IGN, IGN],    # nothing counts -> nan
                            [1, 2, 1, 1]])           # 3 of 4
    ma = M.memorisation_accuracy(preds, targets)
    assert ma[0].item() == pytest.approx(2 / 3)
    assert math.isnan(ma[1])
    assert ma[2].item() == 0.75
    logits = torch.nn.functional.one_hot(preds, 10).float().transpose(1, 2)   # [B, V, L]
    assert torch.equal(M.memorisation_accuracy(logits, targets).nan_to_num(-1),
                       ma.nan_to_num(-1))


def test_memorisation_accuracy_without_the_eos_position():
    # open-unlearning's exact memorisation leaves each row's last counted position (the EOS) out
    preds = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8], [1, 9, 1, 1]])
    targets = torch.tensor([[1, 0, 3, IGN],          # counted 1, 0, 3 -> 1, 0: 1 hit of 2
                            [IGN, IGN, IGN, 8],      # only the EOS counts -> nothing left: nan
                            [1, 2, 1, 5]])           # 1, 2, 1 (5 dropped): 2 of 3
    em = M.memorisation_accuracy(preds, targets, drop_last=True)
    assert em[0].item() == 0.5 and math.isnan(em[1]) and em[2].item() == pytest.approx(2 / 3)
    # Jang et al.'s MA counts the EOS: 2/3, 1, 2/4
    assert M.memorisation_accuracy(preds, targets).tolist() == pytest.approx([2 / 3, 1.0, 0.5])


# ---------------------------------------------------------------- greedy generation

V = 10


def _first_plus_length_model(calls):
    """Predicts (first token + current length) % V: any padding (which changes the first
    token or the length) changes the prediction."""
    def model_fn(ids):
        calls.append(tuple(ids.shape))
        nxt = (ids[:, 0] + ids.shape[1]) % V
        return torch.nn.functional.one_hot(nxt, V).float().unsqueeze(2).expand(-1, -1, ids.shape[1])
    return model_fn


def test_greedy_generate_mixed_lengths_in_order_without_padding():
    calls = []
    prompts = [[3, 4], [7], [1, 2, 5], [2]]
    out = M.greedy_generate(_first_plus_length_model(calls), prompts, max_new=3)
    # [3,4]: 3+2=5, 3+3=6, 3+4=7 | [7]: 8, 9, 10%10=0 | [1,2,5]: 1+3=4, 5, 6 | [2]: 3, 4, 5
    assert out == [[5, 6, 7], [8, 9, 0], [4, 5, 6], [3, 4, 5]]
    # one batch per prompt length, 3 full forward passes each, growing by one token a step
    assert sorted(calls) == sorted([(2, 1), (2, 2), (2, 3),      # [7], [2]
                                    (1, 2), (1, 3), (1, 4),      # [3, 4]
                                    (1, 3), (1, 4), (1, 5)])     # [1, 2, 5]


def test_greedy_generate_stops_each_row_at_eos():
    calls = []
    prompts = [[3, 4], [7], [1, 2, 5], [2], [8]]
    out = M.greedy_generate(_first_plus_length_model(calls), prompts, max_new=3, eos=9)
    # [7] -> 8 then 9 = eos: [8]; [8] -> 8+1 = 9 = eos at once: []; [2] never meets 9
    assert out == [[5, 6, 7], [8], [4, 5, 6], [3, 4, 5], []]
    assert M.greedy_generate(_first_plus_length_model([]), prompts, max_new=0) == [[]] * 5


def test_greedy_generate_stops_decoding_when_the_whole_group_hit_eos():
    calls = []
    out = M.greedy_generate(_first_plus_length_model(calls), [[8], [7]], max_new=5, eos=9)
    # step 1: [8] -> 9 (eos), [7] -> 8; step 2: [7, 8] -> 9 (eos): all done after 2 passes
    assert out == [[], [8]]
    assert calls == [(2, 1), (2, 2)]


# ---------------------------------------------------------------- n-gram overlap, EL_n

def test_ngram_overlap_counts_generated_ngrams_found_in_reference():
    # reference bigrams {12, 23, 34, 45, 51}; generated 12, 23, 35 -> 2 / 3
    assert M.ngram_overlap([1, 2, 3, 5], [2, 3, 4, 5, 1, 2], 2) == pytest.approx(2 / 3)
    assert M.ngram_overlap([1, 2, 3, 4], [2, 3, 4, 5, 1, 2], 2) == 1.0
    # multiplicity on the generated side: 12, 21, 12 against {12} -> 2 / 3
    assert M.ngram_overlap([1, 2, 1, 2], [1, 2], 2) == pytest.approx(2 / 3)
    assert M.ngram_overlap([1], [1, 2], 2) == 0.0
    assert M.ngram_overlap([4, 5, 6], [4, 5, 6], 3) == 1.0


# next-token table: t -> t + 1 (mod 10), except 2 -> 7
TABLE = torch.tensor([1, 2, 7, 4, 5, 6, 7, 8, 9, 0])


def _table_model(calls):
    def model_fn(ids):
        calls.append(tuple(ids.shape))
        return torch.nn.functional.one_hot(TABLE[ids], V).double().transpose(1, 2)   # [B, V, L]
    return model_fn


def test_extraction_likelihood_on_a_next_token_table_model():
    x = [0, 1, 2, 3, 4, 5]      # T = 6, n = 2: prefixes t = 1..4
    y = [3, 4, 5, 6, 7]         # T = 5: prefixes t = 1..3
    short = [1, 2]              # T = 2 < n + 1 -> nan
    calls = []
    el = M.extraction_likelihood(_table_model(calls), [x, y, short], n=2)
    # x, t=1: [0] -> 1 2 7 8 9 vs 1 2 3 4 5: bigrams 12 27 78 89, only 12 in ref -> 1/4
    #    t=2: [0 1] -> 2 7 8 9 vs 2 3 4 5 -> 0/3;  t=3: [.. 2] -> 7 8 9 vs 3 4 5 -> 0/2
    #    t=4: [.. 3] -> 4 5 vs 4 5 -> 1/1.   EL = (1/4 + 0 + 0 + 1) / 4 = 0.3125
    # y: the table follows y everywhere (3 4 5 6 7): every overlap is 1 -> EL = 1
    assert el[0].item() == pytest.approx(0.3125)
    assert el[1].item() == 1.0
    assert math.isnan(el[2])
    # decoding is batched across sequences: x and y share the prefixes t = 1, 2, 3
    assert max(b for b, _ in calls) == 2
    # stride 2: t = 1, 3 -> (1/4 + 0) / 2
    assert M.extraction_likelihood(_table_model([]), [x], n=2, stride=2)[0].item() == 0.125
    # max_new = 2: t=1: 1 2 -> 1/1; t=2: 2 7 -> 0; t=3: 7 8 -> 0; t=4: 4 5 -> 1 -> EL 0.5
    assert M.extraction_likelihood(_table_model([]), [x], n=2, max_new=2)[0].item() == 0.5


# ---------------------------------------------------------------- Min-K% prob, PrivLeak

def _logits_with_token_probs(probs, targets):
    """V = 2 logits whose softmax gives the target token probability p at each position."""
    p = torch.tensor(probs, dtype=torch.float64)
    t = targets.clamp(min=0)
    logits = torch.empty(p.shape[0], 2, p.shape[1], dtype=torch.float64)
    logits.scatter_(1, t.unsqueeze(1), p.log().unsqueeze(1))
    logits.scatter_(1, (1 - t).unsqueeze(1), (1 - p).log().unsqueeze(1))
    return logits


def test_min_k_prob_with_ties_and_masked_positions():
    targets = torch.tensor([[0, 1, 0, 1, 0],
                            [1, IGN, 0, 0, IGN],
                            [IGN, IGN, IGN, IGN, IGN],
                            [IGN, IGN, IGN, IGN, 1]])
    probs = [[0.5, 0.25, 0.25, 0.9, 0.8],
             [0.5, 0.3, 0.1, 0.1, 0.3],      # positions 1 and 4 do not count
             [0.5, 0.5, 0.5, 0.5, 0.5],
             [0.5, 0.5, 0.5, 0.5, 0.5]]
    logits = _logits_with_token_probs(probs, targets)
    l = math.log
    # n = max(1, floor(k·T)) after the last counted position (EOS) is dropped.
    # row 0: .8 dropped, T = 4 (.5 .25 .25 .9). k = .2: floor(.8) -> 1: log .25; k = .4:
    # floor(1.6) = 1; k = .5: 2 -> the tie; k = .75: 3 -> adds log .5; k = 1: all four
    # row 1: counted .5, .1, .1; the last .1 dropped -> T = 2: n = 1 up to k = .75, 2 at k = 1
    expect = {0.2: [l(.25), l(.1)], 0.4: [l(.25), l(.1)], 0.5: [l(.25), l(.1)],
              0.75: [(2 * l(.25) + l(.5)) / 3, l(.1)],
              1.0: [(l(.5) + 2 * l(.25) + l(.9)) / 4, (l(.5) + l(.1)) / 2]}
    for k, (r0, r1) in expect.items():
        got = M.min_k_prob(logits, targets, k)
        assert got[0].item() == pytest.approx(r0, abs=1e-12), k
        assert got[1].item() == pytest.approx(r1, abs=1e-12), k
        assert math.isnan(got[2]) and math.isnan(got[3])   # nothing counted / only the EOS
    # with the EOS kept, row 0 has T = 5: k = .4 -> floor(2) = 2 -> the tie of log .25
    assert M.min_k_prob(logits, targets, 0.4, drop_last=False)[0].item() == pytest.approx(l(.25))
    assert M.min_k_prob(logits, targets, 1.0, drop_last=False)[3].item() == pytest.approx(l(.5))


def test_min_k_count_is_the_references_int_of_k_times_t():
    # open-unlearning / Shi et al. take int(len · k) in float64: 0.57 · 100 = 56.99999999999999
    # -> 56 tokens (and 0.28 · 25 = 7.000000000000001 -> 7). The reference's own formula:
    for k, T in ((0.57, 100), (0.28, 25)):
        n = max(1, int(T * k))
        lp = torch.tensor([[-float(i + 1) for i in range(T)]], dtype=torch.float64)
        targets = torch.zeros(1, T, dtype=torch.long)
        got = M.min_k_prob(lp, targets, k, drop_last=False).item()
        assert got == pytest.approx(-sum(range(T - n + 1, T + 1)) / n, abs=1e-12), (k, T, n)
    assert max(1, int(100 * 0.57)) == 56


def test_mink_auc_and_privleak():
    # member scores (log-probs, higher = member) vs non-members, pairs:
    # -1 > -3, -1 > -2, -2 > -3, -2 = -2 (half) -> 3.5 / 4
    assert M.mink_auc([-1.0, -2.0], [-3.0, -2.0]) == 0.875
    assert M.mink_auc([-5.0], [-1.0]) == 0.0
    assert M.mink_auc([-1.0, math.nan], [-3.0]) == 1.0        # a row without tokens is left out
    # MUSE: AUC' = 1 − AUC; PrivLeak = (AUC'_u − AUC'_r) / AUC'_r · 100
    # not unlearned: AUC 1.0 vs retrained 0.5 -> (0 − 0.5) / 0.5 = −100
    assert M.privleak(1.0, 0.5) == -100.0
    # 0.9 vs 0.6 -> (0.1 − 0.4) / 0.4 = −75 (the old formula gave (0.9 − 0.6) / 0.6 = +50)
    assert M.privleak(0.9, 0.6) == pytest.approx(-75.0)
    # over-unlearned: 0.3 vs 0.5 -> (0.7 − 0.5) / 0.5 = +40
    assert M.privleak(0.3, 0.5) == pytest.approx(40.0)
    assert M.privleak(0.5, 0.5) == 0.0
    assert math.isnan(M.privleak(0.7, 1.0))                  # AUC'_r = 0: undefined
