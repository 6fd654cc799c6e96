"""A resumed run logs each step once, and two processes cannot continue one run at a time."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from conftest import LETHE, ROOT, only_run, run_cli

# split_digits as the README runs it: 5 experiences × 8 epochs, one train/loss (and, with no lr
# schedule, one train/lr) point per epoch: 40 points.
POINTS = 5 * 8


def start_run(args):
    return subprocess.Popen(LETHE + args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def stored_points(db, key: str) -> int:
    con = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    try:
        return con.execute("SELECT COUNT(*) FROM metrics WHERE key = ?", (key,)).fetchone()[0]
    except sqlite3.OperationalError:   # the schema is not there yet
        return 0
    finally:
        con.close()


def checkpointed(runs) -> dict:
    for meta in runs.glob("*/meta.json"):
        try:
            return json.loads(meta.read_text())
        except json.JSONDecodeError:   # being replaced
            pass
    return {}


def kill_mid_experience(db, runs, args) -> dict:
    """Start the run and SIGKILL it once train/loss holds epochs logged after its last
    checkpoint (the points a resume used to log again); returns that checkpoint's meta."""
    proc = start_run(args)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        meta = checkpointed(runs)
        if meta and stored_points(db, "train/loss") > 8 * meta["next_experience"]:
            proc.send_signal(signal.SIGSTOP)   # frozen: no new checkpoint while we look again
            meta = checkpointed(runs)
            if meta and stored_points(db, "train/loss") > 8 * meta["next_experience"]:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return meta
            proc.send_signal(signal.SIGCONT)   # a checkpoint landed meanwhile: look again
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.02)
    raise AssertionError("the run logged no epoch after its first checkpoint")


@pytest.mark.integration
def test_killed_mid_experience_then_resumed_logs_each_step_once(tmp_path, store):
    args = ["run", "split_digits", *store["overrides"]]
    meta = kill_mid_experience(tmp_path / "mlflow.db", tmp_path / "runs", args)
    res = run_cli(args + ["--resume", meta["run_id"]], cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    client, run = only_run(store["uri"])
    assert run.info.status == "FINISHED"
    for key in ("train/loss", "train/lr"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert len(steps) == len(set(steps)) == POINTS, (key, sorted(steps))   # before: 44


def test_a_resumed_tracker_skips_the_steps_the_run_holds(store):
    """The rule itself, on a real store: the interrupted process logged train/loss at steps
    1..5; the resumed one trains steps 4..8 again: 4 and 5 are not logged twice, 6..8 are new."""
    from lethe.platform.tracking import Tracker

    first = Tracker(store["uri"], "test")
    run_id = first.start("resume", {}, {})
    first.log_series("train/loss", [(s, 1.0) for s in range(1, 6)])
    first.log_metrics({"acc/avg_seen": 0.5}, step=0)
    resumed = Tracker(store["uri"], "test")
    resumed.resume(run_id)
    resumed.log_series("train/loss", [(s, 2.0) for s in range(4, 9)])
    resumed.log_metrics({"acc/avg_seen": 0.75}, step=1)
    resumed.end("FINISHED")
    client, _ = only_run(store["uri"])
    loss = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/loss"))
    assert loss == [(1, 1.0), (2, 1.0), (3, 1.0), (4, 1.0), (5, 1.0), (6, 2.0), (7, 2.0), (8, 2.0)]
    acc = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "acc/avg_seen"))
    assert acc == [(0, 0.5), (1, 0.75)]


@pytest.mark.integration
def test_a_second_resume_of_one_run_exits_2_naming_the_first(tmp_path, store):
    runs = tmp_path / "runs"
    args = ["run", "split_digits", *store["overrides"]]
    run_id = kill_mid_experience(tmp_path / "mlflow.db", runs, args)["run_id"]
    first = start_run(args + ["--resume", run_id])
    lock = runs / run_id / ".lock"
    deadline = time.monotonic() + 300
    while not (lock.exists() and lock.read_text().split() == [str(first.pid), "resume"]):
        assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()
        time.sleep(0.02)
    first.send_signal(signal.SIGSTOP)   # holds the lock, stopped: the second cannot miss it
    try:
        second = run_cli(args + ["--resume", run_id], cwd=ROOT)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2, second.stderr[-2000:]
    assert (f"lethe: error: run {run_id} is already being resumed by another process "
            f"(pid {first.pid})") in second.stderr
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    client, run = only_run(store["uri"])
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert len(steps) == len(set(steps)) == POINTS   # before: both resumes logged the same steps


def test_run_folder_lock_refuses_a_second_holder_and_frees_on_exit(tmp_path):
    """flock locks belong to an open file: a second open in this process conflicts like
    another process would. A SIGKILLed holder frees the lock (the kernel drops it)."""
    from lethe.errors import ConfigError
    from lethe.platform.run_lock import run_folder_lock

    folder = tmp_path / "0123abcd"
    with run_folder_lock(folder, resuming=False):
        with pytest.raises(ConfigError, match=rf"^run 0123abcd is still running in another process "
                                              rf"\(pid {os.getpid()}\); wait for it to end"):
            with run_folder_lock(folder, resuming=True):
                pass
    with run_folder_lock(folder, resuming=True):   # released: taken again
        pass
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from lethe.platform.run_lock import "
         "run_folder_lock as l\nwith l(sys.argv[1], resuming=True):\n print('held', flush=True); "
         "time.sleep(600)", str(folder)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ConfigError, match=rf"already being resumed by another process \(pid {holder.pid}\)"):
        with run_folder_lock(folder, resuming=True):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with run_folder_lock(folder, resuming=True):   # the killed holder left nothing locked
        pass
