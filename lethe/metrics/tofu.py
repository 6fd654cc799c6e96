"""Unlearning metrics for language models, as pure functions of logits, token ids and text.

- TOFU (Maini et al., "TOFU: A Task of Fictitious Unlearning for LLMs", 2024):
  :func:`probability` of an answer = exp(−mean NLL) (length-normalised p(a|q));
  :func:`rouge_scores` of a greedy answer against the reference (Lin, 2004, with the
  ``rouge-score`` package and its Porter stemmer, as TOFU, open-unlearning and ReLearn);
  :func:`truth_ratio` R = (geometric mean over perturbed answers of exp(−NLL)) / exp(−NLL of
  the paraphrased answer), reported as TOFU does: :func:`truth_score` = max(0, 1 − R) on the
  splits the model should know and :func:`truth_closeness` = min(R, 1/R) on the forget set;
  :func:`model_utility` = harmonic mean of {prob, ROUGE, truth score} over retain /
  real-authors / world-facts; :func:`forget_quality` = p-value of the two-sample
  Kolmogorov–Smirnov test between the forget-set truth ratios of the unlearned model and of
  a model trained on the retain set only.
- Knowledge Unlearning (Jang et al., ACL 2023): :func:`memorisation_accuracy` (MA, teacher
  forced next-token accuracy) and :func:`extraction_likelihood` (EL_n, the mean n-gram
  overlap of greedy continuations of every prefix with the true suffix), built on
  :func:`greedy_generate` and :func:`ngram_overlap`.
- Min-K% Prob (Shi et al., "Detecting Pretraining Data from Large Language Models", ICLR
  2024): :func:`min_k_prob`, the mean of the lowest max(1, ⌊k·T⌋) token log-probabilities.
- MUSE (Shi et al., "MUSE: Machine Unlearning Six-Way Evaluation for Language Models",
  2024): :func:`privleak` = relative gap (in %) between the membership AUCs of the unlearned
  model and of the retrained reference, on MUSE's AUC scale (holdout = positive class).
- The other membership scores and extraction strength are in :mod:`lethe.metrics.mia`.

Conventions as in :mod:`lethe.metrics.lm`: logits ``[B, V, L]`` (vocabulary second), targets
``[B, L]`` int64 aligned with the logits (``targets[:, l]`` is the token position ``l``
predicts), ``-100`` where a position does not count (prompt, padding). The token-level
metrics (:func:`answer_nll`, :func:`min_k_prob`, :func:`memorisation_accuracy`) also take
what they reduce — per-token log-probabilities ``[B, L]`` (:func:`token_logprobs`) or argmax
ids ``[B, L]`` — so an evaluator can keep those instead of the logits: at 32k vocabulary
and 250-token answers the logits of an evaluation set are tens of gigabytes.
"""
from __future__ import annotations

import functools
import math
from collections import defaultdict

import torch

from lethe.metrics.passes import inference_pass
from lethe.metrics.unlearning import mia_auc

IGNORE = -100


def _working_dtype(logits: torch.Tensor) -> torch.Tensor:
    # float32 is enough for a per-token log-softmax and keeps [B, V, L] at half the memory
    # of float64; reductions over tokens are done in float64. float64 input stays float64.
    return logits if logits.dtype == torch.float64 else logits.float()


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per position [B, L] in float64; 0 where the target is ``-100``."""
    nll = torch.nn.functional.cross_entropy(_working_dtype(logits), targets,
                                            ignore_index=IGNORE, reduction="none")
    return -nll.to(torch.float64)


def _logprobs(logits_or_logprobs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token log-probabilities [B, L] (float64, 0 where not counted) from logits
    [B, V, L] or from per-token log-probabilities [B, L] already."""
    if logits_or_logprobs.dim() == 3:
        return token_logprobs(logits_or_logprobs, targets)
    lp = logits_or_logprobs.to(torch.float64)
    return lp.masked_fill(targets == IGNORE, 0.0)


