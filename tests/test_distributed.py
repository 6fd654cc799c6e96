"""`lethe run CONFIG --nproc N`: data-parallel training through torchrun (DDP, gloo on CPU).

The reference for a 2-process run is the same config in one process: train.batch_size is the
global batch, each rank trains on half of every batch and DDP averages the two half-batch
gradients (each rank's loss scaled by N·n_rank/n_batch), which is the full-batch mean gradient.
The two runs differ only by float reassociation of those sums (float32: ~1e-7 relative per
step), so the final weights must agree to 1e-5 and the accuracy metrics within 1e-4 — one
flipped test prediction moves an accuracy by ≥ 1/|test set| ≈ 3e-3, so this asks for
identical predictions.
"""
from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
import torch
from conftest import LETHE, ROOT, mlflow_client, only_run, run_cli

from lethe.engine import distributed
from lethe.errors import ConfigError
from lethe.platform.config import load_config

SMALL = ["train.epochs=1"]
FINAL_KEYS = ("acc/avg_seen", "acc/avg_all", "forgetting/avg", "bwt", "fwt")


# --- the batch shard (no processes) ------------------------------------------------------
def _shards_of(batch: list, world: int) -> list:
    """(rank r's part of ``batch``, its loss weight) for every rank of ``world``."""
    out = []
    for r in range(world):
        dp = distributed.DataParallel.__new__(distributed.DataParallel)   # no process group
        dp.rank, dp.world = r, world
        out.append((dp.shard(batch), dp.weight))
    return out


def _shards(n: int, world: int):
    return _shards_of([torch.arange(n) * 10, torch.arange(n), torch.zeros(n, dtype=torch.long)], world)


def test_shards_are_disjoint_strided_and_cover_the_batch():
    (a, wa), (b, wb) = _shards(5, 2)
    assert a[1].tolist() == [0, 2, 4] and b[1].tolist() == [1, 3]      # rows rank::2
    assert a[0].tolist() == [0, 20, 40]                                  # every column alike
    assert (wa, wb) == (2 * 3 / 5, 2 * 2 / 5)                            # N·n_rank/n


def test_weighted_shard_gradients_average_to_the_full_batch_gradient():
    """DDP's mean over ranks of weight_r · ∇(mean loss of shard r) = ∇(mean loss of the batch),
    also for an uneven split; a shared term (EWC's penalty) keeps its weight (weights average 1)."""
    torch.manual_seed(0)
    w = torch.randn(3, 4, requires_grad=True)
    x, y = torch.randn(5, 4), torch.tensor([0, 2, 1, 1, 0])
    penalty = lambda: (w ** 2).sum()  # noqa: E731 - the same on every rank
    full = torch.autograd.grad(torch.nn.functional.cross_entropy(x @ w.T, y) + penalty(), w)[0]
    grads = []
    for (xs, ys), weight in _shards_of([x, y], 2):
        loss = (torch.nn.functional.cross_entropy(xs @ w.T, ys) + penalty()) * weight
        grads.append(torch.autograd.grad(loss, w)[0])
    torch.testing.assert_close(sum(grads) / 2, full, rtol=1e-6, atol=1e-7)


def test_token_mean_loss_shards_are_weighted_by_their_target_tokens():
    """A causal LM's loss is the mean over target tokens (-100 ignored), and rows carry
    different numbers of them: weighting the shards by rows would not give the full-batch
    gradient; weighting by tokens (N · tokens_r / tokens) does."""
    torch.manual_seed(0)
    w = torch.randn(3, 4, requires_grad=True)
    x = torch.randn(4, 5, 4)                                    # 4 rows × 5 positions
    y = torch.randint(0, 3, (4, 5))
    y[0, :4] = -100                                             # row 0: 1 token, row 1: 5, ...
    y[2, :2] = -100

    def loss_of(xs, ys):
        return torch.nn.functional.cross_entropy((xs @ w.T).reshape(-1, 3), ys.reshape(-1),
                                                 ignore_index=-100)

    full = torch.autograd.grad(loss_of(x, y), w)[0]
    shards = _shards_of([x, y], 2)
    tokens = [int((ys != -100).sum()) for (_, ys), _ in shards]
    assert tokens == [1 + 3, 5 + 5]                             # rows 0, 2 | rows 1, 3
    grads = [torch.autograd.grad(loss_of(xs, ys) * weight, w)[0] for (xs, ys), weight in shards]
    assert [float(wt) for _, wt in shards] == pytest.approx([2 * 4 / 14, 2 * 10 / 14], rel=1e-6)
    torch.testing.assert_close(sum(grads) / 2, full, rtol=1e-6, atol=1e-7)


def test_a_rank_left_without_rows_runs_one_row_at_weight_zero():
    (a, wa), (b, wb) = _shards(1, 2)
    assert a[1].tolist() == [0] and wa == 2.0
    assert b[1].tolist() == [0] and wb == 0.0


