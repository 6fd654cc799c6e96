"""MOS — Model Surgery for pre-trained-model class-incremental learning.

Sun, Zhou, Zhao, Gan, Zhan & Ye, "MOS: Model Surgery for Pre-Trained Model-Based
Class-Incremental Learning", AAAI 2025 (official code: sun-hailong/AAAI25-MOS, on LAMDA-PILOT).

A frozen pretrained ViT gets AdaptFormer adapters on every block (bottleneck 16, scale 0.1).
Task b trains its own adapter set, initialised from task b−1's, with cross-entropy over the
task's classes (other logits masked) plus 0.1 × a self-discrimination loss that pushes the
similarity matrix of [stored class means; batch features] (temperature 0.8) towards the
identity. *Adapter merging*: after every optimizer step the adapter is pulled towards the
mean of the stored adapters of earlier tasks, θ_b ← 0.9·θ_b + 0.1·mean(θ_k, k<b) (the mean
is computed once from the stored copies; nothing is updated in place while iterating). A copy
of each task's adapter is stored. Per class, MOS keeps the mean and covariance of its
features (under its task's adapter) and, after every task from the second on, re-trains the
linear head for 30 epochs on samples from these Gaussians (*classifier alignment*); it also
keeps a prototype per class from adapter 0's features.

Inference is the training-free *self-refined adapter retrieval*: adapter 0's features against
the prototypes (cosine) pick a task; the sample is classified by the head with that task's
adapter; if the predicted class belongs to another task, retry with that task's adapter (at
most 4 rounds, stopping as soon as the task is stable). Final scores:
softmax(refined logits) + softmax(T · prototype cosine), T = number of tasks learned.

What a run should show: far less forgetting than sequential tuning of one adapter
(``seq_adapter``, registered below as the baseline on the same backbone); with a ViT-B/16
IN-21k backbone the paper (Table 1) reports average incremental / last accuracy 93.30 / 89.25
on CIFAR-100 B0 Inc5 and 82.96 / 77.93 on ImageNet-R B0 Inc20 (lethe's acc/avg_incremental
and acc/last; presets paper/mos_cifar100_b0inc5 and paper/mos_imagenet_r).

Deviation in adapter merging (lethe's default kept): lethe applies the paper's formula to
the adapter parameters once after every optimizer step, from the stored copies. The official
backbone/vit_mos.py calls ``reweight_adapter`` inside the block loop of ``forward_features``:
each forward rewrites every layer's adapter in place (``.data``) once per block, i.e. depth
(12) momentum steps per forward, in training and at test time alike, where it rewrites the
*stored* adapter of the task being queried, so stored adapters drift with every test batch.
lethe keeps each stored copy as it was when its task ended and does not offer that variant
(predictions would depend on how many test batches ran before).

Classifier alignment draws 5 × train.batch_size Gaussian samples per class and epoch (the
official ``num_sampled_pcls``: 240 at batch 48, 80 at batch 16) unless ca_samples_per_class.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from lethe.errors import ConfigError, RunError
from lethe.methods.base import Method
from lethe.registry import register_method

MERGE_EVERY = ("step", "task")
CA_STORAGE = ("covariance", "variance")


@dataclass
class AdapterTuningConfig:
    bottleneck: int = 16          # AdaptFormer bottleneck width (official ffn_num)
    adapter_scale: float = 0.1    # s in x + MLP(LN(x)) + s·adapter(x)
    adapter_dropout: float = 0.1  # dropout inside the adapter (official: 0.1)
    head_lr_scale: float = 0.1    # the linear head learns at head_lr_scale × train.lr
    min_lr: float = 0.0           # per-task cosine schedule over train.epochs ends at this lr


@dataclass
class MOSConfig(AdapterTuningConfig):
    reg: float = 0.1              # weight of the prototype self-discrimination (orthogonality) loss
    orth_temperature: float = 0.8  # S = M·Mᵀ / orth_temperature
    merge_momentum: float = 0.1   # α in θ_b ← (1−α)·θ_b + α·mean(θ_k, k<b); 0 disables merging
    merge_every: str = "step"     # step: after every optimizer step (official code) | task: once
    ca_epochs: int = 30           # classifier-alignment epochs after each task b ≥ 1 (0 disables)
    ca_lr: float = 0.005          # SGD lr of classifier alignment (cosine over ca_epochs)
    ca_momentum: float = 0.9      # SGD momentum of classifier alignment
    ca_weight_decay: Optional[float] = None  # None = train.weight_decay (as the official code)
    # Gaussian samples per class and epoch; None = 5 × train.batch_size (official)
    ca_samples_per_class: Optional[int] = None
    ca_storage: str = "covariance"   # covariance (full) | variance (diagonal): per-class statistics
    cov_eps: float = 1e-4         # added to the diagonal of every class covariance
    max_iter: int = 4             # self-refined retrieval: at most this many rounds
    ensemble: bool = True         # add softmax(T · prototype cosine) to the refined softmax


# --- the formulas, as plain functions (unit-tested) ----------------------------------------
def mean_adapter(stored: list[dict]) -> dict:
    """Element-wise mean of stored adapter copies (name → tensor); inputs untouched."""
    import torch

    return {k: torch.stack([s[k] for s in stored]).mean(0) for k in stored[0]}


def merge_adapters(current: dict, mean: dict, momentum: float) -> dict:
    """MOS adapter merging: (1−α)·θ_current + α·mean(θ_k, k<b), as a new dict."""
    return {k: (1.0 - momentum) * v + momentum * mean[k] for k, v in current.items()}


def orth_loss(features, class_means, temperature: float):
    """Self-discrimination loss: rows of S = M·Mᵀ/τ, M = [class means; features], should peak
    on the diagonal (cross-entropy against the identity)."""
    import torch
    import torch.nn.functional as F

    m = features if class_means is None or len(class_means) == 0 else torch.cat(
        [class_means.to(features.dtype), features])
    sim = m @ m.t() / temperature
    return F.cross_entropy(sim, torch.arange(len(m), device=m.device))


def refine_retrieval(init_task, logits_for, class_task, max_iter: int):
    """Training-free self-refined adapter retrieval.

    init_task: [B] task picked first (prototype retrieval with adapter 0).
    logits_for(rows, tasks): [len(rows), C] logits of samples ``rows``, sample i classified
    with adapter ``tasks[i]``.  class_task: [C] task of each logit column.
    Each round classifies the unsettled samples with their current adapter; a sample whose
    predicted class belongs to that adapter's task is settled, the others move to the task of
    their predicted class. At most ``max_iter`` rounds.
    Returns (logits [B, C] from the last adapter each sample used, that adapter [B], rounds [B]).
    """
    import torch

    if max_iter < 1:
        raise ValueError("max_iter must be ≥ 1")
    n = init_task.shape[0]
    task = init_task.clone()
    active = torch.ones(n, dtype=torch.bool, device=init_task.device)
    rounds = torch.zeros(n, dtype=torch.long, device=init_task.device)
    out = None
    for r in range(1, max_iter + 1):
        rows = active.nonzero().squeeze(1)
        logits = logits_for(rows, task[rows])
        if out is None:
            out = logits.new_empty(n, logits.shape[1])
        out[rows] = logits
        rounds[rows] = r
        predicted = class_task[logits.argmax(1)]
        moved = predicted != task[rows]
        active[rows[~moved]] = False
        if r == max_iter or not bool(moved.any()):
            break           # keep `task` = the adapter whose logits are returned
        task[rows[moved]] = predicted[moved]
    return out, task, rounds


def ensemble_logits(refined, proto_cos, n_tasks: int):
    """MOS's final scores: softmax(refined) + softmax(n_tasks · prototype cosine)."""
    return refined.softmax(-1) + (proto_cos * n_tasks).softmax(-1)