def answer_nll(logits_or_logprobs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL [B] (float64) over the counted positions; nan for a row with none.

    Accepts logits [B, V, L] or per-token log-probabilities [B, L] (:func:`token_logprobs`).
    """
    lp = _logprobs(logits_or_logprobs, targets)
    count = (targets != IGNORE).sum(1).to(torch.float64)
    return -lp.sum(1) / count       # 0 / 0 = nan for a row with no counted position


def probability(nll: torch.Tensor) -> torch.Tensor:
    """TOFU's length-normalised answer probability exp(−mean NLL)."""
    return torch.exp(-torch.as_tensor(nll, dtype=torch.float64))


@functools.cache
def _rouge_scorer():
    from rouge_score import rouge_scorer

    # the references' setting (TOFU, open-unlearning, ReLearn): ROUGE-1 and ROUGE-L, stemmed
    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)


def rouge_scores(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE of a prediction against a reference by the ``rouge-score`` package (Lin, 2004;
    lower-cased alphanumeric tokens, Porter-stemmed): ``rougeL_recall`` (LCS / reference
    tokens), ``rouge1_recall`` (shared unigrams / reference unigrams) and ``rougeL_f1``.
    All 0.0 for an empty reference or prediction."""
    s = _rouge_scorer().score(reference, prediction)
    return {"rougeL_recall": float(s["rougeL"].recall), "rouge1_recall": float(s["rouge1"].recall),
            "rougeL_f1": float(s["rougeL"].fmeasure)}


def rouge_l_recall(prediction: str, reference: str) -> float:
    """ROUGE-L recall with the Porter stemmer (see :func:`rouge_scores`)."""
    return rouge_scores(prediction, reference)["rougeL_recall"]


def truth_ratio(perturbed_nll: torch.Tensor, paraphrased_nll: torch.Tensor) -> torch.Tensor:
    """TOFU truth ratio per item [N]: exp(nll_para − mean_k nll_k).

    perturbed_nll: [N, K] mean NLL of each perturbed answer, nan-padded for items with fewer
    than K perturbed answers (an item with none gets nan); paraphrased_nll: [N].
    The geometric mean of exp(−nll_k) is exp(−mean_k nll_k), hence the closed form.
    """
    pert = torch.as_tensor(perturbed_nll, dtype=torch.float64)
    para = torch.as_tensor(paraphrased_nll, dtype=torch.float64)
    return torch.exp(para - pert.nanmean(1))


def truth_score(ratio: torch.Tensor) -> torch.Tensor:
    """max(0, 1 − R) per item: TOFU's truth ratio as reported on the retain, real-authors and
    world-facts splits (higher = the true answer beats the perturbed ones); model utility
    uses its mean."""
    return (1 - torch.as_tensor(ratio, dtype=torch.float64)).clamp(min=0)


def truth_closeness(ratio: torch.Tensor) -> torch.Tensor:
    """min(R, 1/R) per item: TOFU's truth ratio as reported on the forget set (1 = the true
    and the perturbed answers are equally likely, as for a model that never saw them)."""
    r = torch.as_tensor(ratio, dtype=torch.float64)
    return torch.minimum(r, 1 / r)


def model_utility(values) -> float:
    """Harmonic mean of non-negative numbers: 0.0 if any is 0, nan if there are none."""
    items = values.flatten() if torch.is_tensor(values) else values
    v = torch.tensor([float(x) for x in items], dtype=torch.float64)
    if len(v) == 0:
        return float("nan")
    if (v < 0).any():
        raise ValueError("model_utility: the harmonic mean needs non-negative values, "
                         f"got {v.tolist()}")
    if (v == 0).any():
        return 0.0
    return float(len(v) / (1 / v).sum())


def forget_quality(r_unlearned, r_reference) -> float:
    """p-value of the two-sided two-sample KS test between two truth-ratio samples.

    nan entries (items without perturbed answers) are dropped; nan if either side is empty.
    High (→ 1) = the unlearned model's truth ratios are distributed like the retain-only
    model's, i.e. it looks like it never saw the forget set.
    """
    from scipy.stats import ks_2samp

    a = torch.as_tensor(r_unlearned, dtype=torch.float64).flatten()
    b = torch.as_tensor(r_reference, dtype=torch.float64).flatten()
    a, b = a[~a.isnan()], b[~b.isnan()]
    if len(a) == 0 or len(b) == 0:
        return float("nan")
    return float(ks_2samp(a.cpu().numpy(), b.cpu().numpy(), alternative="two-sided").pvalue)


def drop_last_counted(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` [B, L] without each row's last True position (the answer's EOS): what
    open-unlearning's token statistics leave out ("ignore eos prediction")."""
    pos = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, pos, -1).max(1).values
    return mask & (pos != last.unsqueeze(1))


