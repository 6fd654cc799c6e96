"""SISA — Sharded, Isolated, Sliced, Aggregated training (Bourtoule et al., IEEE S&P 2021).

The training data is split into disjoint shards (one constituent model each), each shard
into slices. A shard model trains on cumulative slices 1..i in stage i and a checkpoint
is kept after every stage. Deleting a sample of slice k reloads the checkpoint before
slice k and retrains slices k..L without it; the other shards are untouched. Predictions
aggregate the shard models by majority vote (or mean softmax).

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
    lora: LoraOptions = field(default_factory=lambda: LoraOptions(rank=0))


@register_method("sisa", config=SISAConfig, kinds=("learn", "forget"))
class SISA(ShardedUnlearner):
    """Shards x slices with slice checkpoints; a deletion retrains one shard from the slice before it."""

    name = "sisa"

    @classmethod
    def validate_config(cls, cfg) -> None:
        from lethe.registry import check_choice

        super().validate_config(cfg)
        check_choice("method.aggregation", cfg.aggregation, AGGREGATIONS)

    def predict(self, x, task_ids):
        import torch

        logits = self.stacked_logits(self.shard_states(), x)   # [M, B, C]
        probs = logits.softmax(-1).mean(0)
        if self.cfg.aggregation == "mean_softmax":
            return probs.clamp_min(1e-12).log()
        votes = torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float().mean(0)
        # vote shares as probabilities; the mean softmax only breaks ties
        return (votes + 1e-4 * probs).log()
