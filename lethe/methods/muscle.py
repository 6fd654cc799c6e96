"""MUSCLE — a compatibility adapter for model updates (Echterhoff et al., "MUSCLE: A Model
Update Strategy for Compatible LLM Evolution", EMNLP Findings 2024).

The new version f₂ is first trained as usual. Then a LoRA *compatibility adapter* on top of
the frozen f₂ is trained with the task loss plus a masked distillation: for every target
(for a classifier: every sample) the teacher is the old version f₁ where f₂ is wrong,
m = 𝟙[argmax z₂ ≠ y], and f₂ itself where it is right (``right_target=new``; ``label``
keeps only the task loss there):

    L = CE(z_c, y) + w · mean_i T² · KL(softmax(t_i/T) ‖ softmax(z_c,i/T)),
    t_i = z₁,i if m_i else z₂,i

z_c are the logits of f₂ + adapter; for a language model i runs over the target tokens,
and positions labelled -100 (padding, prompt) count neither in the KD nor in its mean, as
in the task loss. The adapter starts as a zero update (LoRA's B = 0), so
training starts from f₂. After training it is merged into f₂'s weights: the deployed
version has f₂'s architecture. Version 0 (no old model) is trained without an adapter.

The paper reports up to 40% fewer negative flips (Llama 1 → Llama 2) at the new model's
accuracy. A run should show a lower NFR than ``naive_update`` with accuracy at least as
high. The mask only fires where f₂ errs on its *training* data: a network that fits its
training set leaves little to correct (``muscle/mask_frac`` reports the share of
adapter-training samples taught by the old model). On ``compat_muscle_digits`` (3 seeds)
the mask covers 1.2% of the samples and NFR falls 0.70% → 0.56% at 97.6% accuracy, which is
what naive_update reaches with the adapter's 5 epochs spent on f₂ instead.
*(choices)* LoRA on every Linear and Conv2d layer, rank 8, α 16; the adapter trains on the
version's data with train.lr.

**Version mode** (``method.mode: adapter``; the paper's own setting). Every version is a frozen
pretrained base (``scenario.versions[i].base``) serving the task through a LoRA adapter
(lethe/methods/compat.py). Version k's task adapter is trained first, with the task loss
only, on frozen base_k: that is M_v2, the new task model (what ``naive_update`` deploys).
Then a compatibility adapter on the same frozen base trains with the loss above, where
z₁ = the previous deployed model (base_{k−1} + its adapter, M_v1) and z₂ = M_v2; it is
deployed unmerged, base_k + adapter. ``compat_init: task`` starts it as a copy of M_v2's
adapter (so training starts from M_v2, as in full mode from f₂), ``zero`` as a fresh zero
update on base_k. Deviation / unverified: the paper's method section could not be read
here (its abstract and figure captions only, no official code found: apple/ml-muscle is not
available), so the teacher rule (old where the new task model is wrong, the new task model
elsewhere) and the separate compatibility adapter follow those and lethe's full mode;
whether the paper initialises the compatibility adapter from the task adapter is not
verified, hence the key. Measured on ``muscle_lm_versions`` (two tiny Llama bases, seeds 0-2,
per-token NFR vs v0 at v1's token accuracy): naive_update 7.98% at 32.5%, muscle 3.99% at
34.1% (−50%); naive_update given the adapter's 2 extra epochs 6.08% at 33.8%; compat_init=zero
5.02% at 33.3%. The mask covers 66% of the task tokens there (the bases are weak).
"""
from __future__ import annotations

from dataclasses import dataclass

from lethe.errors import ConfigError
from lethe.methods.compat import (
    UpdateConfig,
    UpdateMethod,
    frozen_copy,
    lora_config,
    with_task_adapter,
)
from lethe.registry import register_method

RIGHT_TARGETS = ("new", "label")
COMPAT_INITS = ("task", "zero")
IGNORE = -100   # target of positions that do not count (CrossEntropyLoss's ignore_index)


