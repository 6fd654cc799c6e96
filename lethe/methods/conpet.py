"""ConPET — Continual Parameter-Efficient Tuning for LLMs (Song et al., 2023).

Repo: Raincleared-Song/ConPET. A frozen pretrained language model is tuned through LoRA
(r = 4) for class-incremental text classification (the paper: entity typing / relation
extraction). Two variants, both with ConPET's *dynamic replay*: from the second task on,
an epoch is a fixed number of batches (``batch_limit``; ``per_task`` policy: that many per
task seen), each batch half new data and half replayed memory, the old half drawn
task-balanced (a uniformly random earlier task, then a random sample of it), so the cost of
a stage does not grow with the amount of old data.

- ``conpet_static``: one LoRA module and one head over all classes seen so far (logits of
  unseen classes are the null logit −100).
- ``conpet_dynamic``: one LoRA expert + head per task; the experts of finished tasks are
  frozen. A *PET selector* (its own LoRA + a task-id head that grows by one output per
  task) is trained first every stage on the replay loader; then the new expert is trained.
  Each sample goes to the top-k experts by selector score (k = 1); during training the true
  task's expert is forced into the selection (teacher forcing); classes of unselected
  experts get the null logit. Old experts are frozen, so their logits are cached per sample
  (a finished expert's logits on its task's memory are computed once, when the task ends)
  and the selector's choices per stage; experts that must still run share one
  mixed-adapter encoder pass. A training step costs about the same at task 8 as at task 2.

Memory (choice): ``mem_per_class`` random training samples per class, seeded (the paper
selects them by k-means over features). Both variants need a model with ``features(x)`` and
a ``head`` (``model.name=hf_encoder``).

A run should show: far less forgetting than naive fine-tuning; for the dynamic variant, old
experts bitwise unchanged after later tasks, ``conpet/selector_acc`` (task routing accuracy
on the seen test data) logged every step, and a flat per-step cost in the number of tasks
(benchmarks/lm_cost.py). Logged: ``params/trainable``, ``params/stored_bytes_per_task``,
``conpet/selector_acc``, ``conpet/selector_train_acc``.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field

from lethe.methods.base import Method
from lethe.registry import register_method

POLICIES = ("fixed", "per_task")


@dataclass
class ConPETStaticConfig:
    lora_rank: int = 4            # LoRA rank r (paper: 4)
    lora_alpha: float = 8.0       # LoRA scaling alpha (scale alpha / r; choice)
    lora_dropout: float = 0.0
    target_modules: list = field(default_factory=list)  # [] = every Linear of the encoder
    batch_limit: int = 800        # batches per epoch from the second task on (paper: 1000 × 0.8)
    batch_limit_policy: str = "fixed"  # fixed: batch_limit | per_task: batch_limit × tasks seen
    new_old_ratio: float = 1.0    # new : old samples per replay batch (paper: 1 = half/half)
    mem_per_class: int = 20       # replay memory per class (choice: random, seeded)
    null_logit: float = -100.0    # logit of classes not (yet) scored (paper: −100)


@dataclass
class ConPETDynamicConfig(ConPETStaticConfig):
    topk: int = 1                 # experts per sample at inference (paper: 1)
    teacher_forcing: bool = True  # training: the true task's expert is always selected
    selector_epochs: int = 0      # selector epochs per stage (0 = train.epochs)
    selector_lr: float = 0.0      # selector lr (0 = train.lr)


def _mix(*parts: int) -> int:
    seed = 0
    for p in parts:
        seed = (seed * 1_000_003 + int(p)) % (2 ** 62)
    return seed


class DynamicReplaySampler:
    """Index batches over [new rows | memory rows of task 0 | task 1 | ...]: ``n_new`` new
    indices (a fresh permutation, cycled) and ``batch − n_new`` old ones, each from a
    uniformly drawn earlier task. ``n_batches`` per epoch; seeded per (seed, epoch)."""

    def __init__(self, n_new: int, old_groups: list, batch_size: int, n_batches: int,
                 ratio: float, seed: int):
        self.n_new_data, self.old_groups = n_new, [list(g) for g in old_groups if len(g)]
        self.batch_size, self.n_batches, self.seed = batch_size, n_batches, seed
        self.n_new = min(batch_size, max(1, int(batch_size * ratio / (ratio + 1))))
        if not self.old_groups:
            self.n_new = batch_size
        self.epoch = 0

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self):
        import torch

        g = torch.Generator().manual_seed(_mix(self.seed, self.epoch))
        self.epoch += 1
        perm, pos = torch.randperm(self.n_new_data, generator=g), 0
        n_old = self.batch_size - self.n_new
        for _ in range(self.n_batches):
            batch = []
            while len(batch) < self.n_new:
                if pos == len(perm):
                    perm, pos = torch.randperm(self.n_new_data, generator=g), 0
                take = min(self.n_new - len(batch), len(perm) - pos)
                batch += perm[pos:pos + take].tolist()
                pos += take
            if n_old:
                tasks = torch.randint(len(self.old_groups), (n_old,), generator=g).tolist()
                for t in tasks:
                    grp = self.old_groups[t]
                    batch.append(grp[int(torch.randint(len(grp), (1,), generator=g))])
            yield batch


class _ConPETBase(Method):
    """Data handling shared by both variants: pool tensors, memory, dynamic replay loader."""

    def __init__(self, cfg, model, ctx):
        from lethe.platform.errors import ConfigError

        if cfg.batch_limit_policy not in POLICIES:
            raise ConfigError(f"method.batch_limit_policy: '{cfg.batch_limit_policy}' must be one of "
                              f"{', '.join(POLICIES)}")
        if cfg.batch_limit < 1 or cfg.mem_per_class < 1 or cfg.new_old_ratio <= 0 or cfg.lora_rank < 1:
            raise ConfigError("method: batch_limit, mem_per_class and lora_rank must be ≥ 1 and "
                              "new_old_ratio > 0")
        if not (hasattr(model, "features") and hasattr(model, "head")):
            raise ConfigError(f"method {self.name} needs a text encoder with features() and a head "
                              f"(model.name=hf_encoder)")
        pool = ctx.stream.train
        if pool is None or getattr(ctx.stream, "task_type", "classification") != "classification":
            raise ConfigError(f"method {self.name} needs a classification stream with training "
                              f"tensors (e.g. scenario.name=text_classification)")
        import torch

        self.pool = pool
        n_tasks = int(pool.exp.max()) + 1
        self.task_classes = [sorted(int(c) for c in pool.y[pool.exp == t].unique()) for t in range(n_tasks)]
        self.class_task = torch.full((ctx.stream.n_classes,), -1, dtype=torch.long)
        for t, cls in enumerate(self.task_classes):
            self.class_task[cls] = t
        self.memory: dict[int, torch.Tensor] = {}   # task → pool rows kept for replay
        self.position = 0                             # learn position of the current stage
        super().__init__(cfg, model, ctx)

    # --- data ---------------------------------------------------------------------------
    def _dataset(self, rows):
        import torch

        p = self.pool
        return torch.utils.data.TensorDataset(p.x[rows], p.y[rows], p.ids[rows],
                                              torch.zeros(len(rows), dtype=torch.long))

    def stage_loader(self, seed_tag: int = 0):
        """The stage's loader: plain shuffled batches for the first task, dynamic replay after."""
        import torch

        t, b = self.position, int(self.ctx.train.batch_size)
        new_rows = self.new_rows
        old = [self.memory[k] for k in sorted(self.memory) if k < t]
        seed = _mix(self.ctx.seed, t, seed_tag)
        if not old:
            g = torch.Generator().manual_seed(seed)
            return torch.utils.data.DataLoader(self._dataset(new_rows), batch_size=b, shuffle=True,
                                               generator=g)
        rows = torch.cat([new_rows, *old])
        groups, start = [], len(new_rows)
        for m in old:
            groups.append(range(start, start + len(m)))
            start += len(m)
        n_batches = self.cfg.batch_limit * (len(old) + 1 if self.cfg.batch_limit_policy == "per_task" else 1)
        sampler = DynamicReplaySampler(len(new_rows), groups, b, n_batches, self.cfg.new_old_ratio, seed)
        return torch.utils.data.DataLoader(self._dataset(rows), batch_sampler=sampler)

    def _remember(self, t: int) -> None:
        import torch

        g = torch.Generator().manual_seed(_mix(self.ctx.seed, t, 99))
        rows = self.new_rows
        keep = []
        for c in self.task_classes[t]:
            r = rows[self.pool.y[rows] == c]
            keep.append(r[torch.randperm(len(r), generator=g)[:self.cfg.mem_per_class]])
        self.memory[t] = torch.cat(keep).sort().values

    # --- the stage ----------------------------------------------------------------------
    def learn(self, experience) -> None:
        self.position = len(self.learned)
        super().learn(experience)
        self._remember(self.position)

    def before_training_exp(self, strategy, **kwargs):
        import torch

        # the experience's training rows; a validation split (eval.every_*) has already been
        # carved out of the template's dataset, so only the samples it kept are used
        rows = (self.pool.exp == self.position).nonzero().flatten()
        kept = getattr(strategy.adapted_dataset, "sample_id", None)
        if kept is not None:
            rows = rows[torch.isin(self.pool.ids[rows], torch.as_tensor(list(kept), dtype=torch.long))]
        self.new_rows = rows
        strategy.dataloader = self.stage_loader()

    # --- checkpoints --------------------------------------------------------------------
    def extra_state(self) -> dict:
        return {"memory": {int(k): v.clone() for k, v in self.memory.items()}}

    def load_extra_state(self, state: dict) -> None:
        self.memory = {int(k): v.long() for k, v in state["memory"].items()}
        self.position = max(len(self.learned) - 1, 0)