def class_statistics(features, labels, classes, storage: str, eps: float):
    """Per class mean [k, D] and covariance [k, D, D] (or variance [k, D]), eps on the diagonal."""
    import torch

    means, spreads = [], []
    d = features.shape[1]
    eye = torch.eye(d, dtype=features.dtype, device=features.device)
    for c in classes:
        f = features[labels == c]
        means.append(f.mean(0))
        cov = (torch.cov(f.t()) if len(f) > 1 else torch.zeros_like(eye)) + eps * eye
        spreads.append(cov if storage == "covariance" else cov.diagonal().clone())
    return torch.stack(means), torch.stack(spreads)


def gaussian_factors(spreads, storage: str):
    """Sampling factors: Cholesky factors of covariances (jitter raised until PD), or std-devs."""
    import torch

    if storage == "variance":
        return spreads.clamp_min(0).sqrt()
    cov = spreads.double()
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    jitter = 0.0
    for _ in range(8):
        chol, info = torch.linalg.cholesky_ex(cov + jitter * eye)
        if not bool((info != 0).any()):
            return chol.to(spreads.dtype)
        jitter = max(jitter * 10, 1e-6 * float(cov.diagonal(dim1=-2, dim2=-1).abs().mean()) + 1e-8)
    raise RunError("MOS classifier alignment: a class covariance is not positive definite even "
                   "with jitter; raise method.cov_eps or use method.ca_storage=variance")


