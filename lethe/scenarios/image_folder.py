"""Image folders: one subfolder per class, split by class into experiences.

Training images are decoded per item, through the train pipeline, when an experience is
iterated (nothing is held in memory up front). The test split is decoded once through the
eval pipeline into lethe's test tensors (the evaluator scores preloaded tensors).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from lethe.errors import ConfigError
from lethe.registry import register_scenario
from lethe.scenarios.transforms import check_config


@dataclass
class ImageFolderConfig:
    root: str = field(default="???", metadata={"path": True})  # <root>/<class>/<image>
    test_root: Optional[str] = field(default=None, metadata={"path": True})  # else split root
    n_experiences: int = 2
    task_labels: bool = False
    shuffle_classes: bool = True
    class_seed: int = 0
    test_fraction: float = 0.2
    image_size: int = 32          # without transforms: images are resized to image_size²
    grayscale: bool = False
    forget_requests: list = field(default_factory=list)  # deletion requests (scenarios/forget.py)
    # train/eval pipelines: a recipe (pilot | imagenet | cifar | cifar10) or torchvision
    # transforms by name (lethe/scenarios/transforms.py); None = Resize(image_size) + ToTensor
    transforms: Any = None
    # pilot | pilot:SEED | [ids]: overrides the class_seed order (scenarios/transforms.py)
    class_order: Any = None


class _Files:
    """A torch Dataset over (path, label) pairs, decoding one image per item (no transform:
    the Avalanche dataset around it applies the train or eval pipeline). ``mode`` is the PIL
    mode images are converted to: RGB as torchvision's ImageFolder loader, or L."""

    def __init__(self, samples, mode: str = "RGB"):
        self.samples, self.mode = list(samples), mode

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        from PIL import Image

        path, label = self.samples[i]
        with open(path, "rb") as fh:     # as torchvision's pil_loader: no open file left behind
            image = Image.open(fh)
            return image.convert(self.mode), label


def _scan(root: str):
    """(path, label) pairs and class names in ImageFolder's sorted order; nothing decoded."""
    from torchvision import datasets

    try:
        ds = datasets.ImageFolder(root)
    except (FileNotFoundError, RuntimeError) as exc:
        raise ConfigError(f"scenario.root: cannot read an image folder at '{root}': {exc} "
                          f"(expected <root>/<class name>/<image files>)") from None
    return ds.samples, ds.classes


def _mode(cfg) -> str:
    """PIL mode at load time. Without scenario.transforms images load as RGB and the default
    pipeline converts to grayscale after the resize (the former eager loading, bit for bit);
    a user pipeline of a grayscale folder gets 1-channel images to start from."""
    return "L" if cfg.grayscale and cfg.transforms is not None else "RGB"


def _pipelines(cfg):
    """(train, eval) transforms; without scenario.transforms the former eager loading's
    Resize((size, size)) [+ Grayscale] + ToTensor for both, so results stay unchanged."""
    from torchvision import transforms as T

    from lethe.scenarios.transforms import build

    default = [T.Resize((cfg.image_size, cfg.image_size))]
    if cfg.grayscale:
        default.append(T.Grayscale())
    default = T.Compose(default + [T.ToTensor()])
    train, eval_ = build(cfg.transforms)
    return train or default, eval_ or default


def _dataset(samples, rows, ids, task: int, mode: str, train_tf, eval_tf):
    """An Avalanche classification dataset over ``rows`` of ``samples`` with sample ids."""
    import torch
    from avalanche.benchmarks.utils import (
        DataAttribute,
        TaskAwareSupervisedClassificationDataset,
        _make_taskaware_classification_dataset,
    )

    files = _Files([samples[int(r)] for r in rows], mode)
    base = _make_taskaware_classification_dataset(
        files, transform_groups={"train": (train_tf, None), "eval": (eval_tf, None)},
        initial_transform_group="train", task_labels=int(task),
        targets=[label for _, label in files.samples])
    ids = torch.as_tensor(ids, dtype=torch.long).tolist()
    return TaskAwareSupervisedClassificationDataset(
        [base], data_attributes=[DataAttribute(ids, "sample_id")])


def _test_tensors(samples, rows, mode: str, eval_tf):
    import torch

    files = _Files([samples[int(r)] for r in rows], mode)
    xs = [eval_tf(files[i][0]) for i in range(len(files))]
    if not xs:
        raise ConfigError("scenario.test_fraction: the test split is empty; raise it or give "
                          "scenario.test_root")
    return torch.stack(xs)


