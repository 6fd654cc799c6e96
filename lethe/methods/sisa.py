"""SISA — Sharded, Isolated, Sliced, Aggregated training (Bourtoule et al., IEEE S&P 2021).

Paper: https://arxiv.org/abs/1912.03817; official code: github.com/cleverhans-lab/machine-unlearning
(``sisa.py`` trains, ``aggregation.py`` votes).

The training data is split into disjoint shards (one constituent model each), each shard
into slices. A shard model trains on cumulative slices 1..i in stage i and a checkpoint
is kept after every stage. Deleting a sample of slice k reloads the checkpoint before
slice k and retrains slices k..L without it; the other shards are untouched. Predictions
aggregate the shard models by majority vote (or mean softmax).

Epochs per stage follow the official ``sisa.py``: with e = train.epochs and R slices, stage
s (0-based) trains int((s+1)·a) − int(s·a) epochs, a = 2e/(R+1), so a shard trains
int(2eR/(R+1)) epochs in all (< 2e) instead of e per stage (R·e; 2.5× more at R = 4, the
paper's budget argument for slicing). Stages can get 0 epochs when e < (R+1)/2 (their
checkpoint is the previous one). lethe computes the floors in integer arithmetic
(⌊(s+1)·2e/(R+1)⌋), which is the formula's exact value; the official floats can round an
exact integer down (rarely). ``unlearn/retrain_samples`` counts rows × epochs of the
stages really trained.

Vote aggregation follows the official ``aggregation.py`` (uniform strategy): the argmax of
the mean one-hot vote of the shard models; a tie goes to the lowest class index (numpy's
argmax, and torch's). ``predict`` returns log vote shares, floored at 1e-12 so classes no
shard voted for stay finite.

In lethe, samples go to shards and slices by a seeded key of their stable id
(:func:`lethe.scenarios.forget.shard_of` / ``slice_of``), so a sample keeps its place as
data arrives; a learn experience adds its samples to the slices and retrains each shard
from the first slice that changed. Every stage's batch order and dropout come from a seed
fixed by (experiment seed, shard, slices so far), so a shard served after a deletion is
bitwise the shard trained from scratch without the sample (tests/test_sisa.py).
Expect: accuracy a little below the retrain oracle (each model sees 1/shards of the data),
unlearn/retrain_samples well below retrain's.

The sharded machinery (sequences of slices per shard, stage checkpoints, training records,
longest valid prefix) lives in the family base class
:class:`~lethe.methods.sharded.ShardedUnlearner`, shared with S3T (:mod:`lethe.methods.s3t`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from lethe.methods.sharded import ShardedUnlearner
from lethe.models.lora import LoraOptions
from lethe.registry import register_method

AGGREGATIONS = ("vote", "mean_softmax")


@dataclass
class SISAConfig:
    shards: int = 5               # disjoint shards, one constituent model each (paper: 5-20)
    slices: int = 4               # slices per shard, a checkpoint after each
    aggregation: str = "vote"     # vote (the paper's majority vote) | mean_softmax
    # rank 0: each shard model trains every parameter; > 0: frozen backbone + LoRA and head
    lora: LoraOptions = field(default_factory=lambda: LoraOptions(rank=0, fused_qkv="qv"))


def sisa_stage_epochs(epochs: int, slices: int, stage: int) -> int:
    """Epochs of stage ``stage`` (0-based): int((s+1)·a) − int(s·a), a = 2·epochs/(slices+1)
    (official sisa.py), in integer arithmetic."""
    def until(s: int) -> int:
        return (s * 2 * epochs) // (slices + 1)
    return until(stage + 1) - until(stage)


@register_method("sisa", config=SISAConfig, kinds=("learn", "forget"))
class SISA(ShardedUnlearner):
    """Shards x slices with slice checkpoints; a deletion retrains one shard from the slice before it."""

    name = "sisa"

    @classmethod
    def validate_config(cls, cfg) -> None:
        from lethe.registry import check_choice

        super().validate_config(cfg)
        check_choice("method.aggregation", cfg.aggregation, AGGREGATIONS)

    def stage_epochs(self, stage: int) -> int:
        return sisa_stage_epochs(int(self.ctx.train.epochs), self.n_slices, stage)

    def predict(self, x, task_ids):
        import torch

        logits = self.stacked_logits(self.shard_states(), x)   # [M, B, C]
        if self.cfg.aggregation == "mean_softmax":
            return logits.softmax(-1).mean(0).clamp_min(1e-12).log()
        votes = torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float().mean(0)
        # vote shares as probabilities; equal shares stay equal, so a tie goes to the lowest
        # class index under argmax, as in the official aggregation
        return votes.clamp_min(1e-12).log()
