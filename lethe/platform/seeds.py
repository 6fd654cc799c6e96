"""`lethe run CONFIG --seeds N`: N seeds under one MLflow parent run with mean ± std ± CI."""
from __future__ import annotations

import math

from omegaconf import DictConfig, OmegaConf

from lethe import tags as T
from lethe.errors import ConfigError

SKIP_PREFIXES = ("time/", "train/")   # not outcomes worth aggregating


def aggregate(values: list[float]) -> dict[str, float]:
    """mean, sample std (ddof=1) and the half-width of a 95% t confidence interval."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "std": 0.0, "ci95": 0.0}
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return {"mean": mean, "std": std, "ci95": float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)}


def aggregate_finals(finals: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted(set.intersection(*(set(f) for f in finals))) if finals else []
    out = {}
    for key in keys:
        if key.startswith(SKIP_PREFIXES):
            continue
        for stat, value in aggregate([f[key] for f in finals]).items():
            out[f"{key}/{stat}"] = value
    return out


def run_seeds(cfg: DictConfig, n_seeds: int, tags: dict[str, str] | None = None, run_one=None):
    """Run seeds cfg.seed .. cfg.seed+N-1 as child runs; returns (parent id, results, aggregates).
    ``run_one(child_cfg, child_tags) -> RunResult`` runs one seed (default: in this process;
    ``--nproc`` passes one that launches the seed's ranks)."""
    from lethe.platform.config import flatten, to_yaml
    from lethe.platform.tracking import Tracker

    if n_seeds < 1:
        raise ConfigError("--seeds must be ≥ 1")
    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment)
    parent = tracker.start(f"{cfg.tracking.run_name or cfg.name} ×{n_seeds} seeds", flatten(cfg),
                           {T.N_SEEDS: str(n_seeds), **T.parent_tags(T.SEEDS), **(tags or {})})
    tracker.log_text(to_yaml(cfg), "config.yaml")
    results, status = [], "FAILED"
    try:
        for k in range(n_seeds):
            child = OmegaConf.merge(cfg, {"seed": cfg.seed + k})
            OmegaConf.set_readonly(child, True)
            results.append((run_one or _in_process)(child, T.child_tags(T.SEEDS, parent, k)))
        agg = aggregate_finals([r.final for r in results])
        tracker.log_metrics(agg, step=0)
        tracker.log_text(summary_table(agg), "seed_summary.txt")
        status = "FINISHED"
        return parent, results, agg
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.end(status)


def _in_process(cfg: DictConfig, tags: dict[str, str]):
    from lethe.platform.runner import run_experiment

    return run_experiment(cfg, tags=tags)


def summary_table(agg: dict[str, float]) -> str:
    names = sorted({k.rsplit("/", 1)[0] for k in agg})
    width = max((len(n) for n in names), default=10)
    lines = [f"{'metric':<{width}}  {'mean':>9}  {'std':>9}  {'±95% CI':>9}"]
    for n in names:
        lines.append(f"{n:<{width}}  {agg[n + '/mean']:9.4f}  {agg[n + '/std']:9.4f}  {agg[n + '/ci95']:9.4f}")
    return "\n".join(lines)
