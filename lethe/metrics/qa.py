"""Evaluation of LLM unlearning on TOFU-style QA streams (``Stream.task_type == "qa"``).

At every evaluation point :class:`QAEvaluator` runs the evaluated model over the evaluation
splits of lethe/scenarios/tofu.py and logs, under ``unlearn/*`` (definitions in
lethe/metrics/tofu.py and lethe/metrics/knowledge.py, documented in docs/metrics.md):

- TOFU (Maini et al., 2024): per split (forget, retain, real_authors, world_facts) the answer
  probability (and those of the paraphrased and perturbed answers), ROUGE of the greedy answer
  (ROUGE-L recall, ROUGE-1 recall, ROUGE-L F1; stemmed, by ``rouge-score``) and the truth ratio
  as TOFU reports it (mean min(R, 1/R) on forget and unseen, mean max(0, 1 − R) elsewhere;
  the mean of R itself under ``<split>_truth_ratio_raw``); ``model_utility`` = harmonic mean
  of {prob, ROUGE-L recall, truth ratio} over retain / real_authors / world_facts;
  ``forget_quality`` = KS-test p-value between the forget-set truth ratios of the evaluated
  model and of a retain-only model the platform trains with the run's model and train
  settings. On real_authors / world_facts the probability is TOFU's normalised one,
  p(a) / Σ p over the true and perturbed answers (the split is multiple choice there).
- Jang et al. (2023): memorisation accuracy MA (forget vs unseen answers; ``_ma_no_eos``:
  open-unlearning's exact memorisation, without the EOS position) and EL_n on the memorised
  (TDEC-style) sequences (forget vs unseen): unlearning is "done" at or below the unseen
  values. Extraction strength per split (Carlini et al., 2021; open-unlearning).
- Membership inference, forget answers (members) vs unseen answers (non-members), by
  open-unlearning's attacks (lethe/metrics/mia.py): LOSS, zlib, Min-K% and Min-K%++ AUCs;
  MUSE's PrivLeak (Shi et al., 2024) from the Min-K% AUCs of the evaluated and the
  retain-only model.
- ReLearn (Xu et al., 2025): KFR on forget, KRR on retain, Linguistic Score of the greedy answers
  to the forget (``forget_ls``) and retain (``retain_ls``) questions.

The token-level predictions on the evaluation answers fill a PredictionStore (experience =
split), so ``acc/exp_<j>`` (token accuracy per split, in the order of ``qa_splits.txt``),
the accuracy-matrix artifacts and checkpoints work as for every stream.
"""
from __future__ import annotations

import math

import torch

from lethe.errors import ConfigError
from lethe.metrics.evaluator import PredictionStore
from lethe.metrics.passes import inference
from lethe.metrics.protocol import StreamEvaluator

# splits the evaluated model should not know: their truth ratio is reported as closeness to 1
NOT_KNOWN = ("forget", "unseen")


def token_stats(fn, x: torch.Tensor, y: torch.Tensor, device, bs: int = 64, moments: bool = False
                ) -> tuple[torch.Tensor, ...]:
    """fn(x) over batches, reduced per batch on ``device`` to what the metrics read: the
    argmax prediction [N, L] (int64) and the log-probability of the target [N, L] (float64,
    0 where the target is -100) of every position, both on CPU; with ``moments`` also the
    mean and variance [N, L] of log p(·) over the vocabulary (Min-K%++, float64). Only one
    batch of logits exists at a time, on the device, so host memory does not grow with the
    vocabulary."""
    from lethe.metrics.mia import logprob_moments

    cols: list[list[torch.Tensor]] = [[], [], [], []]
    with inference():
        for s in range(0, len(x), bs):
            xb, yb = x[s:s + bs].to(device), y[s:s + bs].to(device)
            logits = fn(xb, torch.zeros(len(xb), dtype=torch.long, device=device)).float()
            cols[0].append(logits.argmax(1).cpu())
            nll = torch.nn.functional.cross_entropy(logits, yb, ignore_index=-100, reduction="none")
            # float64 on the host only: some accelerators have no float64
            cols[1].append(-nll.cpu().to(torch.float64))
            if moments:
                mu, var = logprob_moments(logits)
                cols[2].append(mu.cpu().to(torch.float64))
                cols[3].append(var.cpu().to(torch.float64))
            del logits   # freed before the next forward, or two batches of logits peak together
    n = 4 if moments else 2
    if not cols[0]:
        empty = [torch.zeros(y.shape, dtype=torch.long)] + [torch.zeros(y.shape, dtype=torch.float64)] * 3
        return tuple(empty[:n])
    return tuple(torch.cat(c) for c in cols[:n])


