"""Negative flips of one model update with naive_update, pct and muscle side by side (issue 6).

The update of the ``compat_*_digits`` presets: v0 = an MLP (32 hidden units, 10 epochs) on
half of the digits training pool, v1 = a small CNN (32/64 channels, 20 epochs) on all of it,
Adam with a cosine decay per version, evaluated on a fixed test set (half of sklearn digits,
899 images). Every method runs the same v0 → v1 update for each seed through the real
platform (``run_experiment``: scenario, Avalanche template, evaluator, MLflow into a
temporary SQLite store). Version 0 is trained identically by all of them (no old model
yet), so they differ only in how v1 is trained.

For each method it prints mean ± std over seeds of v1's accuracy, its accuracy gain over
v0, NFR, PFR, NFI and relative NFR vs v0. ``best_reduction`` is the relative NFR reduction,
1 − NFR_m / NFR_naive, of the better of pct and muscle (lower mean NFR); the line before it
says whether that method's accuracy is within one point of naive. ``--control`` adds
naive_update with v1 trained for muscle's adapter epochs more (muscle's training budget).
Last line exactly:

    nfr_naive=<a> nfr_pct=<b> nfr_muscle=<c> best_reduction=<r>

    .venv/bin/python benchmarks/compat_nfr.py [--seeds 0 1 2] [--control]
        [--set KEY=VALUE ...] [--set-pct KEY=VALUE ...] [--set-muscle KEY=VALUE ...]
        [--methods pct muscle]
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


def config(preset: str, seed: int, tmp: Path, extra: list[str]):
    from lethe.platform.config import load_config

    return load_config(preset, [f"seed={seed}", f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
                                "tracking.experiment=compat_nfr", "checkpoint.enabled=false",
                                f"checkpoint.dir={tmp / 'runs'}", "eval.save_predictions=false",
                                "device=cpu", *extra])


def run_one(cfg) -> dict:
    from lethe.platform.runner import run_experiment

    res = run_experiment(cfg)
    out = {name: res.final[key] for name, key in KEYS}
    if "muscle/mask_frac" in res.final:   # share of adapter-training samples taught by f₁
        out["mask_frac"] = res.final["muscle/mask_frac"]
    return out


def describe(cfg) -> str:
    """'v0 (mlp, 50% of the data, 10 ep) → v1 (simple_cnn, 100%, 20 ep)' from a config."""
    parts, model = [], cfg.model.name
    for k, v in enumerate(cfg.scenario.versions):
        model = v.model.name if v.model is not None else model
        parts.append(f"v{k} ({model}, {100 * v.fraction:.0f}% of the data, "
                     f"{v.epochs or cfg.train.epochs} ep)")
    return " → ".join(parts)


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.pstdev(xs) if len(xs) > 1 else 0.0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="overrides applied to every run (e.g. train.epochs=5)")
    ap.add_argument("--set-pct", nargs="*", default=[], metavar="KEY=VALUE",
                    help="overrides of the pct runs only (e.g. method.lam=1.0)")
    ap.add_argument("--set-muscle", nargs="*", default=[], metavar="KEY=VALUE",
                    help="overrides of the muscle runs only (e.g. method.adapter_epochs=10)")
    ap.add_argument("--control", action="store_true",
                    help="also run naive_update with the last version trained for as many extra "
                         "epochs as muscle's adapter (same training budget as muscle)")
    ap.add_argument("--methods", nargs="+", default=list(PRESETS), choices=list(PRESETS),
                    help="a subset to run (naive always runs: it is the reference)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = ap.parse_args(argv)

    import torch
    from omegaconf import OmegaConf

    from lethe.platform.config import validate

    torch.set_num_threads(args.threads)
    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.getLogger("lethe").setLevel(logging.WARNING)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    extra = {"naive": args.set, "pct": args.set + args.set_pct, "muscle": args.set + args.set_muscle}
    results = {m: [] for m in PRESETS if m == "naive" or m in args.methods}
    if args.control:
        results["naive+ep"] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="compat_nfr_") as tmp:
        for seed in args.seeds:
            for method in results:
                cfg = config(PRESETS[method.split("+")[0]], seed, Path(tmp), extra[method.split("+")[0]])
                if method == "naive+ep":   # muscle's adapter epochs spent on the new version
                    mus = config(PRESETS["muscle"], seed, Path(tmp), extra["muscle"])
                    raw = OmegaConf.to_container(cfg)
                    last = raw["scenario"]["versions"][-1]
                    base = last["epochs"] or raw["train"]["epochs"]
                    last["epochs"] = base + (mus.method.adapter_epochs or base)
                    cfg = validate(raw)
                if seed == args.seeds[0] and method == "naive":
                    update = describe(cfg)
                r = run_one(cfg)
                results[method].append(r)
                print(f"seed {seed} {method:<7s} acc={r['acc']:.4f} gain={r['gain']:+.4f} "
                      f"nfr={r['nfr']:.4f} pfr={r['pfr']:.4f} nfi={r['nfi']:.4f}", flush=True)
    print(f"\n{update}; {len(args.seeds)} seeds {args.seeds}, "
          f"{time.perf_counter() - t0:.0f} s; mean ± std over seeds (acc, gain: of the last version; "
          "flips: last vs previous version)")
    head = f"{'method':<9s}" + "".join(f"{name:>18s}" for name, _ in KEYS)
    print(head)
    summary = {}
    for method, rows in results.items():
        cells = []
        for name, _ in KEYS:
            m, s = mean_std([r[name] for r in rows])
            summary[(method, name)] = m
            cells.append(f"{m:9.4f} ± {s:6.4f}")
        print(f"{method:<9s}" + "".join(f"{c:>18s}" for c in cells))
    if "muscle" in results:
        m, sd = mean_std([r["mask_frac"] for r in results["muscle"]])
        print(f"muscle: the old model taught {100 * m:.2f}% ± {100 * sd:.2f}% of the adapter's "
              "training samples (where the new version was wrong)")
    nan = float("nan")
    naive = summary[("naive", "nfr")]
    ran = [m for m in ("pct", "muscle") if m in results]
    if not ran:
        return 0
    best = min(ran, key=lambda m: summary[(m, "nfr")])
    reduction = 1.0 - summary[(best, "nfr")] / naive if naive > 0 else 0.0
    d_acc = 100 * (summary[(best, "acc")] - summary[("naive", "acc")])
    ok = reduction >= 0.30 and d_acc >= -1.0
    print(f"best: {best}, NFR reduction {reduction:.3f} vs naive, accuracy {d_acc:+.2f} points "
          f"vs naive; goal (reduction ≥ 0.30, accuracy within 1 point): "
          f"{'met' if ok else 'NOT met'}")
    print(f"nfr_naive={naive:.4f} nfr_pct={summary.get(('pct', 'nfr'), nan):.4f} "
          f"nfr_muscle={summary.get(('muscle', 'nfr'), nan):.4f} best_reduction={reduction:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
