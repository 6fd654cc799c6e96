"""A mixed stream (learn, forget, learn, forget) end to end: MLflow metrics at every step,
the unlearning CSV, resume after SIGKILL, and the retrain oracle's exactness."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time

import pytest
import torch
from conftest import LETHE, ROOT, only_run, run_cli, train_by_hand

STREAM = ["scenario.n_experiences=2", "model.name=mlp", "model.layers=3", "model.hidden=16",
          "train.epochs=3", "train.batch_size=16", "train.optimizer=adam", "train.lr=0.01",
          "scenario.forget_requests=[{after: 0, n: 3}, {after: 1, n: 4, policy: class}]"]
S3T = ["method.name=s3t", "method.shards=2", "method.slices=3", "method.lora.rank=2"]
QUALITY = ("acc/avg_seen", "acc/exp_0", "acc/exp_1", "unlearn/forget_acc", "unlearn/retain_acc",
           "unlearn/test_acc", "unlearn/mia_auc", "unlearn/mia_efficacy", "unlearn/retrain_samples",
           "unlearn/live_shards", "unlearn/served_prefix")


def history(client, run_id, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def wait_for_checkpoint(folder, at_least: int, proc, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        for meta in folder.glob("*/meta.json"):
            try:
                info = json.loads(meta.read_text())
            except json.JSONDecodeError:
                continue
            if info.get("next_experience", 0) >= at_least:
                return info
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "run ended early"
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


@pytest.mark.integration
def test_mixed_stream_logs_every_step_and_resumes_after_sigkill(tmp_path):
    a_uri, b_uri = f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"
    common = ["run", "split_digits", "tracking.experiment=test", *STREAM, *S3T]
    a = common + [f"tracking.uri={a_uri}", f"checkpoint.dir={tmp_path / 'a'}"]
    b = common + [f"tracking.uri={b_uri}", f"checkpoint.dir={tmp_path / 'b'}"]

    res = run_cli(a, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    client, run = only_run(a_uri)
    rid = run.info.run_id
    assert [s for s, _ in history(client, rid, "acc/avg_seen")] == [0, 1, 2, 3]
    for key in ("unlearn/forget_acc", "unlearn/mia_auc", "unlearn/serve_s",
                "unlearn/retrain_samples", "unlearn/requests_since_retrain",
                "unlearn/live_seq/shard_0", "unlearn/n_forgotten"):
        assert [s for s, _ in history(client, rid, key)] == [1, 3], key
    assert [v for _, v in history(client, rid, "unlearn/n_forgotten")] == [3.0, 7.0]
    # the unlearning CSV artifact: one row per forget step
    path = client.download_artifacts(rid, "unlearning.csv", str(tmp_path))
    rows = list(csv.DictReader(open(path)))
    assert [r["step"] for r in rows] == ["1", "3"]
    assert float(rows[1]["unlearn/n_forgotten"]) == 7.0

    # the same run killed after the first forget step, then resumed
    proc = subprocess.Popen(LETHE + b, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"}, text=True)
    meta = wait_for_checkpoint(tmp_path / "b", 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = json.loads((tmp_path / "b" / meta["run_id"] / "meta.json").read_text())
    assert 2 <= killed["next_experience"] < 4 and not killed["finished"]
    res = run_cli(b + ["--resume"], cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"at experience {killed['next_experience']}/4" in res.stdout
    client_b, run_b = only_run(b_uri)
    assert run_b.info.run_id == meta["run_id"] and run_b.info.status == "FINISHED"
    for key in QUALITY:
        assert history(client_b, run_b.info.run_id, key)[-1] == history(client, rid, key)[-1], key
    path = client_b.download_artifacts(run_b.info.run_id, "unlearning.csv", str(tmp_path / "b_csv"))
    assert [r["step"] for r in csv.DictReader(open(path))] == ["1", "3"]


@pytest.mark.integration
@pytest.mark.parametrize("method", [["method.name=sisa", "method.shards=2", "method.slices=3"],
                                    ["method.name=retrain"]], ids=["sisa", "retrain"])
def test_sisa_and_retrain_serve_the_same_mixed_stream(tmp_path, store, method):
    from lethe.platform.config import load_config
    from lethe.platform.runner import run_experiment

    cfg = load_config("split_digits", [*store["overrides"], *STREAM, *method])
    res = run_experiment(cfg)
    client, run = only_run(store["uri"])
    rid = run.info.run_id
    assert [s for s, _ in history(client, rid, "acc/avg_seen")] == [0, 1, 2, 3]
    samples = history(client, rid, "unlearn/retrain_samples")
    assert [s for s, _ in samples] == [1, 3] and all(v > 0 for _, v in samples)
    assert res.final["unlearn/n_forgotten"] == 7.0 and res.final["acc/avg_seen"] > 0.5


def test_retrain_after_deletion_equals_training_without_the_samples():
    from lethe.methods.base import MethodContext
    from lethe.platform.config import load_config
    from lethe.platform.runner import build_components, seed_everything
    from lethe.scenarios.forget import derive_seed
    from lethe.scenarios.types import ForgetRequest

    def build():
        cfg = load_config("split_digits", ["device=cpu", "method.name=retrain", "model.layers=1",
                                           "model.hidden=16", "train.epochs=2",
                                           "scenario.n_experiences=5"])
        seed_everything(cfg.seed, False)
        stream, model, entry = build_components(cfg)
        ctx = MethodContext(train=cfg.train, device=torch.device("cpu"), stream=stream, seed=0)
        return entry.obj(cfg.method, model, ctx), stream

    m, stream = build()
    m.learn(stream.experiences[0])
    gone = m.ids_of(m.live)[[3, 50, 77]]
    m.unlearn(ForgetRequest(gone, after=0))
    assert m.stats["retrain_samples"] == int(m.live.sum()) * 2
    # from scratch, by hand: the same initial model (same seeds) trained on the live samples
    # only, with retrain's documented seed
    fresh, _ = build()
    pool = stream.train
    live = torch.isin(pool.ids, torch.as_tensor(list(stream.experiences[0].train.dataset.sample_id)))
    live &= ~torch.isin(pool.ids, gone)
    train_by_hand(fresh.model, [n for n, _ in fresh.model.named_parameters()], pool.x[live],
                  pool.y[live].long(), fresh.ctx.train, derive_seed(0, 0x7E7))
    mine, theirs = m.model.state_dict(), fresh.model.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert not set(gone.tolist()) & set(m.training_ids().tolist())
