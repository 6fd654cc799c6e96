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

import pytest
import torch
from conftest import ROOT, mlflow_client, only_run, run_cli

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
    with pytest.raises(ConfigError, match="distributed.strategy=fsdp is not available yet"):
        distributed.check_launch(load_config("split_digits", ["distributed.strategy=fsdp"]), 2)


def test_a_batch_that_does_not_split_is_refused_before_any_process_starts(tmp_path):
    proc = run_cli(["run", "split_digits", "--nproc", "2", "train.batch_size=33"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "train.batch_size=33 does not split over --nproc 2" in proc.stderr
    assert "divisible by 2" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "mlflow.db").exists()   # no run was started


def test_nproc_refuses_resume(tmp_path):
    proc = run_cli(["run", "split_digits", "--nproc", "2", "--resume"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "--nproc cannot be combined with --seeds or --resume" in proc.stderr


# --- real runs ---------------------------------------------------------------------------
def _run(tmp_path, name: str, extra: list[str], nproc: int | None):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["run", "split_digits", *SMALL, *extra, f"tracking.uri={uri}", f"tracking.experiment={name}",
            f"checkpoint.dir={tmp_path / name}"] + (["--nproc", str(nproc)] if nproc else [])
    proc = run_cli(args, cwd=ROOT, timeout=420)
    return proc, uri


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
