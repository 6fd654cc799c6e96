"""Learning-rate schedules as plain functions step → lr, usable by any method (`train.lr_schedule`).

Every schedule restarts at every experience: its step s counts from 0 at the experience's first
training step (``infinite`` alone keeps its warm-up and cool-down for the first experience).

Ibrahim et al., "Simple and Scalable Strategies to Continually Pre-train Large Language
Models" (2024): when a new dataset arrives, *re-warm* the learning rate (linear warm-up to
η_max over ~1% of its steps) and *re-decay* it (cosine to η_min = 0.1·η_max) — the
``rewarm_cosine`` schedule, restarted at every experience. Their *infinite* schedule avoids
re-warming: warm-up → cool-down (cosine, inverse-sqrt with α = 10, or linear) to a constant
η_const once, at the start of the stream → constant for every later experience → a short
exponential anneal to η_min at the end of each experience, where the model is evaluated and
checkpointed (the next experience resumes at η_const).

Step conventions (the tests compute these formulas independently):

W below is ``warmup_steps`` when it is > 0; η_min = eta_min_frac·η_max (default 0.1·η_max, but
0 for cosine, as in HF).

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
warmup_linear and cosine are the Hugging Face Trainer's ``get_linear_schedule_with_warmup`` and
``get_cosine_schedule_with_warmup`` (``get_cosine_with_min_lr_schedule_with_warmup`` when
η_min > 0), step for step. T steps, s = 0..T-1, W = warmup_steps, or ⌈warmup_frac·T⌉ when
warmup_steps = 0 (as the Trainer derives it from warmup_ratio):
    s < W:  η = η_max·s/W                                 (η = 0 at s = 0, as in HF)
    s ≥ W, p = (s−W)/max(1, T−W):
        warmup_linear: η = η_max·max(0, 1−p)              (0 would be reached at s = T)
        cosine:        η = η_min + ½(η_max−η_min)(1 + cos(πp)),  η_min = eta_min_frac·η_max
step (torch's StepLR stepped once per epoch), E steps per epoch, epoch e = ⌊s/E⌋:
    η = η_max·γ^⌊e/step_size⌋

This module holds no heavy imports at module level: the config loader imports it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

from lethe.engine.plugins import RunnerPlugin
from lethe.errors import ConfigError

NAMES = ("none", "rewarm_cosine", "infinite", "warmup_linear", "cosine", "step")
COOLDOWNS = ("cosine", "inv_sqrt", "linear")


@dataclass
class LRScheduleConfig:
    name: str = "none"            # none (constant train.lr) | rewarm_cosine | infinite
                                  # | warmup_linear | cosine | step
    eta_max: Optional[float] = None  # peak lr η_max; None = train.lr
    eta_min_frac: Optional[float] = None  # η_min = eta_min_frac·η_max; None = the schedule's
                                  # own: 0.1 for rewarm_cosine and infinite (paper), 0 for cosine (HF)
    warmup_frac: float = 0.01     # warm-up share of each experience's steps (rewarm_cosine,
                                  # warmup_linear, cosine) or of the first experience's steps
                                  # (infinite); paper: ~1%
    warmup_steps: int = 0         # warm-up length in steps instead; 0 = use warmup_frac
    cooldown: str = "cosine"      # infinite: cosine | inv_sqrt | linear, from η_max to η_const
    cooldown_frac: float = 0.2    # infinite: cool-down share of the first experience (choice)
    alpha: float = 10.0           # infinite, inv_sqrt cool-down steepness (paper: 10)
    eta_const_frac: float = 0.5   # infinite: η_const = eta_const_frac·η_max (choice)
    anneal_frac: float = 0.1      # infinite: share of each experience's last steps spent
                                  # annealing exponentially to η_min (choice)
    step_size: Optional[int] = None  # step: epochs between decays (required; CLR: 20)
    gamma: float = 0.1            # step: lr factor at every decay (CLR: 0.1)


# --- the formulas ---------------------------------------------------------------------------
def _round(x: float) -> int:
    return int(math.floor(x + 0.5))


def warmup(step: int, warmup_steps: int, eta_max: float) -> float:
    """Linear warm-up: η_max·(s+1)/(W+1) for s ≤ W (η_max at s = W; W = 0: η_max at once)."""
    return eta_max * (step + 1) / (warmup_steps + 1)


def rewarm_cosine(step: int, total_steps: int, eta_max: float, warmup_frac: float = 0.01,
                  eta_min_frac: float = 0.1, warmup_steps: int = 0) -> float:
    """Re-warming + cosine re-decay over one experience of ``total_steps`` steps
    (W = ``warmup_steps``, or round(warmup_frac·T) when it is 0)."""
    w = warmup_steps if warmup_steps > 0 else _round(warmup_frac * total_steps)
    w = min(w, max(total_steps - 1, 0))
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


def hf_warmup(step: int, warmup_steps: int) -> float:
    """HF's warm-up multiplier s/W (0 at the first step), for s < W."""
    return step / max(1, warmup_steps)


