"""Evaluation of language models on corpus streams: held-out loss / perplexity per corpus.

The test set of an LM stream (``Stream.task_type == "lm"``) holds packed token blocks
``[N, L + 1]`` and the corpus index of each block. :class:`LMEvaluator` runs one batched
``inference_mode`` pass per evaluation point (same batch sizing, AMP and out-of-memory
fallback as the classification :class:`~lethe.metrics.evaluator.Evaluator`, which it
extends) and keeps

- the next-token predictions of every held-out token in a token-level
  :class:`~lethe.metrics.evaluator.PredictionStore` (targets = next tokens, experience =
  the corpus): every standard key (``acc/exp_<j>`` = next-token top-1 accuracy,
  forgetting, BWT/FWT, flips) comes from it unchanged;
- the summed next-token negative log-likelihood of every block, from which the loss matrix
  ``L[i, j]`` (mean nats per token on corpus j after evaluation point i) and the perplexity
  ``exp(L)`` follow. Forgetting on a corpus stream is a *rise* in loss on earlier corpora:
  ``forgetting/loss_avg = mean_{j<i} (L[i, j] − min_{l<i} L[l, j])``.

Exact match: a held-out block is an exact match when the model's next-token predictions
over its last ``em_tokens`` positions (default 4) are all right — with teacher forcing that is
exactly "greedy decoding continues the block's prefix with the reference" (if every step is
right, each greedy step sees the reference prefix). ``em/exp_<j>`` is the exact-match rate per
corpus. On model-update streams (store rows ``update:<k>``) negative flips are counted on
exact match (``em_nfr``: the older version matched, the new one does not) and as score drops
of a continuous per-block score, the continuation's token accuracy (``sdf``: the new score is
lower than the old one by more than ``score_drop``, default 0), against the previous version
and every earlier one, next to the token-level flips of :mod:`lethe.metrics.compat`.

Models return logits ``[B, V, L]`` (class dimension second, see lethe/models/hf.py).
"""
from __future__ import annotations

import math

import torch

from lethe.errors import RunError
from lethe.metrics.evaluator import BatchedPass, PredictionStore, _logits, _to_device
from lethe.metrics.passes import gather_rows, inference, rank_rows
from lethe.metrics.protocol import StreamEvaluator