def muscle_loss(compat_logits, new_logits, old_logits, targets, temperature: float = 1.0,
                right_target: str = "new"):
    """Masked distillation term (without the task loss), and the mask.

    Returns (loss, mask): mask[i] = 1 where the new model is wrong on target i (teacher =
    old model); elsewhere the teacher is the new model, or nothing with right_target=label.
    Targets equal to -100 (LM padding / prompt positions, the task loss's ignore_index) are
    neither distilled nor counted in the mean, and are absent from ``mask``.
    """
    import torch
    import torch.nn.functional as F

    new_logits, old_logits = new_logits.detach(), old_logits.detach()
    if compat_logits.dim() == 3:   # LM logits [B, V, L] (lethe/models/hf.py): one target per token
        def tokens(z):
            return z.transpose(1, 2).reshape(-1, z.shape[1])
        compat_logits, new_logits, old_logits = map(tokens, (compat_logits, new_logits, old_logits))
        targets = targets.reshape(-1)
    valid = targets != IGNORE
    if not bool(valid.all()):      # the task loss skips these positions: so does the KD
        compat_logits, new_logits, old_logits, targets = (
            t[valid] for t in (compat_logits, new_logits, old_logits, targets))
    mask = new_logits.argmax(-1) != targets
    teacher = torch.where(mask.unsqueeze(-1), old_logits, new_logits)
    T = float(temperature)
    log_t = F.log_softmax(teacher / T, dim=-1)
    log_s = F.log_softmax(compat_logits / T, dim=-1)
    kl = (T * T) * (log_t.exp() * (log_t - log_s)).sum(-1)
    if right_target == "label":
        kl = kl * mask.to(kl.dtype)
    loss = kl.mean() if len(kl) else torch.zeros((), device=compat_logits.device)
    return loss, mask


def attach_lora(model, rank: int, alpha: float, dropout: float):
    """Wrap ``model`` with a peft LoRA adapter on every Linear / Conv2d (base weights frozen)."""
    from peft import get_peft_model

    opts = UpdateConfig(rank=rank, lora_alpha=alpha, lora_dropout=dropout)
    return get_peft_model(model, lora_config(model, opts))


@dataclass
class MuscleConfig(UpdateConfig):
    # mode, rank, lora_alpha, lora_dropout (UpdateConfig): the adapters' LoRA (compatibility
    # adapter; in adapter mode the task adapters too)
    adapter_epochs: int = 0       # epochs of adapter training; 0 = the version's epochs
    adapter_lr: float = 0.0       # learning rate of the adapter; 0 = train.lr
    kd_weight: float = 1.0        # w: weight of the masked distillation next to the task loss
    temperature: float = 1.0      # T of the distillation softmax
    right_target: str = "new"     # where the new model is right: distil from it (new) or
                                  # keep the task loss only (label)
    compat_init: str = "task"     # adapter mode: the compatibility adapter starts as the new
                                  # task adapter (task) or as a fresh zero update (zero)


