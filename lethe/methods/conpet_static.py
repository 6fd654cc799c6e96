"""ConPET (static) — one LoRA module and one head over every label, trained with
ConPET's dynamic replay (Song et al., 2023; repo Raincleared-Song/ConPET). The family, its
replay and what a run should show: lethe/methods/conpet.py.
"""
from __future__ import annotations

import warnings

from lethe.methods.conpet import ConPETBase, ConPETStaticConfig
from lethe.registry import register_method


@register_method("conpet_static", config=ConPETStaticConfig, kinds=("learn",),
                 settings=("class_incremental",))
class ConPETStatic(ConPETBase):
    """ConPET (static): one LoRA + a head over every label, dynamic replay with bounded cost."""

    name = "conpet_static"
    not_distributable = ("parameters of its model get no gradient in some steps, which DDP's "
                         "gradient reduction refuses")

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
        if not self.cfg.mask_unseen:   # official: every label scored
            return logits
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
