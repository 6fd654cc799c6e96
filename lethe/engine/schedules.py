"""Learning-rate schedules as plain functions step → lr, usable by any method (`train.lr_schedule`).

Ibrahim et al., "Simple and Scalable Strategies to Continually Pre-train Large Language
Models" (2024): when a new dataset arrives, *re-warm* the learning rate (linear warm-up to
η_max over ~1% of its steps) and *re-decay* it (cosine to η_min = 0.1·η_max) — the
``rewarm_cosine`` schedule, restarted at every experience. Their *infinite* schedule avoids
re-warming: warm-up → cool-down (cosine, inverse-sqrt with α = 10, or linear) to a constant
η_const once, at the start of the stream → constant for every later experience → a short
exponential anneal to η_min at the end of each experience, where the model is evaluated and
checkpointed (the next experience resumes at η_const).

Step conventions (the tests compute these formulas independently):

rewarm_cosine, T steps in the experience, local step s = 0..T-1, W = round(warmup_frac·T):
    s ≤ W:  η = η_max·(s+1)/(W+1)                       (reaches η_max exactly at s = W)
    s ≥ W:  η = η_min + ½(η_max−η_min)(1 + cos(π·(s−W)/(T−1−W)))   (η_min exactly at s = T−1)
infinite, first experience (T₀ steps): W = round(warmup_frac·T₀), C = round(cooldown_frac·T₀):
    s ≤ W:      η = η_max·(s+1)/(W+1)
    W < s ≤ W+C, x = (s−W)/C:
        cosine:   η = η_const + ½(η_max−η_const)(1 + cos(πx))
        linear:   η = η_max + (η_const−η_max)·x
        inv_sqrt: η = η_max + (η_const−η_max)·h(x)/h(1),  h(x) = 1/√(1+αx) − 1
    later:      η = η_const                               (every later experience: constant)
    anneal, the last A = round(anneal_frac·T) steps of every experience, k = s−(T−A)+1 ∈ 1..A:
        η = η_a·(η_min/η_a)^(k/A),  η_a = the schedule's value at s = T−A before annealing
        (η_min exactly at the last step)

This module holds no heavy imports at module level: the config loader imports it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

from lethe.engine.plugins import RunnerPlugin
from lethe.errors import ConfigError

NAMES = ("none", "rewarm_cosine", "infinite")
COOLDOWNS = ("cosine", "inv_sqrt", "linear")


@dataclass
class LRScheduleConfig:
    name: str = "none"            # none (constant train.lr) | rewarm_cosine | infinite
    eta_max: Optional[float] = None  # peak lr η_max; None = train.lr
    eta_min_frac: float = 0.1     # η_min = eta_min_frac·η_max (paper: 0.1)
    warmup_frac: float = 0.01     # warm-up share of each experience's steps (rewarm_cosine)
                                  # or of the first experience's steps (infinite); paper: ~1%
    cooldown: str = "cosine"      # infinite: cosine | inv_sqrt | linear, from η_max to η_const
    cooldown_frac: float = 0.2    # infinite: cool-down share of the first experience (choice)
    alpha: float = 10.0           # infinite, inv_sqrt cool-down steepness (paper: 10)
    eta_const_frac: float = 0.5   # infinite: η_const = eta_const_frac·η_max (choice)
    anneal_frac: float = 0.1      # infinite: share of each experience's last steps spent
                                  # annealing exponentially to η_min (choice)


# --- the formulas ---------------------------------------------------------------------------
def _round(x: float) -> int:
    return int(math.floor(x + 0.5))


def warmup(step: int, warmup_steps: int, eta_max: float) -> float:
    """Linear warm-up: η_max·(s+1)/(W+1) for s ≤ W (η_max at s = W; W = 0: η_max at once)."""
    return eta_max * (step + 1) / (warmup_steps + 1)


def rewarm_cosine(step: int, total_steps: int, eta_max: float, warmup_frac: float = 0.01,
                  eta_min_frac: float = 0.1) -> float:
    """Re-warming + cosine re-decay over one experience of ``total_steps`` steps."""
    w = min(_round(warmup_frac * total_steps), max(total_steps - 1, 0))
    if step <= w:
        return warmup(step, w, eta_max)
    eta_min = eta_min_frac * eta_max
    span = max(total_steps - 1 - w, 1)
    progress = min((step - w) / span, 1.0)
    return eta_min + 0.5 * (eta_max - eta_min) * (1.0 + math.cos(math.pi * progress))


def cooldown_value(x: float, kind: str, eta_max: float, eta_const: float, alpha: float = 10.0) -> float:
    """Cool-down from η_max (x = 0) to η_const (x = 1)."""
    if kind == "cosine":
        return eta_const + 0.5 * (eta_max - eta_const) * (1.0 + math.cos(math.pi * x))
    if kind == "linear":
        return eta_max + (eta_const - eta_max) * x
    if kind == "inv_sqrt":
        def h(v):
            return 1.0 / math.sqrt(1.0 + alpha * v) - 1.0
        return eta_max + (eta_const - eta_max) * h(x) / h(1.0)
    raise ValueError(f"unknown cool-down '{kind}' (use {', '.join(COOLDOWNS)})")


def infinite(step: int, total_steps: int, *, first: bool, eta_max: float, eta_const: float,
             eta_min: float, warmup_steps: int = 0, cooldown_steps: int = 0,
             anneal_steps: int = 0, cooldown: str = "cosine", alpha: float = 10.0) -> float:
    """The infinite schedule at local step ``step`` of an experience of ``total_steps`` steps.

    ``first``: the stream's first training experience (warm-up and cool-down happen there only).
    """
    def base(s: int) -> float:
        if not first:
            return eta_const
        if s <= warmup_steps:
            return warmup(s, warmup_steps, eta_max)
        if s <= warmup_steps + cooldown_steps:
            return cooldown_value((s - warmup_steps) / cooldown_steps, cooldown, eta_max, eta_const, alpha)
        return eta_const

    a = min(anneal_steps, total_steps)
    start = total_steps - a
    if a == 0 or step < start:
        return base(step)
    eta_a = base(start)
    k = min(step - start + 1, a)
    return eta_a * (eta_min / eta_a) ** (k / a)


def experience_schedule(cfg: LRScheduleConfig, base_lr: float, total_steps: int,
                        first: bool) -> Callable[[int], float]:
    """The function local step → lr for one experience of ``total_steps`` steps."""
    eta_max = float(cfg.eta_max if cfg.eta_max is not None else base_lr)
    if cfg.name == "rewarm_cosine":
        return lambda s: rewarm_cosine(s, total_steps, eta_max, cfg.warmup_frac, cfg.eta_min_frac)
    if cfg.name == "infinite":
        kw = dict(first=first, eta_max=eta_max, eta_const=cfg.eta_const_frac * eta_max,
                  eta_min=cfg.eta_min_frac * eta_max,
                  warmup_steps=_round(cfg.warmup_frac * total_steps) if first else 0,
                  cooldown_steps=_round(cfg.cooldown_frac * total_steps) if first else 0,
                  anneal_steps=_round(cfg.anneal_frac * total_steps),
                  cooldown=cfg.cooldown, alpha=cfg.alpha)
        return lambda s: infinite(s, total_steps, **kw)
    return lambda s: eta_max


# --- config checks (called by lethe.platform.config) ---------------------------------------
def check_config(cfg: LRScheduleConfig) -> None:
    from lethe.registry import suggest

    key = "train.lr_schedule"
    if cfg.name not in NAMES:
        raise ConfigError(f"bad value for '{key}.name': '{cfg.name}'{suggest(cfg.name, NAMES)} "
                          f"(choose one of {', '.join(NAMES)})")
    if cfg.cooldown not in COOLDOWNS:
        raise ConfigError(f"bad value for '{key}.cooldown': '{cfg.cooldown}'"
                          f"{suggest(cfg.cooldown, COOLDOWNS)} (choose one of {', '.join(COOLDOWNS)})")
    if cfg.eta_max is not None and cfg.eta_max <= 0:
        raise ConfigError(f"bad value for '{key}.eta_max': must be > 0 (or null for train.lr)")
    for f in ("eta_min_frac", "eta_const_frac"):
        v = getattr(cfg, f)
        if not 0 < v <= 1:
            raise ConfigError(f"bad value for '{key}.{f}': {v} must be in (0, 1]")
    for f in ("warmup_frac", "cooldown_frac", "anneal_frac"):
        v = getattr(cfg, f)
        if not 0 <= v <= 1:
            raise ConfigError(f"bad value for '{key}.{f}': {v} must be in [0, 1]")
    if cfg.name == "infinite":
        if cfg.warmup_frac + cfg.cooldown_frac + cfg.anneal_frac > 1:
            raise ConfigError(f"'{key}': warmup_frac + cooldown_frac + anneal_frac = "
                              f"{cfg.warmup_frac + cfg.cooldown_frac + cfg.anneal_frac:g} > 1; "
                              f"the phases must fit in the first experience")
        if cfg.eta_min_frac > cfg.eta_const_frac:
            raise ConfigError(f"'{key}': eta_min_frac ({cfg.eta_min_frac}) must not exceed "
                              f"eta_const_frac ({cfg.eta_const_frac}): the anneal goes down to η_min")
    if cfg.alpha <= 0:
        raise ConfigError(f"bad value for '{key}.alpha': must be > 0")


# --- applying a schedule in training --------------------------------------------------------
class LRSchedulePlugin(RunnerPlugin):
    """Sets the optimizer's lr before every training iteration and logs ``train/lr`` per step.

    Duck-typed Avalanche plugin (no Avalanche import). Step axis: the template clock's global
    iteration count, which checkpoints restore, so a resumed run continues the same curve (the
    plugin itself has no state to checkpoint).
    The first experience of the stream is the one that starts at global step 0. Parameter
    groups keep their lr ratio to ``train.lr`` (a method may give heads a larger lr).
    """

    def __init__(self, cfg: LRScheduleConfig, base_lr: float, tracker=None):
        self.cfg, self.base_lr, self.tracker = cfg, float(base_lr), tracker
        self.fn: Callable[[int], float] | None = None
        self.pending: list[tuple[int, float]] = []
        self.history: list[tuple[int, float]] = []   # (global step, lr of group 0) this process

    def before_training_exp(self, strategy, **kwargs):
        total = len(strategy.dataloader) * strategy.train_epochs
        first = strategy.clock.train_iterations == 0
        self.fn = experience_schedule(self.cfg, self.base_lr, total, first)

    def before_training_iteration(self, strategy, **kwargs):
        lr = self.fn(strategy.clock.train_exp_iterations)
        for group in strategy.optimizer.param_groups:
            scale = group.setdefault("lethe_lr_scale", group["lr"] / self.base_lr)
            group["lr"] = lr * scale
        used = strategy.optimizer.param_groups[0]["lr"]
        self.pending.append((strategy.clock.train_iterations, used))
        self.history.append((strategy.clock.train_iterations, used))

    def after_training_exp(self, strategy, **kwargs):
        self.flush()

    def flush(self) -> None:
        if self.tracker is not None and self.pending:   # one write per flush, not one per step
            self.tracker.log_series("train/lr", self.pending)
        self.pending = []

