"""Checkpoints, resume after SIGKILL, and failures that keep what was logged."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass

import pytest
from conftest import LETHE, ROOT, only_run, run_cli

pytestmark = pytest.mark.integration

# Long enough per experience that the kill lands mid-stream; small enough to stay fast.
SLOW = ["train.epochs=12", "train.batch_size=16", "method.mem_size=100"]
STEPS = ("acc/exp_0", "acc/exp_1", "acc/exp_2", "acc/exp_3", "acc/exp_4", "acc/avg_seen",
         "forgetting/avg", "bwt", "fwt", "nfr/prev")


def final_metrics(client, run_id):
    out = {}
    for key in STEPS:
        hist = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        out[key] = [(m.step, m.value) for m in hist]
    return out


def wait_for_checkpoint(folder, at_least: int, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        for meta in folder.glob("*/meta.json"):
            try:
                if json.loads(meta.read_text())["next_experience"] >= at_least:
                    return json.loads(meta.read_text())
            except (json.JSONDecodeError, KeyError):
                pass
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "run ended early"
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    a_uri, b_uri = f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"
    common = ["run", "conf/split_digits.yaml", "tracking.experiment=test", *SLOW]
    a = common + [f"tracking.uri={a_uri}", f"checkpoint.dir={tmp_path / 'a'}"]
    b = common + [f"tracking.uri={b_uri}", f"checkpoint.dir={tmp_path / 'b'}"]

    res = run_cli(a, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]

    proc = subprocess.Popen(LETHE + b, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"}, text=True)
    meta = wait_for_checkpoint(tmp_path / "b", 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = json.loads((tmp_path / "b" / meta["run_id"] / "meta.json").read_text())
    assert killed_at["next_experience"] < 5 and not killed_at["finished"]

    res = run_cli(b + ["--resume"], cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"at experience {killed_at['next_experience']}/5" in res.stdout

    client_a, run_a = only_run(a_uri)
    client_b, run_b = only_run(b_uri)          # the same MLflow run continued, no second run
    assert run_b.info.run_id == meta["run_id"] and run_b.info.status == "FINISHED"
    fa, fb = final_metrics(client_a, run_a.info.run_id), final_metrics(client_b, run_b.info.run_id)
    for key in STEPS:
        last_a, last_b = fa[key][-1], fb[key][-1]
        assert last_a == last_b, (key, last_a, last_b)   # bitwise-equal final values
        assert [s for s, _ in fb[key]][-1] == 4


def test_resume_without_unfinished_run_is_a_clear_error(tmp_path, store):
    res = run_cli(["run", "split_digits", *store["overrides"], "--resume"], cwd=ROOT)
    assert res.returncode == 2
    assert "no unfinished run of this config" in res.stderr and "Traceback" not in res.stderr


def test_ctrl_c_marks_run_killed_and_keeps_checkpoint(tmp_path, store):
    proc = subprocess.Popen(LETHE + ["run", "split_digits", *store["overrides"], *SLOW], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    meta = wait_for_checkpoint(tmp_path / "runs", 1, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err
    client, run = only_run(store["uri"])
    assert run.info.status == "KILLED"
    assert (tmp_path / "runs" / meta["run_id"] / "state.pt").exists()
    assert client.get_metric_history(run.info.run_id, "acc/avg_seen")  # logged metrics kept


def test_ctrl_c_during_a_tracking_write_is_raised_after_the_write(store, monkeypatch):
    """An interrupt inside an MLflow write used to cut a SQLite transaction in half, so the
    store stayed locked and the run could not be marked KILLED ("database is locked"). Now
    the write completes, then KeyboardInterrupt is raised, and the run can be ended."""
    from lethe.platform.tracking import Tracker

    tracker = Tracker(store["uri"], "test")
    run_id = tracker.start("ctrl-c", {"a": "1"}, {})
    write = tracker.client.log_batch

    def interrupted_write(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)   # Ctrl-C lands while the write is under way
        time.sleep(0.05)
        return write(*args, **kwargs)

    monkeypatch.setattr(tracker.client, "log_batch", interrupted_write)
    with pytest.raises(KeyboardInterrupt):
        tracker.log_metrics({"acc/avg_seen": 0.25}, step=3)
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # handler restored
    tracker.end("KILLED")
    client, run = only_run(store["uri"])
    assert run.info.status == "KILLED"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "acc/avg_seen")] == [(3, 0.25)]


@dataclass
class NanModelConfig:
    hidden: int = 16
    nan_after: int = 30      # training forwards before the model starts returning NaN


def test_nan_loss_stops_with_message_and_keeps_logged_metrics(tmp_path, store, registry_snapshot):
    """A registered model that turns NaN mid-stream: exit message names experience and epoch."""
    import torch

    from lethe.errors import RunError
    from lethe.platform.config import load_config
    from lethe.platform.runner import run_experiment
    from lethe.registry import register_model

    @register_model("nan_after_test", config=NanModelConfig)
    def nan_model(cfg, info):
        """Test model: an MLP whose training forward returns NaN after `nan_after` calls."""
        class NanAfter(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, info.n_classes))
                self.calls = 0

            def forward(self, x):
                out = self.net(x)
                if self.training:
                    self.calls += 1
                    if self.calls > cfg.nan_after:
                        return out * float("nan")
                return out
        return NanAfter()

    cfg = load_config("split_digits", [*store["overrides"], "model.name=nan_after_test",
                                       "train.epochs=2", "model.nan_after=30"])
    with pytest.raises(RunError) as info:
        run_experiment(cfg)
    msg = str(info.value)
    assert "non-finite training loss" in msg and "experience 2/5" in msg and "epoch 2" in msg
    client, run = only_run(store["uri"])
    assert run.info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "acc/avg_seen")] == [0]
    ckpt = tmp_path / "runs" / run.info.run_id
    assert (ckpt / "state.pt").exists() and json.loads((ckpt / "meta.json").read_text())["next_experience"] == 1
    assert "non-finite" in (ckpt / "run.log").read_text()
    assert "run.log" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_cli_reports_run_failure_with_log_path_and_exit_1(tmp_path, store):
    # lr so large the loss overflows in the first experience: a run failure, not a config error
    res = run_cli(["run", "split_digits", *store["overrides"], "train.lr=1e30", "train.epochs=2",
                   "method.name=naive"], cwd=ROOT)
    assert res.returncode == 1, res.stderr[-1500:]
    assert "non-finite training loss" in res.stderr and "full log:" in res.stderr
    assert "Traceback" not in res.stderr
    _, run = only_run(store["uri"])
    assert run.info.status == "FAILED"


@pytest.mark.parametrize("engine", [[], ["train.grad_accum_steps=2", "train.precision=bf16-mixed",
                                          "train.grad_clip_norm=1.0"]], ids=["fp32", "accum-bf16mixed"])
def test_resume_with_validation_and_best_selection_equals_uninterrupted_run(tmp_path, monkeypatch, engine):
    """Validation carves its split with a per-experience counter; a resumed run must carve the
    same ids. The run is interrupted (Ctrl-C) as experience 2 of 3 starts, after experiences 0
    and 1 were checkpointed, then resumed in the same MLflow run: every logged metric history
    equals the uninterrupted run's bitwise. (Before the counter was checkpointed the resumed
    run ended with acc/exp_2 0.642 instead of 0.336.)"""
    from lethe.methods.base import Method
    from lethe.platform.config import load_config
    from lethe.platform.runner import run_experiment

    def cfg(name):
        return load_config("split_digits", [
            "scenario.n_experiences=3", "train.epochs=3", "eval.every_epochs=1",
            "checkpoint.select=best", "method.mem_size=60", f"tracking.uri=sqlite:///{tmp_path / name}.db",
            "tracking.experiment=test", f"checkpoint.dir={tmp_path / name}", *engine])

    whole = run_experiment(cfg("a"))
    serve = Method.serve

    def interrupt_at_2(self, experience):
        if experience.index == 2:
            raise KeyboardInterrupt
        serve(self, experience)

    monkeypatch.setattr(Method, "serve", interrupt_at_2)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg("b"))
    monkeypatch.setattr(Method, "serve", serve)
    resumed = run_experiment(cfg("b"), resume=True)

    client_a, run_a = only_run(f"sqlite:///{tmp_path / 'a'}.db")
    client_b, run_b = only_run(f"sqlite:///{tmp_path / 'b'}.db")
    assert run_b.info.run_id == resumed.run_id and run_b.info.status == "FINISHED"
    keys = sorted(k for k in run_a.data.metrics if k.startswith(("acc/", "select/", "val/", "nfr/")))
    assert "acc/exp_2" in keys and "select/epoch" in keys and "val/acc" in keys
    for key in keys:
        hist = lambda c, r: sorted((m.step, m.value) for m in c.get_metric_history(r.info.run_id, key))  # noqa: E731
        assert hist(client_a, run_a) == hist(client_b, run_b), key
    assert whole.final["acc/exp_2"] == resumed.final["acc/exp_2"]


def test_concurrent_runs_on_a_new_sqlite_store_all_finish(tmp_path):
    """Three `lethe run`s started together on a store that does not exist yet: MLflow's schema
    migration ran in several processes at once and failed runs (`table _alembic_tmp_tags already
    exists`) or left the file unusable. Now every run finishes and the store stays readable."""
    uri = f"sqlite:///{tmp_path / 'new.db'}"
    procs = [subprocess.Popen(LETHE + ["run", "split_digits", "train.epochs=1", f"seed={k}",
                                       f"tracking.uri={uri}", "tracking.experiment=test",
                                       f"checkpoint.dir={tmp_path / f'runs{k}'}",
                                       "eval.save_predictions=false"],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"}) for k in range(3)]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [e[-1500:] for e in errors]
    from conftest import mlflow_client

    client = mlflow_client(uri)
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 3
    assert sorted(r.data.params["seed"] for r in runs) == ["0", "1", "2"]