def test_rank_seeds_differ_by_rank_and_follow_the_run_seed():
    seeds = {distributed.rank_seed(0, r, 7) for r in range(4)}
    assert len(seeds) == 4
    assert distributed.rank_seed(0, 1, 7) == distributed.rank_seed(0, 1, 7) != distributed.rank_seed(1, 1, 7)


# --- config checks -----------------------------------------------------------------------
def test_distributed_section_is_validated():
    with pytest.raises(ConfigError, match=r"bad value for 'distributed.backend': 'mpi'.*auto, nccl, gloo"):
        load_config("split_digits", ["distributed.backend=mpi"])
    with pytest.raises(ConfigError, match="distributed.strategy=fsdp shards Hugging Face causal LMs "
                                          r"\(model.name=hf_causal_lm\), not model.name=mlp"):
        distributed.check_launch(load_config("split_digits", ["distributed.strategy=fsdp"]), 2)


def test_a_batch_that_does_not_split_is_refused_before_any_process_starts(tmp_path):
    proc = run_cli(["run", "split_digits", "--nproc", "2", "train.batch_size=33"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "train.batch_size=33 does not split over --nproc 2" in proc.stderr
    assert "divisible by 2" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "mlflow.db").exists()   # no run was started


# --- real runs ---------------------------------------------------------------------------
def _run(tmp_path, name: str, extra: list[str], nproc: int | None):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["run", "split_digits", *SMALL, *extra, f"tracking.uri={uri}", f"tracking.experiment={name}",
            f"checkpoint.dir={tmp_path / name}"] + (["--nproc", str(nproc)] if nproc else [])
    proc = run_cli(args, cwd=ROOT, timeout=420)
    return proc, uri


def _artifact_text(client, run_id: str, name: str, tmp_path) -> str:
    from pathlib import Path

    return Path(client.download_artifacts(run_id, name, str(tmp_path))).read_text()


def _model_state(folder, run_id):
    return torch.load(folder / run_id / "state.pt", weights_only=False)["method"]["model"]


@pytest.mark.integration
@pytest.mark.parametrize("method", [[], ["method.name=ewc"]], ids=["replay", "ewc"])
def test_two_processes_match_one_process(tmp_path, method):
    proc, uri = _run(tmp_path, "two", method, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("FINISHED") == 1                # rank 0 alone reports the run
    client, run = only_run(uri, "two")                       # exactly one MLflow run
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "acc/avg_seen")]
    assert sorted(steps) == [0, 1, 2, 3, 4]
    assert [p.name for p in (tmp_path / "two").iterdir()] == [run.info.run_id]   # one writer

    ref, _ = _run(tmp_path, "one", method, nproc=None)
    assert ref.returncode == 0, ref.stderr[-3000:]
    _, one = only_run(uri, "one")
    for key in FINAL_KEYS:
        assert abs(run.data.metrics[key] - one.data.metrics[key]) <= 1e-4, key
    # train/loss: each rank's shard mean, reduced sample-weighted over the ranks = the
    # single-process epoch loss (float reassociation only)
    history = {r.info.run_id: sorted((m.step, m.value) for m in
                                     client.get_metric_history(r.info.run_id, "train/loss"))
               for r in (run, one)}
    two_loss, one_loss = history[run.info.run_id], history[one.info.run_id]
    assert [s for s, _ in two_loss] == [s for s, _ in one_loss] and len(one_loss) >= 5
    for (_, a), (_, b) in zip(two_loss, one_loss):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (a, b)
    mine = _model_state(tmp_path / "two", run.info.run_id)
    theirs = _model_state(tmp_path / "one", one.info.run_id)
    for key in theirs:
        torch.testing.assert_close(mine[key], theirs[key], rtol=1e-5, atol=1e-5)
    # the evaluation is sharded over the ranks and gathered: the accuracy matrix is the
    # single-process one (identical predictions, see the module docstring)
    matrices = [_artifact_text(client, r.info.run_id, "accuracy_matrix.csv", tmp_path) for r in (run, one)]
    assert matrices[0] == matrices[1]


