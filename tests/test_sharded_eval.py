"""The evaluators' passes sharded over the ranks of a data-parallel run (real processes, gloo):
each rank predicts only its contiguous share of the test rows, and the gathered predictions
equal a plain single-process loop over all rows."""
from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from lethe.metrics.evaluator import Evaluator
from lethe.metrics.passes import gather_rows, rank_rows
from lethe.scenarios import types

N, D, C = 23, 5, 4   # 23 rows over 2 ranks: shares of 11 and 12 (an uneven split)


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, D, generator=g), torch.randn(D, C, generator=g)


def _worker(rank: int, world: int, init: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        x, w = _data()
        seen = []

        def predict(xb, task):
            seen.append(xb.clone())
            return xb @ w

        test = types.TestSet(x=x, y=torch.zeros(N, dtype=torch.long), exp=torch.arange(N) % 2,
                       task=torch.zeros(N, dtype=torch.long), ids=torch.arange(N))
        ev = Evaluator(test, batch_size=4, n_classes=C)
        preds = ev.predict(predict)
        # LM-style rows: a [n, k] tensor along dim 0
        lo, hi = rank_rows(N)
        rows = gather_rows(torch.arange(lo, hi).repeat(3, 1).T.contiguous(), N)
        torch.save({"preds": preds, "seen": torch.cat(seen), "rows": rows, "share": (lo, hi)},
                   f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def test_two_ranks_predict_their_shares_and_gather_the_single_process_result(tmp_path):
    try:
        mp.spawn(_worker, args=(2, f"file://{tmp_path / 'pg'}", str(tmp_path / "out")), nprocs=2)
    except Exception as exc:   # e.g. no gloo in this torch build
        pytest.fail(f"two gloo processes could not run: {exc}")
    x, w = _data()
    expected = torch.stack([(x[i] @ w).argmax() for i in range(N)])   # an independent loop
    results = [torch.load(tmp_path / f"out.{r}") for r in range(2)]
    assert [r["share"] for r in results] == [(0, 11), (11, 23)]       # n·r//W .. n·(r+1)//W
    for r, res in enumerate(results):
        lo, hi = res["share"]
        assert torch.equal(res["seen"], x[lo:hi])                       # only its own rows
        assert torch.equal(res["preds"], expected)                      # everyone has all
        assert torch.equal(res["rows"], torch.arange(N).repeat(3, 1).T)  # in rank order


def test_a_single_process_evaluates_every_row():
    assert rank_rows(7) == (0, 7)
    part = torch.arange(7)
    assert gather_rows(part, 7) is part
