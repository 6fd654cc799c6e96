"""Deletion requests in the experience stream.

A scenario's ``forget_requests`` list interleaves forget experiences with its learn
experiences. Each entry names training samples by their stable ids, either explicitly
(``ids: [...]``) or drawn by a policy from the samples learned so far and not yet deleted:

- ``random``: ``n`` samples uniformly;
- ``class``: ``n`` samples of one class (``classes: [...]`` to choose it; default: a seeded
  draw among the classes seen so far);
- ``slice_skewed``: ``n`` samples concentrated on some slices of the sharded methods: each
  sample's slice position is ``slice_of(id, slices, seed)`` — the same seeded key SISA and
  S3T use to place samples in slices — and slice k is drawn with weight ``weights[k]``
  (default 8:4:2:1…, halving per slice), the skewed deletion distributions of S3T §5.

Every request is checked when the stream is built (unknown ids, test ids, ids learned only
after the request, ids already deleted by an earlier request, duplicates, too few samples
left, deleting every remaining sample): a bad request is a ConfigError naming the entry
and the fix, before any work starts, so a request is never half-applied.

Also here: the training-sample pool of a stream (:func:`train_pool`) and the seeded
shard/slice keys shared by the exact-unlearning methods and the ``slice_skewed`` policy.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from lethe.errors import ConfigError

POLICIES = ("random", "class", "slice_skewed")


@dataclass
class ForgetRequestSpec:
    """One entry of ``scenario.forget_requests``."""

    after: int = -1               # learn experience (0-based) the request follows
    n: int = 0                    # samples to delete (policies); ignored when `ids` is given
    policy: str = "random"        # random | class | slice_skewed
    seed: Optional[int] = None    # draw seed; None = experiment seed + position in the list
    ids: list = field(default_factory=list)      # explicit sample ids (instead of n/policy)
    classes: list = field(default_factory=list)  # class policy: classes to draw from
    slices: int = 4               # slice_skewed: slices per shard of the method served
    weights: list = field(default_factory=list)  # slice_skewed: weight per slice (default 2^-k)


# --- seeded keys ------------------------------------------------------------------------
_M64 = (1 << 64) - 1


def _mix64(x):
    """splitmix64 finaliser on a uint64 array: a fast, well-spread integer hash."""
    import numpy as np

    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def derive_seed(*parts: int) -> int:
    """A 62-bit seed that depends on every part (order matters); stable across runs."""
    import numpy as np

    h = np.uint64(0x51ED270B27A1B3C5)
    for p in parts:
        h = _mix64(np.uint64((int(h) ^ (int(p) & _M64)) & _M64))
    return int(h) >> 2


def sample_key(ids, seed: int, salt: int):
    """A uniform float64 in [0, 1) per sample id, fixed by (seed, salt): float numpy array."""
    import numpy as np

    ids = np.asarray(ids, dtype=np.int64).astype(np.uint64)
    base = np.uint64(derive_seed(seed, salt))
    return (_mix64(ids ^ base) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def shard_of(ids, n_shards: int, seed: int):
    """Shard index of each sample id (int64 numpy array): stable as data arrives."""
    import numpy as np

    return np.minimum((sample_key(ids, seed, 1) * n_shards).astype(np.int64), n_shards - 1)


def slice_of(ids, n_slices: int, seed: int):
    """Slice index of each sample id within its shard (independent of the shard key)."""
    import numpy as np

    return np.minimum((sample_key(ids, seed, 2) * n_slices).astype(np.int64), n_slices - 1)


# --- the training pool ------------------------------------------------------------------
def train_pool(stream):
    """All training samples of the stream's learn experiences as tensors (a TestSet whose
    ``exp`` is the learn experience's position among learn experiences).

    Streams built from tensors fill ``stream.train``; others (Avalanche classic
    benchmarks) get it built once from their experiences' datasets and cached.
    """
    pool = getattr(stream, "train", None)
    if pool is not None:
        return pool
    import torch

    from lethe.scenarios.types import LEARN, TestSet

    parts = []
    for k, exp in enumerate(e for e in stream.experiences if e.kind == LEARN):
        data = exp.train.dataset
        loader = torch.utils.data.DataLoader(data.eval(), batch_size=512, shuffle=False)
        xs, ys, ts = [], [], []
        for batch in loader:
            xs.append(batch[0])
            ys.append(batch[1])
            ts.append(batch[2] if len(batch) > 2 else torch.zeros_like(batch[1]))
        y = torch.cat(ys).long()
        parts.append((torch.cat(xs), y, torch.full_like(y, k), torch.cat(ts).long(),
                      torch.as_tensor(list(data.sample_id), dtype=torch.long)))
    stream.train = TestSet(*(torch.cat([p[i] for p in parts]) for i in range(5)))
    return stream.train


def experience_ids(exp):
    """Stable sample ids of a learn experience (int64 tensor)."""
    import torch

    return torch.as_tensor(list(exp.train.dataset.sample_id), dtype=torch.long)


# --- parsing ----------------------------------------------------------------------------
def _error(msg: str):
    return ConfigError(msg)


def parse_requests(raw) -> list[ForgetRequestSpec]:
    """Validate the raw ``forget_requests`` list (dicts from YAML) into specs."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    from lethe.registry import suggest

    if raw is None:
        return []
    if isinstance(raw, (ListConfig, DictConfig)):
        raw = OmegaConf.to_container(raw, resolve=True)
    if not isinstance(raw, list):
        raise _error("scenario.forget_requests must be a list of requests, e.g. "
                     "[{after: 0, n: 10, policy: random}]")
    keys = [f.name for f in dataclasses.fields(ForgetRequestSpec)]
    specs = []
    for i, item in enumerate(raw):
        where = f"scenario.forget_requests[{i}]"
        if not isinstance(item, dict):
            raise _error(f"{where} must be a mapping such as {{after: 0, n: 10, policy: random}} "
                         f"or {{after: 0, ids: [3, 17]}}, got {item!r}")
        unknown = sorted(set(item) - set(keys))
        if unknown:
            raise _error(f"unknown key '{where}.{unknown[0]}'{suggest(unknown[0], keys)} "
                         f"(valid keys: {', '.join(keys)})")
        if "after" not in item:
            raise _error(f"missing value for '{where}.after': the learn experience (0-based) "
                         f"the request follows")
        spec = ForgetRequestSpec()
        for k, v in item.items():
            setattr(spec, k, v)
        try:
            spec.after, spec.n, spec.slices = int(spec.after), int(spec.n), int(spec.slices)
            spec.seed = None if spec.seed is None else int(spec.seed)
            spec.ids = [int(v) for v in (spec.ids or [])]
            spec.classes = [int(v) for v in (spec.classes or [])]
            spec.weights = [float(v) for v in (spec.weights or [])]
        except (TypeError, ValueError) as exc:
            raise _error(f"bad value in {where}: {exc} (after, n, seed, slices and ids are "
                         f"integers; weights are numbers)") from None
        if spec.policy not in POLICIES:
            raise _error(f"bad value for '{where}.policy': '{spec.policy}'"
                         f"{suggest(spec.policy, POLICIES)} (choose one of {', '.join(POLICIES)})")
        if not spec.ids and spec.n < 1:
            raise _error(f"{where}: give n ≥ 1 samples to draw (policy {spec.policy}) or an "
                         f"explicit list of sample ids")
        if spec.policy == "slice_skewed" and not spec.ids:
            if spec.slices < 1:
                raise _error(f"bad value for '{where}.slices': must be ≥ 1")
            if spec.weights and (len(spec.weights) != spec.slices or min(spec.weights) < 0
                                 or sum(spec.weights) <= 0):
                raise _error(f"bad value for '{where}.weights': {spec.slices} non-negative "
                             f"numbers (one per slice, not all zero) expected, got {spec.weights}")
        specs.append(spec)
    return specs


