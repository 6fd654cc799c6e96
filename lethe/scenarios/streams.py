"""Build Avalanche benchmarks (plus lethe's test tensors and experience list) from tensors.

Every lethe stream goes through here, so samples always carry a stable ``sample_id``
data attribute (needed by deletion requests and by replay-buffer checkpoints).
"""
from __future__ import annotations

import numpy as np

from lethe.errors import ConfigError
from lethe.scenarios.splits import stratified_split  # noqa: F401 - the scenarios' import path
from lethe.scenarios.types import LEARN, Experience, Stream, TestSet


def split_classes(class_order: list[int], n_experiences: int) -> list[list[int]]:
    """Split classes into ``n_experiences`` groups; leftovers go to the first groups.

    (Avalanche's ``class_incremental_benchmark(num_experiences=...)`` drops them silently.)
    """
    if not 1 <= n_experiences <= len(class_order):
        raise ConfigError(f"scenario.n_experiences={n_experiences} must be between 1 and the "
                          f"number of classes ({len(class_order)})")
    return [list(map(int, part)) for part in np.array_split(np.asarray(class_order), n_experiences)]


def seeded_class_order(n_classes: int, seed: int, shuffle: bool = True) -> list[int]:
    if not shuffle:
        return list(range(n_classes))
    return [int(c) for c in np.random.default_rng(seed).permutation(n_classes)]


def avalanche_dataset(x, y, ids, task: int = 0):
    """A task-aware Avalanche classification dataset with a ``sample_id`` attribute."""
    import torch
    from avalanche.benchmarks.utils import (
        DataAttribute,
        TaskAwareSupervisedClassificationDataset,
        _make_taskaware_tensor_classification_dataset,
    )

    base = _make_taskaware_tensor_classification_dataset(x, y.long(), task_labels=int(task))
    ids = torch.as_tensor(ids, dtype=torch.long).tolist()
    return TaskAwareSupervisedClassificationDataset(
        [base], data_attributes=[DataAttribute(ids, "sample_id")])


def class_incremental_stream(train, test, groups: list[list[int]], *, task_labels: bool,
                             input_shape: tuple, n_classes: int) -> Stream:
    """train / test: (x, y, ids) tensors; groups: classes of each experience."""
    import torch
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.benchmarks.scenarios.supervised import with_classes_timeline
    from avalanche.benchmarks.scenarios.task_aware import with_task_labels

    train_rows, test_parts = [], []
    for e, classes in enumerate(groups):
        task = e if task_labels else 0
        train_rows.append(torch.isin(train[1], torch.tensor(classes)).nonzero().flatten())
        tmask = torch.isin(test[1], torch.tensor(classes))
        test_parts.append((test[0][tmask], test[1][tmask], test[2][tmask], e, task))
    # The training pool (one copy, ordered by experience); each experience's dataset is a
    # view into it, so deletion requests and unlearning metrics cost no second copy.
    rows = torch.cat(train_rows)
    sizes = [len(r) for r in train_rows]
    pool = TestSet(
        x=train[0][rows], y=train[1][rows].long(), ids=train[2][rows].long(),
        exp=torch.cat([torch.full((n,), e, dtype=torch.long) for e, n in enumerate(sizes)]),
        task=torch.cat([torch.full((n,), e if task_labels else 0, dtype=torch.long)
                        for e, n in enumerate(sizes)]))
    bounds = [0, *torch.tensor(sizes).cumsum(0).tolist()]
    train_sets = [avalanche_dataset(pool.x[a:b], pool.y[a:b], pool.ids[a:b], e if task_labels else 0)
                  for e, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
    test_sets = [avalanche_dataset(x, y, i, t) for x, y, i, _, t in test_parts]
    bm = with_classes_timeline(with_task_labels(benchmark_from_datasets(train=train_sets,
                                                                        test=test_sets)))
    tensors = TestSet(
        x=torch.cat([p[0] for p in test_parts]), y=torch.cat([p[1] for p in test_parts]).long(),
        exp=torch.cat([torch.full((len(p[1]),), p[3], dtype=torch.long) for p in test_parts]),
        task=torch.cat([torch.full((len(p[1]),), p[4], dtype=torch.long) for p in test_parts]),
        ids=torch.cat([p[2] for p in test_parts]).long())
    experiences = [Experience(index=i, kind=LEARN, train=exp) for i, exp in enumerate(bm.train_stream)]
    return Stream(experiences=experiences, benchmark=bm, test=tensors, input_shape=tuple(input_shape),
                  n_classes=n_classes,
                  setting="task_incremental" if task_labels else "class_incremental",
                  class_order=[c for g in groups for c in g], train=pool)