def warmup_linear(step: int, total_steps: int, eta_max: float, warmup_steps: int) -> float:
    """Linear warm-up then linear decay towards 0 (HF ``get_linear_schedule_with_warmup``)."""
    if step < warmup_steps:
        return eta_max * hf_warmup(step, warmup_steps)
    return eta_max * max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def cosine(step: int, total_steps: int, eta_max: float, warmup_steps: int,
           eta_min_frac: float = 0.0) -> float:
    """Linear warm-up then cosine decay towards eta_min_frac·η_max (HF
    ``get_cosine_schedule_with_warmup``; ``get_cosine_with_min_lr_schedule_with_warmup`` with
    ``min_lr_rate=eta_min_frac``)."""
    if step < warmup_steps:
        return eta_max * hf_warmup(step, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return eta_max * max(0.0, factor * (1.0 - eta_min_frac) + eta_min_frac)


def step_lr(step: int, steps_per_epoch: int, eta_max: float, step_size: int, gamma: float) -> float:
    """StepLR per epoch: η_max·γ^⌊epoch/step_size⌋, epoch = ⌊step/steps_per_epoch⌋."""
    epoch = step // max(1, steps_per_epoch)
    return eta_max * gamma ** (epoch // step_size)


def resolved_eta_min_frac(cfg: LRScheduleConfig) -> float:
    """The configured η_min share, or the schedule's own default (paper 0.1, HF cosine 0)."""
    if cfg.eta_min_frac is not None:
        return float(cfg.eta_min_frac)
    return 0.0 if cfg.name == "cosine" else 0.1


def warmup_length(cfg: LRScheduleConfig, total_steps: int, hf: bool) -> int:
    """``warmup_steps`` if set, else a share of the steps: ⌈·⌉ as the HF Trainer takes it
    (``hf``), else rounded to nearest (the paper's schedules)."""
    if cfg.warmup_steps > 0:
        return int(cfg.warmup_steps)
    share = cfg.warmup_frac * total_steps
    return math.ceil(share) if hf else _round(share)


def experience_schedule(cfg: LRScheduleConfig, base_lr: float, total_steps: int,
                        first: bool, steps_per_epoch: int | None = None) -> Callable[[int], float]:
    """The function local step → lr for one experience of ``total_steps`` steps
    (``steps_per_epoch``: needed by ``step``)."""
    eta_max = float(cfg.eta_max if cfg.eta_max is not None else base_lr)
    low = resolved_eta_min_frac(cfg)
    if cfg.name in ("warmup_linear", "cosine"):
        w = warmup_length(cfg, total_steps, hf=True)
        if cfg.name == "cosine":
            return lambda s: cosine(s, total_steps, eta_max, w, low)
        return lambda s: warmup_linear(s, total_steps, eta_max, w)
    if cfg.name == "step":
        if steps_per_epoch is None:
            raise ValueError("the step schedule needs steps_per_epoch")
        return lambda s: step_lr(s, steps_per_epoch, eta_max, cfg.step_size, cfg.gamma)
    if cfg.name == "rewarm_cosine":
        return lambda s: rewarm_cosine(s, total_steps, eta_max, cfg.warmup_frac, low, cfg.warmup_steps)
    if cfg.name == "infinite":
        return _infinite_schedule(cfg, eta_max, low, total_steps, first)
    return lambda s: eta_max


def _infinite_schedule(cfg: LRScheduleConfig, eta_max: float, low: float, total_steps: int,
                       first: bool) -> Callable[[int], float]:
    kw = dict(first=first, eta_max=eta_max, eta_const=cfg.eta_const_frac * eta_max,
              eta_min=low * eta_max,
              warmup_steps=warmup_length(cfg, total_steps, hf=False) if first else 0,
              cooldown_steps=_round(cfg.cooldown_frac * total_steps) if first else 0,
              anneal_steps=_round(cfg.anneal_frac * total_steps),
              cooldown=cfg.cooldown, alpha=cfg.alpha)
    return lambda s: infinite(s, total_steps, **kw)


# --- config checks (called by lethe.platform.config) ---------------------------------------
def check_config(cfg: LRScheduleConfig) -> None:
    from lethe.registry import check_choice

    key = "train.lr_schedule"
    check_choice(f"{key}.name", cfg.name, NAMES)
    check_choice(f"{key}.cooldown", cfg.cooldown, COOLDOWNS)
    if cfg.eta_max is not None and cfg.eta_max <= 0:
        raise ConfigError(f"bad value for '{key}.eta_max': must be > 0 (or null for train.lr)")
    _check_ranges(cfg, key)
    if cfg.name == "infinite":
        _check_infinite(cfg, key)
    if cfg.name == "step" and cfg.step_size is None:
        raise ConfigError(f"'{key}.name=step' needs '{key}.step_size': the number of epochs "
                          f"between decays by gamma (e.g. {key}.step_size=20)")


def _check_ranges(cfg: LRScheduleConfig, key: str) -> None:
    if cfg.eta_min_frac is not None and not 0 <= cfg.eta_min_frac <= 1:
        raise ConfigError(f"bad value for '{key}.eta_min_frac': {cfg.eta_min_frac} must be in "
                          f"[0, 1] (or null for the schedule's default)")
    for f in ("eta_const_frac", "gamma"):
        v = getattr(cfg, f)
        if not 0 < v <= 1:
            raise ConfigError(f"bad value for '{key}.{f}': {v} must be in (0, 1]")
    for f in ("warmup_frac", "cooldown_frac", "anneal_frac"):
        v = getattr(cfg, f)
        if not 0 <= v <= 1:
            raise ConfigError(f"bad value for '{key}.{f}': {v} must be in [0, 1]")
    if cfg.warmup_steps < 0:
        raise ConfigError(f"bad value for '{key}.warmup_steps': {cfg.warmup_steps} must be ≥ 0 "
                          f"(0 = use warmup_frac)")
    if cfg.step_size is not None and cfg.step_size < 1:
        raise ConfigError(f"bad value for '{key}.step_size': {cfg.step_size} must be ≥ 1 (epochs)")
    if cfg.alpha <= 0:
        raise ConfigError(f"bad value for '{key}.alpha': must be > 0")


def _check_infinite(cfg: LRScheduleConfig, key: str) -> None:
    if cfg.warmup_frac + cfg.cooldown_frac + cfg.anneal_frac > 1:
        raise ConfigError(f"'{key}': warmup_frac + cooldown_frac + anneal_frac = "
                          f"{cfg.warmup_frac + cfg.cooldown_frac + cfg.anneal_frac:g} > 1; "
                          f"the phases must fit in the first experience")
    low = resolved_eta_min_frac(cfg)
    if low <= 0:
        raise ConfigError(f"bad value for '{key}.eta_min_frac': {low} must be > 0 for the "
                          f"infinite schedule (its exponential anneal ends at η_min)")
    if low > cfg.eta_const_frac:
        raise ConfigError(f"'{key}': eta_min_frac ({low}) must not exceed "
                          f"eta_const_frac ({cfg.eta_const_frac}): the anneal goes down to η_min")


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
        # the schedule counts optimizer steps: with train.grad_accum_steps = k an epoch of n
        # mini-batches is ceil(n / k) steps (as the Hugging Face Trainer counts them)
        engine = getattr(strategy, "engine", None)
        self.accum = engine.accum if engine is not None else 1
        self.batches = len(strategy.dataloader)
        per_epoch = -(-self.batches // self.accum)
        first = strategy.clock.train_iterations == 0
        self.fn = experience_schedule(self.cfg, self.base_lr, per_epoch * strategy.train_epochs,
                                      first, steps_per_epoch=per_epoch)
        self.per_epoch = per_epoch

    def before_training_iteration(self, strategy, **kwargs):
        epoch, batch = divmod(strategy.clock.train_exp_iterations, self.batches)
        lr = self.fn(epoch * self.per_epoch + batch // self.accum)
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

