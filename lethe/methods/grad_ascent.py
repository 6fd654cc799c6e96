"""Gradient ascent — the simplest LLM-unlearning baseline.

Maximise the language-modelling loss on the forget set (Jang et al., "Knowledge Unlearning
for Mitigating Privacy Risks in Language Models", ACL 2023; TOFU's "GA" baseline, Maini et
al., 2024): loss = −NLL(forget). Unbounded, so it drives the model towards degenerate text;
TOFU and LoKU report its collapse of model utility, ReLearn its loss of fluency — the
baselines benchmarks/llm_unlearning.py measures the other methods against.
"""
from __future__ import annotations

from dataclasses import dataclass

from lethe.methods.llm_unlearn import LLMUnlearner, UnlearnConfig, lm_nll
from lethe.registry import register_method


@dataclass
class GradAscentConfig(UnlearnConfig):
    pass


@register_method("grad_ascent", config=GradAscentConfig, kinds=("learn", "forget"))
class GradAscent(LLMUnlearner):
    """Gradient ascent on the forget set (the TOFU GA baseline)."""

    name = "grad_ascent"
    fsdp = True

    def unlearn_loss(self, fx, fy, rx, ry):
        return -lm_nll(self.model(fx), fy)
