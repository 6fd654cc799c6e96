"""Joint (cumulative) training: at each step, train on all data seen so far.

The usual upper bound of a continual-learning stream, served per step so its accuracy
matrix is comparable with the other methods (Avalanche's Cumulative strategy).
"""
from __future__ import annotations

from dataclasses import dataclass

from lethe.methods.base import Method
from lethe.registry import register_method


@dataclass
class JointConfig:
    pass


@register_method("joint", config=JointConfig, kinds=("learn",))
class Joint(Method):
    """Upper bound: retrain on the union of all experiences seen so far at every step."""

    name = "joint"

    def strategy_class(self):
        from avalanche.training import Cumulative

        return Cumulative

    def load_extra_state(self, state: dict) -> None:
        # The cumulative dataset is rebuilt from the experiences already learned.
        from avalanche.benchmarks.utils import concat_datasets

        learned = self.learn_experiences()
        if learned:
            self.strategy.dataset = concat_datasets([e.train.dataset for e in learned])