@pytest.mark.integration
def test_a_failing_run_is_failed_and_leaves_no_process(tmp_path):
    """A real run-time failure: lr=1e30 makes the loss non-finite in the first epoch, on every
    rank (DDP shares the gradients); the run ends FAILED and the command returns (timeout)."""
    proc, uri = _run(tmp_path, "bad", ["train.lr=1e30", "method.name=naive"], nproc=2)
    assert proc.returncode == 1, proc.stderr[-3000:]
    # every rank fails alike; the launcher says the first failure once, naming the rank
    assert proc.stderr.count("non-finite training loss") == 1, proc.stderr
    assert "of 2; the other ranks were stopped; MLflow run" in proc.stderr
    assert "Traceback" not in proc.stderr
    client = mlflow_client(uri)
    runs = client.search_runs([client.get_experiment_by_name("bad").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


def _kill_all_mid_stream(args: list[str], folder, after: int = 2) -> int:
    """Start ``lethe args`` and SIGKILL the launcher and both ranks together once a checkpoint
    after experience ``after`` exists and the run is not finished (a node lost mid-stream);
    returns the checkpoint's next experience."""
    import psutil

    def kill_all(proc):
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        for p in family:
            p.send_signal(signal.SIGKILL)
        proc.wait()
        psutil.wait_procs(family, timeout=30)

    return _mid_stream(args, folder, after, kill_all)[0]


def _mid_stream(args: list[str], folder, after: int, act):
    """Start ``lethe args``; once a checkpoint after experience ``after`` exists and the run is
    not finished, call ``act(proc)``; returns (the checkpoint's next experience, proc)."""
    proc = subprocess.Popen(LETHE + args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        for meta_path in folder.glob("*/meta.json"):
            try:
                meta = json.loads(meta_path.read_text())
            except json.JSONDecodeError:   # being replaced
                continue
            if (after <= meta["next_experience"] < meta["n_experiences"]
                    and (meta_path.parent / "state.pt").exists()):
                act(proc)
                return meta["next_experience"], proc
        time.sleep(0.01)
    raise AssertionError(f"no checkpoint after experience {after} appeared")


@pytest.mark.integration
def test_sigterm_on_the_launcher_marks_the_run_killed_and_stops_every_rank(tmp_path):
    """SIGTERM to the launcher alone (what a scheduler or `kill` sends): torchrun stops the
    ranks, the launcher marks the run KILLED, says how to resume, exits 130 and leaves no
    process; the checkpoint written before stays."""
    import psutil

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["run", "split_digits", "train.epochs=4", f"tracking.uri={uri}", "tracking.experiment=term",
            f"checkpoint.dir={tmp_path / 'term'}", "--nproc", "2"]
    ranks = []

    def term(proc):
        ranks.extend(psutil.Process(proc.pid).children(recursive=True))
        proc.send_signal(signal.SIGTERM)

    _, proc = _mid_stream(args, tmp_path / "term", 1, term)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    _, run = only_run(uri, "term")
    assert run.info.status == "KILLED"
    assert f"MLflow run {run.info.run_id} is marked KILLED" in err and "--resume" in err
    assert (tmp_path / "term" / run.info.run_id / "state.pt").exists()
    _, alive = psutil.wait_procs(ranks, timeout=30)
    assert ranks and not alive, [p.cmdline() for p in alive]


@pytest.mark.integration
def test_both_ranks_killed_then_resumed_match_the_uninterrupted_run(tmp_path):
    """--resume with --nproc 2: the launcher finds the checkpoint and every rank loads it (model,
    optimizer, evaluator, RNG state shared by all ranks); the resumed run continues the same
    MLflow run and ends where the uninterrupted 2-process run ends: the same arithmetic in the
    same order, so final metrics and weights are bitwise equal."""
    ref, uri = _run(tmp_path, "whole", [], nproc=2)
    assert ref.returncode == 0, ref.stderr[-3000:]
    _, whole = only_run(uri, "whole")
    args = ["run", "split_digits", *SMALL, f"tracking.uri={uri}", "tracking.experiment=cut",
            f"checkpoint.dir={tmp_path / 'cut'}", "--nproc", "2"]
    assert _kill_all_mid_stream(args, tmp_path / "cut") >= 2
    client, cut = only_run(uri, "cut")
    assert cut.info.status == "RUNNING"                      # nobody could end it
    res = run_cli(args + ["--resume"], cwd=ROOT, timeout=420)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming run" in res.stdout
    client, run = only_run(uri, "cut")                       # the same run, now FINISHED
    assert run.info.run_id == cut.info.run_id and run.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "acc/avg_seen"))
    assert steps == [0, 1, 2, 3, 4]                          # each experience logged once
    for key in FINAL_KEYS:
        assert run.data.metrics[key] == whole.data.metrics[key], key
    mine = _model_state(tmp_path / "cut", run.info.run_id)
    theirs = _model_state(tmp_path / "whole", whole.info.run_id)
    for key in theirs:
        assert torch.equal(mine[key], theirs[key]), key


@pytest.mark.integration
def test_seeds_with_nproc_are_child_runs_of_one_parent(tmp_path):
    """--seeds 2 --nproc 2: the launcher opens the parent run, each seed is one 2-process run
    tagged as its child, and the parent holds mean and sample std of the children's finals."""
    from lethe import tags as T

    proc, uri = _run(tmp_path, "seeds", ["--seeds", "2"], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = mlflow_client(uri)
    runs = client.search_runs([client.get_experiment_by_name("seeds").experiment_id])
    parents = [r for r in runs if r.data.tags.get(T.ROLE) == T.PARENT]
    children = sorted((r for r in runs if r.data.tags.get(T.ROLE) == T.CHILD),
                      key=lambda r: int(r.data.params["seed"]))
    assert len(parents) == 1 and len(children) == 2 and len(runs) == 3
    parent = parents[0]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert [r.data.params["seed"] for r in children] == ["0", "1"]
    assert {r.data.tags[T.PARENT_RUN] for r in children} == {parent.info.run_id}
    a, b = (r.data.metrics["acc/avg_seen"] for r in children)
    assert parent.data.metrics["acc/avg_seen/mean"] == pytest.approx((a + b) / 2, abs=1e-12)
    # sample std of two values: |a - b| / sqrt(2)
    assert parent.data.metrics["acc/avg_seen/std"] == pytest.approx(abs(a - b) / 2 ** 0.5, abs=1e-12)


@pytest.mark.parametrize("preset, why", [
    ("conpet_dynamic_text", "its training forward runs the selected experts"),
    ("conpet_static_text", "get no gradient in some steps")])
def test_a_method_that_cannot_train_distributed_is_refused_at_config_time(tmp_path, preset, why):
    """Refused before any process starts (exit 2, no MLflow run), not mid-run by DDP."""
    proc = run_cli(["run", preset, "--nproc", "2"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"method '{preset.rsplit('_', 1)[0]}' cannot train in several processes" in proc.stderr
    assert why in proc.stderr and "run it in one process" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "mlflow.db").exists()


@pytest.mark.integration
def test_a_language_model_unlearning_run_with_two_processes_matches_one(tmp_path):
    """Gradient ascent on the synthetic TOFU stream, tiny Llama, DDP: the learn phase trains
    data-parallel through the template, the unlearning phase runs whole on every rank (its own
    loop: identical inputs and seeds on every rank), every rank holds the model. The same run
    under FSDP (each rank half of every weight) is checked against one process by
    tests/test_fsdp.py's validation test, which adds validation to it. The 2-process run
    differs from one process by float reassociation, carried through a few dozen AdamW steps:
    probabilities agree to 1e-3 relative (measured differences are ~1e-6; a mis-sharded batch
    or a double-counted gradient moves them by far more than 1e-3)."""
    from tofu_helpers import small

    extra = [*small(tmp_path), "model.layers=1", "model.d_model=32", "model.heads=2",
             "scenario.el_n=30", "train.epochs=3", "method.epochs=3", "method.stop_at_target=false",
             "distributed.strategy=ddp", "checkpoint.enabled=false"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    finals = {}
    # one process first: it writes the generated TOFU folder that two ranks would race to write
    for name, nproc in (("one", []), ("two", ["--nproc", "2"])):
        proc = run_cli(["run", "ga_tofu_synthetic", *extra, f"tracking.uri={uri}",
                        f"tracking.experiment={name}", f"checkpoint.dir={tmp_path / name}", *nproc],
                       cwd=ROOT, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        client, run = only_run(uri, name)
        finals[name] = {k: {m.step: m.value for m in client.get_metric_history(run.info.run_id, k)}
                        for k in ("unlearn/forget_prob", "unlearn/model_utility", "unlearn/forget_ma")}
        log = _artifact_text(client, run.info.run_id, "run.log", tmp_path / name)
        assert "FSDP:" not in log and "sharded" not in log
    for key, by_step in finals["one"].items():
        assert set(finals["two"][key]) == set(by_step) == {0, 1}, key
        for step, value in by_step.items():
            assert finals["two"][key][step] == pytest.approx(value, rel=1e-3), (key, step)


def test_fsdp_refuses_what_it_does_not_support_yet(tmp_path):
    """Refused before any process starts: a method not made to train sharded. Checkpoints,
    validation and the LoRA methods are accepted (tests/test_fsdp.py runs them)."""
    from tofu_helpers import small

    from lethe.platform.runner import check_distributable

    base = [*small(tmp_path), "distributed.strategy=fsdp", "--nproc", "2"]
    proc = run_cli(["run", "ga_tofu_synthetic", *base, "method.name=retrain"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "method 'retrain' does not train under distributed.strategy=fsdp yet" in proc.stderr
    assert "grad_ascent, grad_diff, loku, naive, relearn" in proc.stderr   # the ones that do
    assert "Traceback" not in proc.stderr and not (tmp_path / "mlflow.db").exists()
    for preset in ("loku_tofu_synthetic", "relearn_tofu_synthetic"):
        check_distributable(load_config(preset, ["distributed.strategy=fsdp", "checkpoint.enabled=true",
                                                 "eval.every_epochs=1", "checkpoint.select=best"]), 2)