def next_token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood [B, L] of logits [B, V, L] against targets [B, L]."""
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")


def loss_matrix(block_loss: torch.Tensor, block_tokens: torch.Tensor, exp: torch.Tensor,
                n_experiences: int) -> torch.Tensor:
    """[P, E] mean next-token loss per corpus from summed block losses [P, N] (float64)."""
    block_loss = block_loss.reshape(-1, block_loss.shape[-1]).to(torch.float64)
    sums = torch.zeros(block_loss.shape[0], n_experiences, dtype=torch.float64, device=block_loss.device)
    sums.index_add_(1, exp.to(block_loss.device), block_loss)
    tokens = torch.zeros(n_experiences, dtype=torch.float64, device=block_loss.device)
    tokens.index_add_(0, exp.to(block_loss.device), block_tokens.to(block_loss.device, torch.float64))
    return sums / tokens.clamp(min=1)


def loss_forgetting(L: torch.Tensor, i: int) -> float:
    """mean_{j < i} (L[i, j] − min_{l < i} L[l, j]): the rise in held-out loss on earlier corpora."""
    if i < 1:
        return 0.0
    j = min(i, L.shape[1])
    best = L[:i, :j].min(0).values
    return float((L[i, :j] - best).mean())


class LMEvaluator(BatchedPass, StreamEvaluator):
    """Batched held-out evaluation of next-token prediction on every corpus of a stream."""

    def __init__(self, test, device: torch.device | str = "cpu", batch_size: int = 0,
                 amp: bool = False, n_classes: int | None = None, em_tokens: int = 4,
                 score_drop: float = 0.0):
        blocks = test.x.long()
        if blocks.dim() != 2 or blocks.shape[1] < 2:
            raise ValueError(f"LM test data must be token blocks [N, L+1]; got {tuple(blocks.shape)}")
        super().__init__(blocks[:, :-1].contiguous(), test.task, device, batch_size, amp)
        n, L = blocks[:, 1:].shape
        self.block_len = L
        self.em_tokens = max(1, min(int(em_tokens), L))
        self.score_drop = float(score_drop)
        self.y = _to_device(blocks[:, 1:].contiguous(), self.device)
        self.block_exp = _to_device(test.exp.long(), self.device)
        self.block_tokens = torch.full((n,), L, dtype=torch.long, device=self.device)
        self.n_experiences = test.n_experiences
        tok_ids = test.ids.long().repeat_interleave(L) * L + torch.arange(L).repeat(n)
        self.store = PredictionStore(self.y.reshape(-1), self.block_exp.repeat_interleave(L),
                                     self.task.repeat_interleave(L), tok_ids, self.n_experiences,
                                     int(n_classes or int(blocks.max()) + 1))
        self.block_loss: list[torch.Tensor] = []   # [N] float64 summed NLL per evaluation point

    # --- passes -------------------------------------------------------------------------
    def _run_lm(self, fn, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token predictions [N, L] and summed block losses [N]; sharded over the ranks of a
        data-parallel run and gathered, as the classification evaluator's pass."""
        lo, hi = rank_rows(len(self.x))

        def attempt(bs: int) -> tuple[torch.Tensor, torch.Tensor]:
            preds = torch.empty((hi - lo, self.block_len), dtype=torch.long, device=self.device)
            loss = torch.empty(hi - lo, dtype=torch.float64, device=self.device)
            with inference(), self._autocast():
                for s in range(lo, hi, bs):
                    e = min(s + bs, hi)
                    logits = _logits(fn(self.x[s:e], self.task[s:e]))
                    if logits.dim() != 3 or logits.shape[-1] != self.block_len:
                        raise RunError(f"an LM must return logits [batch, vocab, {self.block_len}]; "
                                       f"got {tuple(logits.shape)} (use model.name=hf_causal_lm)")
                    preds[s - lo:e - lo] = logits.argmax(1)
                    loss[s - lo:e - lo] = next_token_nll(logits, self.y[s:e]).sum(1).double()
            return preds, loss

        preds, loss = self._with_oom_retry(attempt, bs)
        return gather_rows(preds, len(self.x)), gather_rows(loss, len(self.x))

    def evaluate(self, predict_fn, label: str, model: torch.nn.Module | None = None,
                 plain: bool = False) -> torch.Tensor:
        """One pass: token predictions into the store, block losses into the loss history."""
        was_training = model.training if model is not None else False
        if model is not None:
            model.eval()
        try:
            bs = self._resolve_batch_size(predict_fn, model)
            preds, loss = self._run_lm(predict_fn, bs)
            self.batch_size = self._last_bs
            self.last_path = "single"
        finally:
            if model is not None and was_training:
                model.train()
        self.store.add(label, preds.reshape(-1))
        self.block_loss.append(loss)
        return preds

    # --- metrics ------------------------------------------------------------------------
    def loss_matrix(self) -> torch.Tensor:
        """[P, E] mean next-token loss (nats) of every evaluation point on every corpus."""
        if not self.block_loss:
            return torch.empty(0, self.n_experiences, dtype=torch.float64)
        return loss_matrix(torch.stack(self.block_loss), self.block_tokens, self.block_exp,
                           self.n_experiences).cpu()

    def point_metrics(self, n_learned: int) -> dict[str, float]:
        """The standard keys from the token-level store plus loss/ppl per corpus."""
        from lethe.metrics.summary import learn_rows

        out = super().point_metrics(n_learned)
        L = self.loss_matrix()
        cur = L[-1]
        for j in range(self.n_experiences):
            out[f"loss/exp_{j}"] = float(cur[j])
            out[f"ppl/exp_{j}"] = math.exp(min(float(cur[j]), 700.0))
        seen = max(1, min(n_learned, self.n_experiences))
        out["loss/avg_seen"] = float(cur[:seen].mean())
        out["ppl/avg_seen"] = math.exp(min(out["loss/avg_seen"], 700.0))
        rows = learn_rows(self.store.labels)
        if rows and n_learned >= 1:
            last = len(self.store) - 1
            hist = rows if rows[-1] == last else rows + [last]
            out["forgetting/loss_avg"] = loss_forgetting(L[hist], len(hist) - 1)
        em = self.exact_match()
        for j, v in enumerate(self.per_corpus(em[-1].double()).tolist()):
            out[f"em/exp_{j}"] = v
        out.update(self.update_flips())
        return out

    # --- exact match and flips of continuous scores ---------------------------------------
    def continuation_hits(self) -> torch.Tensor:
        """[P, N] bool per (evaluation point, block, last em_tokens positions)."""
        n = len(self.block_exp)
        preds = self.store.preds.reshape(len(self.store), n, self.block_len)[..., -self.em_tokens:]
        return preds == self.y[:, -self.em_tokens:].unsqueeze(0)

    def exact_match(self) -> torch.Tensor:
        """[P, N] bool: the block's last em_tokens predictions are all right."""
        return self.continuation_hits().all(-1)

    def continuation_score(self) -> torch.Tensor:
        """[P, N] float: token accuracy over the block's last em_tokens positions."""
        return self.continuation_hits().double().mean(-1)

    def per_corpus(self, values: torch.Tensor) -> torch.Tensor:
        """Mean of a per-block value [N] per corpus [E]."""
        sums = torch.zeros(self.n_experiences, dtype=torch.float64, device=values.device)
        sums.index_add_(0, self.block_exp, values.double())
        counts = torch.bincount(self.block_exp, minlength=self.n_experiences).double()
        return (sums / counts.clamp(min=1)).cpu()

    def update_flips(self) -> dict[str, float]:
        """Exact-match flips and score-drop flips of the newest model version vs every earlier
        one (empty unless the newest row is a version 'update:<k>' with a predecessor)."""
        from lethe.metrics.compat import version_rows

        rows = version_rows(self.store.labels)
        if len(rows) < 2 or rows[-1] != len(self.store) - 1:
            return {}
        em, score = self.exact_match(), self.continuation_score()
        new_em, new_score = em[rows[-1]], score[rows[-1]]
        out = {"em/version": float(new_em.double().mean())}
        for k, r in enumerate(rows[:-1]):
            names = [f"v{k}"] + (["prev"] if k == len(rows) - 2 else [])
            neg = (em[r] & ~new_em).double().mean()
            pos = (~em[r] & new_em).double().mean()
            drop = (new_score < score[r] - self.score_drop).double().mean()
            for name in names:
                out.update({f"em_nfr/{name}": float(neg), f"em_pfr/{name}": float(pos),
                            f"sdf/{name}": float(drop)})
        return out

    # --- checkpoints and artifacts ------------------------------------------------------
    def extra_state(self) -> dict:
        return {"block_loss": (torch.stack(self.block_loss).cpu() if self.block_loss
                               else torch.zeros(0, len(self.x), dtype=torch.float64))}

    def load_extra_state(self, state: dict) -> None:
        self.block_loss = [r.to(self.device) for r in state["block_loss"]]

    def write_artifacts(self, folder, title: str) -> list[str]:
        """loss_matrix.csv (mean nats per token) and perplexity_matrix.png (plus the shared
        update reports of model-update streams)."""
        import csv
        from pathlib import Path

        from matplotlib.figure import Figure

        folder = Path(folder)
        files = super().write_artifacts(folder, title)
        L = self.loss_matrix()
        labels = list(self.store.labels)
        with open(folder / "loss_matrix.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["eval_point"] + [f"exp_{j}" for j in range(L.shape[1])])
            for lab, row in zip(labels, L.tolist()):
                w.writerow([lab] + [f"{v:.6f}" for v in row])
        P = L.clamp(max=700).exp()
        fig = Figure(figsize=(1.2 + 0.7 * P.shape[1], 1.0 + 0.45 * len(labels)))
        ax = fig.subplots()
        im = ax.imshow(P.log().numpy(), cmap="magma_r")
        ax.set_xticks(range(P.shape[1]), [f"corpus {j}" for j in range(P.shape[1])], rotation=45)
        ax.set_yticks(range(len(labels)), labels)
        for i in range(P.shape[0]):
            for j in range(P.shape[1]):
                ax.text(j, i, f"{float(P[i, j]):.1f}", ha="center", va="center", fontsize=7,
                        color="grey")
        ax.set_xlabel("held-out corpus")
        ax.set_ylabel("evaluated after")
        ax.set_title(f"{title}: perplexity")
        fig.colorbar(im, ax=ax, fraction=0.046, label="log perplexity")
        fig.tight_layout()
        fig.savefig(folder / "perplexity_matrix.png", dpi=110)
        return files + ["loss_matrix.csv", "perplexity_matrix.png"]


__all__ = ["LMEvaluator", "next_token_nll", "loss_matrix", "loss_forgetting"]
