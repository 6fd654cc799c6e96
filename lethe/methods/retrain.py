"""Retrain from scratch — the exact-unlearning oracle.

After every learn and every forget experience the model is trained from the same seeded
initialisation on all live training data seen so far (learned and not deleted). Its
model is, by construction, the one that would exist had the deleted samples never been
there: the reference every unlearning method is compared with (forget accuracy, MIA AUC)
and the cost S3T and SISA are measured against (``benchmarks/unlearning_cost.py``).
Expect: unlearn/retrain_samples = live samples × epochs at every forget step.

The family base class :class:`~lethe.methods.exact.ExactUnlearner` (lethe/methods/exact.py)
holds what retrain, SISA and S3T share.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from lethe.methods.exact import ExactUnlearner
from lethe.models.lora import LoraOptions
from lethe.registry import register_method


@dataclass
class RetrainConfig:
    # rank 0: train every parameter of the model; > 0: frozen backbone + LoRA adapters and
    # head (the same trainable set as S3T, for like-for-like comparisons)
    lora: LoraOptions = field(default_factory=lambda: LoraOptions(rank=0, fused_qkv="qv"))


@register_method("retrain", config=RetrainConfig, kinds=("learn", "forget"))
class Retrain(ExactUnlearner):
    """Retrain from scratch on the remaining data after every request (the exact oracle)."""

    name = "retrain"

    def seed_of_training(self) -> int:
        from lethe.scenarios.forget import derive_seed

        return derive_seed(self.ctx.seed, 0x7E7)

    def train_live(self) -> int:
        rows = self.live.nonzero().flatten()
        self.load(self.init_state)
        return self.fit(self.train_names, rows, self.seed_of_training(), "retrain")

    def forget_rows(self, rows) -> int:
        self.deleted[rows] = True
        return self.train_live()

    def training_ids(self):
        """Sample ids the served model was trained on."""
        return self.pool_ids[self.live]
