"""Image folders: one subfolder per class, split by class into experiences."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from lethe.errors import ConfigError
from lethe.registry import register_scenario


@dataclass
class ImageFolderConfig:
    root: str = field(default="???", metadata={"path": True})  # <root>/<class>/<image>
    test_root: Optional[str] = field(default=None, metadata={"path": True})  # else split root
    n_experiences: int = 2
    task_labels: bool = False
    shuffle_classes: bool = True
    class_seed: int = 0
    test_fraction: float = 0.2
    image_size: int = 32          # images are resized to image_size x image_size
    grayscale: bool = False
    forget_requests: list = field(default_factory=list)  # deletion requests (scenarios/forget.py)


def _load_folder(root: str, size: int, grayscale: bool):
    import torch
    from torchvision import datasets, transforms

    tf = [transforms.Resize((size, size))]
    if grayscale:
        tf.append(transforms.Grayscale())
    tf.append(transforms.ToTensor())
    try:
        ds = datasets.ImageFolder(root, transform=transforms.Compose(tf))
    except (FileNotFoundError, RuntimeError) as exc:
        raise ConfigError(f"scenario.root: cannot read an image folder at '{root}': {exc} "
                          f"(expected <root>/<class name>/<image files>)") from None
    loader = torch.utils.data.DataLoader(ds, batch_size=256, shuffle=False)
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys), ds.classes


@register_scenario("image_folder", config=ImageFolderConfig,
                   settings=("class_incremental", "task_incremental"))
def image_folder(cfg, seed: int):
    """Images in class subfolders (torchvision ImageFolder), split by class into experiences."""
    import torch

    from lethe.scenarios.streams import (
        class_incremental_stream,
        seeded_class_order,
        split_classes,
        stratified_split,
    )

    x, y, classes = _load_folder(cfg.root, cfg.image_size, cfg.grayscale)
    ids = torch.arange(len(y))               # position in the sorted file list of root
    if cfg.test_root:
        tx, ty, tclasses = _load_folder(cfg.test_root, cfg.image_size, cfg.grayscale)
        if tclasses != classes:
            raise ConfigError(f"scenario.test_root: class folders {tclasses} differ from "
                              f"scenario.root's {classes}")
        train, test = (x, y, ids), (tx, ty, len(y) + torch.arange(len(ty)))
    else:
        tr, te = stratified_split(y.numpy(), cfg.test_fraction, cfg.class_seed)
        tr, te = torch.as_tensor(tr), torch.as_tensor(te)
        train, test = (x[tr], y[tr], ids[tr]), (x[te], y[te], ids[te])
    order = seeded_class_order(len(classes), cfg.class_seed, cfg.shuffle_classes)
    return class_incremental_stream(train, test, split_classes(order, cfg.n_experiences),
                                    task_labels=cfg.task_labels, input_shape=tuple(x.shape[1:]),
                                    n_classes=len(classes))
