"""Artifacts of a run: accuracy matrix CSV/PNG, flip matrix CSV, predictions, summary."""
from __future__ import annotations

import csv
from pathlib import Path

import torch

from lethe.metrics import cl, flips


def accuracy_table(store) -> tuple[list[str], torch.Tensor]:
    R = cl.accuracy_matrix(store.preds, store.targets, store.exp, store.n_experiences)
    return list(store.labels), R.cpu()


def write_accuracy_csv(store, path: Path) -> None:
    labels, R = accuracy_table(store)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["eval_point"] + [f"exp_{j}" for j in range(R.shape[1])])
        for lab, row in zip(labels, R.tolist()):
            w.writerow([lab] + [f"{v:.6f}" for v in row])


def write_accuracy_png(store, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, R = accuracy_table(store)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * R.shape[1], 1.0 + 0.45 * len(labels)))
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
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cells(R: torch.Tensor):
    for i in range(R.shape[0]):
        for j in range(R.shape[1]):
            yield (i, j), float(R[i, j])


def write_flip_csv(store, path: Path) -> None:
    M = flips.nfr_matrix(store.preds, store.targets).cpu()
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["nfr(row→col)"] + store.labels)
        for lab, row in zip(store.labels, M.tolist()):
            w.writerow([lab] + [f"{v:.6f}" for v in row])


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
