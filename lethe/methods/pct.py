"""PCT — Positive-Congruent Training with focal distillation (Yan et al., CVPR 2021).

The new version f₂ is trained with cross-entropy plus a distillation term from the frozen
old version f₁ that weighs the samples f₁ gets right more:

    L = CE(z₂, y) + λ · mean_i[(α + β·𝟙[argmax z₁ᵢ = yᵢ]) · D(z₁ᵢ, z₂ᵢ)]
    D_kl = T² · KL(softmax(z₁/T) ‖ softmax(z₂/T))       (paper: T = 100, α = 1, β = 5)
    D_l2 = ½ · mean_c (z₁,c − z₂,c)²  (logit matching, FD-LM)

Paper: https://arxiv.org/abs/2011.09161. Code followed: the public implementation
github.com/jun-fang/PCT (``main.py``, ``fd-kl`` / ``fd-lm``):
FD-KL sums T²·KL over the classes, FD-LM takes half the mean squared logit difference over
the C classes (½‖z₁ − z₂‖²/C, the usual ½ of an L2 loss), and the focal weight α + β·𝟙[old
model right] multiplies the per-sample distance before the batch mean. That code adds the
term with weight 1; lethe keeps λ (default 1) to tune it. Version 0 (no old model) trains
with CE only.

A run should show a lower NFR than ``naive_update`` on the same update at a similar
accuracy. On digits (``compat_pct_digits``: MLP on half the data → CNN on all of it, 3
seeds) λ = 0.1 gives NFR 0.33% vs 0.70% for naive_update (−53%) at 97.8% vs 97.1% accuracy;
the paper's λ = 1 lets the weaker old model's logits dominate this CNN (with a 20-epoch old
MLP: accuracy −4.8 points, NFR doubled; see the README, "Compatible model updates").
"""
from __future__ import annotations

from dataclasses import dataclass

from lethe.errors import ConfigError
from lethe.methods.compat import UpdateMethod
from lethe.registry import register_method

DISTANCES = ("kl", "l2")


def pct_loss(new_logits, old_logits, targets, alpha: float = 1.0, beta: float = 5.0,
             distance: str = "kl", temperature: float = 100.0):
    """Focal distillation term (without λ): mean over the batch of (α + β·𝟙[old right])·D,
    where 'old right' is the *old* model's argmax matching the label."""
    import torch
    import torch.nn.functional as F

    old_logits = old_logits.detach()
    weight = alpha + beta * (old_logits.argmax(-1) == targets).to(new_logits.dtype)
    if distance == "kl":
        T = float(temperature)
        log_p_old = F.log_softmax(old_logits / T, dim=-1)
        log_p_new = F.log_softmax(new_logits / T, dim=-1)
        d = (T * T) * (log_p_old.exp() * (log_p_old - log_p_new)).sum(-1)
    elif distance == "l2":
        d = (new_logits - old_logits).pow(2).mean(-1) / 2     # jun-fang/PCT's FD-LM scale
    else:
        raise ValueError(f"unknown PCT distance '{distance}' (known: {', '.join(DISTANCES)})")
    return (weight * d).mean() if len(d) else torch.zeros((), device=new_logits.device)


@dataclass
class PCTConfig:
    distance: str = "kl"          # kl (focal distillation, FD-KL) | l2 (logit matching, FD-LM)
    lam: float = 1.0              # λ: weight of the distillation term next to cross-entropy
    alpha: float = 1.0            # α: weight of every sample (plain distillation)
    beta: float = 5.0             # β: extra weight of the samples the old model gets right
    temperature: float = 100.0    # T of the KL form (the paper's 100 ≈ logit matching)


@register_method("pct", config=PCTConfig, kinds=("update",))
class PCT(UpdateMethod):
    """Positive-congruent training: focal distillation from the frozen old version."""

    name = "pct"

    def __init__(self, cfg, model, ctx):
        if cfg.distance not in DISTANCES:
            raise ConfigError(f"method.distance='{cfg.distance}' must be one of {', '.join(DISTANCES)}")
        if cfg.temperature <= 0:
            raise ConfigError(f"method.temperature={cfg.temperature} must be > 0")
        if min(cfg.lam, cfg.alpha, cfg.beta) < 0:
            raise ConfigError("method.lam, method.alpha and method.beta must be >= 0")
        super().__init__(cfg, model, ctx)

    def before_backward(self, strategy, **kwargs):
        """Avalanche callback: add λ·focal distillation to the template's loss."""
        if self.old_model is None or strategy.model is not self.model:
            return
        import torch

        with torch.no_grad():
            old = self.old_model(strategy.mb_x)
        c = self.cfg
        strategy.loss = strategy.loss + c.lam * pct_loss(
            strategy.mb_output, old, strategy.mb_y, c.alpha, c.beta, c.distance, c.temperature)
