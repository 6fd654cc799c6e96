"""S3T — Sequence-aware Sharded Sliced Training (Chowdhury et al., ICLR 2025).

Paper: https://arxiv.org/abs/2406.16257 (openreview.net/forum?id=oe51Q5Uo37); official code:
github.com/brcsomnath/S3T (``src/sequence_selection.py``: ``get_cyclic``, ``bms_selection``,
matched here sequence for sequence; ``src/s3t_vit.py``: LoRA on HF ViT's query and value).

Each shard has a frozen backbone with LoRA adapters split into L groups of consecutive
layers (group 1 = the topmost) and its data split into L slices. A *sequence* is an order
of the slices: stage i trains only group i (and the head) on the cumulative slices
π1..πi, earlier groups frozen, later groups still zero, and a checkpoint is kept after
every stage, so the model after stage i depends on slices π1..πi only. B sequences per
shard (cyclic rotations, bipartite-matching selection from per-slice deletion
probabilities, or all L!) are trained.

A deletion in slice s deactivates, in every sequence of the shard, the groups from s's
position on (= serves the stage checkpoint before it): no gradient step. The shard serves
its sequence with the longest surviving prefix; a shard whose sequences are all empty is
retrained (``retrain_empty``) or left out. Predictions average the logits of the shards.

Deletion capacity (``unlearn/requests_since_retrain``): as in the paper, the requests served
since the last learn experience until every shard has run out of sequences; retraining one
emptied shard does not reset it. The request that empties the last not-yet-emptied shard
uses the capacity up: the counter restarts at 0 there (every shard has been retrained).

Exactness (tests/test_s3t.py): the served model of a shard is bitwise its stored prefix
checkpoint, equal to deactivating the later groups of the full sequence, and equal to a
fresh training on just the prefix slices with the same seeds; its recorded training ids
exclude every deleted sample. The frozen backbone must never have seen deletable data:
with ``model.weights_path`` it is a public checkpoint, otherwise it is the seeded random
initialisation (which has seen no data at all).
Expect: unlearn/serve_s in microseconds to milliseconds, unlearn/retrain_samples 0 until
a shard runs out of sequences, accuracy close to SISA's on the same backbone.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from lethe.errors import ConfigError, RunError
from lethe.methods.sharded import ShardedUnlearner
from lethe.models.lora import LoraOptions
from lethe.registry import register_method

SELECTIONS = ("cyclic", "bipartite", "all")


@dataclass
class S3TConfig:
    shards: int = 5               # disjoint shards (paper's ViT/CIFAR setting: 5)
    slices: int = 4               # slices per shard = LoRA groups per shard (paper: 4)
    budget: int = 0               # sequences per shard B; 0 = slices (each slice leads one)
    selection: str = "cyclic"     # cyclic | bipartite | all (every permutation, small L only)
    deletion_probs: list = field(default_factory=list)  # per-slice deletion prior (bipartite);
    #                               [] = uniform
    score_t: float = 100.0        # exponent t of the bipartite score Σ i·(1 − Σ_{j≤i} p)^t
    retrain_empty: bool = True    # retrain a shard whose sequences are all emptied
    # LoRA on the frozen backbone (paper: r = 16, lr 2e-3, 15 epochs on ViT/CIFAR); a fused
    # qkv layer (timm ViT) gets query/value adapters only, as the official code's HF ViT
    lora: LoraOptions = field(default_factory=lambda: LoraOptions(rank=16, fused_qkv="qv"))


# --- sequence selection (pure functions) --------------------------------------------------
def sequence_score(probs, t: float = 100.0) -> float:
    """Σ_i i·(1 − Σ_{j≤i} p_j)^t over the positions i = 1..len: large when slices likely to
    be deleted come late, so long prefixes are expected to survive."""
    total, cum = 0.0, 0.0
    for i, p in enumerate(probs, start=1):
        cum += float(p)
        total += i * max(0.0, 1.0 - cum) ** t
    return total


def rotate_right(seq, k: int) -> list[int]:
    """``seq`` rotated right by k (k = 1: the last element first)."""
    seq = list(seq)
    k %= len(seq)
    return seq[len(seq) - k:] + seq[:len(seq) - k]


def _spread(n: int, step: int, count: int) -> list[int]:
    """``count`` distinct indices of 0..n-1 spread ``step`` apart: 0, step, 2·step, … then
    1, 1+step, … (how the official code picks the parents of the leftover sequences)."""
    out, start, first = [], 0, 0
    while len(out) < count:
        if start >= n:
            first += 1
            start = first
        out.append(start)
        start += max(step, 1)
    return out


def cyclic_sequences(L: int, B: int) -> list[list[int]]:
    """B sequences by cyclic rotation, as the official ``get_cyclic``: the right rotations of
    [0..L-1] (B ≤ L: the first B). For B > L the suffixes after the first position are
    rotated: every parent gets its first B // L rotations (rotation 0 is the parent), and the
    B % L leftover ones go to parents ``len(parents) // L`` apart (:func:`_spread`), each
    taking its next rotation; the list is then sorted. When B // L covers every rotation,
    the same is done after the second position with B // (number of sequences), and so on."""
    seqs = [rotate_right(range(L), k) for k in range(L)][:B]
    depth = 1
    while len(seqs) < B:
        if depth >= L - 1:
            raise ConfigError(f"bad value for 'method.budget': {B} sequences of {L} slices do not "
                              f"exist (at most {len(seqs)})")
        n_rot, per = L - depth, B // len(seqs)
        grown = [s[:depth] + rotate_right(s[depth:], r) for s in seqs for r in range(min(per, n_rot))]
        if len(grown) < len(seqs) * n_rot:          # B is reached at this depth
            extra = B % len(seqs)
            parents = _spread(len(seqs), len(seqs) // L, extra)
            grown += [seqs[i][:depth] + rotate_right(seqs[i][depth:], per) for i in parents]
            if extra:
                grown.sort()
        seqs = grown
        depth += 1
    return seqs


def bipartite_sequences(probs, B: int, t: float = 100.0) -> list[list[int]]:
    """Bipartite-matching selection, as the official ``bms_selection``: sequence i starts
    with slice i; each of the L−1 next positions is assigned by a maximum-weight matching
    (scipy's ``linear_sum_assignment``) of sequences to unused slices, weight
    :func:`sequence_score` of the grown sequence (slices already used: −inf). B < L keeps
    the first B sequences. (A sequence may take any unused slice, so every round is a
    regular bipartite graph and a perfect matching exists.)"""
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    L = len(probs)
    seqs: list[list[int]] = [[i] for i in range(L)]
    for _ in range(L - 1):
        score = np.full((L, L), -np.inf)
        for i, s in enumerate(seqs):
            for j in range(L):
                if j not in s:
                    score[i, j] = sequence_score([probs[k] for k in s + [j]], t)
        rows, cols = linear_sum_assignment(score, maximize=True)
        for i, j in zip(rows, cols):
            seqs[i].append(int(j))
    return seqs[:B]


def all_sequences(L: int) -> list[list[int]]:
    import itertools

    return [list(p) for p in itertools.permutations(range(L))]


@register_method("s3t", config=S3TConfig, kinds=("learn", "forget"))
class S3T(ShardedUnlearner):
    """Sequence-aware sharded sliced LoRA training; deletions served by deactivating adapter groups."""

    name = "s3t"

    @classmethod
    def validate_config(cls, cfg) -> None:
        import math

        from lethe.registry import check_choice

        super().validate_config(cfg)
        L, B = int(cfg.slices), int(cfg.budget) or int(cfg.slices)
        check_choice("method.selection", cfg.selection, SELECTIONS)
        if int(cfg.lora.rank) < 1:
            raise ConfigError("bad value for 'method.lora.rank': S3T trains LoRA groups on a frozen "
                              "backbone, so the rank must be ≥ 1")
        if B < 1:
            raise ConfigError(f"bad value for 'method.budget': {cfg.budget} (must be ≥ 0)")
        if cfg.selection == "cyclic" and B > math.factorial(L):
            raise ConfigError(f"bad value for 'method.budget': {B} > {L}! orders of {L} slices")
        if cfg.selection == "bipartite" and B > L:
            raise ConfigError(f"bad value for 'method.budget': bipartite selection builds at most "
                              f"method.slices={L} sequences, got {B}")
        if cfg.selection == "all" and L > 6:
            raise ConfigError(f"method.selection=all trains {L}! sequences per shard; use it with "
                              f"slices ≤ 6 or choose cyclic / bipartite")
        probs = list(cfg.deletion_probs or [])
        if probs and (len(probs) != L or min(float(p) for p in probs) < 0):
            raise ConfigError(f"bad value for 'method.deletion_probs': {L} non-negative numbers "
                              f"(one per slice) expected, got {probs}")
        if float(cfg.score_t) <= 0:
            raise ConfigError("bad value for 'method.score_t': must be > 0")

    @classmethod
    def sequences_for(cls, cfg) -> list[list[int]]:
        L, B = int(cfg.slices), int(cfg.budget) or int(cfg.slices)
        if cfg.selection == "all":
            return all_sequences(L)
        if cfg.selection == "bipartite":
            probs = [float(p) for p in (cfg.deletion_probs or [])] or [1.0 / L] * L
            total = sum(probs) or 1.0
            return bipartite_sequences([p / total for p in probs], B, float(cfg.score_t))
        return cyclic_sequences(L, B)

    # --- construction -------------------------------------------------------------------
    def __init__(self, cfg, model, ctx):
        self.emptied: set = set()   # shards whose sequences all ran out since the last learn
        super().__init__(cfg, model, ctx)

    def setup(self, model):
        from lethe.models import lora

        model = super().setup(model)
        groups = lora.group_top_down(self.targets, int(self.cfg.slices))
        self.groups = groups
        self.group_names = [lora.adapter_params(model, g) for g in groups]
        self.head_names = lora.head_params(model, self.head)
        return model

    def make_sequences(self, shard: int) -> list[list[int]]:
        return [list(s) for s in self.sequences_for(self.cfg)]

    def method_state(self) -> dict:
        return {**super().method_state(), "emptied": sorted(self.emptied)}

    def load_method_state(self, state: dict) -> None:
        super().load_method_state(state)
        self.emptied = set(state.get("emptied", []))

    def stage_names(self, stage: int) -> list[str]:
        return self.group_names[stage] + self.head_names

    # --- deletion by deactivation -------------------------------------------------------
    def forget_rows(self, rows) -> int:
        if not self.cfg.retrain_empty:   # checked before anything changes
            new = self.truncated(rows)
            if not any(max(new.get(j, self.alive[j])) > 0 for j in range(self.n_shards)):
                raise RunError("this deletion empties every sequence of every shard and "
                               "method.retrain_empty is false: no model would be left to serve; "
                               "set method.retrain_empty=true")
        self.deleted[rows] = True
        done = 0
        for j in self.truncate(rows):
            if self.served_sequence(j) is None:
                self.emptied.add(j)
                if self.cfg.retrain_empty:
                    done += self.refresh_shard(j)   # the shard still has data (request_rows)
        self._update_stats()
        return done

    def count_request(self, processed: int) -> int:
        """The paper's deletion capacity: count until every shard has been emptied since the
        last learn experience (a single shard's retrain does not reset it)."""
        if len(self.emptied) == self.n_shards:
            self.emptied = set()
            return 0
        return int(self.stats.get("requests_since_retrain", 0)) + 1

    def train_live(self) -> int:
        done = super().train_live()
        self.emptied = set()                        # every shard freshly trained
        self._update_stats()
        return done

    def deactivate(self, j: int, b: int, p: int) -> dict:
        """The fully trained sequence b of shard j with groups p+1..L switched off (their
        initial, zero-B values) and the head of stage p: the paper's deactivation."""
        full, at_p = self.ckpts[j][b][self.n_slices], self.ckpts[j][b][p]
        out = dict(full)
        for g in range(p, self.n_slices):
            for k in self.group_names[g]:
                out[k] = self.init_state[k]
        for k in self.head_names:
            out[k] = at_p[k]
        return out

    def _update_stats(self) -> None:
        live_shards, prefix = 0, []
        for j in range(self.n_shards):
            n_live = sum(1 for a in self.alive[j] if a > 0)
            self.stats[f"live_seq/shard_{j}"] = n_live
            served = self.served_sequence(j)
            if served is not None:
                live_shards += 1
                prefix.append(served[1] / self.n_slices)
        self.stats["live_shards"] = live_shards
        self.stats["served_prefix"] = sum(prefix) / len(prefix) if prefix else 0.0

    def unlearn_stats(self) -> dict:
        out = super().unlearn_stats()
        out.update({k: float(self.stats[k]) for k in ("live_shards", "served_prefix")
                    if k in self.stats})
        return out

    # --- predictions --------------------------------------------------------------------
    def predict(self, x, task_ids):
        states = self.shard_states()
        if not states:
            raise RunError("S3T has no shard with a live sequence to serve")
        return self.stacked_logits(states, x).mean(0)   # the paper's logit averaging
