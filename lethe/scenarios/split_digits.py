"""Split digits: scikit-learn's 1,797 real 8x8 handwritten digits, class-incremental."""
from __future__ import annotations

from dataclasses import dataclass, field

from lethe.registry import register_scenario


@dataclass
class SplitDigitsConfig:
    n_experiences: int = 5        # classes are split evenly (leftovers to the first experiences)
    task_labels: bool = False     # True: experience i has task label i (task-incremental)
    shuffle_classes: bool = True  # seeded class order; False keeps 0..9
    class_seed: int = 0           # seed of the class order and of the train/test split
    test_fraction: float = 0.25
    forget_requests: list = field(default_factory=list)  # deletion requests (scenarios/forget.py)
    # share of the training split held out as non-deletable public data (stream.public, in no
    # experience): what exact-unlearning methods may pretrain their frozen backbone on
    public_fraction: float = 0.0


@register_scenario("split_digits", config=SplitDigitsConfig,
                   settings=("class_incremental", "task_incremental"))
def split_digits(cfg, seed: int):
    """scikit-learn's digits (8x8, 10 classes) split by class into experiences; ships offline."""
    import torch

    from lethe.scenarios.splits import load_digits
    from lethe.scenarios.streams import (
        class_incremental_stream,
        seeded_class_order,
        split_classes,
        stratified_split,
    )

    images, target = load_digits()
    x = torch.tensor(images / 16.0, dtype=torch.float32).unsqueeze(1)  # [N, 1, 8, 8]
    y = torch.tensor(target, dtype=torch.long)
    ids = torch.arange(len(y))                    # row in load_digits(): stable across runs
    tr, te = stratified_split(target, cfg.test_fraction, cfg.class_seed)
    public = None
    if cfg.public_fraction > 0:
        from lethe.scenarios.types import TestSet

        keep, pub = stratified_split(target[tr], cfg.public_fraction, cfg.class_seed + 1)
        tr, pub = tr[keep], tr[pub]
        public = TestSet(x=x[pub], y=y[pub], exp=torch.zeros(len(pub), dtype=torch.long),
                         task=torch.zeros(len(pub), dtype=torch.long), ids=ids[pub])
    tr, te = torch.as_tensor(tr), torch.as_tensor(te)
    order = seeded_class_order(10, cfg.class_seed, cfg.shuffle_classes)
    stream = class_incremental_stream(
        (x[tr], y[tr], ids[tr]), (x[te], y[te], ids[te]), split_classes(order, cfg.n_experiences),
        task_labels=cfg.task_labels, input_shape=(1, 8, 8), n_classes=10)
    stream.public = public
    return stream