# --- building the stream ----------------------------------------------------------------
def _fmt(ids, limit: int = 8) -> str:
    ids = list(ids)
    return "[" + ", ".join(map(str, ids[:limit])) + (", …" if len(ids) > limit else "") + "]"


def _draw(spec: ForgetRequestSpec, where: str, live_rows, pool, seed: int, partition_seed: int):
    """Rows (into the pool) drawn by the spec's policy from the live rows."""
    import numpy as np

    rng = np.random.default_rng(seed)
    live_rows = np.asarray(live_rows)
    if spec.policy == "random":
        cand = live_rows
    elif spec.policy == "class":
        ys = pool.y.numpy()[live_rows]
        present = sorted(set(ys.tolist()))
        classes = spec.classes or [int(rng.choice(present))]
        missing = sorted(set(classes) - set(present))
        if missing:
            raise _error(f"{where}.classes: class(es) {missing} have no live training sample "
                         f"at this point (classes learned and not deleted: {present})")
        cand = live_rows[np.isin(ys, classes)]
    else:
        ids = pool.ids.numpy()[live_rows]
        pos = slice_of(ids, spec.slices, seed=partition_seed)
        weights = np.asarray(spec.weights or [2.0 ** -k for k in range(spec.slices)], dtype=float)
        if len(live_rows) < spec.n:
            cand = live_rows
        else:
            chosen = []
            remaining = {k: list(rng.permutation(live_rows[pos == k])) for k in range(spec.slices)}
            for _ in range(spec.n):
                w = np.array([weights[k] if remaining[k] else 0.0 for k in range(spec.slices)])
                if w.sum() <= 0:   # the weighted slices ran out: fall back to any live slice
                    w = np.array([1.0 if remaining[k] else 0.0 for k in range(spec.slices)])
                k = int(rng.choice(spec.slices, p=w / w.sum()))
                chosen.append(remaining[k].pop())
            return np.sort(np.asarray(chosen, dtype=np.int64))
    if len(cand) < spec.n:
        what = (f"live samples of class(es) {classes}" if spec.policy == "class"
                else "live training samples")
        raise _error(f"{where}: asks for n={spec.n} samples but only {len(cand)} {what} remain "
                     f"after experience {spec.after} (lower n)")
    return np.sort(rng.choice(cand, size=spec.n, replace=False).astype(np.int64))


