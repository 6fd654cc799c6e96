"""A run tracked by a real `mlflow server` on 127.0.0.1 (artifacts served by the server)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, only_run, run_cli

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen(
        [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts")],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(url + "/health", timeout=2).status == 200:
                break
        except OSError:
            time.sleep(0.5)
        assert proc.poll() is None, "mlflow server exited"
    else:
        raise AssertionError("mlflow server did not start")
    yield url, tmp_path / "artifacts"
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


def test_run_logs_to_a_real_mlflow_server(tmp_path, mlflow_server):
    url, artifact_dir = mlflow_server
    res = run_cli(["run", "split_digits", f"tracking.uri={url}", "tracking.experiment=test",
                   f"checkpoint.dir={tmp_path / 'runs'}", "train.epochs=2",
                   "scenario.n_experiences=3"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    client, run = only_run(url)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "acc/avg_seen")] == [0, 1, 2]
    # the artifacts went through the server into its artifact destination
    stored = {p.name for p in artifact_dir.rglob("*") if p.is_file()}
    assert {"config.yaml", "accuracy_matrix.csv", "predictions.pt"} <= stored
    text = open(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))).read()
    assert "n_experiences: 3" in text
