"""The deterministic tensor training loop and the optimizer factory every method shares.

:func:`train_loop` trains on tensors already on the device: batch order and dropout come from
its ``seed`` only, inside ``fork_rng``, so a stage retrained later (or in a fresh process)
repeats bit for bit. Exact unlearning (retrain, SISA, S3T) and the retain-only reference model
of the TOFU metrics train with it.
"""
from __future__ import annotations

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
               freeze_norms: bool = False) -> int:
    """Train the parameters ``names`` of ``model`` on (x, y) for ``epochs`` with the
    optimizer of ``train`` (a TrainConfig); batch order and dropout come from ``seed`` only
    (inside ``fork_rng``: the caller's RNG streams are untouched). Returns samples × epochs."""
    import torch
    import torch.nn.functional as F

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
            opt = make_optimizer([params[k] for k in names], train)
            model.train()
            if freeze_norms:
                freeze_norm_stats(model)
            bs = int(train.batch_size)
            for epoch in range(epochs):
                perm = torch.randperm(n, generator=gen).to(device)
                total = torch.zeros((), device=device)
                for s in range(0, n, bs):
                    idx = perm[s:s + bs]
                    loss = F.cross_entropy(model(x[idx]), y[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += loss.detach()
                if not torch.isfinite(total):
                    raise RunError(f"non-finite training loss in {label}, epoch {epoch + 1}: "
                                   f"lower train.lr or check the inputs")
    finally:
        model.eval()
        for k, p in params.items():
            p.requires_grad_(flags[k])
    return n * epochs
