"""Elastic Weight Consolidation (Kirkpatrick et al., PNAS 2017), via Avalanche's EWCPlugin.

A quadratic penalty keeps parameters important to earlier experiences (diagonal Fisher)
close to their values after those experiences.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from lethe.errors import ConfigError
from lethe.methods.base import Method
from lethe.registry import register_method


@dataclass
class EWCConfig:
    ewc_lambda: float = 100.0            # penalty weight
    mode: str = "separate"               # separate (one penalty per experience) | online
    decay_factor: Optional[float] = None  # online mode only


@register_method("ewc", config=EWCConfig, kinds=("learn",))
class EWC(Method):
    """Elastic Weight Consolidation: Fisher-weighted quadratic penalty to old parameters."""

    name = "ewc"

    def plugins(self):
        from avalanche.training.plugins import EWCPlugin

        if self.cfg.mode not in ("separate", "online"):
            raise ConfigError(f"method.mode: '{self.cfg.mode}' must be 'separate' or 'online'")
        if self.cfg.mode == "online" and self.cfg.decay_factor is None:
            raise ConfigError("method.decay_factor must be set when method.mode=online")
        self.ewc = EWCPlugin(self.cfg.ewc_lambda, mode=self.cfg.mode,
                             decay_factor=self.cfg.decay_factor)
        return [self.ewc]

    def extra_state(self) -> dict:
        def dump(table):
            return {int(e): {n: p.data.clone() for n, p in params.items()} for e, params in table.items()}

        return {"saved_params": dump(self.ewc.saved_params), "importances": dump(self.ewc.importances)}

    def load_extra_state(self, state: dict) -> None:
        from avalanche.training.utils import ParamData

        for attr in ("saved_params", "importances"):
            table = getattr(self.ewc, attr)
            for e, params in state[attr].items():
                table[int(e)] = {n: ParamData(n, init_tensor=t.to(self.ctx.device), device=self.ctx.device)
                                 for n, t in params.items()}