def sample_gaussians(means, factors, n: int, storage: str):
    """n samples per class: [k·n, D] and the class row index of each sample [k·n]."""
    import torch

    k, d = means.shape
    z = torch.randn(k, n, d, device=means.device, dtype=means.dtype)
    if storage == "covariance":
        x = means[:, None, :] + z @ factors.transpose(-1, -2)
    else:
        x = means[:, None, :] + z * factors[:, None, :]
    return x.reshape(k * n, d), torch.arange(k, device=means.device).repeat_interleave(n)


# --- the methods --------------------------------------------------------------------------
class _AdapterTuning(Method):
    """Shared by MOS and its baseline: ViT surgery, per-task SGD with a cosine schedule."""

    def setup(self, model):
        from lethe.models.adapters import adapted_vit

        c = self.cfg
        if c.bottleneck < 1:
            raise ConfigError("bad value for 'method.bottleneck': must be ≥ 1")
        if c.head_lr_scale < 0 or c.min_lr < 0:
            raise ConfigError("bad value for 'method.head_lr_scale'/'method.min_lr': must be ≥ 0")
        return adapted_vit(model, c.bottleneck, c.adapter_scale, c.adapter_dropout, self.name)

    def strategy_class(self):
        from avalanche.training.templates import SupervisedTemplate

        method = self

        class AdapterTemplate(SupervisedTemplate):
            def make_optimizer(self, **kwargs):
                pass   # the method builds a fresh optimizer per task (official: reinit_optimizer)

            def criterion(self):
                if not self.is_training:
                    return super().criterion()
                return method.training_loss(self.mb_output, self.mb_y)

        return AdapterTemplate

    def build_strategy(self):
        strategy = super().build_strategy()
        strategy.optimizer = self._new_optimizer()   # same param groups as every later one
        return strategy

    def _new_optimizer(self):
        import torch

        t, m = self.ctx.train, self.model
        adapters = [p for n, p in m.named_parameters() if ".adapter." in n]
        groups = [{"params": adapters, "lr": t.lr, "base_lr": t.lr},
                  {"params": list(m.head.parameters()), "lr": t.lr * self.cfg.head_lr_scale,
                   "base_lr": t.lr * self.cfg.head_lr_scale}]
        if t.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
        cls = torch.optim.Adam if t.optimizer == "adam" else torch.optim.AdamW
        return cls(groups, lr=t.lr, weight_decay=t.weight_decay)

    # --- Avalanche callbacks (the method object is a plugin) ----------------------------
    def before_training_exp(self, strategy, **kwargs):
        strategy.optimizer = self._new_optimizer()

    def before_training_epoch(self, strategy, **kwargs):
        # Cosine annealing per epoch over the task (official: CosineAnnealingLR, T_max=epochs).
        # A platform schedule (train.lr_schedule) sets the lr per step instead and wins.
        schedule = getattr(self.ctx.train, "lr_schedule", None)
        if schedule is not None and schedule.name != "none":
            return
        e, total, low = strategy.clock.train_exp_epochs, max(self.ctx.train.epochs, 1), self.cfg.min_lr
        for g in strategy.optimizer.param_groups:
            g["lr"] = low + (g["base_lr"] - low) * 0.5 * (1 + math.cos(math.pi * e / total))

    def training_loss(self, logits, targets):
        import torch.nn.functional as F

        return F.cross_entropy(logits, targets)

    def log_params(self) -> dict:
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        return {"params/trainable": float(trainable), "params/frac_trainable": trainable / total}

    def load_state_dict(self, state: dict) -> None:
        # The optimizer is the method's own (rebuilt per task, two param groups), not one
        # Avalanche's make_optimizer manages, so it is restored as is.
        self.model.load_state_dict(state["model"])
        self.strategy.optimizer.load_state_dict(state["optimizer"])
        for k, v in state["clock"].items():
            setattr(self.strategy.clock, k, v)
        self.learned = list(state["learned"])
        self.load_extra_state(state["extra"])


