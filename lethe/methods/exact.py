"""Exact unlearning: what retrain, SISA and S3T share.

:class:`ExactUnlearner` keeps the training pool, seen/deleted masks, request validation (a
request is checked completely before anything changes), optional LoRA on a frozen backbone
(``lora.rank``) and the vmapped ensemble forward of several states of one model.

Why a tensor loop (lethe/engine/loop.py ``train_loop``) instead of Avalanche's template here:
exactness means every stored state is a pure function of (initial state, sample ids, seed).
The loop draws its batch order from its own generator seeded per stage and runs inside
``fork_rng``, so a stage retrained later (or in a fresh process) repeats bit for bit; and the
cost of a deletion is measured without per-call template overhead, which would flatter S3T.

Training inputs go through the stream's *training* pipeline: when the learn experiences'
Avalanche datasets transform samples differently in their ``train`` group than in ``eval``
(augmentation, as Avalanche's CIFAR benchmarks and S3T's official code train with), every
batch is read through ``dataset.train()`` at every access, so each epoch sees fresh
augmentations; they draw from torch's RNG, which ``train_loop`` seeds per stage, so stages
still repeat bit for bit. Tensor streams (no transforms) keep the fast path: the pool tensors
(``train_pool``, eval transforms), which also serve the sample ids, labels and the
forget/retain evaluation.
"""
from __future__ import annotations

import abc
import time

from lethe.engine.loop import train_loop
from lethe.errors import ConfigError, RunError
from lethe.methods.base import Method

PRETRAIN_NEEDS_PUBLIC = ("method.lora.pretrain_epochs > 0 needs a non-deletable public split in "
                         "the stream (e.g. scenario.public_fraction=0.3 for split_digits)")


def train_views(stream, probe: int = 8):
    """The learn experiences' datasets in their ``train`` transform group, or None when
    training would see what evaluation sees: no sample of the first ``probe`` of any
    experience changes between ``eval()`` and ``train()`` under two torch seeds."""
    import torch

    from lethe.scenarios.types import LEARN

    views, differs = [], False
    for exp in (e for e in stream.experiences if e.kind == LEARN):
        data = exp.train.dataset
        if not (hasattr(data, "train") and hasattr(data, "eval")):
            return None
        train, ev = data.train(), data.eval()
        views.append((train, list(data.sample_id)))
        with torch.random.fork_rng(devices=[]):     # the probe leaves the run's RNG alone
            for seed in (0, 1):
                torch.manual_seed(seed)
                differs = differs or any(
                    not torch.equal(torch.as_tensor(train[i][0]), torch.as_tensor(ev[i][0]))
                    for i in range(min(probe, len(data))))
    return views if differs else None


class TrainInputs:
    """Pool rows read through the training pipeline at each access (``x[idx]`` of
    ``train_loop``): every epoch's batches get fresh augmentations."""

    def __init__(self, sources: list, device):
        self.sources, self.device = sources, device   # (dataset, index) per row

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, idx):
        import torch

        picked = [self.sources[i] for i in torch.as_tensor(idx).flatten().tolist()]
        return torch.stack([torch.as_tensor(ds[j][0]) for ds, j in picked]).to(self.device)


