"""Artifacts of a run: accuracy matrix CSV/PNG, flip matrix CSV, lr schedule PNG, summary.

Each artifact has a builder (a ``Figure`` or CSV text, for ``Tracker.log_figure`` /
``Tracker.log_text``, which need no temp file) and a ``write_*`` form that saves it to a path.
Plots use matplotlib's object API (``Figure``), never ``pyplot``: no process-wide backend switch
and no global figure registry left behind in a caller's process.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

import torch

from lethe.metrics import cl, flips

DPI = 110


def accuracy_table(store) -> tuple[list[str], torch.Tensor]:
    R = cl.accuracy_matrix(store.preds, store.targets, store.exp, store.n_experiences)
    return list(store.labels), R.cpu()


def _csv_text(header: list[str], labels: list[str], rows: list[list[float]]) -> str:
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(header)
    for lab, row in zip(labels, rows):
        w.writerow([lab] + [f"{v:.6f}" for v in row])
    return buf.getvalue()


def accuracy_csv(store) -> str:
    labels, R = accuracy_table(store)
    return _csv_text(["eval_point"] + [f"exp_{j}" for j in range(R.shape[1])], labels, R.tolist())


def flip_csv(store) -> str:
    M = flips.nfr_matrix(store.preds, store.targets).cpu()
    return _csv_text(["nfr(row→col)"] + list(store.labels), list(store.labels), M.tolist())


def accuracy_figure(store, title: str):
    """Heat map of the accuracy matrix (rows: evaluated after; columns: test experience)."""
    from matplotlib.figure import Figure

    labels, R = accuracy_table(store)
    fig = Figure(figsize=(1.0 + 0.6 * R.shape[1], 1.0 + 0.45 * len(labels)))
    ax = fig.subplots()
    im = ax.imshow(R.numpy(), vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(R.shape[1]), [f"exp {j}" for j in range(R.shape[1])], rotation=45)
    ax.set_yticks(range(len(labels)), labels)
    for (i, j), v in _cells(R):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                color="white" if v < 0.5 else "black")
    ax.set_xlabel("test experience")
    ax.set_ylabel("evaluated after")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def schedule_figure(steps, lrs, title: str, boundaries=()):
    """The learning rate per training step (the ``lr_schedule.png`` artifact)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3))
    ax = fig.subplots()
    ax.plot(list(steps), list(lrs), lw=1.2)
    for b in boundaries:
        ax.axvline(b, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("training step")
    ax.set_ylabel("learning rate")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def _cells(R: torch.Tensor):
    for i in range(R.shape[0]):
        for j in range(R.shape[1]):
            yield (i, j), float(R[i, j])


def write_accuracy_csv(store, path: Path) -> None:
    Path(path).write_text(accuracy_csv(store), newline="")


def write_flip_csv(store, path: Path) -> None:
    Path(path).write_text(flip_csv(store), newline="")


def write_accuracy_png(store, path: Path, title: str) -> None:
    accuracy_figure(store, title).savefig(path, dpi=DPI)


def write_schedule_png(steps, lrs, path, title: str, boundaries=()) -> None:
    schedule_figure(steps, lrs, title, boundaries).savefig(path, dpi=DPI)


def summary_text(store, final: dict[str, float]) -> str:
    labels, R = accuracy_table(store)
    width = max(len(lab) for lab in labels) if labels else 10
    head = " " * width + "  " + " ".join(f"exp_{j:<3d}" for j in range(R.shape[1]))
    lines = ["accuracy matrix (rows: evaluated after; columns: test experience)", head]
    for lab, row in zip(labels, R.tolist()):
        lines.append(f"{lab:<{width}}  " + " ".join(f"{v:7.3f}" for v in row))
    keys = ["acc/avg_seen", "acc/avg_all", "forgetting/avg", "bwt", "fwt", "nfr/prev"]
    lines.append("final: " + "  ".join(f"{k}={final[k]:.4f}" for k in keys if k in final))
    return "\n".join(lines)
