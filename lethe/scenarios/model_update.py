"""Model updates: a stream of model versions evaluated on one fixed test set.

Each experience is an ``update``: the method trains a *new version* of the model (more data,
a wider/deeper architecture or another backbone) while the previous version is the deployed
one. The evaluator keeps every version's predictions, so negative flips (NFR/PFR/NFI,
:mod:`lethe.metrics.compat`) are logged against the previous version and every earlier one.
This is the setting of Positive-Congruent Training (Yan et al., CVPR 2021: old model on
half of the data / a smaller network, new model on all of it / a bigger one) and MUSCLE
(Echterhoff et al., 2024: a base-model update under a fixed task).

The data come from any registered scenario (``source``, default ``split_digits``): the
training sets of its learn experiences are pooled, its whole test set is the fixed
evaluation set (one evaluation experience). Version k trains on the first
``fraction_k`` of a seeded permutation of the pool, so a version with a larger fraction sees
the earlier versions' data plus more.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from lethe.errors import ConfigError
from lethe.registry import register_scenario
from lethe.schema import validate_component

INITS = ("scratch", "previous")


@dataclass
class VersionSpec:
    fraction: float = 1.0         # share of the pooled training data this version trains on
    model: Any = None             # model node {name: ..., ...}; None = the previous version's
                                  # architecture (version 0: the experiment's top-level `model`)
    epochs: int = 0               # training epochs of this version; 0 = train.epochs
    init: str = "scratch"         # scratch | previous (warm start from the deployed version's
                                  # weights; needs the same architecture)


def _default_versions() -> list:
    # PCT's "more data + bigger model" update: v0 on half the data, v1 on all of it
    return [VersionSpec(fraction=0.5), VersionSpec(fraction=1.0)]


@dataclass
class ModelUpdateConfig:
    source: str = "split_digits"  # registered scenario whose data (pooled) the versions train on
    source_args: Any = field(default_factory=dict)  # keys of the source scenario, e.g. {test_fraction: 0.5}
    versions: List[VersionSpec] = field(default_factory=_default_versions)  # one update per entry
    data_seed: Optional[int] = None  # seed of the data permutation; None = the run's seed


def _check_versions(cfg) -> list[dict]:
    """Validated version entries as plain dicts (model nodes validated against their schema)."""
    from omegaconf import OmegaConf


    if len(cfg.versions) == 0:
        raise ConfigError("scenario.versions is empty: give at least one version, e.g. "
                          "versions: [{fraction: 0.5}, {fraction: 1.0, model: {name: simple_cnn}}]")
    out = []
    for k, v in enumerate(cfg.versions):
        key = f"scenario.versions[{k}]"
        if not 0.0 < float(v.fraction) <= 1.0:
            raise ConfigError(f"{key}.fraction={v.fraction} must be in (0, 1] (share of the training data)")
        if v.init not in INITS:
            raise ConfigError(f"{key}.init='{v.init}' must be one of {', '.join(INITS)}")
        if v.epochs < 0:
            raise ConfigError(f"{key}.epochs={v.epochs} must be >= 0 (0 = train.epochs)")
        model = None
        if v.model is not None:
            raw = OmegaConf.to_container(v.model) if not isinstance(v.model, (str, dict)) else v.model
            try:
                model = OmegaConf.to_container(validate_component("model", raw))
            except ConfigError as exc:
                raise ConfigError(f"{key}.{exc}") from None
        if k == 0 and v.init == "previous":
            raise ConfigError(f"{key}.init=previous but version 0 has no previous version "
                              "(use init: scratch)")
        if v.init == "previous" and model is not None:
            raise ConfigError(f"{key}: init=previous warm-starts from the previous version, so it "
                              "cannot also set a new model; drop `model` or use init: scratch")
        out.append({"fraction": float(v.fraction), "model": model, "epochs": int(v.epochs),
                    "init": str(v.init)})
    return out


@register_scenario("model_update", config=ModelUpdateConfig)
def model_update(cfg, seed: int):
    """Model versions (more data / new architecture) on a fixed test set: update experiences."""
    import numpy as np
    import torch
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.benchmarks.scenarios.supervised import with_classes_timeline
    from avalanche.benchmarks.scenarios.task_aware import with_task_labels
    from omegaconf import OmegaConf

    from lethe import registry
    from lethe.scenarios.streams import avalanche_dataset
    from lethe.scenarios.types import UPDATE, Experience, Stream, TestSet

    if cfg.source == "model_update":
        raise ConfigError("scenario.source cannot be model_update itself; name a data scenario "
                          "such as split_digits")
    versions = _check_versions(cfg)
    args = OmegaConf.to_container(cfg.source_args) if cfg.source_args is not None else {}
    if not isinstance(args, dict):
        raise ConfigError("scenario.source_args must be a mapping of the source scenario's keys")
    try:
        source_cfg = validate_component("scenario", {"name": cfg.source, **args})
    except ConfigError as exc:
        raise ConfigError(f"scenario.source_args: {exc}") from None
    source = registry.get("scenarios", cfg.source).obj(source_cfg, seed)
    learn = [e for e in source.experiences if e.kind == "learn" and e.train is not None]
    if not learn:
        raise ConfigError(f"scenario.source '{cfg.source}' has no learn experiences to train on")

    pool = learn[0].train.dataset
    for e in learn[1:]:
        pool = pool.concat(e.train.dataset)
    data_seed = seed if cfg.data_seed is None else int(cfg.data_seed)
    perm = np.random.default_rng(data_seed).permutation(len(pool))
    subsets = []
    for k, v in enumerate(versions):
        n = max(1, int(round(v["fraction"] * len(pool))))
        subsets.append(pool.subset(sorted(int(i) for i in perm[:n])))

    t = source.test   # the fixed evaluation set: one evaluation experience
    test = TestSet(x=t.x, y=t.y, exp=torch.zeros_like(t.y), task=t.task, ids=t.ids)
    test_ds = avalanche_dataset(test.x, test.y, test.ids, 0)
    bm = with_classes_timeline(with_task_labels(benchmark_from_datasets(train=subsets,
                                                                        test=[test_ds])))
    experiences = []
    for k, (v, exp) in enumerate(zip(versions, bm.train_stream)):
        payload = {"version": k, "n_train": len(exp.dataset), **v}
        experiences.append(Experience(index=k, kind=UPDATE, train=exp, payload=payload))
    return Stream(experiences=experiences, benchmark=bm, test=test,
                  input_shape=tuple(source.input_shape), n_classes=source.n_classes,
                  setting=source.setting, class_order=list(source.class_order),
                  task_type=getattr(source, "task_type", "classification"))  # LM sources: LMEvaluator
