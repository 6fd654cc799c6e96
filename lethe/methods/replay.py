"""Experience replay with Avalanche's experience-balanced reservoir buffer.

Rolnick et al., "Experience Replay for Continual Learning", NeurIPS 2019. The buffer is
split evenly over the experiences seen; each mini-batch mixes new data with buffer data.
Avalanche's ReplayPlugin *concatenates* a buffer batch to every new-data batch: a step sees
train.batch_size new samples plus batch_size_mem buffer samples (2 × train.batch_size by
default, i.e. twice the compute per step of naive), and an epoch has as many steps as the
new data alone fills. For a fixed batch size with an exact replayed share, use
``rewarm_replay`` (lethe/methods/rewarm.py). Checkpoints store the buffer as sample ids + reservoir weights, so a resumed run replays
exactly the samples the uninterrupted run would.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from lethe.errors import ConfigError
from lethe.methods.base import Method
from lethe.registry import register_method


@dataclass
class ReplayConfig:
    mem_size: int = 200                  # samples kept over all experiences
    batch_size_mem: Optional[int] = None  # buffer samples per mini-batch (None = train.batch_size)


@register_method("replay", config=ReplayConfig, kinds=("learn",))
class Replay(Method):
    """Experience replay from a class-agnostic, experience-balanced reservoir buffer."""

    name = "replay"

    def plugins(self):
        from avalanche.training.plugins import ReplayPlugin

        if self.cfg.mem_size < 1:
            raise ConfigError("method.mem_size must be ≥ 1")
        class _Replay(ReplayPlugin):
            def after_training_exp(self, strategy, **kwargs):
                # Avalanche 0.6's plugin calls the deprecated `update`; same effect, no warning.
                self.storage_policy.post_adapt(strategy, strategy.experience)

        self.replay = _Replay(mem_size=self.cfg.mem_size,
                                   batch_size=self.ctx.train.batch_size,
                                   batch_size_mem=self.cfg.batch_size_mem or self.ctx.train.batch_size)
        return [self.replay]

    def extra_state(self) -> dict:
        policy = self.replay.storage_policy
        groups = []
        for key, group in policy.buffer_groups.items():
            groups.append({"key": int(key), "max_size": int(group.max_size),
                           "ids": [int(i) for i in group.buffer.sample_id],
                           "weights": group._buffer_weights.clone()})
        return {"num_exps": int(policy._num_exps), "groups": groups}

    def load_extra_state(self, state: dict) -> None:
        from avalanche.training.storage_policy import ReservoirSamplingBuffer

        policy = self.replay.storage_policy
        policy._num_exps = state["num_exps"]
        learned = self.learn_experiences()
        for group in state["groups"]:
            data = learned[group["key"]].train.dataset   # group k = k-th learned experience
            pos = {int(s): i for i, s in enumerate(data.sample_id)}
            buf = ReservoirSamplingBuffer(group["max_size"])
            buf.buffer = data.subset([pos[i] for i in group["ids"]])
            buf._buffer_weights = group["weights"]
            policy.buffer_groups[group["key"]] = buf
