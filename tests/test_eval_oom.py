"""Evaluation passes that run out of memory: the batch halves, the pass restarts, and the size
that worked is kept for the next passes."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lethe.metrics.evaluator import Evaluator
from lethe.scenarios import types as scenario_types


def make_test_set(n: int, features: int = 8):
    g = torch.Generator().manual_seed(0)
    zeros = torch.zeros(n, dtype=torch.long)
    return scenario_types.TestSet(x=torch.randn(n, features, generator=g),
                                  y=torch.randint(0, 4, (n,), generator=g), exp=zeros,
                                  task=zeros.clone(), ids=torch.arange(n))


class Budget(nn.Module):
    """A linear classifier whose device "holds" at most ``limit`` samples per batch: larger
    batches raise PyTorch's own out-of-memory error, as a full GPU does."""

    def __init__(self, limit: int):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(8, 4)
        self.limit, self.sizes = limit, []

    def forward(self, x):
        self.sizes.append(len(x))
        if len(x) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.net(x)


def test_out_of_memory_halves_the_batch_and_keeps_the_size_that_worked():
    data = make_test_set(200)
    model = Budget(limit=40)
    ev = Evaluator(data, batch_size=128)
    preds = ev.predict(lambda x, t: model(x), model)
    with torch.no_grad():
        assert torch.equal(preds, model.net(data.x).argmax(-1))
    assert ev.batch_size == 32                     # 128 → 64 → 32, the first that fits
    model.sizes.clear()
    ev.predict(lambda x, t: model(x), model)       # the next pass starts at the kept size
    assert max(model.sizes) == 32 and sum(model.sizes) == 200


def test_out_of_memory_at_batch_size_one_is_raised_as_it_is():
    model = Budget(limit=0)
    ev = Evaluator(make_test_set(10), batch_size=4)
    with pytest.raises(torch.OutOfMemoryError, match="CUDA out of memory"):
        ev.predict(lambda x, t: model(x), model)
    assert model.sizes[-1] == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_real_cuda_out_of_memory_is_survived_with_a_smaller_batch():
    """The device gets ~256 MiB above what is in use; one sample's activations take 4 MiB, so
    a 4096 batch (16 GiB) cannot fit and the pass must shrink to a few dozen samples."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 1 << 20), nn.ReLU(), nn.Linear(1 << 20, 4)).cuda()
    data = make_test_set(4096)
    with torch.no_grad():
        ref = torch.cat([model(data.x[s:s + 256].cuda()).argmax(-1) for s in range(0, 4096, 256)])
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(
        min(1.0, (torch.cuda.memory_reserved() + (256 << 20)) / total))
    try:
        ev = Evaluator(data, device="cuda", batch_size=4096)
        preds = ev.predict(lambda x, t: model(x), model)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    # other batch sizes may pick other GEMM kernels: a near-tie may flip, nothing more
    assert int((preds != ref).sum()) <= 2
    assert 1 <= ev.batch_size <= 64
