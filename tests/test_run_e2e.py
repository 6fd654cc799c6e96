"""`lethe run` end to end through the real CLI into a real MLflow SQLite store."""
from __future__ import annotations

import pytest
import torch
from conftest import ROOT, only_run, run_cli

pytestmark = pytest.mark.integration


def metric_steps(client, run_id, key):
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def test_split_digits_preset_runs_and_replay_forgets_less_than_naive(tmp_path, store):
    res = run_cli(["run", "conf/split_digits.yaml", *store["overrides"]], cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "FINISHED" in res.stdout and store["uri"] in res.stdout
    client, run = only_run(store["uri"])
    assert run.info.status == "FINISHED"
    for key in ("acc/avg_seen", "forgetting/avg", "acc/avg_all", "bwt", "time/train_s", "acc/last",
                "acc/avg_incremental"):
        assert sorted(metric_steps(client, run.info.run_id, key)) == [0, 1, 2, 3, 4], key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "accuracy_matrix.csv", "accuracy_matrix.png", "flip_matrix.csv",
            "predictions.pt"} <= artifacts
    assert run.data.params["method.name"] == "replay" and run.data.params["train.epochs"] == "8"
    assert run.data.tags["lethe.version"] and run.data.tags["host"]
    # train/loss comes from Avalanche's own loss metric through the MLflow logger
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 5 * 8
    # the CLI owns the process and lets the run's progress (INFO) into run.log
    run_log = open(client.download_artifacts(run.info.run_id, "run.log", str(tmp_path))).read()
    assert " INFO " in run_log and "accuracy matrix (rows: evaluated after" in run_log

    # The accuracy matrix artifact agrees with the logged per-experience accuracies.
    local = client.download_artifacts(run.info.run_id, "accuracy_matrix.csv", str(tmp_path))
    rows = [line.split(",") for line in open(local).read().strip().splitlines()[1:]]
    last = [float(v) for v in rows[-1][1:]]
    for j, v in enumerate(last):
        assert abs(metric_steps(client, run.info.run_id, f"acc/exp_{j}")[4] - v) < 1e-6
    preds = torch.load(client.download_artifacts(run.info.run_id, "predictions.pt", str(tmp_path)),
                       weights_only=True)
    for j in range(5):  # recompute each experience's accuracy from the raw predictions
        hits = [int(p == t) for p, t, e in zip(preds["preds"][-1].tolist(), preds["targets"].tolist(),
                                                preds["exp"].tolist()) if e == j]
        assert abs(sum(hits) / len(hits) - metric_steps(client, run.info.run_id, f"acc/exp_{j}")[4]) < 1e-9

    res = run_cli(["run", "conf/split_digits.yaml", *store["overrides"], "method.name=naive"],
                  cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    exp = client.get_experiment_by_name("test")
    runs = client.search_runs([exp.experiment_id])
    by_method = {r.data.params["method.name"]: r for r in runs}
    f_replay = by_method["replay"].data.metrics["forgetting/avg"]
    f_naive = by_method["naive"].data.metrics["forgetting/avg"]
    assert f_replay < f_naive - 0.2, (f_replay, f_naive)
