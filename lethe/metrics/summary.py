"""The metric keys logged at each step, derived from the prediction store (DESIGN.md keys)."""
from __future__ import annotations

import torch

from lethe.metrics import cl, flips


def learn_rows(labels: list[str]) -> list[int]:
    """Store rows that follow a learn experience (labels 'learn:<i>')."""
    return [r for r, lab in enumerate(labels) if lab.startswith("learn:")]


def step_metrics(store, n_learned: int) -> dict[str, float]:
    """Metrics after the newest evaluation point of the store.

    n_learned: learn experiences served so far (the seen test experiences are 0..n_learned-1).
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
    if rows and n_learned >= 1:
        R = R_all[rows]
        i = len(rows) - 1
        out["forgetting/avg"] = cl.forgetting(R, min(i, E - 1)) if i < E else _forgetting_late(R, i, E)
        out["bwt"] = cl.bwt(R, min(i, E - 1)) if i < E else cl.bwt(R[: E], E - 1)
        if "init" in store.labels:
            b = R_all[store.labels.index("init")]
            out["fwt"] = cl.fwt(R, b, min(i, E - 1))
    if len(store) >= 2:
        f = flips.flip_stats(preds[-2], preds[-1], store.targets)
        out.update({"nfr/prev": f["nfr"], "pfr/prev": f["pfr"], "nfi/prev": f["nfi"]})
    return out


def _forgetting_late(R: torch.Tensor, i: int, E: int) -> float:
    """Chaudhry forgetting when more learn steps than test experiences (e.g. a repeated
    domain): best earlier accuracy minus the current one, over all experiences."""
    best = R[:i].max(dim=0).values
    return float((best - R[i]).mean())
