"""How evaluation passes run in a data-parallel run: sharded over the ranks (rows split,
predictions gathered) or, when the weights themselves are sharded (FSDP), whole on every rank
under ``no_grad``; and the no-gradient context every pass uses."""
from __future__ import annotations

import functools

import torch

_sharding = {"enabled": True}


def shard_evaluation(enabled: bool) -> None:
    """Whether passes are sharded over the ranks of a data-parallel run (the default). A run
    with sharded weights (FSDP) turns it off: there every forward is a collective, so every
    rank must run the same forwards, on all rows — and under ``no_grad``, not
    ``inference_mode`` (FSDP reuses the buffers it gathers weights into; one allocated in
    inference mode cannot be written by a training step later)."""
    _sharding["enabled"] = bool(enabled)


def inference():
    """The context of every evaluation pass: ``torch.inference_mode()``, or ``torch.no_grad()``
    when the weights are sharded (see :func:`shard_evaluation`)."""
    return torch.inference_mode() if _sharding["enabled"] else torch.no_grad()


def inference_pass(fn):
    """``fn`` run under :func:`inference` (a decorator)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with inference():
            return fn(*args, **kwargs)

    return run


def _group_size(n: int) -> int:
    """Processes sharing an evaluation of ``n`` rows: those of the data-parallel run this one
    belongs to, or 1 (outside one, fewer rows than processes, or sharding turned off)."""
    dist = torch.distributed
    on = _sharding["enabled"] and dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if on else 1
    return world if n >= world else 1


def rank_rows(n: int) -> tuple[int, int]:
    """This process's contiguous share ``[lo, hi)`` of ``n`` evaluation rows: all of them in a
    single process; rank r of W gets rows ``n·r//W .. n·(r+1)//W`` in a data-parallel run."""
    world = _group_size(n)
    if world == 1:
        return 0, n
    r = torch.distributed.get_rank()
    return n * r // world, n * (r + 1) // world


def gather_rows(part: torch.Tensor, n: int, dim: int = 0) -> torch.Tensor:
    """The whole ``n`` rows along ``dim`` from every rank's :func:`rank_rows` share (in rank
    order, so the result equals a single process's pass); ``part`` itself in a single process.
    Shares differ by at most one row: each is padded to the largest for all_gather."""
    world = _group_size(n)
    if world == 1:
        return part
    sizes = [n * (r + 1) // world - n * r // world for r in range(world)]
    shape = list(part.shape)
    shape[dim] = max(sizes)
    padded = part.new_zeros(shape)
    padded.narrow(dim, 0, part.shape[dim]).copy_(part)
    shares = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(shares, padded)
    return torch.cat([t.narrow(dim, 0, k) for t, k in zip(shares, sizes)], dim)
