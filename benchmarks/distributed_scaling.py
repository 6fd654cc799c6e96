"""Training throughput of `lethe run CONFIG --nproc N` for N = 1, 2, ... and the scaling
efficiency, side by side in one run.

Each N runs the same experiment (naive fine-tuning on 5-experience split digits by default,
the same global batch: `train.batch_size` is split over the ranks) as a real `lethe run`
subprocess into a fresh SQLite store; its training time is the sum of the run's logged
`time/train_s` (rank 0's wall time of each experience's training, which waits for the other
ranks at every gradient all-reduce), so start-up, evaluation and MLflow writes are outside it.
Throughput = training samples (experience sizes × epochs) / training time; efficiency of N =
throughput(N) / (N × throughput(1)). Every process gets `--threads` threads, so N processes
use N × threads cores: on a machine with fewer cores the figure measures contention, not
scaling (the script says so).

Usage: python benchmarks/distributed_scaling.py [--nprocs 1,2] [--epochs 8] [--batch-size 64]
       [--threads 1] [--repeats 3] [overrides ...]
Last line: ``throughput_1=<samples/s> throughput_<N>=<samples/s> ... scaling_efficiency=<e>``
(e for the largest N).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def training_samples(overrides: list[str]) -> int:
    """Σ over experiences of the training-set size × epochs, from the stream lethe builds."""
    from lethe import registry
    from lethe.platform.config import load_config

    cfg = load_config("split_digits", overrides)
    stream = registry.get("scenarios", cfg.scenario.name).obj(cfg.scenario, cfg.seed)
    return sum(len(e.train.dataset) for e in stream.experiences) * int(cfg.train.epochs)


def one_run(nproc: int, overrides: list[str], threads: int) -> float:
    """Σ time/train_s of one `lethe run ... --nproc nproc` (seconds)."""
    from mlflow.tracking import MlflowClient

    lethe = Path(sys.executable).with_name("lethe")
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        cmd = [str(lethe), "run", "split_digits", *overrides, f"tracking.uri={uri}",
               f"checkpoint.dir={tmp}/ckpt", "--nproc", str(nproc)]
        env = os.environ | {"OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp)
        if done.returncode != 0:
            sys.exit(f"`{' '.join(cmd)}` failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
        client = MlflowClient(tracking_uri=uri)
        (run,) = client.search_runs([client.get_experiment_by_name("lethe").experiment_id])
        return sum(m.value for m in client.get_metric_history(run.info.run_id, "time/train_s"))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nprocs", default="1,2", help="comma list of process counts (default 1,2)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64, help="the global batch (default 64)")
    p.add_argument("--threads", type=int, default=1, help="threads per process (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="runs per N, interleaved; the median counts")
    p.add_argument("overrides", nargs="*", help="extra config overrides (key=value)")
    args = p.parse_args(argv)
    nprocs = sorted({int(n) for n in args.nprocs.split(",")})
    if nprocs[0] != 1:
        sys.exit("--nprocs must include 1: efficiency is measured against one process")
    overrides = ["method.name=naive", f"train.epochs={args.epochs}",
                 f"train.batch_size={args.batch_size}", "eval.initial=false", *args.overrides]
    samples = training_samples(overrides)
    cores = os.cpu_count() or 1
    print(f"machine: cpus={cores} threads/process={args.threads} load={os.getloadavg()[0]:.1f}; "
          f"{samples} training samples per run (global batch {args.batch_size})")
    if nprocs[-1] * args.threads > cores:
        print(f"note: {nprocs[-1]} processes × {args.threads} threads > {cores} cores: "
              f"the largest N shares cores, so its figure measures contention")
    times: dict[int, list[float]] = {n: [] for n in nprocs}
    for _ in range(args.repeats):          # interleaved: every N sees the same machine load
        for n in nprocs:
            t0 = time.perf_counter()
            times[n].append(one_run(n, overrides, args.threads))
            print(f"  --nproc {n}: train {times[n][-1]:.2f} s (command {time.perf_counter() - t0:.1f} s)")
    throughput = {n: samples / statistics.median(times[n]) for n in nprocs}
    for n in nprocs:
        eff = throughput[n] / (n * throughput[1])
        print(f"--nproc {n}: median train {statistics.median(times[n]):.2f} s, "
              f"{throughput[n]:.0f} samples/s, efficiency {eff:.2f}")
    last = nprocs[-1]
    print(" ".join(f"throughput_{n}={throughput[n]:.0f}" for n in nprocs)
          + f" scaling_efficiency={throughput[last] / (last * throughput[1]):.2f}")


if __name__ == "__main__":
    main()