def _stream(cfg, train, test, groups, n_classes: int):
    """train: (samples, rows, ids, labels); test: (samples, rows, ids, labels) → a Stream."""
    import torch
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.benchmarks.scenarios.supervised import with_classes_timeline
    from avalanche.benchmarks.scenarios.task_aware import with_task_labels

    from lethe.scenarios.types import LEARN, Experience, Stream, TestSet

    train_tf, eval_tf = _pipelines(cfg)
    tx = _test_tensors(test[0], test[1], _mode(cfg), eval_tf)
    train_sets, test_sets, parts = [], [], []
    for e, classes in enumerate(groups):
        task = e if cfg.task_labels else 0
        sel = torch.isin(train[3], torch.tensor(classes)).nonzero().flatten()
        train_sets.append(_dataset(train[0], train[1][sel], train[2][sel], task, _mode(cfg),
                                   train_tf, eval_tf))
        tsel = torch.isin(test[3], torch.tensor(classes)).nonzero().flatten()
        parts.append((tx[tsel], test[3][tsel], test[2][tsel], e, task))
        test_sets.append(_dataset(test[0], test[1][tsel], test[2][tsel], task, _mode(cfg),
                                  eval_tf, eval_tf))
    bm = with_classes_timeline(with_task_labels(benchmark_from_datasets(train=train_sets,
                                                                        test=test_sets)))
    tensors = TestSet(
        x=torch.cat([p[0] for p in parts]), y=torch.cat([p[1] for p in parts]).long(),
        exp=torch.cat([torch.full((len(p[1]),), p[3], dtype=torch.long) for p in parts]),
        task=torch.cat([torch.full((len(p[1]),), p[4], dtype=torch.long) for p in parts]),
        ids=torch.cat([p[2] for p in parts]).long())
    experiences = [Experience(index=i, kind=LEARN, train=exp) for i, exp in enumerate(bm.train_stream)]
    # stream.train stays None: the training pool is decoded on demand (scenarios/forget.py)
    return Stream(experiences=experiences, benchmark=bm, test=tensors,
                  input_shape=tuple(tx.shape[1:]), n_classes=n_classes,
                  setting="task_incremental" if cfg.task_labels else "class_incremental",
                  class_order=[c for g in groups for c in g])


@register_scenario("image_folder", config=ImageFolderConfig,
                   settings=("class_incremental", "task_incremental"), check=check_config)
def image_folder(cfg, seed: int):
    """Images in class subfolders (torchvision ImageFolder), split by class into experiences."""
    import torch

    from lethe.scenarios.streams import (
        seeded_class_order,
        split_classes,
        stratified_split,
    )
    from lethe.scenarios.transforms import class_order

    samples, classes = _scan(cfg.root)
    y = torch.tensor([label for _, label in samples], dtype=torch.long)
    ids = torch.arange(len(y))               # position in the sorted file list of root
    if cfg.test_root:
        tsamples, tclasses = _scan(cfg.test_root)
        if tclasses != classes:
            raise ConfigError(f"scenario.test_root: class folders {tclasses} differ from "
                              f"scenario.root's {classes}")
        ty = torch.tensor([label for _, label in tsamples], dtype=torch.long)
        train = (samples, ids, ids, y)
        test = (tsamples, torch.arange(len(ty)), len(y) + torch.arange(len(ty)), ty)
    else:
        tr, te = stratified_split(y.numpy(), cfg.test_fraction, cfg.class_seed)
        tr, te = torch.as_tensor(tr), torch.as_tensor(te)
        train, test = (samples, tr, ids[tr], y[tr]), (samples, te, ids[te], y[te])
    order = class_order(cfg.class_order, len(classes)) or \
        seeded_class_order(len(classes), cfg.class_seed, cfg.shuffle_classes)
    return _stream(cfg, train, test, split_classes(order, cfg.n_experiences), len(classes))


def write_digit_pngs(root, per_class: int | None = None, scale: int = 1) -> int:
    """scikit-learn's 8x8 digits as an image folder ``<root>/<digit>/<i>.png`` (the input of
    the paper presets' CPU twins, lethe/conf/paper/tiny/); ``scale`` enlarges them (nearest).
    Returns the number of files written."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from lethe.scenarios.splits import load_digits

    (images, target), root, n = load_digits(), Path(root), 0
    for c in range(10):
        (root / str(c)).mkdir(parents=True, exist_ok=True)
        rows = np.flatnonzero(target == c)[:per_class]
        for i, r in enumerate(rows):
            pixels = (images[r] * (255 / 16)).round().astype(np.uint8)
            Image.fromarray(pixels.repeat(scale, 0).repeat(scale, 1)).save(root / str(c) / f"{i}.png")
            n += 1
    return n


if __name__ == "__main__":   # python -m lethe.scenarios.image_folder DIR [PER_CLASS]
    import sys

    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python -m lethe.scenarios.image_folder DIR [PER_CLASS]")
    count = write_digit_pngs(sys.argv[1], int(sys.argv[2]) if len(sys.argv) == 3 else None)
    print(f"wrote {count} digit images under {sys.argv[1]}")
