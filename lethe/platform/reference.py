"""The retain-only reference model of TOFU's forget quality and MUSE's PrivLeak.

The QA evaluator compares the evaluated model with a model that never saw the forget set: the
run's model trained from the same initialisation seed on the retain rows with the run's train
settings, by the exact methods' seeded loop (lethe/engine/loop.py ``train_loop``). The runner
owns it (training is not a metric) and hands the evaluator a callable; the cache belongs to
the caller, so a benchmark that runs several methods on one config trains it once.

``scenario.retain_model_path`` loads a published retain-only model instead (e.g. TOFU's
retain90 fine-tune): a model fine-tuned on all of TOFU has already seen the forget set, so a
reference trained from that checkpoint would have seen it too and forget quality would mean
nothing.
"""
from __future__ import annotations


def retain_rows(stream):
    """Training rows of the retain set (every learned row outside the deletion request)."""
    import torch

    pool = stream.train
    keep = ~torch.isin(pool.ids, stream.qa.forget_ids)
    return pool.x[keep], pool.y[keep]


def reference_key(cfg) -> str:
    """What the reference depends on: scenario, model, train settings and seed."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml({"s": cfg.scenario, "m": cfg.model, "t": cfg.train, "seed": cfg.seed})


def train_retain_model(cfg, stream, device, cache: dict | None = None):
    """The retain-only model for ``cfg``; reused from ``cache`` (keyed by :func:`reference_key`)
    when the caller passes one."""
    import torch

    from lethe import registry
    from lethe.engine.loop import train_loop
    from lethe.models.vision import ModelInfo

    key = reference_key(cfg)
    if cache is not None and key in cache:
        return cache[key]
    path = cfg.scenario.get("retain_model_path", "") if hasattr(cfg.scenario, "get") else ""
    if path:
        model = load_retain_model(cfg, stream, device, path)
        if cache is not None:
            cache[key] = model
        return model
    # its own RNG streams: the run's results must not depend on whether the reference was
    # trained in this process already (benchmarks share it) or after a resume
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        model = registry.get("models", cfg.model.name).obj(
            cfg.model, ModelInfo(input_shape=stream.input_shape, n_classes=stream.n_classes)).to(device)
    x, y = retain_rows(stream)
    train_loop(model, [n for n, _ in model.named_parameters()], x.to(device), y.to(device), cfg.train,
               cfg.train.epochs, cfg.seed, "the retain-only reference model")
    if cache is not None:
        cache[key] = model
    return model


def load_retain_model(cfg, stream, device, path: str):
    """The run's model class with its weights from the local folder ``path`` (a causal LM
    fine-tuned on the retain split only), in eval mode on ``device``."""
    from omegaconf import OmegaConf

    from lethe import registry
    from lethe.errors import ConfigError
    from lethe.models.vision import ModelInfo

    if "path" not in cfg.model:
        raise ConfigError(f"scenario.retain_model_path: model '{cfg.model.name}' loads no local "
                          f"checkpoint; use model.name=hf_causal_lm (or leave retain_model_path empty "
                          f"to train the retain-only model)")
    model_cfg = OmegaConf.merge(cfg.model, {"path": path})
    info = ModelInfo(input_shape=stream.input_shape, n_classes=stream.n_classes)
    try:
        model = registry.get("models", cfg.model.name).obj(model_cfg, info)
    except ConfigError as exc:   # the model's message names model.path: this is the other key
        raise ConfigError(str(exc).replace("model.path", "scenario.retain_model_path", 1)) from None
    return model.to(device).eval()


__all__ = ["retain_rows", "reference_key", "train_retain_model", "load_retain_model"]
