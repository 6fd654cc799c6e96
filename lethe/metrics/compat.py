"""Negative-flip reports of model updates, derived from the prediction store.

A model version is a store row labelled ``update:<i>``; version k is the k-th such row.
Per-step keys (:func:`update_metrics`), logged after every update experience:
  nfr/prev, pfr/prev, nfi/prev, rel_nfr/prev   the new version vs the previous version
  nfr/v<k>, pfr/v<k>, nfi/v<k>, rel_nfr/v<k>   the new version vs every earlier version k
  acc/version                                  accuracy of the new version on the test set
  acc/gain_prev, acc/gain_v<k>                 its accuracy minus the older version's
so a lower NFR is always logged next to what it cost in accuracy. The rates themselves come
from :mod:`lethe.metrics.flips`; this module only picks the rows and writes the reports:
per-class negative flips and the flip confusion matrix (old prediction → new prediction of
the negatively flipped samples) as CSV + PNG.
"""
from __future__ import annotations

import csv
from pathlib import Path

import torch

from lethe.metrics import flips

PREFIX = "update:"


def version_rows(labels: list[str]) -> list[int]:
    """Store rows that hold a model version (labels 'update:<i>'), in version order."""
    return [r for r, lab in enumerate(labels) if lab.startswith(PREFIX)]


def accuracy(pred: torch.Tensor, targets: torch.Tensor) -> float:
    return float((pred == targets.to(pred.device)).to(torch.float64).mean()) if len(targets) else 0.0


def update_metrics(store) -> dict[str, float]:
    """Flip and accuracy-gain keys of the newest version vs all earlier versions.

    Empty unless the newest store row is a version and an earlier version exists.
    """
    rows = version_rows(store.labels)
    if len(rows) < 2 or rows[-1] != len(store) - 1:
        return {}
    preds, y = store.preds, store.targets
    new = preds[rows[-1]]
    acc_new = accuracy(new, y)
    out = {"acc/version": acc_new}
    for k, r in enumerate(rows[:-1]):
        f = flips.flip_stats(preds[r], new, y)
        gain = acc_new - accuracy(preds[r], y)
        names = [f"v{k}"] + (["prev"] if k == len(rows) - 2 else [])
        for name in names:
            out.update({f"nfr/{name}": f["nfr"], f"pfr/{name}": f["pfr"], f"nfi/{name}": f["nfi"],
                        f"rel_nfr/{name}": f["rel_nfr"], f"acc/gain_{name}": gain})
    return out


def per_class_flips(old: torch.Tensor, new: torch.Tensor, targets: torch.Tensor,
                    n_classes: int) -> list[dict]:
    """One row per true class: samples, both accuracies, negative/positive flips (counts and
    within-class rates), NFI and relative NFR (from :func:`flips.flip_stats_per_group`)."""
    y = targets.to(new.device)
    per = flips.flip_stats_per_group(old, new, y, y, n_classes)
    n = torch.bincount(y, minlength=n_classes).cpu()
    old_ok = torch.bincount(y, weights=(old.to(y.device) == y).double(), minlength=n_classes).cpu()
    new_ok = torch.bincount(y, weights=(new == y).double(), minlength=n_classes).cpu()
    rows = []
    for c in range(n_classes):
        size = int(n[c])
        rows.append({"class": c, "n": size,
                     "acc_old": float(old_ok[c]) / size if size else 0.0,
                     "acc_new": float(new_ok[c]) / size if size else 0.0,
                     "neg_flips": int(round(float(per["nfr"][c]) * size)),
                     "pos_flips": int(round(float(per["pfr"][c]) * size)),
                     "nfr": float(per["nfr"][c]), "pfr": float(per["pfr"][c]),
                     "nfi": float(per["nfi"][c]), "rel_nfr": float(per["rel_nfr"][c])})
    return rows


def flip_confusion(old: torch.Tensor, new: torch.Tensor, targets: torch.Tensor,
                   n_classes: int) -> torch.Tensor:
    """[C, C] int64 counts over the negatively flipped samples: row = old prediction (the
    true class, since the old version was right), column = new (wrong) prediction."""
    y = targets.to(new.device)
    old = old.to(new.device)
    neg = (old == y) & (new != y)
    idx = old[neg] * n_classes + new[neg]
    return torch.bincount(idx, minlength=n_classes * n_classes).reshape(n_classes, n_classes).cpu()