class ExactUnlearner(Method, abc.ABC):
    """Base of the exact-unlearning methods (retrain, sisa, s3t)."""

    name = "exact"

    # --- construction -------------------------------------------------------------------
    def __init__(self, cfg, model, ctx):
        self.validate_config(cfg)
        super().__init__(cfg, model, ctx)
        import torch

        from lethe.scenarios.forget import train_pool

        pool = train_pool(ctx.stream)
        self.pool_ids = pool.ids.long()
        self.row_of = {int(i): r for r, i in enumerate(self.pool_ids.tolist())}
        self._pool = pool
        self._x = self._y = None            # pool tensors on the device, moved on first use
        self._sources = self._train_sources(ctx.stream)
        self.seen = torch.zeros(len(self.pool_ids), dtype=torch.bool)
        self.deleted = torch.zeros(len(self.pool_ids), dtype=torch.bool)
        self.stats: dict = {"requests_since_retrain": 0}
        self.init_state = self.snapshot()
        self._stack_cache = None

    @classmethod
    def validate_config(cls, cfg) -> None:
        """Config checks that need no data (ConfigError)."""
        from lethe.models.lora import FUSED_QKV
        from lethe.registry import check_choice

        check_choice("method.lora.fused_qkv", cfg.lora.fused_qkv, FUSED_QKV)

    def setup(self, model):
        from lethe.models import lora

        opts = self.cfg.lora
        if opts.resize_to:
            model = lora.resize_input(model, opts.resize_to)
        self.head = lora.find_head(model, self.ctx.stream.n_classes)
        if int(opts.pretrain_epochs) > 0:
            self.pretrain(model, int(opts.pretrain_epochs))
        self.frozen_backbone = int(opts.rank) > 0
        if self.frozen_backbone:
            self.targets = lora.lora_targets(model, self.head, list(opts.target_modules))
            model = lora.add_lora(model, self.targets, opts, self.head)
        else:
            self.targets = []
            model.requires_grad_(True)
        self.train_names = [n for n, p in model.named_parameters() if p.requires_grad]
        # the state each trained model owns: trainable parameters, plus the buffers
        # (BatchNorm statistics) when the whole network trains
        self.keys = list(self.train_names)
        if not self.frozen_backbone:
            self.keys += [n for n, _ in model.named_buffers()]
        model.eval()
        return model

    def pretrain(self, model, epochs: int) -> None:
        """Train the whole model on the stream's public (non-deletable) split: the backbone
        then depends on no deletable sample, so deletions stay exact."""
        from lethe.scenarios.forget import derive_seed

        public = getattr(self.ctx.stream, "public", None)
        if public is None or len(public.y) == 0:
            raise ConfigError(PRETRAIN_NEEDS_PUBLIC)
        device = self.ctx.device
        model.to(device)
        train_loop(model, [n for n, _ in model.named_parameters()], public.x.to(device),
                   public.y.long().to(device), self.ctx.train, epochs,
                   derive_seed(self.ctx.seed, 0xBAC), f"{self.name} backbone pretraining",
                   engine=self.engine)

    # --- model states -------------------------------------------------------------------
    def _tensors(self) -> dict:
        return {**dict(self.model.named_parameters()), **dict(self.model.named_buffers())}

    def snapshot(self) -> dict:
        """A copy of the current trainable state of the model."""
        t = self._tensors()
        return {k: t[k].detach().clone() for k in self.keys}

    def load(self, state: dict) -> None:
        import torch

        t = self._tensors()
        with torch.no_grad():
            for k, v in state.items():
                t[k].copy_(v)

    # --- data ---------------------------------------------------------------------------
    def _device_pool(self):
        if self._x is None:
            self._x = self._pool.x.to(self.ctx.device)
            self._y = self._pool.y.long().to(self.ctx.device)
        return self._x, self._y

    def _train_sources(self, stream):
        """(train-group dataset, index) of every pool row, or None (train on the pool)."""
        views = train_views(stream)
        if views is None:
            return None
        where = {int(i): (ds, j) for ds, ids in views for j, i in enumerate(ids)}
        return [where[int(i)] for i in self.pool_ids.tolist()]

    def training_inputs(self, rows):
        """Inputs and labels ``train_loop`` trains on for pool ``rows``."""
        if self._sources is None:
            x_all, y_all = self._device_pool()
            rows_dev = rows.to(self.ctx.device)
            return x_all[rows_dev], y_all[rows_dev]
        y = self._pool.y[rows].long().to(self.ctx.device)
        return TrainInputs([self._sources[r] for r in rows.tolist()], self.ctx.device), y

    @property
    def live(self):
        """Pool rows learned and not deleted (bool tensor)."""
        return self.seen & ~self.deleted

    def ids_of(self, rows):
        return self.pool_ids[rows]

    # --- the deterministic training loop ------------------------------------------------
    def fit(self, names: list[str], rows, seed: int, label: str, epochs: int | None = None) -> int:
        """Train the parameters ``names`` of the model on pool ``rows`` (sorted) for ``epochs``
        (None: train.epochs); batch order and dropout are drawn from ``seed`` only. Returns
        the samples processed (rows × epochs; 0 for 0 epochs)."""
        import torch

        rows = torch.as_tensor(rows, dtype=torch.long)
        epochs = int(self.ctx.train.epochs) if epochs is None else int(epochs)
        if len(rows) == 0 or not names or epochs < 1:
            return 0
        x, y = self.training_inputs(rows)
        return train_loop(self.model, names, x, y, self.ctx.train,
                          epochs, seed, f"{self.name} ({label})",
                          freeze_norms=self.frozen_backbone, engine=self.engine)

    # --- serving experiences ------------------------------------------------------------
    def learn(self, experience) -> None:
        from lethe.scenarios.forget import experience_ids

        rows = [self.row_of[int(i)] for i in experience_ids(experience).tolist()]
        self.seen[rows] = True
        self.learned.append(experience.index)
        self.stats["learn_samples"] = self.train_live()
        self.stats["requests_since_retrain"] = 0

    def request_rows(self, request):
        """Pool rows of a request, after checking every id (RunError; nothing changes)."""
        import torch

        from lethe.scenarios.forget import _fmt

        ids = torch.as_tensor(request.sample_ids, dtype=torch.long).flatten().tolist()
        if not ids:
            raise RunError("empty deletion request: it names no sample id")
        dup = sorted({i for i in ids if ids.count(i) > 1}) if len(set(ids)) < len(ids) else []
        if dup:
            raise RunError(f"deletion request lists ids {_fmt(dup)} more than once")
        unknown = [i for i in ids if i not in self.row_of]
        if unknown:
            raise RunError(f"deletion request names unknown sample ids {_fmt(unknown)}: no "
                           f"training sample of this stream has them")
        rows = torch.tensor([self.row_of[i] for i in ids], dtype=torch.long)
        unseen = [i for i, r in zip(ids, rows.tolist()) if not self.seen[r]]
        if unseen:
            raise RunError(f"deletion request names samples {_fmt(unseen)} that {self.name} has "
                           f"not learned yet")
        gone = [i for i, r in zip(ids, rows.tolist()) if self.deleted[r]]
        if gone:
            raise RunError(f"deletion request names samples {_fmt(gone)} that were already deleted")
        after = self.live.clone()
        after[rows] = False
        if not bool(after.any()):
            raise RunError("deletion request deletes every remaining training sample; there is "
                           "no data left to serve a model from")
        problem = self.partition_problem(after)
        if problem:
            raise RunError(f"deletion request {problem}")
        return rows.sort().values

    def unlearn(self, request) -> None:
        t0 = time.perf_counter()
        rows = self.request_rows(request)
        processed = self.forget_rows(rows)
        self.stats["serve_s"] = time.perf_counter() - t0
        self.stats["retrain_samples"] = processed
        self.stats["requests_since_retrain"] = self.count_request(processed)
        self._stack_cache = None

    def count_request(self, processed: int) -> int:
        """``requests_since_retrain`` after a request that re-processed ``processed`` samples:
        one more when it trained nothing, else 0 (S3T counts its own way)."""
        return self.stats.get("requests_since_retrain", 0) + 1 if processed == 0 else 0

    def unlearn_stats(self) -> dict:
        """Cost of the last deletion and method state, logged as unlearn/<key>."""
        keep = ("serve_s", "retrain_samples", "requests_since_retrain")
        return {k: float(v) for k, v in self.stats.items() if k in keep or "/" in k}

    # --- subclass hooks -----------------------------------------------------------------
    @abc.abstractmethod
    def train_live(self) -> int:
        """(Re)train on the live data after a learn experience; returns samples processed."""

    @abc.abstractmethod
    def forget_rows(self, rows) -> int:
        """Apply a validated deletion; returns samples processed to serve it."""

    @classmethod
    def partition_problem_of(cls, cfg, live_ids, had_data, seed: int) -> str:
        """'' or what is wrong with a live set for this method (e.g. an empty shard)."""
        return ""

    def partition_problem(self, live_after) -> str:
        return self.partition_problem_of(self.cfg, self.pool_ids[live_after],
                                         self.pool_ids[self.seen], self.ctx.seed)

    @classmethod
    def check_stream(cls, cfg, stream, seed: int) -> None:
        """Config-time check of the whole request schedule (runner.build_components)."""
        import torch

        from lethe.scenarios.forget import experience_ids, train_pool

        cls.validate_config(cfg)
        public = getattr(stream, "public", None)
        if int(cfg.lora.pretrain_epochs) > 0 and (public is None or len(public.y) == 0):
            raise ConfigError(PRETRAIN_NEEDS_PUBLIC)
        pool = train_pool(stream)
        row_of = {int(i): r for r, i in enumerate(pool.ids.tolist())}
        seen = torch.zeros(len(pool.ids), dtype=torch.bool)
        deleted = torch.zeros_like(seen)
        for exp in stream.experiences:
            if exp.kind == "learn":
                seen[[row_of[int(i)] for i in experience_ids(exp).tolist()]] = True
                what = f"after learn experience {exp.index}"
            elif exp.kind == "forget":
                ids = torch.as_tensor(exp.request.sample_ids).long().tolist()
                deleted[[row_of[i] for i in ids if i in row_of]] = True
                what = (f"the deletion request at stream step {exp.index} (after learn "
                        f"experience {exp.request.after})")
            else:
                continue
            problem = cls.partition_problem_of(cfg, pool.ids[seen & ~deleted], pool.ids[seen], seed)
            if problem:
                raise ConfigError(f"scenario.forget_requests / method: {what}: {problem}")

    # --- predictions --------------------------------------------------------------------
    def stacked_logits(self, states: list[dict], x):
        """[M, B, C] logits of the model with each state swapped in: one vmapped
        ``torch.func`` pass (the shard models share the template's architecture)."""
        import torch
        from torch.func import functional_call

        if len(states) == 1:
            return functional_call(self.model, states[0], (x,)).unsqueeze(0)
        cache = self._stack_cache
        if cache is None or len(cache[0]) != len(states) or any(a is not b for a, b in
                                                                zip(cache[0], states)):
            stacked = {k: torch.stack([s[k] for s in states]) for k in states[0]}
            self._stack_cache = cache = (list(states), stacked)
        return torch.vmap(lambda p, xb: functional_call(self.model, p, (xb,)),
                          in_dims=(0, None))(cache[1], x)

    # --- checkpoints --------------------------------------------------------------------
    # The template's Avalanche optimizer is never stepped (fit() makes one per stage), so
    # only the model, the learned steps and the method state are saved.
    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "learned": list(self.learned),
                "extra": self.extra_state()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.learned = list(state["learned"])
        self.load_extra_state(state["extra"])

    def extra_state(self) -> dict:
        return {"seen": self.seen.clone(), "deleted": self.deleted.clone(),
                "stats": {k: float(v) for k, v in self.stats.items()},
                "init": self.init_state, **self.method_state()}

    def load_extra_state(self, state: dict) -> None:
        self.seen = state["seen"].clone()
        self.deleted = state["deleted"].clone()
        self.stats = {k: (int(v) if k in ("requests_since_retrain",) else v)
                      for k, v in state["stats"].items()}
        self.init_state = state["init"]
        self.load_method_state(state)
        self._stack_cache = None

    def method_state(self) -> dict:
        return {}

    def load_method_state(self, state: dict) -> None:
        pass