def hf_greedy(lm, prompts: list[list[int]], max_new: int, eos: int, device, bs: int = 64) -> list[list[int]]:
    """Greedy continuations of equal-length prompts with a Hugging Face model's ``generate``
    (KV cache; no padding needed), cut at the first eos (excluded) — what
    :func:`lethe.metrics.tofu.greedy_generate` computes by full recompute."""
    out = []
    with inference():
        for s in range(0, len(prompts), bs):
            ids = torch.tensor(prompts[s:s + bs], dtype=torch.long, device=device)
            gen = lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                              min_new_tokens=0, do_sample=False, num_beams=1, eos_token_id=eos,
                              pad_token_id=eos, use_cache=True)[:, ids.shape[1]:].tolist()
            for row in gen:
                out.append(row[:row.index(eos)] if eos in row else row)
    return out


class QAEvaluator(StreamEvaluator):
    """One evaluation pass per point over the QA splits; metrics under ``unlearn/*``."""

    def __init__(self, stream, device, batch_size: int = 0, reference_fn=None):
        from lethe.metrics.knowledge import ExactEmbedder, MiniLMEmbedder, RuleJudge, load_plugin

        self.stream, self.qa, self.cfg = stream, stream.qa, stream.qa_config
        self.device = torch.device(device)
        self.bs = batch_size or 64
        self.reference_fn = reference_fn
        self.splits = list(self.qa.splits)
        test = stream.test
        _, ty = self.qa.item_rows([r for s in self.splits for r in self.qa.splits[s]])
        self.x, self.y = test.x, ty
        mask = ty != -100
        tok_exp = test.exp.unsqueeze(1).expand_as(ty)[mask]
        self.store = PredictionStore(ty[mask], tok_exp, torch.zeros_like(tok_exp),
                                     torch.arange(int(mask.sum())), len(self.splits),
                                     int(stream.n_classes))
        self.embedder = load_plugin(self.cfg.embedder, MiniLMEmbedder) if self.cfg.embedder != "exact" \
            else ExactEmbedder()
        judge = self.cfg.judge
        if judge and judge != "rule" and ":" not in judge:
            from lethe.metrics.knowledge import HFNLIJudge

            self.judge = HFNLIJudge(judge)
        else:
            self.judge = load_plugin(judge, RuleJudge)
        if self.cfg.ppl_model not in ("self", "reference", "wordfreq"):
            import os

            if not os.path.isdir(os.path.expanduser(self.cfg.ppl_model)):
                raise ConfigError(f"scenario.ppl_model: '{self.cfg.ppl_model}' is neither self, "
                                  f"reference, wordfreq nor a local causal LM folder")
        self._generate_fn = self._generate_lm = None
        self.history: list[dict[str, float]] = []
        self.answers: list[tuple[str, dict]] = []   # (label, {split: greedy answers}) per point
        self._reference_stats = None

    def _pair(self, q, a):
        """(prompt ids, answer ids + eos) in the stream's prompt format (scenario.prompt_format)."""
        return self.qa.encode(q, a)

    # --- model passes -----------------------------------------------------------------------
    def _nll(self, fn, pairs) -> torch.Tensor:
        from lethe.metrics.tofu import answer_nll

        x, y = self.qa.rows(pairs)
        return answer_nll(token_stats(fn, x, y, self.device, self.bs)[1], y)

    def _candidates(self, fn, items) -> tuple[torch.Tensor, torch.Tensor]:
        """NLL of the paraphrased and of each perturbed answer ([N], [N, K], nan-padded); the true
        answers' come from the evaluation pass over ``self.x``."""
        k = max((len(r.get("perturbed_answer", [])) for r in items), default=0)
        pairs = []
        for r in items:
            pert = r.get("perturbed_answer", [])
            pairs.append(self._pair(r["question"], r.get("paraphrased_answer", r["answer"])))
            pairs += [self._pair(r["question"], p) for p in pert] + [self._pair(r["question"], "")] * (k - len(pert))
        nll = self._nll(fn, pairs).reshape(len(items), 1 + k)
        counts = torch.tensor([len(r.get("perturbed_answer", [])) for r in items])
        pert = nll[:, 1:].clone()
        pert[torch.arange(k).unsqueeze(0) >= counts.unsqueeze(1)] = float("nan")
        return nll[:, 0], pert

    def _mink_auc(self, logprobs, k: float | None = None) -> float:
        """Min-K% prob AUC (k = scenario.mink_k unless given), forget answers (members) vs
        unseen answers, from the token log-probabilities of a pass over self.x."""
        from lethe.metrics.tofu import min_k_prob, mink_auc

        if "unseen" not in self.splits:
            return float("nan")
        score = min_k_prob(logprobs, self.y, self.cfg.mink_k if k is None else k)
        return mink_auc(*self._members(score))

    def _members(self, score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A per-answer score [N] split into (forget answers, unseen answers)."""
        split_of = self.stream.test.exp
        return (score[split_of == self.splits.index("forget")],
                score[split_of == self.splits.index("unseen")])

    def _greedy(self, fn, items) -> tuple[list[str], list[list[int]], list[list[int]]]:
        """Greedy answers (text), their tokens and their prompts."""
        from lethe.metrics.tofu import greedy_generate

        tok = self.qa.tokenizer
        prompts = [self._pair(r["question"], "")[0] for r in items]
        cap = self.cfg.max_new_tokens or self.qa.length
        by_len: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            by_len.setdefault(len(p), []).append(i)
        outs = [None] * len(items)
        hf = self._generate_lm if fn is self._generate_fn else None
        for n, idx in by_len.items():   # positions are bounded by the model's length
            max_new = max(1, min(cap, self.qa.length - n + 1))
            if hf is not None:   # the plain HF forward: KV-cached generate, same greedy tokens
                gen = hf_greedy(hf, [prompts[i] for i in idx], max_new, tok.eos, self.device, self.bs)
            else:
                gen = greedy_generate(lambda ids: fn(ids.to(self.device), torch.zeros(
                    len(ids), dtype=torch.long, device=self.device)), [prompts[i] for i in idx],
                    max_new, eos=tok.eos, batch_size=self.bs)
            for i, g in zip(idx, gen):
                outs[i] = g
        return [tok.decode(g) for g in outs], outs, prompts

    def _answer_ppl(self, fn, items, answers, tokens, prompts, ref) -> list[float]:
        """Perplexity of each greedy answer given its question: by the evaluated model
        (``ppl_model: self``), the retain-only model (``reference``), English word frequencies
        (``wordfreq``: an offline external judge, the answer alone), or an external causal LM
        from a local folder — ReLearn's evaluation uses a fluent LLM judge — scoring the text."""
        from lethe.scenarios.tofu import PROMPT

        mode = self.cfg.ppl_model
        if mode == "wordfreq":
            from lethe.metrics.knowledge import unigram_perplexity

            return [unigram_perplexity(a) for a in answers]
        if mode in ("self", "reference"):
            judge = ref[2] if (mode == "reference" and ref) else fn
            pairs = [(p, t + [self.qa.tokenizer.eos]) for p, t in zip(prompts, tokens)]
            return self._nll(judge, pairs).clamp(max=700.0).exp().tolist()
        from lethe.metrics.knowledge import text_perplexities

        return text_perplexities(mode, [PROMPT.format(question=r["question"]) for r in items], answers)

    @staticmethod
    def _ls(answers, ppl) -> float:
        """Linguistic Score of a split's greedy answers, aggregated as ReLearn's evaluation does:
        the means over answers of PPL, Brunet's W and Honoré's H, then the harmonic mean of
        1/(1+PPL), 1/(1+W), H/(1+H), over ReLearn's tokens (``ls_tokens``: nltk's, punctuation
        kept). An empty answer counts W = 1000 and H = 0 (so does the reference code); H = 0
        for a one-token answer."""
        from lethe.metrics.knowledge import brunet_w, honore_h, linguistic_score
        from lethe.metrics.knowledge import ls_tokens as words

        if not answers:
            return float("nan")
        ws, hs = [], []
        for a in answers:
            w = words(a)
            ws.append(brunet_w(w) if w else 1000.0)
            hs.append(honore_h(w) if len(w) > 1 else 0.0)
        mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
        scored = [p for p in ppl if p == p]   # an external judge gives nan for an empty answer
        # every answer empty: nothing fluent to score (LS 0 through H = 0, not NaN)
        return linguistic_score(mean(scored) if scored else math.inf, mean(ws), mean(hs))

    def _reference(self):
        """(forget truth ratios, Min-K% AUC) of the retain-only model, computed once."""
        from lethe.metrics.tofu import truth_ratio

        if self._reference_stats is None and self.reference_fn is not None:
            ref = self.reference_fn()
            fn = lambda x, t: ref(x)  # noqa: E731
            para, pert = self._candidates(fn, self.qa.splits["forget"])
            auc = self._mink_auc(token_stats(fn, self.x, self.y, self.device, self.bs)[1])
            self._reference_stats = (truth_ratio(pert, para), auc, fn)
        return self._reference_stats

    # --- the evaluation point ---------------------------------------------------------------
    def evaluate(self, predict_fn, label: str, model: torch.nn.Module | None = None,
                 plain: bool = False):
        was_training = model.training if model is not None else False
        if model is not None:
            model.eval()
        # answers are decoded with the HF model's KV-cached generate when predict_fn is the
        # plain forward of lethe's causal-LM wrapper (plain=True: the method does not route
        # inference elsewhere); otherwise by full recompute through predict_fn
        plain = plain and hasattr(getattr(model, "lm", None), "generate")
        self._generate_fn, self._generate_lm = (predict_fn, model.lm) if plain else (None, None)
        try:
            stats = token_stats(predict_fn, self.x, self.y, self.device, self.bs, moments=True)
            self.store.add(label, stats[0][self.y != -100])
            metrics = self._metrics(predict_fn, *stats)
            self.answers.append((label, self._last_answers))
        finally:
            if model is not None and was_training:
                model.train()
        self.history.append(metrics)
        return metrics

    def _metrics(self, fn, preds, logprobs, mu, var) -> dict[str, float]:
        from lethe.metrics.tofu import answer_nll, forget_quality, model_utility, privleak

        true_nll = answer_nll(logprobs, self.y)
        out, answers, forget_R = self._split_metrics(fn, preds, true_nll)
        out["unlearn/model_utility"] = model_utility(
            [out[f"unlearn/{n}_{m}"] for n in ("retain", "real_authors", "world_facts") if n in self.splits
             for m in ("prob", "rouge", "truth_ratio")])
        out.update(self._el(fn))
        self._last_answers = {k: v[0] for k, v in answers.items()}
        ref = self._reference()
        out.update(self._relearn(fn, answers, ref))
        if "unseen" in self.splits:
            out.update(self._mia(true_nll, logprobs, mu, var))
        if ref is not None:
            out["unlearn/forget_quality"] = forget_quality(forget_R, ref[0])
            if "unseen" in self.splits:
                out["unlearn/privleak"] = privleak(out["unlearn/mink_auc"], ref[1])
        return out

    def _split_metrics(self, fn, preds, true_nll):
        """Per split: TOFU's probabilities, truth ratio and ROUGE, MA and extraction strength;
        also the greedy answers (text, tokens, prompts) and the forget truth ratios R."""
        from lethe.metrics.mia import extraction_strength
        from lethe.metrics.tofu import (
            memorisation_accuracy,
            probability,
            rouge_scores,
            truth_closeness,
            truth_ratio,
            truth_score,
        )

        out: dict[str, float] = {}
        split_of = self.stream.test.exp
        per_answer = {"ma": memorisation_accuracy(preds, self.y),
                      "ma_no_eos": memorisation_accuracy(preds, self.y, drop_last=True),
                      "es": extraction_strength(preds, self.y)}
        answers: dict[str, tuple] = {}
        forget_R = None
        for s, name in enumerate(self.splits):
            items, rows = self.qa.splits[name], split_of == s
            para, pert = self._candidates(fn, items)
            R = truth_ratio(pert, para)
            out[f"unlearn/{name}_prob"] = self._prob(name, true_nll[rows], pert)
            out[f"unlearn/{name}_para_prob"] = float(probability(para).mean())
            out[f"unlearn/{name}_pert_prob"] = float(probability(pert).nanmean(1).nanmean())
            # TOFU reports the forget set's closeness to 1 and the others' max(0, 1 − R)
            score = truth_closeness(R) if name in NOT_KNOWN else truth_score(R)
            out[f"unlearn/{name}_truth_ratio"] = float(score.nanmean())
            out[f"unlearn/{name}_truth_ratio_raw"] = float(R.nanmean())
            for key, values in per_answer.items():
                out[f"unlearn/{name}_{key}"] = float(values[rows].nanmean())
            if name != "unseen":
                answers[name] = self._greedy(fn, items)
                scores = [rouge_scores(a, r["answer"]) for a, r in zip(answers[name][0], items)]
                for key, suffix in (("rougeL_recall", "rouge"), ("rouge1_recall", "rouge1_recall"),
                                    ("rougeL_f1", "rougeL_f1")):
                    out[f"unlearn/{name}_{suffix}"] = sum(sc[key] for sc in scores) / len(items)
            if name == "forget":
                forget_R = R
        return out, answers, forget_R

    @staticmethod
    def _prob(name: str, true_nll, pert) -> float:
        from lethe.metrics.tofu import probability

        if name in ("real_authors", "world_facts"):   # TOFU: normalised over the choices
            p = torch.cat([(-true_nll).unsqueeze(1), -pert], 1).exp()
            return float((p[:, 0] / p.nansum(1)).mean())
        return float(probability(true_nll).mean())

    def _el(self, fn) -> dict[str, float]:
        """EL_n on the memorised sequences (Jang et al.), forget and unseen."""
        from lethe.metrics.tofu import extraction_likelihood

        out = {}
        for k in ("forget", "unseen"):
            seqs = self.qa.memorised.get(k) or []
            if seqs:
                el = extraction_likelihood(lambda ids: fn(ids.to(self.device), torch.zeros(
                    len(ids), dtype=torch.long, device=self.device)), seqs, self.cfg.el_n,
                    batch_size=self.bs)
                out[f"unlearn/{k}_el"] = float(el.nanmean())
        return out

    def _relearn(self, fn, answers, ref) -> dict[str, float]:
        """KFR on forget, KRR on retain, Linguistic Score of both splits' greedy answers."""
        from lethe.metrics.knowledge import kfr, krr

        out = {}
        for key, rate, split in (("kfr", kfr, "forget"), ("krr", krr, "retain")):
            items = self.qa.splits[split]
            out[f"unlearn/{key}"] = rate(answers[split][0], [r["answer"] for r in items], self.embedder,
                                         self.judge, questions=[r["question"] for r in items])
        for k in ("forget", "retain"):
            out[f"unlearn/{k}_ls"] = self._ls(answers[k][0], self._answer_ppl(
                fn, self.qa.splits[k], *answers[k], ref))
        return out

    def _mia(self, true_nll, logprobs, mu, var) -> dict[str, float]:
        """Membership AUCs, forget answers (members) vs unseen answers (open-unlearning's
        attacks): LOSS, zlib, Min-K% (scenario.mink_k and 0.2) and Min-K%++."""
        from lethe.metrics.mia import min_k_plus_plus, zlib_score
        from lethe.metrics.tofu import mink_auc
        from lethe.metrics.unlearning import mia_auc

        texts = [r["answer"] for s in self.splits for r in self.qa.splits[s]]
        return {"unlearn/mia_auc": mia_auc(*self._members(true_nll)),
                "unlearn/zlib_auc": mia_auc(*self._members(zlib_score(true_nll, texts))),
                "unlearn/mink_auc": self._mink_auc(logprobs),
                "unlearn/mink_auc_k20": self._mink_auc(logprobs, 0.2),
                "unlearn/minkpp_auc": mink_auc(*self._members(
                    min_k_plus_plus(logprobs, mu, var, self.y, self.cfg.mink_k)))}

    # --- the evaluator protocol (lethe/metrics/protocol.py) --------------------------------
    def point_metrics(self, n_learned: int) -> dict[str, float]:
        """Token accuracy per split (``acc/exp_<j>``) and the ``unlearn/*`` keys of the point."""
        out = {k: v for k, v in super().point_metrics(n_learned).items() if k.startswith("acc/exp_")}
        out.update(self.history[-1] if self.history else {})
        return out

    def extra_state(self) -> dict:
        return {"history": [dict(h) for h in self.history], "answers": list(self.answers)}

    def load_extra_state(self, state: dict) -> None:
        self.history = [dict(h) for h in state.get("history", [])]
        self.answers = list(state.get("answers", []))

    def write_artifacts(self, folder, title: str) -> list[str]:
        """qa_splits.txt (which split each accuracy-matrix column is) and qa_answers.csv (the
        greedy answer to every evaluation question at every evaluation point)."""
        import csv
        from pathlib import Path

        folder = Path(folder)
        files = super().write_artifacts(folder, title)
        (folder / "qa_splits.txt").write_text(
            "".join(f"exp_{j}\t{name}\n" for j, name in enumerate(self.splits)))
        with open(folder / "qa_answers.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["eval_point", "split", "question", "reference", "answer"])
            for label, answers in self.answers:
                for split, texts in answers.items():
                    for item, text in zip(self.qa.splits[split], texts):
                        w.writerow([label, split, item["question"], item["answer"], text])
        return files + ["qa_splits.txt", "qa_answers.csv"]


__all__ = ["QAEvaluator", "hf_greedy", "token_stats"]
