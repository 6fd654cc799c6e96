"""Seeded stratified train/test splits, and the digits data, without importing scikit-learn.

Why not scikit-learn itself: importing it costs about a second (it pulls in scipy.stats and
pandas), all of it on a ``lethe run``'s start-up path, for one shuffle. The split below draws
exactly what ``sklearn.model_selection.train_test_split(idx, test_size=f, random_state=seed,
stratify=y)`` draws — same legacy ``RandomState`` stream, same largest-remainder allocation
with random tie-breaking — so every stream lethe built before keeps its rows (the tests check
it index for index against scikit-learn, which stays installed as lethe's reference).
"""
from __future__ import annotations

import math
from importlib.util import find_spec
from pathlib import Path

import numpy as np

from lethe.errors import ConfigError


def allocate(counts: np.ndarray, draws: int, rng: np.random.RandomState) -> np.ndarray:
    """Split ``draws`` over classes in proportion to ``counts``: each class gets the floor of
    its share, the draws left over go to the largest remainders, ties broken at random."""
    share = counts / counts.sum() * draws
    taken = np.floor(share)
    left = int(draws - taken.sum())
    remainder = share - taken
    for value in np.unique(remainder)[::-1]:   # largest remainder first
        if left <= 0:
            break
        (tied,) = np.where(remainder == value)
        pick = rng.choice(tied, size=min(len(tied), left), replace=False)
        taken[pick] += 1
        left -= len(pick)
    return taken.astype(int)


def stratified_split(y: np.ndarray, test_fraction: float, seed: int):
    """Indices (train, test), each class in the same proportion in both, seeded."""
    y = np.asarray(y)
    n = len(y)
    n_test = math.ceil(test_fraction * n)
    n_train = n - n_test
    classes, codes = np.unique(y, return_inverse=True)
    counts = np.bincount(codes)
    if not 0 < test_fraction < 1:
        raise ConfigError(f"scenario.test_fraction={test_fraction} must be between 0 and 1")
    if counts.min() < 2:
        raise ConfigError(f"class {classes[counts.argmin()]} has only {counts.min()} sample: a "
                          f"stratified train/test split needs at least 2 per class")
    if min(n_train, n_test) < len(classes):
        raise ConfigError(f"scenario.test_fraction={test_fraction} leaves {min(n_train, n_test)} "
                          f"samples on one side for {len(classes)} classes: each class needs "
                          f"one on both sides; move test_fraction towards 0.5")
    rng = np.random.RandomState(seed)
    by_class = np.split(np.argsort(codes, kind="mergesort"), np.cumsum(counts)[:-1])
    n_tr = allocate(counts, n_train, rng)
    n_te = allocate(counts - n_tr, n_test, rng)
    train, test = [], []
    for rows, a, b in zip(by_class, n_tr, n_te):
        rows = rows.take(rng.permutation(len(rows)))
        train.extend(rows[:a])
        test.extend(rows[a:a + b])
    return rng.permutation(train), rng.permutation(test)


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 handwritten digits as (images [N, 8, 8] float64 in 0..16,
    targets [N] int), read from the CSV that ships inside scikit-learn without importing it."""
    spec = find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the digits data ship with scikit-learn: pip install scikit-learn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    data = np.loadtxt(path, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)