@register_method("seq_adapter", config=AdapterTuningConfig, kinds=("learn",),
                 settings=("class_incremental",))
class SeqAdapter(_AdapterTuning):
    """Baseline for MOS: one adapter set + linear head on the frozen ViT, tuned on each task in turn.

    Same surgery, optimizer and schedule as MOS, plain cross-entropy over all classes, no
    stored copies, merging, statistics or retrieval: the catastrophic-forgetting reference.
    """

    name = "seq_adapter"


@register_method("mos", config=MOSConfig, kinds=("learn",), settings=("class_incremental",))
class MOS(_AdapterTuning):
    """MOS: task adapters with merging, Gaussian classifier alignment, self-refined retrieval."""

    name = "mos"

    def setup(self, model):
        import torch

        c = self.cfg
        if c.merge_every not in MERGE_EVERY:
            raise ConfigError(f"bad value for 'method.merge_every': '{c.merge_every}' "
                              f"(choose one of {', '.join(MERGE_EVERY)})")
        if c.ca_storage not in CA_STORAGE:
            raise ConfigError(f"bad value for 'method.ca_storage': '{c.ca_storage}' "
                              f"(choose one of {', '.join(CA_STORAGE)})")
        if not 0.0 <= c.merge_momentum <= 1.0:
            raise ConfigError("bad value for 'method.merge_momentum': must be in [0, 1]")
        for key in ("max_iter", "ca_samples_per_class"):
            if getattr(c, key) is not None and getattr(c, key) < 1:
                raise ConfigError(f"bad value for 'method.{key}': must be ≥ 1")
        if c.ca_epochs < 0 or c.orth_temperature <= 0 or c.cov_eps < 0:
            raise ConfigError("bad value for 'method.ca_epochs' (≥ 0), 'method.orth_temperature' "
                              "(> 0) or 'method.cov_eps' (≥ 0)")
        model = super().setup(model)
        n, d, dev = self.ctx.stream.n_classes, model.feature_dim, self.ctx.device
        self.task_adapters: list[dict] = []   # stored copy of each task's (merged) adapter
        self.class_task = torch.full((n,), -1, dtype=torch.long, device=dev)
        self.prototypes = torch.zeros(n, d, device=dev)   # adapter-0 class means (cosine head)
        self.means = torch.zeros(n, d, device=dev)        # class means under the class's adapter
        self.spreads = torch.zeros((n, d, d) if c.ca_storage == "covariance" else (n, d), device=dev)
        self._merge_mean = None
        self._cur_mask = None
        return model

    @property
    def n_tasks(self) -> int:
        return len(self.task_adapters)

    def seen_classes(self):
        return (self.class_task >= 0).nonzero().squeeze(1)

    # --- training -----------------------------------------------------------------------
    def before_training_exp(self, strategy, **kwargs):
        import torch

        b = self.n_tasks
        classes = torch.as_tensor(sorted(int(c) for c in strategy.experience.classes_in_this_experience),
                                  device=self.class_task.device)
        self.class_task[classes] = b
        self._cur_mask = torch.zeros_like(self.class_task, dtype=torch.bool)
        self._cur_mask[classes] = True
        self._merge_mean = None
        if b > 0:
            self.model.load_adapter(self.task_adapters[-1])   # task b starts from task b−1's
            if self.cfg.merge_momentum > 0:
                self._merge_mean = mean_adapter(self.task_adapters)  # from the stored copies, once
                if self.cfg.merge_every == "step":
                    self._merge_live()   # the first forward already sees the merged adapter
        super().before_training_exp(strategy, **kwargs)

    def after_update(self, strategy, **kwargs):
        if self._merge_mean is not None and self.cfg.merge_every == "step":
            self._merge_live()

    def _merge_live(self):
        self.model.load_adapter(merge_adapters(self.model.adapter_state(), self._merge_mean,
                                               self.cfg.merge_momentum))

    def training_loss(self, logits, targets):
        import torch.nn.functional as F

        masked = logits.masked_fill(~self._cur_mask, float("-inf"))   # only this task's classes
        loss = F.cross_entropy(masked, targets)
        if self.cfg.reg:
            old = (self.class_task >= 0) & ~self._cur_mask
            loss = loss + self.cfg.reg * orth_loss(self.model.last_features, self.means[old],
                                                   self.cfg.orth_temperature)
        return loss

    def learn(self, experience) -> None:
        super().learn(experience)
        self.model.last_features = None
        if self._merge_mean is not None and self.cfg.merge_every == "task":
            self._merge_live()
        self._merge_mean = None
        self.task_adapters.append(self.model.adapter_state())
        self._task_statistics(experience.train.dataset)
        if self.n_tasks > 1 and self.cfg.ca_epochs > 0:
            self._align_classifier()

    def _task_statistics(self, dataset):
        """Prototypes (adapter 0) and Gaussian statistics (this task's adapter) of its classes."""
        import torch

        feats, feats0, labels = [], [], []
        loader = torch.utils.data.DataLoader(dataset.eval(), batch_size=self.strategy.eval_mb_size,
                                             shuffle=False, num_workers=self.ctx.train.num_workers)
        self.model.eval()
        with torch.no_grad():
            for batch in loader:
                x = batch[0].to(self.ctx.device)
                feats.append(self.model.features(x).float())
                feats0.append(self.model.features(x, self.task_adapters[0]).float())
                labels.append(batch[1].to(self.ctx.device))
        self.model.train()
        feats, feats0, labels = torch.cat(feats), torch.cat(feats0), torch.cat(labels)
        classes = labels.unique()
        for c in classes.tolist():
            self.prototypes[c] = feats0[labels == c].mean(0)
        means, spreads = class_statistics(feats, labels, classes.tolist(), self.cfg.ca_storage,
                                          self.cfg.cov_eps)
        self.means[classes] = means
        self.spreads[classes] = spreads

    def ca_samples(self) -> int:
        """Gaussian samples per class and epoch of classifier alignment."""
        n = self.cfg.ca_samples_per_class
        return 5 * int(self.ctx.train.batch_size) if n is None else int(n)

    def _align_classifier(self):
        """Re-train the head on features sampled from every seen class's Gaussian."""
        import torch
        import torch.nn.functional as F

        from lethe.engine.loop import fit

        c, head = self.cfg, self.model.head
        seen = self.seen_classes()
        means = self.means[seen]
        factors = gaussian_factors(self.spreads[seen], c.ca_storage)
        wd = self.ctx.train.weight_decay if c.ca_weight_decay is None else c.ca_weight_decay
        opt = torch.optim.SGD(head.parameters(), lr=c.ca_lr, momentum=c.ca_momentum, weight_decay=wd)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=c.ca_epochs)
        n = self.ca_samples()
        head.train()

        def batches(epoch):   # fresh Gaussian samples every epoch, one batch of n per class
            with torch.no_grad():
                x, y = sample_gaussians(means, factors, n, c.ca_storage)
                perm = torch.randperm(len(y), device=y.device)
                x, y = x[perm], y[perm]
            return [(x[i * n:(i + 1) * n], y[i * n:(i + 1) * n]) for i in range(len(seen))]

        # the official per-epoch cosine schedule of this stage, not train.lr_schedule (which
        # schedules the adapter training around it)
        fit(self.engine, head, opt, c.ca_epochs, batches,
            lambda b: F.cross_entropy(head(b[0])[:, seen], b[1]), "MOS classifier alignment",
            after_epoch=lambda epoch, total: sched.step())

    # --- inference ----------------------------------------------------------------------
    def predict(self, x, task_ids):
        """MOS inference (class-incremental: task ids are not used)."""
        import torch
        import torch.nn.functional as F

        if not self.task_adapters:
            return self.model(x)
        seen = self.seen_classes()
        col_task = self.class_task[seen]
        f0 = self.model.features(x, self.task_adapters[0])
        proto = F.linear(F.normalize(f0, dim=1), F.normalize(self.prototypes[seen].to(f0.dtype), dim=1))
        n = x.shape[0]
        feats = {0: f0}
        done = {0: torch.ones(n, dtype=torch.bool, device=x.device)}

        def logits_for(rows, tasks):
            f = f0.new_empty(len(rows), f0.shape[1])
            for t in tasks.unique().tolist():
                sel = tasks == t
                r = rows[sel]
                if t not in feats:
                    feats[t] = torch.zeros_like(f0)
                    done[t] = torch.zeros(n, dtype=torch.bool, device=x.device)
                need = r[~done[t][r]]
                if len(need):   # each (sample, adapter) pair is computed once
                    feats[t][need] = self.model.features(x[need], self.task_adapters[t]).to(f0.dtype)
                    done[t][need] = True
                f[sel] = feats[t][r]
            return self.model.head(f)[:, seen]

        init = col_task[proto.argmax(1)]
        refined, used, rounds = refine_retrieval(init, logits_for, col_task, self.cfg.max_iter)
        self.last_retrieval = {"initial_task": init, "task": used, "rounds": rounds}
        scores = ensemble_logits(refined.float(), proto.float(), self.n_tasks) if self.cfg.ensemble \
            else refined.float()
        out = scores.new_full((n, self.class_task.shape[0]), float("-inf"))
        out[:, seen] = scores
        return out

    def log_params(self) -> dict:
        stored = sum(v.numel() * v.element_size() for a in self.task_adapters for v in a.values())
        stats = (self.means.numel() + self.spreads.numel() + self.prototypes.numel()) * 4
        return {**super().log_params(), "mos/stored_adapter_bytes": float(stored),
                "mos/class_statistics_bytes": float(stats)}

    # --- checkpoints --------------------------------------------------------------------
    def extra_state(self) -> dict:
        seen = self.seen_classes()   # statistics of seen classes only: covariances are D² each
        return {"task_adapters": [{k: v.cpu() for k, v in a.items()} for a in self.task_adapters],
                "class_task": self.class_task.cpu(), "prototypes": self.prototypes[seen].cpu(),
                "means": self.means[seen].cpu(), "spreads": self.spreads[seen].cpu()}

    def load_extra_state(self, state: dict) -> None:
        dev = self.ctx.device
        self.task_adapters = [{k: v.to(dev) for k, v in a.items()} for a in state["task_adapters"]]
        self.class_task = state["class_task"].to(dev)
        seen = self.seen_classes()
        for key in ("prototypes", "means", "spreads"):
            getattr(self, key)[seen] = state[key].to(dev)
