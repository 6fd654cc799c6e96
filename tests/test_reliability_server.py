"""An unreachable tracking server: a run whose real `mlflow server` dies (SIGKILL by PID) or
hangs (SIGSTOP) mid-run ends within a minute naming the URI and the failed request, Ctrl-C is
honoured within seconds, and the kept checkpoint resumes the run once the server is back."""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import LETHE, _wait_until_healthy, free_port, run_cli

pytestmark = pytest.mark.integration

# 5 experiences × 12 epochs: long enough that the server dies mid-stream, small enough to be fast
SLOW = ["train.epochs=12", "train.batch_size=16", "method.mem_size=100"]


class Server:
    """A real `mlflow server` on 127.0.0.1 that a test may kill and start again on the same
    port and backend store (its own session: os.killpg reaches its workers too)."""

    def __init__(self, folder):
        self.folder, self.port = folder, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.folder / 'server.db'}",
             "--artifacts-destination", str(self.folder / "artifacts")],
            cwd=self.folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        _wait_until_healthy(self.url, self.proc)

    def signal(self, sig) -> None:
        os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.signal(signal.SIGKILL)
        self.proc.wait(timeout=30)


@pytest.fixture
def server(tmp_path):
    folder = tmp_path / "server"   # inside tmp_path: the session's metric-key check reads its store
    folder.mkdir()
    srv = Server(folder)
    srv.start()
    yield srv
    if srv.proc.poll() is None:
        srv.kill()


def start_run(args, cwd):
    return subprocess.Popen(LETHE + args, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def first_checkpoint(folder, proc, timeout=300) -> dict:
    """meta.json of the run's first checkpoint (its first experience served)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for meta in folder.glob("*/meta.json"):
            with contextlib.suppress(json.JSONDecodeError, KeyError):
                if json.loads(meta.read_text())["next_experience"] >= 1:
                    return json.loads(meta.read_text())
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


def test_server_killed_mid_run_fails_within_a_minute_and_the_run_resumes(tmp_path, server):
    runs = tmp_path / "runs"
    args = ["run", "split_digits", f"tracking.uri={server.url}", "tracking.experiment=test",
            f"checkpoint.dir={runs}", *SLOW]
    proc = start_run(args, tmp_path)
    run_id = first_checkpoint(runs, proc)["run_id"]
    server.kill()
    killed = time.monotonic()
    _, err = proc.communicate(timeout=300)
    # before: ~8 minutes of silence (MLflow retried each request ~4 min, twice)
    assert time.monotonic() - killed <= 60, err[-2000:]
    assert proc.returncode == 1, err[-2000:]
    assert "Traceback" not in err
    # the URI, the request that failed (client call and endpoint), and how to continue
    assert re.search(rf"the tracking server {server.url} is unreachable: \w+ \({server.url}/api/"
                     rf"[\w./-]+\) failed after 4 tries", err), err[-2000:]
    assert f"--resume {run_id}" in err
    meta = json.loads((runs / run_id / "meta.json").read_text())
    assert (runs / run_id / "state.pt").exists() and not meta["finished"]

    server.start()   # same port, same backend store
    res = run_cli(args + ["--resume", run_id], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"at experience {meta['next_experience']}/5" in res.stdout
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=server.url)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "acc/avg_seen")] == [0, 1, 2, 3, 4]
    # one train/loss point per epoch: 5 experiences × 12 epochs, each step once
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert len(steps) == len(set(steps)) == 60


def test_nothing_listening_fails_fast_naming_the_uri(tmp_path):
    from lethe.errors import RunError
    from lethe.platform.tracking import Tracker, http_limits

    url = f"http://127.0.0.1:{free_port()}"   # a port nobody listens on
    start = time.monotonic()
    with http_limits(), pytest.raises(RunError) as info:
        Tracker(url, "test")
    assert time.monotonic() - start <= 60   # before: 256 s of retries
    assert str(info.value).startswith(
        f"the tracking server {url} is unreachable: get_experiment_by_name "
        f"({url}/api/2.0/mlflow/experiments/get-by-name) failed after 4 tries")
    assert "(Connection refused)" in str(info.value)

    # the CLI: exit 1 with that message (the subprocess timeout guards against a hang)
    res = run_cli(["run", "split_digits", f"tracking.uri={url}", f"checkpoint.dir={tmp_path / 'runs'}",
                   "train.epochs=1"], cwd=tmp_path, timeout=180)
    assert res.returncode == 1, res.stderr[-2000:]
    assert f"lethe: run failed: the tracking server {url} is unreachable" in res.stderr
    assert "start the server, or point tracking.uri at a running one" in res.stderr
    assert "Traceback" not in res.stderr


def test_ctrl_c_while_the_server_hangs_exits_130_within_seconds(tmp_path, server):
    runs = tmp_path / "runs"
    proc = start_run(["run", "split_digits", f"tracking.uri={server.url}", "tracking.experiment=test",
                      f"checkpoint.dir={runs}", *SLOW], tmp_path)
    run_id = first_checkpoint(runs, proc)["run_id"]
    server.signal(signal.SIGSTOP)   # the server accepts connections but never answers
    try:
        time.sleep(3)               # the run is waiting on its next request by now (epochs: < 1 s)
        proc.send_signal(signal.SIGINT)
        pressed = time.monotonic()
        _, err = proc.communicate(timeout=300)
        # before: Ctrl-C was held until the request gave up (486 s) and the exit code was 1
        assert time.monotonic() - pressed <= 15, err[-2000:]
    finally:
        server.signal(signal.SIGCONT)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err
    assert (runs / run_id / "state.pt").exists()


def test_an_experiment_another_run_creates_meanwhile_is_joined(server, monkeypatch):
    """Runs starting together on a server both find no experiment and both create it (no lock
    spans machines): the second create fails on the real server with RESOURCE_ALREADY_EXISTS,
    which used to fail that run (1 of 8 in benchmarks/stress_tracking.py)."""
    from mlflow.tracking import MlflowClient

    from lethe.platform.tracking import Tracker

    other = MlflowClient(tracking_uri=server.url)   # the other run, creating it right after our lookup
    lookup = MlflowClient.get_experiment_by_name
    looked = []

    def loses_the_race(self, name):
        looked.append(name)
        if len(looked) == 1:
            other.create_experiment(name)
            return None
        return lookup(self, name)

    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", loses_the_race)
    tracker = Tracker(server.url, "race")
    monkeypatch.undo()
    assert looked == ["race", "race"]   # looked up again after its create was refused
    assert tracker.experiment_id == other.get_experiment_by_name("race").experiment_id
    assert [e.name for e in other.search_experiments()].count("race") == 1
