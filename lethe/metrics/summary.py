"""The metric keys logged at each step, derived from the prediction store (see docs/metrics.md)."""
from __future__ import annotations

import torch

from lethe.metrics import cl, flips


def learn_rows(labels: list[str]) -> list[int]:
    """Store rows that follow a learn experience (labels 'learn:<i>')."""
    return [r for r, lab in enumerate(labels) if lab.startswith("learn:")]


def incremental_accuracy(store, rows: list[int], n_learned: int) -> dict[str, float]:
    """``acc/last``: sample-weighted accuracy of the newest point on every seen experience's
    test data; ``acc/avg_incremental``: the mean of that accuracy after each learn step so far
    (the t-th learn row saw experiences 0..t), PyCIL / PILOT's "average incremental
    accuracy". Forget / update rows are not incremental steps: they enter acc/last only."""
    E = store.n_experiences
    last = len(store) - 1
    idx = rows + ([] if rows and rows[-1] == last else [last])
    n_seen = [t + 1 for t in range(len(rows))] + ([] if len(idx) == len(rows) else [max(1, n_learned)])
    acc = cl.seen_accuracy(store.preds[idx], store.targets, store.exp, E,
                           torch.tensor(n_seen, dtype=torch.long))
    out = {"acc/last": float(acc[-1])}
    if rows:
        out["acc/avg_incremental"] = float(acc[:len(rows)].mean())
    return out


def step_metrics(store, n_learned: int) -> dict[str, float]:
    """Metrics after the newest evaluation point of the store.

    n_learned: learn experiences served so far (the seen test experiences are 0..n_learned-1).
    Forgetting and BWT compare the newest point with the points after each learn
    experience. When the newest point follows a forget/update experience it is the current
    row after all learn rows, so forgetting/BWT cover every seen experience (the last one
    learned included: the forget step may have changed it). FWT only depends on learn rows.
    """
    preds = store.preds
    E = store.n_experiences
    R_all = cl.accuracy_matrix(preds, store.targets, store.exp, E)
    cur = R_all[-1]
    out = {f"acc/exp_{j}": float(cur[j]) for j in range(E)}
    seen = max(1, min(n_learned, E))
    out["acc/avg_seen"] = float(cur[:seen].mean())
    out["acc/avg_all"] = float(cur.mean())
    rows = learn_rows(store.labels)
    out.update(incremental_accuracy(store, rows, n_learned))
    if rows and n_learned >= 1:
        last = len(store) - 1
        hist = rows if rows[-1] == last else rows + [last]
        R = R_all[hist]
        i = len(hist) - 1
        out["forgetting/avg"] = cl.forgetting(R, i)
        out["bwt"] = cl.bwt(R, i)
        if "init" in store.labels:
            b = R_all[store.labels.index("init")]
            out["fwt"] = cl.fwt(R_all[rows], b, len(rows) - 1)
    if len(store) >= 2:
        f = flips.flip_stats(preds[-2], preds[-1], store.targets)
        out.update({"nfr/prev": f["nfr"], "pfr/prev": f["pfr"], "nfi/prev": f["nfi"]})
    return out