@register_method("conpet_static", config=ConPETStaticConfig, kinds=("learn",),
                 settings=("class_incremental",))
class ConPETStatic(_ConPETBase):
    """ConPET (static): one LoRA + a head over seen classes, dynamic replay with bounded cost."""

    name = "conpet_static"

    def setup(self, model):
        import torch

        from lethe.models.lora import LoraOptions, add_lora, lora_targets

        opts = LoraOptions(rank=self.cfg.lora_rank, alpha=self.cfg.lora_alpha, dropout=self.cfg.lora_dropout,
                           rslora=False, target_modules=list(self.cfg.target_modules))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = add_lora(model, lora_targets(model, "head", opts.target_modules), opts, "head")
        self.seen = torch.zeros(self.ctx.stream.n_classes, dtype=torch.bool)
        return model

    def before_training_exp(self, strategy, **kwargs):
        self.seen[self.task_classes[self.position]] = True
        super().before_training_exp(strategy)

    def _mask(self, logits):
        return logits.masked_fill(~self.seen.to(logits.device), self.cfg.null_logit)

    def after_forward(self, strategy, **kwargs):
        strategy.mb_output = self._mask(strategy.mb_output)

    def predict(self, x, task_ids):
        return self._mask(self.model(x))

    def log_params(self) -> dict:
        params = list(self.model.parameters())
        trainable = sum(p.numel() for p in params if p.requires_grad)
        return {"params/trainable": float(trainable),
                "params/frac_trainable": trainable / max(sum(p.numel() for p in params), 1)}

    def extra_state(self) -> dict:
        return super().extra_state() | {"seen": self.seen.clone()}

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        self.seen = state["seen"].bool()