def memorisation_accuracy(logits_or_preds: torch.Tensor, targets: torch.Tensor,
                          drop_last: bool = False) -> torch.Tensor:
    """MA per sequence [B] (float64): share of counted positions whose argmax is the target.

    Every counted position by default, the answer's EOS included (Jang et al., 2023: every
    token of the sequence); ``drop_last``: without each row's last counted position, as
    open-unlearning's ``exact_memorization`` (Tirumala et al., 2022). Accepts logits
    [B, V, L] or predicted ids [B, L]; nan for a row with no counted position.
    """
    preds = logits_or_preds.argmax(1) if logits_or_preds.dim() == 3 else logits_or_preds
    mask = targets != IGNORE
    if drop_last:
        mask = drop_last_counted(mask)
    hits = ((preds == targets) & mask).sum(1).to(torch.float64)
    return hits / mask.sum(1).to(torch.float64)


@inference_pass
def greedy_generate(model_fn, prompts: list[list[int]], max_new: int, eos: int | None = None,
                    device=None, batch_size: int | None = None) -> list[list[int]]:
    """Greedy continuations (at most ``max_new`` tokens each) of ``prompts``, in input order.

    model_fn(ids LongTensor [B, L]) -> logits [B, V, L] (or an object with ``.logits``).
    The models take no attention mask, so nothing is padded: prompts are grouped by length
    and each group decodes as one batch (split into ``batch_size`` rows if given), with a
    full forward pass per step (tiny models; no KV cache). A row stops at ``eos``, which is
    not included. ``device``: where the ids are built (the model's device).
    Put the model in eval mode first: dropout would make the decoding random.
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError("greedy_generate: every prompt needs at least one token to condition on")
    out: list[list[int]] = [[] for _ in prompts]
    if max_new <= 0:
        return out
    groups: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        groups[len(p)].append(i)
    for idx in groups.values():
        step = batch_size or len(idx)
        for s in range(0, len(idx), step):
            rows = idx[s:s + step]
            ids = torch.tensor([prompts[i] for i in rows], dtype=torch.long, device=device)
            for r, tokens in zip(rows, _decode(model_fn, ids, max_new, eos)):
                out[r] = tokens
    return out


def _decode(model_fn, ids: torch.Tensor, max_new: int, eos: int | None) -> list[list[int]]:
    done = torch.zeros(len(ids), dtype=torch.bool, device=ids.device)
    new = []
    for _ in range(max_new):
        logits = model_fn(ids)
        logits = getattr(logits, "logits", logits)
        nxt = logits[:, :, -1].argmax(1)
        new.append(nxt)
        if eos is not None:
            done |= nxt == eos
            if bool(done.all()):
                break
        ids = torch.cat([ids, nxt.unsqueeze(1)], 1)
    gen = torch.stack(new, 1).tolist()
    if eos is None:
        return gen
    return [row[:row.index(eos)] if eos in row else row for row in gen]


def _ngrams(seq: list[int], n: int) -> list[tuple]:
    return [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]


def ngram_overlap(generated: list[int], reference: list[int], n: int) -> float:
    """Jang et al.'s OVERLAP_n: share of the generated n-grams found among the reference's
    n-grams (with multiplicity on the generated side); 0.0 if fewer than n tokens."""
    gen = _ngrams(list(generated), n)
    if not gen:
        return 0.0
    ref = set(_ngrams(list(reference), n))
    return sum(g in ref for g in gen) / len(gen)


def extraction_likelihood(model_fn, sequences: list[list[int]], n: int = 10, stride: int = 1,
                          max_new: int = 0, device=None,
                          batch_size: int | None = None) -> torch.Tensor:
    """EL_n per sequence [N] (float64; Jang et al., 2023).

    For each prefix length t in range(1, T − n + 1, stride): the n-gram overlap of the
    greedy continuation of x[:t] (T − t tokens, at most ``max_new`` if > 0) with x[t:];
    EL_n is their mean. Sequences shorter than n + 1 tokens give nan.
    Decoding is batched across sequences: one :func:`greedy_generate` call per prefix
    length, decoding as far as the longest need and truncating the others (a greedy
    continuation's first m tokens do not depend on how far it goes on).
    """
    def need(T: int, t: int) -> int:
        return min(T - t, max_new) if max_new > 0 else T - t

    by_t: dict[int, list[int]] = defaultdict(list)
    for i, x in enumerate(sequences):
        for t in range(1, len(x) - n + 1, stride):
            by_t[t].append(i)
    scores: list[list[float]] = [[] for _ in sequences]
    for t, rows in sorted(by_t.items()):
        steps = max(need(len(sequences[i]), t) for i in rows)
        conts = greedy_generate(model_fn, [list(sequences[i][:t]) for i in rows], steps,
                                device=device, batch_size=batch_size)
        for i, c in zip(rows, conts):
            x = list(sequences[i])
            scores[i].append(ngram_overlap(c[:need(len(x), t)], x[t:], n))
    return torch.tensor([sum(s) / len(s) if s else math.nan for s in scores], dtype=torch.float64)


def min_k_prob(logits_or_logprobs: torch.Tensor, targets: torch.Tensor, k: float = 0.4,
               drop_last: bool = True) -> torch.Tensor:
    """Min-K% Prob per sequence [B] (float64; Shi et al., ICLR 2024): mean of the
    n = max(1, ⌊k·T⌋) lowest token log-probabilities over the T counted positions of the row,
    ⌊k·T⌋ taken in float64 as the references' ``int(len · k)``; nan if T = 0.

    ``drop_last``: the row's last counted position (the answer's EOS) is left out first, as
    open-unlearning's token statistics do; k = 0.4 is MUSE's and open-unlearning's default.
    Higher = more likely seen in training (the references report its negation as the attack
    score). Accepts logits [B, V, L] or per-token log-probabilities [B, L]."""
    if not 0 < k <= 1:
        raise ValueError(f"min_k_prob: k must be in (0, 1], got {k}")
    lp = _logprobs(logits_or_logprobs, targets)
    mask = targets != IGNORE
    if drop_last:
        mask = drop_last_counted(mask)
    return lowest_k_mean(lp, mask, k)


def lowest_k_mean(values: torch.Tensor, mask: torch.Tensor, k: float) -> torch.Tensor:
    """Mean per row of the max(1, ⌊k·T⌋) lowest ``values`` [B, L] where ``mask`` (T of them);
    nan for a row with T = 0."""
    T = mask.sum(1)
    n = torch.floor(k * T.to(torch.float64)).clamp(min=1).minimum(T.clamp(min=1).to(torch.float64))
    low = values.to(torch.float64).masked_fill(~mask, math.inf).sort(1).values   # uncounted last
    take = torch.arange(values.shape[1], device=values.device).unsqueeze(0) < n.unsqueeze(1)
    out = low.masked_fill(~take, 0).sum(1) / n
    return out.masked_fill(T == 0, math.nan)


def mink_auc(member_scores, nonmember_scores) -> float:
    """AUC of a membership attack whose score is higher for members (Min-K%, Min-K%++):
    P(member's score > non-member's score), ties counting half; rows with a nan score are
    left out. :func:`~lethe.metrics.unlearning.mia_auc` takes losses (lower = member), so the
    scores are negated. For PrivLeak, members = the forget set, non-members = held-out data.
    This is open-unlearning's ``mia_*`` AUC (it labels the holdout 1 on a loss-like score)."""
    m = torch.as_tensor(member_scores, dtype=torch.float64)
    nm = torch.as_tensor(nonmember_scores, dtype=torch.float64)
    return mia_auc(-m[~m.isnan()], -nm[~nm.isnan()])


def privleak(auc_unlearned: float, auc_reference: float) -> float:
    """MUSE PrivLeak in % (Shi et al., 2024) from two membership AUCs on the usual scale
    (forget = positive class, as :func:`mink_auc`): MUSE's AUC is 1 − that one (holdout =
    positive), and PrivLeak = (AUC'_unlearned − AUC'_retrained) / AUC'_retrained · 100 on it,
    i.e. (AUC_r − AUC_u) / (1 − AUC_r) · 100 here — open-unlearning's ``privleak``.
    0 = as private as retraining; a model that still remembers the forget set (AUC_u → 1
    against a retrained 0.5) reads −100; > 0 = over-unlearned. nan when AUC_r = 1."""
    muse_u, muse_r = 1 - auc_unlearned, 1 - auc_reference
    if muse_r == 0:
        return float("nan")
    return (muse_u - muse_r) / muse_r * 100