@register_method("muscle", config=MuscleConfig, kinds=("update",))
class Muscle(UpdateMethod):
    """MUSCLE: LoRA compatibility adapter trained with old-where-new-is-wrong distillation."""

    name = "muscle"

    def __init__(self, cfg, model, ctx):
        if cfg.right_target not in RIGHT_TARGETS:
            raise ConfigError(f"method.right_target='{cfg.right_target}' must be one of "
                              f"{', '.join(RIGHT_TARGETS)}")
        if cfg.compat_init not in COMPAT_INITS:
            raise ConfigError(f"method.compat_init='{cfg.compat_init}' must be one of "
                              f"{', '.join(COMPAT_INITS)}")
        if cfg.rank < 1 or cfg.temperature <= 0 or cfg.adapter_epochs < 0 or cfg.adapter_lr < 0:
            raise ConfigError("method.rank must be >= 1, method.temperature > 0, "
                              "method.adapter_epochs and method.adapter_lr >= 0")
        self.new_model = None         # frozen f₂ while the adapter trains
        self.mask_seen = [0, 0]       # [samples taught by the old model, samples] this update
        self.adapter_params = 0
        super().__init__(cfg, model, ctx)

    def train_version(self, experience, epochs: int) -> None:
        super().train_version(experience, epochs)        # f₂ / task adapter: the task loss only
        if self.old_model is None:
            return
        if self.adapter_mode:
            self.train_compat_adapter(experience, epochs)
            return
        c = self.cfg
        self.new_model = frozen_copy(self.model)
        try:
            compat = attach_lora(self.model, c.rank, c.lora_alpha, c.lora_dropout)
            self._train_adapter(compat, experience, epochs)
            deployed = compat.merge_and_unload()          # f₂ with the adapter merged in
            for p in deployed.parameters():               # an ordinary network again
                p.requires_grad_(True)
            self.use_model(deployed)
        finally:
            self.new_model = None

    def _train_adapter(self, model, experience, epochs: int) -> None:
        """Train ``model`` (an adapter on frozen weights) with the masked distillation."""
        c = self.cfg
        self.mask_seen = [0, 0]
        self.adapter_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.use_model(model, c.adapter_epochs or epochs)
        if c.adapter_lr:
            for g in self.strategy.optimizer.param_groups:
                g["lr"] = c.adapter_lr
        self.strategy.train(experience.train, num_workers=self.ctx.train.num_workers)

    def train_compat_adapter(self, experience, epochs: int) -> None:
        """Adapter mode: the task adapter just trained (task loss only) on the frozen base_k
        makes M_v2, the teacher where it is right; the compatibility adapter on the same
        frozen base (from M_v2's adapter, or from zero) trains with the task loss + the masked
        distillation from the previous (base + adapter), and is deployed unmerged."""
        self.new_model = frozen_copy(self.model)
        try:
            if self.cfg.compat_init == "task":
                compat = self.model                  # M_v2's adapter trains on, new optimizer
            else:                                    # the frozen base under a fresh adapter
                compat = with_task_adapter(self._bare_base(self.model), self.cfg)
            self._train_adapter(compat, experience, epochs)
        finally:
            self.new_model = None

    @staticmethod
    def _bare_base(model):
        """A copy of a base carrying a peft-injected adapter, with the adapter removed."""
        import copy

        from peft.tuners.lora import LoraLayer

        bare = copy.deepcopy(model)
        for name, m in list(bare.named_modules()):
            if isinstance(m, LoraLayer):
                parent, _, child = name.rpartition(".")
                setattr(bare.get_submodule(parent) if parent else bare, child, m.get_base_layer())
        return bare

    # --- Avalanche callbacks (the method object is a plugin of its template) -------------
    def before_training_epoch(self, strategy, **kwargs):
        super().before_training_epoch(strategy, **kwargs)
        # f₂ is frozen under the adapter: its normalisation statistics must not drift either
        if self.new_model is not None:
            from lethe.models.lora import freeze_norm_stats

            freeze_norm_stats(strategy.model)

    def before_backward(self, strategy, **kwargs):
        if self.new_model is None or not self.method_loss_active(strategy):
            return
        import torch

        with torch.no_grad():
            new, old = self.new_model(strategy.mb_x), self.old_model(strategy.mb_x)
        c = self.cfg
        loss, mask = muscle_loss(strategy.mb_output, new, old, strategy.mb_y, c.temperature,
                                 c.right_target)
        self.mask_seen[0] += int(mask.sum())
        self.mask_seen[1] += int(mask.numel())
        strategy.loss = strategy.loss + c.kd_weight * loss

    def log_params(self) -> dict:
        if not self.mask_seen[1]:
            return {}
        return {"muscle/mask_frac": self.mask_seen[0] / self.mask_seen[1],
                "muscle/adapter_params": float(self.adapter_params)}
