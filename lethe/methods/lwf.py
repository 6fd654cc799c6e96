"""Learning without Forgetting (Li & Hoiem, TPAMI 2017), via Avalanche's LwFPlugin.

Distils the previous model's outputs on the old classes into the current model while it
learns new data (knowledge distillation with a temperature).
"""
from __future__ import annotations

from dataclasses import dataclass

from lethe.methods.base import Method
from lethe.registry import register_method


@dataclass
class LwFConfig:
    alpha: float = 1.0        # distillation weight
    temperature: float = 2.0  # softmax temperature of the distillation


@register_method("lwf", config=LwFConfig, kinds=("learn",))
class LwF(Method):
    """Learning without Forgetting: distil the previous model's old-class outputs."""

    name = "lwf"

    def plugins(self):
        from avalanche.training.plugins import LwFPlugin

        self.lwf = LwFPlugin(alpha=self.cfg.alpha, temperature=self.cfg.temperature)
        return [self.lwf]

    def extra_state(self) -> dict:
        core = self.lwf.lwf
        prev = core.prev_model.state_dict() if core.prev_model is not None else {}
        return {"expcount": int(core.expcount), "prev_model": prev,
                "prev_classes": {int(t): sorted(int(c) for c in cs)
                                 for t, cs in core.prev_classes_by_task.items()}}

    def load_extra_state(self, state: dict) -> None:
        import copy

        core = self.lwf.lwf
        core.expcount = state["expcount"]
        if state["prev_model"]:
            core.prev_model = copy.deepcopy(self.model)
            core.prev_model.load_state_dict(state["prev_model"])
        for t, cs in state["prev_classes"].items():
            core.prev_classes_by_task[int(t)] = set(cs)