@functools.cache
def _dynamic_model_class():
    import torch
    from torch import nn

    class DynamicConPETModel(nn.Module):
        """Frozen encoder with one LoRA adapter per task ("expert_<t>") and one for the
        selector; a head per expert over its task's classes and a task-id selector head."""

        def __init__(self, base, task_classes: list, n_classes: int, null_logit: float):
            super().__init__()
            hidden = base.head.in_features
            self.base = base
            self.experts = nn.ModuleList(nn.Linear(hidden, len(c)) for c in task_classes)
            self.selector = nn.Linear(hidden, len(task_classes))
            for t, c in enumerate(task_classes):
                self.register_buffer(f"classes_{t}", torch.as_tensor(c, dtype=torch.long))
            self.n_classes, self.null_logit = n_classes, float(null_logit)
            self.n_seen = 0                     # tasks learned so far (inference routes among them)
            self.topk = 1
            from peft.tuners.tuners_utils import BaseTunerLayer

            self.lora_layers = [m for m in base.modules() if isinstance(m, BaseTunerLayer)]
            self.trainable: list = []           # parameters to keep trainable across switches

        def classes(self, t: int):
            return getattr(self, f"classes_{t}")

        def use(self, adapter: str) -> None:
            """Route the encoder through one adapter (peft's switch also resets requires_grad,
            so the trainable set is restored after it)."""
            for layer in self.lora_layers:
                layer.set_adapter(adapter, inference_mode=True)
            for p in self.trainable:
                p.requires_grad_(True)

        def expert_logits(self, t: int, x):
            self.use(f"expert_{t}")
            return self.experts[t](self.base.features(x))

        def mixed_logits(self, x, experts):
            """Each row of ``x`` through its own expert in one encoder pass (peft's per-sample
            ``adapter_names``), then through that expert's head: a list of [n_e, |classes_e|]
            in the order of ``experts.unique()``."""
            names = [f"expert_{e}" for e in experts.tolist()]

            def hook(_mod, args, kwargs):
                return args, {**kwargs, "adapter_names": names}

            handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in self.lora_layers]
            try:
                feats = self.base.features(x)
            finally:
                for h in handles:
                    h.remove()
            return [self.experts[e](feats[experts == e]) for e in experts.unique().tolist()]

        def selector_logits(self, x, n_seen: int):
            self.use("selector")
            z = self.selector(self.base.features(x))
            mask = torch.arange(z.shape[1], device=z.device) >= n_seen
            return z.masked_fill(mask, float("-inf"))

        def select(self, x, n_seen: int, k: int):
            """[B, k'] experts per sample (k' = min(k, n_seen)); all seen experts when k ≥ n_seen."""
            b = x.shape[0]
            if k >= n_seen:
                return torch.arange(n_seen, device=x.device).expand(b, n_seen)
            return self.selector_logits(x, n_seen).topk(k, dim=1).indices

        def route(self, x, selected, fixed=None, live: int | None = None):
            """Logits [B, n_classes]: each sample's selected experts score their classes, the
            rest get the null logit. ``fixed``: (rows, classes, values) of precomputed expert
            logits, written in one indexed assignment (then no other expert runs but ``live``);
            ``live``: the expert being trained (its own pass, with gradients). Without
            ``fixed`` every other selected expert runs in one shared mixed-adapter pass, so
            the cost does not grow with the number of experts."""
            out = torch.full((x.shape[0], self.n_classes), self.null_logit, device=x.device)
            if fixed is not None:
                rows, cols, vals = fixed
                if len(rows):
                    out[rows, cols] = vals.to(out.dtype)
            else:
                pairs = [(i, int(e)) for i, row in enumerate(selected.tolist()) for e in row if e != live]
                if pairs:
                    rows = torch.tensor([i for i, _ in pairs], device=x.device)
                    experts = torch.tensor([e for _, e in pairs], device=x.device)
                    for e, z in zip(experts.unique().tolist(), self.mixed_logits(x[rows], experts)):
                        r = rows[experts == e]
                        out[r.unsqueeze(1), self.classes(e).unsqueeze(0)] = z.to(out.dtype)
            if live is not None and (selected == live).any():
                r = (selected == live).any(1).nonzero().flatten()
                out[r.unsqueeze(1), self.classes(live).unsqueeze(0)] = self.expert_logits(live, x[r]).to(out.dtype)
            return out

        def forward(self, x):
            if self.n_seen == 0:
                return torch.full((x.shape[0], self.n_classes), self.null_logit, device=x.device)
            return self.route(x, self.select(x, self.n_seen, self.topk))

    return DynamicConPETModel


