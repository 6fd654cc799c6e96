"""Concurrent runs into one tracking store: nothing lost, nothing hung.

N ``lethe run`` processes at once (default 8; a tiny split_digits config: 5 experiences,
1 epoch, seed = the run's index) first into a fresh SQLite store (a file that does not exist
yet: every process opens it at once), then into a real ``mlflow server`` on 127.0.0.1 (its own
fresh SQLite backend). Each phase is bounded (``--timeout``): processes still alive then are
killed and count as not finished.

What each run should hold, from the config (n = 5 experiences, E = 1 epoch):
  - every experience-level key at steps 0..n-1: acc/exp_0..acc/exp_{n-1} and the 12 keys of
    a class-incremental learn stream (EXPERIENCE_KEYS below): n · (n + 12) = 85 points
  - train/loss and train/lr (no lr schedule: TrainProgress logs it) once per epoch: n · E each
so 95 points per run. ``lost_points`` counts expected (key, step) points missing from the
store (a run that never appeared loses all 95); a key the store holds beyond these is named as
``unexpected`` (a new metric: update EXPERIENCE_KEYS), not counted. ``stuck``: runs still
RUNNING once every process has ended. ``finished``: runs FINISHED whose process exited 0.

The last line is exactly ``runs=<n> finished=<n> lost_points=<n> stuck=<n>`` (both phases
together); the exit code is 0 when finished = runs, lost_points = 0 and stuck = 0.

    .venv/bin/python benchmarks/stress_tracking.py [--runs 8] [--timeout 900]
        [--backends sqlite,server] [--keep]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

N_EXP, EPOCHS = 5, 1
CONFIG = ["split_digits", f"scenario.n_experiences={N_EXP}", f"train.epochs={EPOCHS}",
          "method.mem_size=100"]
EXPERIENCE_KEYS = ([f"acc/exp_{j}" for j in range(N_EXP)] + [
    "acc/avg_all", "acc/avg_incremental", "acc/avg_seen", "acc/last", "bwt", "forgetting/avg",
    "fwt", "nfi/prev", "nfr/prev", "pfr/prev", "time/eval_s", "time/train_s"])
EPOCH_KEYS = ("train/loss", "train/lr")
EXPECTED = len(EXPERIENCE_KEYS) * N_EXP + len(EPOCH_KEYS) * N_EXP * EPOCHS
EXPERIMENT = "stress"


@dataclass
class Phase:
    name: str
    runs: int = 0
    finished: int = 0
    lost: int = 0
    stuck: int = 0
    seconds: float = 0.0


# --- processes ---------------------------------------------------------------------------
def launch(uri: str, work: Path, n: int) -> list[subprocess.Popen]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    procs = []
    for i in range(n):
        log = open(work / f"run-{i}.log", "w")
        args = [sys.executable, "-m", "lethe.platform.cli", "run", *CONFIG, f"seed={i}",
                f"tracking.uri={uri}", f"tracking.experiment={EXPERIMENT}",
                f"tracking.run_name=stress-{i}", f"checkpoint.dir={work / 'runs'}"]
        procs.append(subprocess.Popen(args, cwd=work, stdout=log, stderr=subprocess.STDOUT, env=env,
                                      start_new_session=True))   # its own group: killable whole
        log.close()
    return procs


def wait_all(procs: list[subprocess.Popen], deadline: float) -> list[int | None]:
    """Exit codes; None for a process killed at the deadline."""
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(deadline - time.monotonic(), 0.1)))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            codes.append(None)
    return codes


# --- a real server -----------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: Path) -> tuple[str, subprocess.Popen]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
         "--artifacts-destination", str(folder / "artifacts")],
        cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"mlflow server exited with code {proc.returncode} before answering")
        with contextlib.suppress(OSError):
            if urllib.request.urlopen(url + "/health", timeout=2).status == 200:
                return url, proc
        time.sleep(0.5)
    stop_server(proc)
    raise SystemExit(f"mlflow server did not answer {url}/health within 180 s")


def stop_server(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# --- what the store holds ----------------------------------------------------------------
def lost_points(client, run_id: str, unexpected: set[str]) -> int:
    """Expected points (see the module docstring) missing from one run."""
    run = client.get_run(run_id)
    unexpected |= set(run.data.metrics) - set(EXPERIENCE_KEYS) - set(EPOCH_KEYS)
    lost = 0
    for key in EXPERIENCE_KEYS:
        steps = {m.step for m in client.get_metric_history(run_id, key)}
        lost += len(set(range(N_EXP)) - steps)
    for key in EPOCH_KEYS:   # steps are iteration counts: count distinct steps per key
        steps = {m.step for m in client.get_metric_history(run_id, key)}
        lost += max(N_EXP * EPOCHS - len(steps), 0)
    return lost


def audit(phase: Phase, uri: str, codes: list[int | None]) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = None
    with contextlib.suppress(Exception):   # a store broken by the runs: every run is lost
        exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], max_results=10_000) if exp else []
    by_name = {r.info.run_name: r for r in runs}
    unexpected: set[str] = set()
    for i, code in enumerate(codes):
        run = by_name.get(f"stress-{i}")
        if run is None:
            phase.lost += EXPECTED
            continue
        phase.finished += run.info.status == "FINISHED" and code == 0
        phase.lost += lost_points(client, run.info.run_id, unexpected)
    phase.stuck = sum(r.info.status == "RUNNING" for r in runs)
    if unexpected:
        print(f"  {phase.name}: keys not counted (update EXPERIENCE_KEYS): {', '.join(sorted(unexpected))}")


def failures(work: Path, codes: list[int | None]) -> list[str]:
    lines = []
    for i, code in enumerate(codes):
        if code != 0:
            tail = (work / f"run-{i}.log").read_text(errors="replace").strip().splitlines()[-1:]
            lines.append(f"  run {i}: {'killed at the deadline' if code is None else f'exit {code}'}"
                         f"{': ' + tail[0][:300] if tail else ''}")
    return lines


def run_phase(name: str, work: Path, n: int, timeout: float) -> Phase:
    work.mkdir(parents=True)
    server = None
    if name == "sqlite":
        uri = f"sqlite:///{work / 'mlflow.db'}"   # does not exist yet: the runs create it
    else:
        uri, server = start_server(work)
    phase = Phase(name, runs=n)
    try:
        start = time.monotonic()
        codes = wait_all(launch(uri, work, n), start + timeout)
        phase.seconds = time.monotonic() - start
        audit(phase, uri, codes)
    finally:
        if server is not None:
            stop_server(server)
    print(f"{name}: runs={phase.runs} finished={phase.finished} lost_points={phase.lost} "
          f"stuck={phase.stuck} ({EXPECTED} points expected per run; {phase.seconds:.0f} s; "
          f"exit codes {codes})")
    for line in failures(work, codes):
        print(line)
    return phase


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=8, help="concurrent runs per store (default 8)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per store before the runs "
                   "still alive are killed (default 900)")
    p.add_argument("--backends", default="sqlite,server", help="sqlite, server or both (default)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, stores)")
    args = p.parse_args(argv)
    names = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not names or set(names) - {"sqlite", "server"}:
        p.error("--backends takes sqlite, server or sqlite,server")
    root = Path(tempfile.mkdtemp(prefix="lethe-stress-"))
    try:
        phases = [run_phase(name, root / name, args.runs, args.timeout) for name in names]
    finally:
        if args.keep:
            print(f"logs and stores kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    total = Phase("all", runs=sum(ph.runs for ph in phases), finished=sum(ph.finished for ph in phases),
                  lost=sum(ph.lost for ph in phases), stuck=sum(ph.stuck for ph in phases))
    print(f"runs={total.runs} finished={total.finished} lost_points={total.lost} stuck={total.stuck}")
    return 0 if total.finished == total.runs and total.lost == 0 and total.stuck == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
