"""The engine's loops outside Avalanche's template, and the optimizer factory every method shares.

:func:`fit` is the one loop of every method-specific training stage (the exact methods'
stages, LLM unlearning, CLR's anchor pre-training, MOS's classifier alignment, ConPET's
selector): mini-batches through the engine (precision, accumulation, clipping), an optional
``train.lr_schedule`` per optimizer step, and the non-finite loss check. :func:`train_loop`
is the exact methods' seeded tensor loop on top of it: batch order and dropout come from its
``seed`` only, inside ``fork_rng``, so a stage retrained later (or in a fresh process) repeats
bit for bit. Exact unlearning (retrain, SISA, S3T) and the retain-only reference model of the
TOFU metrics train with it.
"""
from __future__ import annotations

from typing import Callable, Sequence

from lethe.errors import RunError


def make_optimizer(params, train):
    import torch

    params = [p for p in params if p.requires_grad]
    if train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=train.lr, momentum=train.momentum,
                               weight_decay=train.weight_decay)
    if train.optimizer == "adam":
        return torch.optim.Adam(params, lr=train.lr, weight_decay=train.weight_decay)
    return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)


def train_loop(model, names: list[str], x, y, train, epochs: int, seed: int, label: str,
               freeze_norms: bool = False, engine=None) -> int:
    """Train the parameters ``names`` of ``model`` on (x, y) for ``epochs`` with the
    optimizer of ``train`` (a TrainConfig) through the training engine (``engine``, or one
    built from ``train``: precision, accumulation, clipping); batch order and dropout come from
    ``seed`` only (inside ``fork_rng``: the caller's RNG streams are untouched). Returns
    samples × epochs."""
    import torch
    import torch.nn.functional as F

    from lethe.engine.engine import Engine
    from lethe.models.lora import freeze_norm_stats

    n = len(y)
    if n == 0 or not names or epochs < 1:
        return 0
    device = x.device
    params = dict(model.named_parameters())
    flags = {k: p.requires_grad for k, p in params.items()}
    chosen = set(names)
    for k, p in params.items():
        p.requires_grad_(k in chosen)
    forked = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=forked):
            torch.manual_seed(seed)          # dropout; restored on exit
            gen = torch.Generator().manual_seed(seed)
            engine = engine or Engine(train, device)
            opt = make_optimizer([params[k] for k in names], train)
            model.train()
            if freeze_norms:
                freeze_norm_stats(model)
            bs = int(train.batch_size)
            order = lambda epoch: torch.randperm(n, generator=gen).to(device).split(bs)  # noqa: E731
            fit(engine, model, opt, epochs, order,
                lambda idx: F.cross_entropy(model(engine.convert_input(x[idx])), y[idx]), label,
                lr_schedule=train.lr_schedule, base_lr=train.lr)
    finally:
        model.eval()
        for k, p in params.items():
            p.requires_grad_(flags[k])
    return n * epochs


def fit(engine, model, optimizer, epochs: int, batches: Callable[[int], Sequence], loss_fn,
        label: str, lr_schedule=None, base_lr: float | None = None,
        on_step: Callable[[int], bool] | None = None,
        after_epoch: Callable[[int, object], None] | None = None) -> int:
    """Train for ``epochs``; returns the number of optimizer steps.

    batches(epoch): the epoch's mini-batches (a sequence: its length plans the accumulation
    windows); loss_fn(batch): the loss, computed under the engine's autocast. lr_schedule: a
    ``train.lr_schedule`` node (None or ``none``: the optimizer's lr stays), stepped per optimizer
    step from ``base_lr``, restarting at every call. on_step(steps) after each optimizer step:
    True stops early. The losses are summed on the device and checked at each epoch's end (no
    host sync per step): a non-finite sum raises RunError naming ``label`` and the epoch.
    after_epoch(epoch, summed_loss) at each epoch's end (e.g. an epoch-wise scheduler, a log line).
    """
    import torch

    scheduled = lr_schedule is not None and lr_schedule.name != "none"
    # a schedule needs the total number of steps up front: plan every epoch's batches first
    plans = [batches(e) for e in range(epochs)] if scheduled else None
    lr_at = _schedule(lr_schedule, base_lr, optimizer, plans, engine.accum)
    optimizer.zero_grad(set_to_none=True)
    steps = 0
    for epoch in range(epochs):
        epoch_batches = plans[epoch] if plans is not None else batches(epoch)
        engine.begin_epoch(len(epoch_batches))
        total = None
        for batch in epoch_batches:
            if lr_at is not None and engine.window_starts():
                lr_at(steps)
            with engine.autocast():
                loss = loss_fn(batch)
            engine.backward(loss)
            total = loss.detach().float() if total is None else total + loss.detach().float()
            if engine.step(optimizer, model):
                steps += 1
                if on_step is not None and on_step(steps):
                    return steps
        if total is not None and not torch.isfinite(total):
            raise RunError(f"non-finite training loss in {label}, epoch {epoch + 1}: "
                           f"lower the learning rate or check the inputs")
        if after_epoch is not None:
            after_epoch(epoch, total)
    return steps


def _schedule(cfg, base_lr, optimizer, plans, accum: int):
    """A function step → sets the lr of every parameter group (keeping their ratio to base_lr)."""
    from lethe.engine.schedules import experience_schedule

    if not plans:
        return None
    per_epoch = -(-len(plans[0]) // accum)
    fn = experience_schedule(cfg, float(base_lr), sum(-(-len(p) // accum) for p in plans), True,
                             steps_per_epoch=per_epoch)
    scales = [g["lr"] / float(base_lr) for g in optimizer.param_groups]

    def set_lr(step: int) -> None:
        lr = fn(step)
        for g, scale in zip(optimizer.param_groups, scales):
            g["lr"] = lr * scale

    return set_lr