@register_method("conpet_dynamic", config=ConPETDynamicConfig, kinds=("learn",),
                 settings=("class_incremental",))
class ConPETDynamic(_ConPETBase):
    """ConPET (dynamic): per-task LoRA experts, frozen old experts, a PET selector picks top-k."""

    name = "conpet_dynamic"

    def setup(self, model):
        import torch
        from peft import LoraConfig, inject_adapter_in_model

        from lethe.models.lora import lora_targets
        from lethe.platform.errors import ConfigError

        if self.cfg.topk < 1:
            raise ConfigError("method.topk must be ≥ 1")
        model.requires_grad_(False)
        targets = lora_targets(model.encoder, "\0", list(self.cfg.target_modules))
        import re

        config = LoraConfig(r=int(self.cfg.lora_rank), lora_alpha=float(self.cfg.lora_alpha),
                            lora_dropout=float(self.cfg.lora_dropout), bias="none",
                            target_modules="(" + "|".join(re.escape(t) for t in targets) + ")")
        with warnings.catch_warnings():   # peft warns that several adapters share the model
            warnings.simplefilter("ignore")
            for name in [f"expert_{t}" for t in range(len(self.task_classes))] + ["selector"]:
                inject_adapter_in_model(config, model.encoder, adapter_name=name)
        net = _dynamic_model_class()(model, self.task_classes, self.ctx.stream.n_classes,
                                     self.cfg.null_logit)
        net.topk = int(self.cfg.topk)
        net.requires_grad_(False)
        for p in net.experts[0].parameters():   # the template's optimizer needs a non-empty
            p.requires_grad_(True)              # list at build time (Avalanche then adds all)
        self.cache: dict = {}            # (expert, sample id) → logits of a frozen expert: valid
                                         # for good, kept across stages (checkpointed)
        self.sel_cache: dict = {}        # sample id → selected experts (this stage's selector)
        self.selector_train_acc: float | None = None
        self.class_tensors = [torch.as_tensor(c, dtype=torch.long) for c in self.task_classes]
        return net

    # --- parameters of one expert / the selector ----------------------------------------
    def adapter_params(self, adapter: str) -> list:
        tag = f".{adapter}."
        return [p for n, p in self.model.base.named_parameters() if ".lora_" in n and tag in n + "."]

    def expert_params(self, t: int) -> list:
        return self.adapter_params(f"expert_{t}") + list(self.model.experts[t].parameters())

    def selector_params(self) -> list:
        return self.adapter_params("selector") + list(self.model.selector.parameters())

    def _train_only(self, params: list) -> None:
        self.model.requires_grad_(False)
        self.model.trainable = list(params)
        for p in params:
            p.requires_grad_(True)

    # --- the stage ----------------------------------------------------------------------
    def before_training_exp(self, strategy, **kwargs):
        super().before_training_exp(strategy)
        self.sel_cache = {}
        t = self.position
        if t >= 1:
            self.train_selector(t)
        self._train_only(self.expert_params(t))

    def train_selector(self, t: int) -> None:
        """Task-id classification over tasks 0..t on the replay loader, before the expert."""
        import types

        import torch

        from lethe.methods.base import make_optimizer

        net, train = self.model, self.ctx.train
        self._train_only(self.selector_params())
        hp = types.SimpleNamespace(optimizer=train.optimizer, lr=self.cfg.selector_lr or train.lr,
                                   momentum=train.momentum, weight_decay=train.weight_decay)
        opt = make_optimizer(self.selector_params(), hp)
        loader = self.stage_loader(seed_tag=1)
        dev = self.ctx.device
        net.train()
        for _ in range(self.cfg.selector_epochs or train.epochs):
            hits = total = 0
            for x, y, _ids, _t in loader:
                x, task = x.to(dev), self.class_task[y].to(dev)
                opt.zero_grad()
                z = net.selector_logits(x, t + 1)
                loss = torch.nn.functional.cross_entropy(z, task)
                loss.backward()
                opt.step()
                hits += int((z.argmax(1) == task).sum())
                total += len(task)
            self.selector_train_acc = hits / max(total, 1)
        opt.zero_grad(set_to_none=True)

    def _selected(self, x, ids, t: int):
        """Experts per sample for training: top-k (cached per sample), teacher-forced."""
        import torch

        net, k = self.model, int(self.cfg.topk)
        if k >= t + 1:
            return net.select(x, t + 1, k)
        missing = [i for i, s in enumerate(ids.tolist()) if s not in self.sel_cache]
        if missing:
            rows = torch.tensor(missing, device=x.device)
            with torch.no_grad(), _eval(net):
                picks = net.select(x[rows], t + 1, k).cpu()
            for i, p in zip(missing, picks):
                self.sel_cache[int(ids[i])] = p
        return torch.stack([self.sel_cache[int(s)] for s in ids.tolist()]).to(x.device)

    def train_forward(self, strategy):
        """Training logits: cached old experts + the current expert, null logit elsewhere."""
        import torch

        net, t = self.model, self.position
        x, y, ids = strategy.mb_x, strategy.mb_y, strategy.mbatch[2]
        if self.cfg.teacher_forcing and self.cfg.topk == 1 and t >= 1:
            # top-1 with teacher forcing always ends at the true expert: the selector's pick
            # would be overwritten, so it is not computed (same logits, less work)
            selected = self.class_task.to(x.device)[y].unsqueeze(1)
        else:
            selected = self._selected(x, ids, t)
        if self.cfg.teacher_forcing:
            true = self.class_task.to(x.device)[y]
            hit = (selected == true.unsqueeze(1)).any(1)
            selected = selected.clone()
            selected[~hit, -1] = true[~hit]
        # old experts: logits of uncached samples in one mixed pass, then all from the cache,
        # assembled into (row, class, value) triples: no per-expert work in the step
        id_list = ids.tolist()
        pairs = [(i, e) for i, row in enumerate(selected.tolist()) for e in row if e != t]
        keys = [(e, int(id_list[i])) for i, e in pairs]
        todo = {}
        for key, (i, _) in zip(keys, pairs):
            if key not in self.cache:
                todo.setdefault(key, i)
        if todo:
            rows = torch.tensor(list(todo.values()), device=x.device)
            experts = torch.tensor([key[0] for key in todo], device=x.device)
            with torch.no_grad(), _eval(net):
                parts = net.mixed_logits(x[rows], experts)
            for e, z in zip(experts.unique().tolist(), parts):
                for key, row in zip([k for k in todo if k[0] == e], z.cpu()):
                    self.cache[key] = row
        fixed = None
        if pairs:
            sizes = [len(self.task_classes[e]) for _, e in pairs]
            fixed = (torch.tensor([i for (i, _), n in zip(pairs, sizes) for _ in range(n)], device=x.device),
                     torch.cat([self.class_tensors[e] for _, e in pairs]).to(x.device),
                     torch.cat([self.cache[k] for k in keys]).to(x.device))
        out = net.route(x, selected, fixed, live=t)   # the current expert: its own pass, with grads
        if not out.requires_grad:            # no sample routed to the current expert
            out = out + 0.0 * sum(p.sum() for p in self.expert_params(t))
        return out

    def strategy_class(self):
        from avalanche.training.templates import SupervisedTemplate

        method = self

        class ConPETTemplate(SupervisedTemplate):
            def forward(self):
                if self.is_training:
                    return method.train_forward(self)
                return super().forward()

        return ConPETTemplate

    def learn(self, experience) -> None:
        super().learn(experience)
        self.model.requires_grad_(False)   # the finished expert is frozen for good
        self.model.trainable = []
        self.model.n_seen = len(self.learned)
        self.sel_cache = {}
        self._cache_memory_logits(self.position)

    def _cache_memory_logits(self, t: int) -> None:
        """The finished expert's logits on its task's memory, once: replayed samples of task t
        never need expert t's forward again (it is frozen), whatever the number of tasks."""
        import torch

        rows = self.memory[t]
        with torch.no_grad(), _eval(self.model):
            for s in range(0, len(rows), 256):
                r = rows[s:s + 256]
                z = self.model.expert_logits(t, self.pool.x[r].to(self.ctx.device)).cpu()
                for i, row in zip(self.pool.ids[r].tolist(), z):
                    self.cache[(t, int(i))] = row

    # --- inference and logging ----------------------------------------------------------
    def predict(self, x, task_ids):
        return self.model(x)

    def selector_accuracy(self) -> float | None:
        """Task-routing accuracy of the selector on the test data of the seen tasks."""
        import torch

        n = self.model.n_seen
        if n < 2:
            return None
        test = self.ctx.stream.test
        rows = (test.exp < n).nonzero().flatten()
        hits = 0
        with torch.no_grad(), _eval(self.model):
            for s in range(0, len(rows), 256):
                r = rows[s:s + 256]
                z = self.model.selector_logits(test.x[r].to(self.ctx.device), n)
                hits += int((z.argmax(1).cpu() == test.exp[r]).sum())
        return hits / max(len(rows), 1)

    def log_params(self) -> dict:
        out = {"params/trainable": float(sum(p.numel() for p in self.expert_params(max(self.position, 0)))),
               "params/stored_bytes_per_task": float(sum(p.numel() * p.element_size()
                                                         for p in self.expert_params(0)))}
        acc = self.selector_accuracy()
        if acc is not None:
            out["conpet/selector_acc"] = acc
        if self.selector_train_acc is not None:
            out["conpet/selector_train_acc"] = self.selector_train_acc
        return out

    def extra_state(self) -> dict:
        import torch

        keys = sorted(self.cache)
        by_expert = {}
        for e in sorted({k[0] for k in keys}):
            ks = [k for k in keys if k[0] == e]
            by_expert[int(e)] = {"ids": torch.tensor([k[1] for k in ks], dtype=torch.long),
                                 "logits": torch.stack([self.cache[k] for k in ks])}
        return super().extra_state() | {"logit_cache": by_expert}

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        self.model.n_seen = len(self.learned)
        self.cache = {(int(e), int(i)): row for e, d in state.get("logit_cache", {}).items()
                      for i, row in zip(d["ids"].tolist(), d["logits"])}


class _eval:
    """Context manager: eval mode (no dropout) for cached no-grad passes, then back."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was = self.model.training
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was)
        return False
