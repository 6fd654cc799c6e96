"""Gradient difference — ascent on the forget set, descent on the retain set.

TOFU's "Grad. Diff." baseline (Maini et al., 2024; Liu et al., "Continual Learning and
Private Unlearning", CoLLAs 2022): loss = −NLL(forget) + retain_weight · NLL(retain), each
step pairing a forget batch with a retain batch, so the model keeps what it should while it
forgets.
"""
from __future__ import annotations

from dataclasses import dataclass

from lethe.methods.llm_unlearn import LLMUnlearner, UnlearnConfig, lm_nll
from lethe.registry import register_method


@dataclass
class GradDiffConfig(UnlearnConfig):
    retain_weight: float = 1.0


@register_method("grad_diff", config=GradDiffConfig, kinds=("learn", "forget"))
class GradDiff(LLMUnlearner):
    """Ascent on the forget set plus descent on the retain set (TOFU Grad. Diff.)."""

    name = "grad_diff"
    fsdp = True

    def unlearn_loss(self, fx, fy, rx, ry):
        return -lm_nll(self.model(fx), fy) + self.cfg.retain_weight * lm_nll(self.model(rx), ry)
