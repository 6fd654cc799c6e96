"""Unlearning metrics for classification, as pure functions of logits and labels.

At every forget step (keys ``unlearn/...``, see docs/metrics.md):

- ``forget_acc`` / ``retain_acc`` / ``test_acc``: accuracy on every sample deleted so far,
  on the live training samples learned so far, and on the test samples of the learned
  experiences. An exact method's forget accuracy is that of a model that never saw them
  (compare with the ``retrain`` oracle's run), not zero.
- ``mia_auc``: loss-threshold membership inference (Yeom et al., 2018): the AUC of
  "lower loss ⇒ member" separating the forget set from held-out test samples; 0.5 means
  the deleted samples look like data the model never saw. Compare with the retrain
  oracle's value on the same requests.
- ``mia_efficacy``: (Jia et al., NeurIPS 2023) an SVC on the true-class confidence, trained
  with retain samples as members and test samples as non-members, applied to the forget
  set: the share of forget samples judged non-members (higher = more forgotten).
- cost: ``serve_s`` (seconds to serve the request), ``retrain_samples`` (samples × epochs
  re-processed), ``requests_since_retrain`` (requests served with no gradient step since
  the method last had to train), and the method's own state (S3T: live sequences per shard).

Also :func:`write_csv` for the ``unlearning.csv`` artifact (one row per forget step).
"""
from __future__ import annotations

import csv
from pathlib import Path

import torch

from lethe.metrics.passes import inference

# Retain and test sets are subsampled (seeded) above this size: the metrics need losses,
# not just argmax, so they cannot reuse the evaluator's prediction store.
MAX_SAMPLES = 5000


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy (nan for an empty set)."""
    if len(y) == 0:
        return float("nan")
    return float((logits.argmax(-1) == y).float().mean())


def sample_losses(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy."""
    return torch.nn.functional.cross_entropy(logits.float(), y, reduction="none")


