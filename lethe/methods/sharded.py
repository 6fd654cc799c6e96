"""Sharded exact unlearning: what SISA and S3T share.

:class:`ShardedUnlearner` keeps sequences of slices per shard, stage checkpoints, training
records and the longest valid prefix of each sequence after a deletion. SISA
(lethe/methods/sisa.py) trains one sequence per shard; S3T (lethe/methods/s3t.py) keeps
several slice orders per shard and serves deletions without retraining.
"""
from __future__ import annotations

from lethe.errors import ConfigError
from lethe.methods.exact import ExactUnlearner


def _emptied(shard: int, n_shards: int) -> str:
    return (f"deletes every remaining sample of shard {shard} (method.shards={n_shards}); a shard "
            f"without data has no model to serve: delete fewer samples or use fewer shards")


class ShardedUnlearner(ExactUnlearner):
    """Shards × slices, several slice orders (sequences) per shard, stage checkpoints."""

    # --- configuration ------------------------------------------------------------------
    @classmethod
    def validate_config(cls, cfg) -> None:
        super().validate_config(cfg)
        for key in ("shards", "slices"):
            if int(cfg[key]) < 1:
                raise ConfigError(f"bad value for 'method.{key}': {cfg[key]} (must be ≥ 1)")

    @classmethod
    def partition_problem_of(cls, cfg, live_ids, had_data, seed: int) -> str:
        import numpy as np

        from lethe.scenarios.forget import shard_of

        m = int(cfg.shards)
        live = np.bincount(shard_of(live_ids.numpy(), m, seed), minlength=m)
        had = np.bincount(shard_of(had_data.numpy(), m, seed), minlength=m)
        emptied = [j for j in range(m) if had[j] > 0 and live[j] == 0]
        if emptied:
            return _emptied(emptied[0], m)
        never = [j for j in range(m) if had[j] == 0]
        if never and len(had_data):
            return (f"shard {never[0]} holds no training sample (method.shards={m} for "
                    f"{len(had_data)} samples): use fewer shards")
        return ""

    def partition_problem(self, live_after) -> str:
        import torch

        m = self.n_shards           # the shard of every row is precomputed: no hashing here
        live = torch.bincount(self.shard[live_after], minlength=m)
        had = torch.bincount(self.shard[self.seen], minlength=m)
        emptied = ((had > 0) & (live == 0)).nonzero().flatten().tolist()
        if emptied:
            return _emptied(emptied[0], m)
        return ""

    # --- construction -------------------------------------------------------------------
    def __init__(self, cfg, model, ctx):
        super().__init__(cfg, model, ctx)
        import torch

        from lethe.scenarios.forget import shard_of, slice_of

        self.n_shards, self.n_slices = int(cfg.shards), int(cfg.slices)
        ids = self.pool_ids.numpy()
        self.shard = torch.as_tensor(shard_of(ids, self.n_shards, ctx.seed))
        self.slice = torch.as_tensor(slice_of(ids, self.n_slices, ctx.seed))
        self.seqs = [self.make_sequences(j) for j in range(self.n_shards)]
        L = self.n_slices
        # ckpts[j][b][i]: state after stage i of sequence b of shard j (0 = initial state)
        self.ckpts = [[[self.init_state] + [None] * L for _ in s] for s in self.seqs]
        # records[j][b][i]: sample ids of slice seqs[j][b][i] when stage i+1 was trained
        self.records = [[[None] * L for _ in s] for s in self.seqs]
        self.alive = [[0 for _ in s] for s in self.seqs]   # valid stages per sequence

    def make_sequences(self, shard: int) -> list[list[int]]:
        """Slice orders trained for a shard (SISA: one, in slice order)."""
        return [list(range(self.n_slices))]

    def stage_names(self, stage: int) -> list[str]:
        """Parameters trained in stage ``stage`` (0-based) of a sequence."""
        return self.train_names

    def stage_epochs(self, stage: int) -> int:
        """Epochs of stage ``stage`` (0-based) of a sequence (default: train.epochs)."""
        return int(self.ctx.train.epochs)

    def stage_seed(self, shard: int, prefix: tuple) -> int:
        from lethe.scenarios.forget import derive_seed

        return derive_seed(self.ctx.seed, 0x5115A, shard, *prefix)

    # --- data of a shard ----------------------------------------------------------------
    def slice_rows(self, shard: int, slices, live=None):
        """Sorted pool rows of the live samples of ``shard`` in the given slices."""
        import torch

        live = self.live if live is None else live
        mask = live & (self.shard == shard) & torch.isin(self.slice, torch.as_tensor(list(slices)))
        return mask.nonzero().flatten()

    # --- training -----------------------------------------------------------------------
    def refresh_shard(self, j: int) -> int:
        """Retrain every sequence of shard j from its first stage that is no longer valid
        (dropped by a deletion, or its slice changed since); returns samples processed."""
        import torch

        L, done, cache = self.n_slices, 0, {}
        current = [self.ids_of(self.slice_rows(j, [k])) for k in range(L)]
        for b, seq in enumerate(self.seqs[j]):
            start = self.alive[j][b]
            for i in range(start):
                if not torch.equal(self.records[j][b][i], current[seq[i]]):
                    start = i
                    break
            ck, rec = self.ckpts[j][b], self.records[j][b]
            for i in range(start, L):
                prefix = tuple(seq[:i + 1])
                key = (prefix, id(ck[i]))
                if key not in cache:   # sequences sharing a prefix share its stages
                    self.load(ck[i])
                    rows = self.slice_rows(j, prefix)
                    done += self.fit(self.stage_names(i), rows, self.stage_seed(j, prefix),
                                     f"shard {j}, slices {list(prefix)}", self.stage_epochs(i))
                    cache[key] = self.snapshot()
                ck[i + 1] = cache[key]
                rec[i] = current[seq[i]]
            self.alive[j][b] = L
        self._stack_cache = None
        return done

    def train_live(self) -> int:
        return sum(self.refresh_shard(j) for j in range(self.n_shards))

    def truncated(self, rows) -> dict[int, list[int]]:
        """Valid stages per sequence of every touched shard once ``rows`` are deleted: each
        sequence keeps only the stages before the first slice holding a deleted row. Pure."""
        out = {}
        for j in sorted(set(self.shard[rows].tolist())):
            slices = set(self.slice[rows][self.shard[rows] == j].tolist())
            out[j] = [min(a, min(seq.index(k) for k in slices))
                      for a, seq in zip(self.alive[j], self.seqs[j])]
        return out

    def truncate(self, rows) -> list[int]:
        """Drop every stage trained on a deleted row; returns the shards touched."""
        new = self.truncated(rows)
        for j, alive in new.items():
            self.alive[j] = alive
        return sorted(new)

    def forget_rows(self, rows) -> int:
        self.deleted[rows] = True
        touched = self.truncate(rows)
        return sum(self.refresh_shard(j) for j in touched)

    # --- serving ------------------------------------------------------------------------
    def served_sequence(self, j: int):
        """(sequence index, valid stages) served for shard j: the longest valid prefix
        (lowest index on ties); None when every sequence of the shard is empty."""
        best = max(range(len(self.seqs[j])), key=lambda b: (self.alive[j][b], -b))
        return (best, self.alive[j][best]) if self.alive[j][best] > 0 else None

    def served_state(self, j: int):
        served = self.served_sequence(j)
        return None if served is None else self.ckpts[j][served[0]][served[1]]

    def training_ids(self, j: int):
        """Sample ids the served model of shard j was trained on (from its records)."""
        import torch

        served = self.served_sequence(j)
        if served is None:
            return torch.empty(0, dtype=torch.long)
        b, p = served
        return torch.cat(self.records[j][b][:p]).sort().values

    def shard_states(self) -> list[dict]:
        """Served states of the live shards (the initial state before anything is learned)."""
        states = [s for s in (self.served_state(j) for j in range(self.n_shards)) if s is not None]
        return states or ([] if bool(self.seen.any()) else [self.init_state])

    # --- checkpoints --------------------------------------------------------------------
    def method_state(self) -> dict:
        return {"seqs": [[list(s) for s in seqs] for seqs in self.seqs], "ckpts": self.ckpts,
                "records": self.records, "alive": [list(a) for a in self.alive]}

    def load_method_state(self, state: dict) -> None:
        self.seqs = [[list(s) for s in seqs] for seqs in state["seqs"]]
        self.ckpts = [[list(c) for c in cks] for cks in state["ckpts"]]
        self.records = [[list(r) for r in recs] for recs in state["records"]]
        self.alive = [list(a) for a in state["alive"]]
        for cks in self.ckpts:      # the shared initial state stays one object
            for c in cks:
                c[0] = self.init_state