def _pairs(store) -> list[tuple[int, int, int, int]]:
    """(old version, new version, old row, new row) of every consecutive update."""
    rows = version_rows(store.labels)
    return [(k, k + 1, rows[k], rows[k + 1]) for k in range(len(rows) - 1)]


def write_update_reports(store, folder: Path, title: str) -> list[str]:
    """Per consecutive version pair: per-class flips CSV, flip confusion CSV + PNG; and one
    table of every version vs its predecessor. Returns the file names written."""
    folder = Path(folder)
    pairs = _pairs(store)
    if not pairs:
        return []
    preds, y, C = store.preds, store.targets, store.n_classes
    files = []
    with open(folder / "update_versions.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["version", "eval_point", "acc", "acc_gain_prev", "nfr_prev", "pfr_prev",
                    "nfi_prev", "rel_nfr_prev"])
        rows = version_rows(store.labels)
        w.writerow([0, store.labels[rows[0]], f"{accuracy(preds[rows[0]], y):.6f}", "", "", "", "", ""])
        for a, b, ra, rb in pairs:
            f = flips.flip_stats(preds[ra], preds[rb], y)
            acc_b = accuracy(preds[rb], y)
            w.writerow([b, store.labels[rb], f"{acc_b:.6f}", f"{acc_b - accuracy(preds[ra], y):.6f}",
                        f"{f['nfr']:.6f}", f"{f['pfr']:.6f}", f"{f['nfi']:.6f}", f"{f['rel_nfr']:.6f}"])
    files.append("update_versions.csv")
    for a, b, ra, rb in pairs:
        tag = f"v{a}_v{b}"
        table = per_class_flips(preds[ra], preds[rb], y, C)
        name = f"flips_per_class_{tag}.csv"
        with open(folder / name, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(table[0]))
            w.writeheader()
            for row in table:
                w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
        files.append(name)
        M = flip_confusion(preds[ra], preds[rb], y, C)
        name = f"flip_confusion_{tag}.csv"
        with open(folder / name, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["old_pred→new_pred"] + [f"new_{c}" for c in range(C)])
            for c, row in enumerate(M.tolist()):
                w.writerow([f"old_{c}"] + row)
        files.append(name)
        name = f"flip_confusion_{tag}.png"
        write_flip_confusion_png(M, table, folder / name, f"{title}: negative flips v{a} → v{b}")
        files.append(name)
    return files


def write_flip_confusion_png(M: torch.Tensor, table: list[dict], path: Path, title: str) -> None:
    """Confusion matrix of the negative flips beside a bar chart of flips per class."""
    from matplotlib.figure import Figure

    C = M.shape[0]
    fig = Figure(figsize=(4.0 + 0.9 * C, 1.5 + 0.4 * C))
    ax, bx = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.2, 1]})
    top = max(1, int(M.max()))
    im = ax.imshow(M.numpy(), cmap="Reds", vmin=0, vmax=top)
    ax.set_xticks(range(C), [str(c) for c in range(C)])
    ax.set_yticks(range(C), [str(c) for c in range(C)])
    for i in range(C):
        for j in range(C):
            if int(M[i, j]):
                ax.text(j, i, str(int(M[i, j])), ha="center", va="center", fontsize=7,
                        color="white" if int(M[i, j]) > 0.6 * top else "black")
    ax.set_xlabel("new prediction (wrong)")
    ax.set_ylabel("old prediction (right)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    neg = [r["neg_flips"] for r in table]
    pos = [r["pos_flips"] for r in table]
    xs = torch.arange(C).numpy()
    bx.bar(xs - 0.2, neg, width=0.4, color="tab:red", label="negative flips")
    bx.bar(xs + 0.2, pos, width=0.4, color="tab:green", label="positive flips")
    bx.set_xticks(xs, [str(c) for c in range(C)])
    bx.set_xlabel("true class")
    bx.set_ylabel("samples")
    bx.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
