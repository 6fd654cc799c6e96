"""A run tracked by a real `mlflow server` on 127.0.0.1 (artifacts served by the server), the
tracker's artifact writers through it, and where the tracking URI comes from."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import only_run, run_cli

pytestmark = pytest.mark.integration


def test_run_logs_to_a_real_mlflow_server(tmp_path, mlflow_server):
    url, folder = mlflow_server
    artifact_dir = folder / "artifacts"
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


def test_tracker_logs_dicts_figures_and_tables_through_the_server(tmp_path, mlflow_server):
    from matplotlib.figure import Figure
    from PIL import Image

    from lethe.platform.tracking import Tracker

    url, folder = mlflow_server
    artifact_dir = folder / "artifacts"
    tracker = Tracker(url, "tracker-artifacts")
    tracker.start("artifacts", {}, {})
    record = {"seed": 3, "grid": {"train.lr": [0.1, 0.01]}}
    tracker.log_dict(record, "plan.json")
    fig = Figure(figsize=(2, 1))
    fig.subplots().plot([0, 1], [1, 0])
    tracker.log_figure(fig, "curve.png", dpi=50)
    tracker.log_table({"step": [0, 1], "acc": [0.5, 0.75]}, "acc_table.json")
    tracker.end("FINISHED")

    run_id = tracker.run_id
    assert {"plan.json", "curve.png", "acc_table.json"} <= {p.name for p in artifact_dir.rglob("*")}
    got = Path(tracker.client.download_artifacts(run_id, "plan.json", str(tmp_path)))
    assert json.loads(got.read_text()) == record
    png = tracker.client.download_artifacts(run_id, "curve.png", str(tmp_path))
    assert Image.open(png).size == (100, 50)          # figsize inches × dpi
    table = json.loads(Path(tracker.client.download_artifacts(run_id, "acc_table.json",
                                                              str(tmp_path))).read_text())
    assert table["columns"] == ["step", "acc"] and table["data"] == [[0, 0.5], [1, 0.75]]


def test_tracking_uri_is_resolved_once_to_an_absolute_store(tmp_path, monkeypatch):
    """A relative SQLite or file store is pinned to the folder the run started in, so jobs
    started elsewhere reach it; $MLFLOW_TRACKING_URI is the fallback; servers stay as given."""
    from lethe.platform.tracking import Tracker, resolve_tracking_uri

    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri("sqlite:///sub/m.db") == f"sqlite:///{tmp_path}/sub/m.db"
    assert resolve_tracking_uri("./mlruns") == f"file://{tmp_path}/mlruns"
    assert resolve_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///from_env.db")
    tracker = Tracker(None, "resolved")
    assert tracker.uri == f"sqlite:///{tmp_path}/from_env.db"
    monkeypatch.chdir(tmp_path.parent)     # a process elsewhere reaches the same store
    assert Tracker(tracker.uri, "resolved").experiment_id == tracker.experiment_id
