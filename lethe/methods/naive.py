"""Naive fine-tuning: train on each experience in turn (the lower bound on forgetting)."""
from __future__ import annotations

from dataclasses import dataclass

from lethe.methods.base import Method
from lethe.registry import register_method


@dataclass
class NaiveConfig:
    pass


@register_method("naive", config=NaiveConfig, kinds=("learn",))
class Naive(Method):
    """Fine-tune on each experience with no protection against forgetting."""

    name = "naive"
    fsdp = True
