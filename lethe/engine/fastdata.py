"""The fast path for preloaded tensor datasets: mini-batches by tensor indexing.

Avalanche's template builds each mini-batch sample by sample — a Python ``__getitem__`` per
sample through its dataset tree (subsets, concatenations, transform groups, data attributes),
then ``collate`` — which on small models costs as much as the optimisation itself. Every
vision stream lethe builds from tensors (split digits, the torchvision streams, deletion
requests' subsets) is an Avalanche tree over ``TensorDataset`` leaves with no transforms, so its
rows can be gathered once per experience into tensors and each mini-batch indexed directly.

:func:`gather` returns those tensors, or None when a dataset is anything else (a transform to
apply, a custom collate, a non-tensor leaf, several task labels); the template then keeps its
own data loader. The batches are the template's own: the same rows in the same order, from the
same draws of torch's global RNG as the template's shuffling loader (:func:`epoch_order`), the
same dtypes as ``default_collate`` gives — checked bitwise against the template's loader by the
tests, for every dataset shape lethe builds.
"""
from __future__ import annotations

DEVICE_COPY_LIMIT = 1 << 30   # bytes: a tensor dataset up to this size is copied to the device once


class _NotTensors(Exception):
    """The dataset is not a plain tree of tensors: use the template's loader."""


def gather(dataset) -> list | None:
    """``[x, y, task]`` tensors of every row of an Avalanche classification dataset, in row
    order, as ``default_collate`` would give them; None when the fast path does not apply."""
    import torch
    from torch.utils.data import default_collate

    try:
        if getattr(dataset, "collate_fn", None) is not default_collate:
            raise _NotTensors
        rows = torch.arange(len(dataset))
        columns = _gather_flat(dataset._flat_data, rows)
        for attr in dataset._data_attributes.values():
            if attr.use_in_getitem:
                if len(attr.uniques) != 1:
                    raise _NotTensors   # several tasks: the template balances them
                columns.append(torch.full((len(rows),), int(next(iter(attr.uniques))),
                                          dtype=torch.long))
    except (_NotTensors, AttributeError, TypeError, ValueError):
        return None
    return columns if len(columns) == 3 else None   # else not (x, y, task)


def _gather_flat(node, rows):
    """Columns of ``rows`` of an Avalanche FlatData node (recursively down to the leaves)."""
    import torch
    from avalanche.benchmarks.utils.flat_data import FlatData
    from torch.utils.data import TensorDataset

    if isinstance(node, TensorDataset):
        return _leaf_columns(node, rows)
    if not isinstance(node, FlatData) or not _identity_transforms(node):
        raise _NotTensors
    if node._indices is not None:
        rows = _index_tensor(node._indices)[rows]
    bounds = torch.as_tensor(node._cumulative_sizes, dtype=torch.long)
    which = torch.searchsorted(bounds, rows, right=True)
    out = None
    for k in which.unique().tolist():
        mask = which == k
        local = rows[mask] - (bounds[k - 1] if k else 0)
        part = _gather_flat(node._datasets[k], local)
        if out is None:
            out = [torch.empty((len(rows), *c.shape[1:]), dtype=c.dtype) for c in part]
        if len(part) != len(out) or any(p.dtype != o.dtype for p, o in zip(part, out)):
            raise _NotTensors
        for o, p in zip(out, part):
            o[mask] = p
    if out is None:
        raise _NotTensors   # an empty dataset: nothing to gain
    return out


def _index_tensor(indices):
    """A FlatData node's row indices as a tensor: Avalanche's lazy index lists made eager by
    its own method (a numpy array) instead of one Python ``__getitem__`` per row."""
    import torch
    from avalanche.benchmarks.utils.flat_data import LazyIndices

    if isinstance(indices, LazyIndices):
        indices._to_eager()
        if indices._eager_list is not None:
            return torch.from_numpy(indices._eager_list).long()
    return torch.as_tensor(list(indices), dtype=torch.long)


def _leaf_columns(leaf, rows):
    import torch
    from avalanche.benchmarks.utils.classification_dataset import _TensorClassificationDataset

    columns = [t[rows] for t in leaf.tensors]
    if type(leaf) is _TensorClassificationDataset:
        columns[1] = columns[1].long()   # its __getitem__ turns labels into Python ints
    elif type(leaf) is not torch.utils.data.TensorDataset:
        raise _NotTensors                # a subclass may return anything from __getitem__
    return columns


def _identity_transforms(node) -> bool:
    """No transform in the current group (nor in the frozen groups) of a FlatData node."""
    for name in ("_transform_groups", "_frozen_transform_groups"):
        groups = getattr(node, name, None)
        if groups is not None and groups.transform_groups.get(groups.current_group) is not None:
            return False
    return True


def epoch_order(n: int, shuffle: bool):
    """The row order a ``DataLoader(..., shuffle=shuffle)`` over ``n`` rows takes in one epoch,
    from the same two draws of torch's global RNG it makes: the iterator's base seed (drawn when
    it is created, also unshuffled) and the random sampler's seed (drawn at the first batch),
    then ``randperm`` on a generator seeded with it — the code of torch's ``RandomSampler``,
    without its per-sample Python iteration (≈ 17 µs per mini-batch of 32 for an index loader,
    ≈ 1 µs this way). The tests check the order bitwise against a real DataLoader."""
    import torch

    torch.empty((), dtype=torch.int64).random_()          # _BaseDataLoaderIter's base seed
    if not shuffle:
        return torch.arange(n)
    seed = int(torch.empty((), dtype=torch.int64).random_().item())
    generator = torch.Generator()
    generator.manual_seed(seed)
    return torch.randperm(n, generator=generator)


class TensorBatches:
    """Mini-batches of preloaded tensors in the template's order (it stands in for the
    template's loader as ``strategy.dataloader``).

    ``len()`` is the template's number of mini-batches; each iteration draws the epoch's order
    as the template's loader does (:func:`epoch_order`)."""

    def __init__(self, columns, batch_size: int, shuffle: bool, device):
        import torch

        size = sum(c.numel() * c.element_size() for c in columns)
        if torch.device(device).type != "cpu" and size <= DEVICE_COPY_LIMIT:
            columns = [c.to(device) for c in columns]   # once per experience, not per batch
        self.columns = columns
        # a column holding one value (the task label of a single-task experience) is sliced,
        # not indexed: a view of it is the same batch column at a fraction of an index's cost
        self._constant = [c.dim() == 1 and len(c) > 0 and bool((c == c[0]).all()) for c in columns]
        self.batch_size, self.shuffle = int(batch_size), bool(shuffle)

    def on(self, device) -> bool:
        """Whether every batch comes out on ``device`` already."""
        import torch

        device = torch.device(device)
        return all(c.device.type == device.type and (device.index is None or c.device == device)
                   for c in self.columns)

    def __len__(self) -> int:
        return -(-len(self.columns[0]) // self.batch_size)

    def __iter__(self):
        order = epoch_order(len(self.columns[0]), self.shuffle)
        for idx in order.split(self.batch_size):
            # a CPU index works on device tensors too
            yield [c[:len(idx)] if same else c[idx] for c, same in zip(self.columns, self._constant)]


__all__ = ["gather", "epoch_order", "TensorBatches", "DEVICE_COPY_LIMIT"]
