"""Negative flips of one model update with naive_update, pct and muscle side by side (issue 6).

The update of the ``compat_*_digits`` presets: v0 = an MLP (32 hidden units) on half of
the digits training pool, v1 = a small CNN on all of it, evaluated on a fixed test set (half
of sklearn digits, 899 images). Every method runs the same v0 → v1 update for each seed
through the real platform (``run_experiment``: scenario, Avalanche template, evaluator,
MLflow into a temporary SQLite store); version 0 is trained identically by all of them
(no old model yet), so they differ only in how v1 is trained.

For each method it prints mean ± std over seeds of the new version's accuracy, its
accuracy gain over v0, NFR, PFR, NFI and relative NFR vs v0. ``best_reduction`` is the
relative NFR reduction, 1 − NFR_m / NFR_naive, of the better of pct and muscle (lower
mean NFR); the line before it says whether that method's accuracy is within one point of
naive. Last line exactly:

    nfr_naive=<a> nfr_pct=<b> nfr_muscle=<c> best_reduction=<r>

    .venv/bin/python benchmarks/compat_nfr.py [--seeds 0 1 2] [--set KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PRESETS = {"naive": "compat_naive_digits", "pct": "compat_pct_digits",
           "muscle": "compat_muscle_digits"}
KEYS = [("acc", "acc/version"), ("gain", "acc/gain_prev"), ("nfr", "nfr/prev"),
        ("pfr", "pfr/prev"), ("nfi", "nfi/prev"), ("rel_nfr", "rel_nfr/prev")]


def run_one(preset: str, seed: int, tmp: Path, extra: list[str]) -> dict:
    from lethe.platform.config import load_config
    from lethe.platform.runner import run_experiment

    cfg = load_config(preset, [f"seed={seed}", f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
                               "tracking.experiment=compat_nfr", "checkpoint.enabled=false",
                               f"checkpoint.dir={tmp / 'runs'}", "eval.save_predictions=false",
                               "device=cpu", *extra])
    res = run_experiment(cfg)
    return {name: res.final[key] for name, key in KEYS}


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.pstdev(xs) if len(xs) > 1 else 0.0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="overrides applied to every run (e.g. train.epochs=5)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.getLogger("lethe").setLevel(logging.WARNING)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    results = {m: [] for m in PRESETS}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="compat_nfr_") as tmp:
        for seed in args.seeds:
            for method, preset in PRESETS.items():
                r = run_one(preset, seed, Path(tmp), args.set)
                results[method].append(r)
                print(f"seed {seed} {method:<7s} acc={r['acc']:.4f} gain={r['gain']:+.4f} "
                      f"nfr={r['nfr']:.4f} pfr={r['pfr']:.4f} nfi={r['nfi']:.4f}", flush=True)
    print(f"\nv0 (MLP, half the data) → v1 (CNN, all the data), {len(args.seeds)} seeds "
          f"{args.seeds}, {time.perf_counter() - t0:.0f} s; mean ± std over seeds")
    head = f"{'method':<8s}" + "".join(f"{name:>18s}" for name, _ in KEYS)
    print(head)
    summary = {}
    for method, rows in results.items():
        cells = []
        for name, _ in KEYS:
            m, s = mean_std([r[name] for r in rows])
            summary[(method, name)] = m
            cells.append(f"{m:9.4f} ± {s:6.4f}")
        print(f"{method:<8s}" + "".join(f"{c:>18s}" for c in cells))
    naive = summary[("naive", "nfr")]
    best = min(("pct", "muscle"), key=lambda m: summary[(m, "nfr")])
    reduction = 1.0 - summary[(best, "nfr")] / naive if naive > 0 else 0.0
    d_acc = 100 * (summary[(best, "acc")] - summary[("naive", "acc")])
    ok = reduction >= 0.30 and d_acc >= -1.0
    print(f"best: {best}, NFR reduction {reduction:.3f} vs naive, accuracy {d_acc:+.2f} points "
          f"vs naive; goal (reduction ≥ 0.30, accuracy within 1 point): "
          f"{'met' if ok else 'NOT met'}")
    print(f"nfr_naive={naive:.4f} nfr_pct={summary[('pct', 'nfr')]:.4f} "
          f"nfr_muscle={summary[('muscle', 'nfr')]:.4f} best_reduction={reduction:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
