"""Shared fixtures: a real MLflow SQLite store per test and small, fast overrides."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LETHE = [sys.executable, "-m", "lethe.platform.cli"]

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# The suite's models are tiny: one intra-op thread per process (subprocesses inherit it) is
# faster than several fighting over a small shared machine's cores (measured ~12× per step).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Every metric key logged by any run of the suite (subprocesses too) is appended here;
# tests/test_zz_metrics_reference.py checks them against docs/metrics.md at the end.
METRIC_KEYS_FILE = Path(tempfile.mkdtemp(prefix="lethe-keys-")) / "keys.txt"
os.environ["LETHE_METRIC_KEYS_FILE"] = str(METRIC_KEYS_FILE)


@pytest.fixture
def store(tmp_path) -> dict:
    """Tracking + checkpoint overrides pointing into tmp_path (a real SQLite MLflow store)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return {"uri": uri, "overrides": [f"tracking.uri={uri}", "tracking.experiment=test",
                                      f"checkpoint.dir={tmp_path / 'runs'}"]}


def run_cli(args: list[str], cwd: Path, timeout: int = 600, env: dict | None = None):
    """Run the real `lethe` CLI in a subprocess; returns CompletedProcess (text)."""
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run(LETHE + args, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def mlflow_client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def only_run(uri: str, experiment: str = "test"):
    client = mlflow_client(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]
