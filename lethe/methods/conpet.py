"""ConPET — Continual Parameter-Efficient Tuning for LLMs (Song et al., 2023).

Repo: Raincleared-Song/ConPET. A frozen pretrained language model is tuned through LoRA
(r = 4) for class-incremental text classification (the paper: entity typing / relation
extraction). Two variants, both with ConPET's *dynamic replay*: from the second task on,
an epoch is a fixed number of batches (``batch_limit``; ``per_task`` policy: that many per
task seen), each batch half new data and half replayed memory, the old half drawn
task-balanced (a uniformly random earlier task, then a random sample of it), so the cost of
a stage does not grow with the amount of old data.

- ``conpet_static``: one LoRA module and one head over every label (the official code scores
  all labels, unseen ones included; ``method.mask_unseen: true`` gives classes not yet seen
  the null logit −100 instead, lethe's earlier default).
- ``conpet_dynamic``: one LoRA expert + head per task; the experts of finished tasks are
  frozen. A *PET selector* (its own LoRA + a task-id head that grows by one output per
  task) is trained first every stage on the replay loader; then the new expert is trained.
  Each sample goes to the top-k experts by selector score (k = 1); during training the true
  task's expert is forced into the selection (teacher forcing); classes of unselected
  experts get the null logit. Old experts are frozen, so their logits are cached per sample
  (a finished expert's logits on its task's memory are computed once, when the task ends)
  and the selector's choices per stage; experts that must still run share one
  mixed-adapter encoder pass. A training step costs about the same at task 8 as at task 2.

Memory: the official code replays from the *full* training data of the earlier tasks (the
k-means-selected memories in its repository belong to the EMR / CRL baselines it compares
with), and so does lethe by default (``mem_per_class: 0``); ``mem_per_class: n`` keeps n random
training samples per class instead (seeded), which bounds memory. The selector trains on the
same replay loader. Official training also clips gradients at norm 1.0 and keeps the best epoch
on a 20% validation share: the presets set ``train.grad_clip_norm: 1.0``, and
``conpet_dynamic_local`` ``eval.every_epochs: 1``, ``eval.val_fraction: 0.2`` and
``checkpoint.select: best`` (the platform's validation split, carved from the current
experience's training rows, which the stage then does not train on). Both variants need a
model with ``features(x)`` and a ``head`` (``model.name=hf_encoder``).

The family lives here (configs, the dynamic replay sampler, :class:`ConPETBase`); the two
methods are lethe/methods/conpet_static.py and lethe/methods/conpet_dynamic.py.

A run should show: far less forgetting than naive fine-tuning; for the dynamic variant, old
experts bitwise unchanged after later tasks, ``conpet/selector_acc`` (task routing accuracy
on the seen test data) logged every step, and a flat per-step cost in the number of tasks
(benchmarks/lm_cost.py). Logged: ``params/trainable``, ``params/stored_bytes_per_task``,
``conpet/selector_acc``, ``conpet/selector_train_acc``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from lethe.errors import ConfigError
from lethe.methods.base import Method

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
    mem_per_class: int = 0        # 0 = replay every training row of earlier tasks (official);
                                  # n = n random rows per class (seeded), bounded memory
    null_logit: float = -100.0    # logit of classes not (yet) scored (paper: −100)
    mask_unseen: bool = False     # conpet_static: null logit for classes not yet seen (official:
                                  # an unmasked head over every label)


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


class ConPETBase(Method):
    """Data handling shared by both variants: pool tensors, memory, dynamic replay loader."""

    def __init__(self, cfg, model, ctx):
        if cfg.batch_limit_policy not in POLICIES:
            raise ConfigError(f"method.batch_limit_policy: '{cfg.batch_limit_policy}' must be one of "
                              f"{', '.join(POLICIES)}")
        if cfg.batch_limit < 1 or cfg.mem_per_class < 0 or cfg.new_old_ratio <= 0 or cfg.lora_rank < 1:
            raise ConfigError("method: batch_limit and lora_rank must be ≥ 1, mem_per_class ≥ 0 "
                              "(0 = every earlier training row) and new_old_ratio > 0")
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
        if self.cfg.mem_per_class == 0:   # the official full-data replay
            self.memory[t] = rows.sort().values
            return
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


class eval_mode:
    """Context manager: eval mode (no dropout) for cached no-grad passes, then back."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was = self.model.training
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was)
        return False
