"""Naive model update — the baseline of PCT and MUSCLE: each new model version is trained with
cross-entropy only, as if the deployed version did not exist.

Setting (Yan et al., "Positive-Congruent Training", CVPR 2021): a run should show an accuracy
gain together with a non-zero negative flip rate, the figure ``pct`` and ``muscle`` must lower
at a similar accuracy. Measured on the MLP → CNN update of ``compat_naive_digits`` (3 seeds,
``benchmarks/compat_nfr.py``): accuracy 79.3% → 97.1%, NFR 0.70% ± 0.38% (6 of 899 test images).

``method.mode: adapter`` is MUSCLE's baseline (Echterhoff et al., 2024): every version is a
frozen pretrained base (``scenario.versions[i].base``) and its new task LoRA adapter is trained
with the task loss only, exactly as the previous version's was.
"""
from __future__ import annotations

from dataclasses import dataclass

from lethe.methods.compat import UpdateConfig, UpdateMethod
from lethe.registry import register_method


@dataclass
class NaiveUpdateConfig(UpdateConfig):
    pass   # mode (full | adapter) and the task adapters' LoRA: lethe/methods/compat.py


@register_method("naive_update", config=NaiveUpdateConfig, kinds=("update",))
class NaiveUpdate(UpdateMethod):
    """Train each new model version with cross-entropy only (the negative-flip baseline)."""

    name = "naive_update"
