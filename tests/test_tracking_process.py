"""A local store's Tracker runs in a child process (start-up off the run's path): the run never
imports MLflow, answers and errors are the in-process Tracker's, a write's error is raised by a
later call, and a dead child is one RunError saying so."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
from mlflow.tracking import MlflowClient

from lethe.errors import ConfigError, RunError
from lethe.platform.tracking_process import TrackerProcess, TrackingProcessDied, is_local_store


def test_which_stores_get_a_child_process(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert is_local_store(None)                       # MLflow's default: ./mlflow.db
    assert is_local_store("sqlite:///x.db") and is_local_store("/some/folder")
    assert not is_local_store("http://127.0.0.1:5000")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://tracking.example.org")
    assert not is_local_store(None)


def test_a_run_on_a_local_store_never_imports_mlflow(tmp_path):
    """The whole run in one process: MLflow is imported by the tracking child only; what the
    run logged is in the store, read back here with MLflow's own client."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = textwrap.dedent(f"""
        import sys
        from lethe.platform.config import load_config
        from lethe.platform.runner import run_experiment
        cfg = load_config("split_digits", ["train.epochs=1", "scenario.n_experiences=2",
                          "tracking.uri={uri}", "checkpoint.dir={tmp_path / 'runs'}"])
        result = run_experiment(cfg)
        print(result.run_id)
        print(sorted(m for m in sys.modules if m == "mlflow" or m.startswith("mlflow.")))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=os.environ | {"OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"},
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    run_id, modules = out.stdout.strip().splitlines()[-2:]
    assert modules == "[]"
    run = MlflowClient(tracking_uri=uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert {"acc/avg_seen", "time/train_s"} <= set(run.data.metrics)
    assert run.data.params["train.epochs"] == "1"


def test_answers_and_errors_come_back_from_the_child(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = TrackerProcess(uri, "exp").ready()
    run_id = tracker.start("r", {"a": "1"}, {"t": "x"})
    assert tracker.run_id == run_id and tracker.uri == uri
    tracker.log_metrics({"acc/avg_seen": 0.5}, step=3)
    tracker.log_series("train/lr", [(0, 1.0), (1, 2.0)])
    assert tracker.metric_history("train/lr") == [(0, 1.0), (1, 2.0)]   # a read waits for the writes
    tracker.end("FINISHED")
    tracker.close()
    run = MlflowClient(tracking_uri=uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics == {"acc/avg_seen": 0.5, "train/lr": 2.0}
    assert run.data.params == {"a": "1"} and run.data.tags["t"] == "x"


def test_a_bad_store_is_raised_by_ready_as_a_config_error(tmp_path):
    tracker = TrackerProcess(f"sqlite:///{tmp_path / 'no' / 'such' / 'm.db'}", "exp")
    with pytest.raises(ConfigError, match="does not exist; create it first"):
        tracker.ready()
    tracker.close()
    assert not (tmp_path / "no").exists()


def test_a_failing_write_is_raised_by_the_next_call(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = TrackerProcess(uri, "exp").ready()
    tracker.start("r", {}, {})
    tracker.log_params({"p": "1"})
    tracker.log_params({"p": "2"})         # MLflow refuses to change a logged param
    with pytest.raises(Exception, match="Changing param values is not allowed"):
        tracker.metric_keys()
    assert tracker.metric_keys() == []    # read once: the next call is clean
    tracker.end("FINISHED")
    tracker.close()


def test_a_killed_child_is_one_run_error(tmp_path):
    tracker = TrackerProcess(f"sqlite:///{tmp_path / 'mlflow.db'}", "exp").ready()
    tracker.start("r", {}, {})
    os.kill(tracker._proc.pid, signal.SIGKILL)
    tracker._proc.wait()
    with pytest.raises(TrackingProcessDied, match=r"tracking process \(pid \d+\) stopped .*--resume"):
        tracker.metric_keys()
    assert issubclass(TrackingProcessDied, RunError)
    tracker.close()