def true_class_confidence(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return logits.float().softmax(-1).gather(1, y.view(-1, 1)).squeeze(1)


def mia_auc(member_losses, nonmember_losses) -> float:
    """AUC of the loss-threshold attack: P(loss of a member < loss of a non-member), ties
    counting half (Mann-Whitney U / (n_m · n_n))."""
    m = torch.as_tensor(member_losses, dtype=torch.float64).flatten()
    n = torch.as_tensor(nonmember_losses, dtype=torch.float64).flatten()
    if len(m) == 0 or len(n) == 0:
        return float("nan")
    scores = torch.cat([-m, -n])            # a higher score = judged a member
    _, inverse, counts = torch.unique(scores, sorted=True, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    ranks = (ends - (counts.double() - 1) / 2)[inverse]   # 1-based ranks, ties averaged
    u = ranks[: len(m)].sum() - len(m) * (len(m) + 1) / 2
    return float(u / (len(m) * len(n)))


def mia_efficacy(retain_conf, test_conf, forget_conf, seed: int = 0,
                 max_train: int = 2000) -> float:
    """Share of forget samples an SVC (trained: retain = member, test = non-member, on the
    true-class confidence) judges non-members. Classes are balanced by subsampling."""
    import numpy as np
    from sklearn.svm import SVC

    r = np.asarray(retain_conf, dtype=np.float64).ravel()
    t = np.asarray(test_conf, dtype=np.float64).ravel()
    f = np.asarray(forget_conf, dtype=np.float64).ravel()
    if len(f) == 0 or len(r) == 0 or len(t) == 0:
        return float("nan")
    rng = np.random.default_rng(seed)
    k = min(len(r), len(t), max_train)
    r, t = rng.choice(r, k, replace=False), rng.choice(t, k, replace=False)
    x = np.concatenate([r, t]).reshape(-1, 1)
    y = np.concatenate([np.ones(k), np.zeros(k)])
    clf = SVC(C=3, gamma="auto", kernel="rbf").fit(x, y)
    return float((clf.predict(f.reshape(-1, 1)) == 0).mean())


def logits_of(predict, x, task, device, batch_size: int = 512) -> torch.Tensor:
    """Logits of ``predict(x, task)`` in batches, on CPU (float32)."""
    outs = []
    with inference():
        for s in range(0, len(x), batch_size):
            out = predict(x[s:s + batch_size].to(device), task[s:s + batch_size].to(device))
            out = getattr(out, "logits", out)
            outs.append(out.float().cpu())
    if not outs:
        return torch.empty(0, 0)
    return torch.cat(outs)


def _subsample(n: int, k: int, seed: int) -> torch.Tensor:
    if n <= k:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:k].sort().values


def quality(forget_logits, forget_y, retain_logits, retain_y, test_logits, test_y,
            seed: int = 0) -> dict[str, float]:
    """Accuracy, MIA AUC and MIA-efficacy from the logits of the three sets."""
    out = {"forget_acc": accuracy(forget_logits, forget_y),
           "retain_acc": accuracy(retain_logits, retain_y),
           "test_acc": accuracy(test_logits, test_y)}
    if len(forget_y) and len(test_y):
        out["mia_auc"] = mia_auc(sample_losses(forget_logits, forget_y),
                                 sample_losses(test_logits, test_y))
        out["mia_efficacy"] = mia_efficacy(true_class_confidence(retain_logits, retain_y),
                                           true_class_confidence(test_logits, test_y),
                                           true_class_confidence(forget_logits, forget_y), seed)
    return out


def forget_step_metrics(predict, stream, index: int, device, stats: dict | None = None,
                        serve_s: float | None = None, model=None,
                        max_samples: int = MAX_SAMPLES, seed: int = 0) -> dict[str, float]:
    """The ``unlearn/...`` metrics after the forget experience at stream step ``index``.

    predict: (x, task_ids) -> logits of the served model; stats: the method's own numbers
    (``serve_s``, ``retrain_samples``, ...; see ``unlearn_stats()`` of the exact methods);
    serve_s: the runner's timing of the request, used when the method reports none.
    """
    from lethe.scenarios.forget import forgotten_until, train_pool
    from lethe.scenarios.types import LEARN

    pool = train_pool(stream)
    n_learned = sum(1 for e in stream.experiences if e.kind == LEARN and e.index < index)
    forgotten = torch.isin(pool.ids, forgotten_until(stream, index))
    retain_idx = ((pool.exp < n_learned) & ~forgotten).nonzero().flatten()
    forget_idx = forgotten.nonzero().flatten()
    test = stream.test
    test_idx = (test.exp < n_learned).nonzero().flatten()
    retain_idx = retain_idx[_subsample(len(retain_idx), max_samples, seed)]
    test_idx = test_idx[_subsample(len(test_idx), max_samples, seed + 1)]

    was_training = model.training if model is not None else False
    if model is not None:
        model.eval()
    try:
        sets = {}
        for name, data, idx in (("forget", pool, forget_idx), ("retain", pool, retain_idx),
                                ("test", test, test_idx)):
            sets[name] = (logits_of(predict, data.x[idx], data.task[idx], device), data.y[idx].long())
    finally:
        if model is not None and was_training:
            model.train()
    out = quality(*sets["forget"], *sets["retain"], *sets["test"], seed=seed)
    out["n_forgotten"] = float(len(forget_idx))
    stats = dict(stats or {})
    if "serve_s" not in stats and serve_s is not None:
        stats["serve_s"] = serve_s
    out.update({k: float(v) for k, v in stats.items()})
    return {f"unlearn/{k}": v for k, v in out.items()}


def write_csv(history: dict[str, list[tuple[int, float]]], path: str | Path) -> Path:
    """One row per step, one column per key: ``history[key] = [(step, value), ...]``."""
    steps = sorted({s for rows in history.values() for s, _ in rows})
    keys = sorted(history)
    table = {s: {} for s in steps}
    for k, rows in history.items():
        for s, v in rows:
            table[s][k] = v
    path = Path(path)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["step", *keys])
        for s in steps:
            w.writerow([s, *(table[s].get(k, "") for k in keys)])
    return path