def build_forget_experiences(stream, raw_requests, seed: int) -> dict[int, list]:
    """Validated requests as ``{learn position: [ForgetRequest, ...]}`` (stream order)."""
    import numpy as np
    import torch

    from lethe.scenarios.types import LEARN, ForgetRequest

    specs = parse_requests(raw_requests)
    if not specs:
        return {}
    n_learn = sum(1 for e in stream.experiences if e.kind == LEARN)
    pool = train_pool(stream)
    pool_ids = pool.ids.numpy()
    pool_exp = pool.exp.numpy()
    row_of = {int(i): r for r, i in enumerate(pool_ids)}
    test_ids = set(stream.test.ids.tolist()) - set(row_of)
    public = getattr(stream, "public", None)
    public_ids = set(public.ids.tolist()) if public is not None else set()
    deleted_by = np.full(len(pool_ids), -1, dtype=np.int64)   # request position that deleted a row
    out: dict[int, list] = {}
    order = sorted(range(len(specs)), key=lambda i: specs[i].after)   # stable: YAML order per step
    for i in order:
        spec, where = specs[i], f"scenario.forget_requests[{i}]"
        if not 0 <= spec.after < n_learn:
            raise _error(f"bad value for '{where}.after': {spec.after} (the stream has {n_learn} "
                         f"learn experiences: use 0..{n_learn - 1})")
        seen = pool_exp <= spec.after
        live = seen & (deleted_by < 0)
        if spec.ids:
            ids = spec.ids
            dup = sorted({v for v in ids if ids.count(v) > 1})
            if dup:
                raise _error(f"{where}.ids: ids {_fmt(dup)} are listed more than once")
            unknown = [v for v in ids if v not in row_of]
            if unknown:
                in_test = [v for v in unknown if v in test_ids]
                in_public = [v for v in unknown if v in public_ids]
                extra = (f"; {_fmt(in_test)} are test samples, which cannot be deleted"
                         if in_test else "")
                extra += (f"; {_fmt(in_public)} are in the non-deletable public split "
                          f"(scenario.public_fraction)" if in_public else "")
                raise _error(f"{where}.ids: unknown sample ids {_fmt(unknown)}: they name no "
                             f"training sample of this stream{extra} (training ids range "
                             f"{int(pool_ids.min())}..{int(pool_ids.max())})")
            rows = np.asarray([row_of[v] for v in ids], dtype=np.int64)
            later = [v for v, r in zip(ids, rows) if pool_exp[r] > spec.after]
            if later:
                r0 = row_of[later[0]]
                raise _error(f"{where}.ids: samples {_fmt(later)} are learned only in experience "
                             f"{int(pool_exp[r0])}, after this request (after: {spec.after}); "
                             f"move the request later or drop them")
            gone = [v for v, r in zip(ids, rows) if deleted_by[r] >= 0]
            if gone:
                raise _error(f"{where}.ids: samples {_fmt(gone)} were already deleted by "
                             f"scenario.forget_requests[{int(deleted_by[row_of[gone[0]]])}]")
            rows = np.sort(rows)
        else:
            draw_seed = spec.seed if spec.seed is not None else derive_seed(seed, i, 7)
            rows = _draw(spec, where, np.flatnonzero(live), pool, draw_seed, seed)
        if int(live.sum()) - len(rows) <= 0:
            raise _error(f"{where}: deletes every remaining training sample after experience "
                         f"{spec.after} ({int(live.sum())} live); exact unlearning then has no "
                         f"data to serve a model from: delete fewer samples")
        deleted_by[rows] = i
        ids_t = torch.as_tensor(pool_ids[rows], dtype=torch.long)
        out.setdefault(spec.after, []).append(ForgetRequest(sample_ids=ids_t, after=spec.after))
    return out


def add_forget_requests(stream, raw_requests, seed: int):
    """Insert forget experiences after their learn experiences and renumber the stream so
    each experience's index is its position (= its MLflow step). Returns the stream."""
    from lethe.scenarios.types import FORGET, LEARN, Experience

    by_after = build_forget_experiences(stream, raw_requests, seed)
    if not by_after:
        return stream
    experiences, k = [], 0
    for exp in stream.experiences:
        experiences.append(exp)
        if exp.kind == LEARN:
            experiences += [Experience(index=-1, kind=FORGET, request=r) for r in by_after.get(k, [])]
            k += 1
    for i, exp in enumerate(experiences):
        exp.index = i
    stream.experiences = experiences
    return stream


def forgotten_until(stream, index: int):
    """Sample ids deleted by forget experiences up to and including stream step ``index``."""
    import torch

    from lethe.scenarios.types import FORGET

    parts = [torch.as_tensor(e.request.sample_ids, dtype=torch.long)
             for e in stream.experiences if e.kind == FORGET and e.index <= index]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)


__all__ = ["ForgetRequestSpec", "POLICIES", "add_forget_requests", "build_forget_experiences",
           "derive_seed", "experience_ids", "forgotten_until", "parse_requests", "sample_key",
           "shard_of", "slice_of", "train_pool"]
