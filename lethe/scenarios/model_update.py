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

**Version mode** (MUSCLE's setting: ``versions[i].base``): every version is a *pretrained base*
(a model node, e.g. ``{name: hf_causal_lm, path: /models/llama-2-7b}``) that stays frozen
while a task LoRA adapter is trained on it over one fixed task dataset (methods with
``method.mode: adapter``). The task is the source's *last* learn experience, and the
evaluation set is that experience's held-out part. At test scale a base can be pretrained
in the run instead of loaded: ``pretrain_epochs > 0`` trains it (all weights) on the first
``fraction`` of the pool of the source's *earlier* learn experiences (e.g. the first of two
generated Markov corpora), so a later version with a larger fraction is a base pretrained on
more data, as Llama 2 is over Llama 1.
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
    # version mode: this version's frozen pretrained base (a model node); set on every
    # version or on none. `fraction` is then the share of the pretraining pool
    base: Any = None
    pretrain_epochs: int = 0      # version mode: > 0 = pretrain the base in the run first


def _default_versions() -> list:
    # PCT's "more data + bigger model" update: v0 on half the data, v1 on all of it
    return [VersionSpec(fraction=0.5), VersionSpec(fraction=1.0)]


@dataclass
class ModelUpdateConfig:
    source: str = "split_digits"  # registered scenario whose data (pooled) the versions train on
    source_args: Any = field(default_factory=dict)  # keys of the source scenario, e.g. {test_fraction: 0.5}
    versions: List[VersionSpec] = field(default_factory=_default_versions)  # one update per entry
    data_seed: Optional[int] = None  # seed of the data permutation; None = the run's seed


def _model_node(raw, key: str):
    """A model node validated against its schema, as a plain dict (errors prefixed by key)."""
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(raw) if not isinstance(raw, (str, dict)) else raw
    try:
        return OmegaConf.to_container(validate_component("model", raw))
    except ConfigError as exc:
        raise ConfigError(f"{key}.{exc}") from None


def _check_base(v, key: str) -> dict:
    """A version-mode entry: its base node and pretraining epochs."""
    if v.model is not None:
        raise ConfigError(f"{key}: set base (the frozen pretrained model of this version) or "
                          "model (a network trained in full), not both")
    if v.init != "scratch":
        raise ConfigError(f"{key}.init={v.init}: in version mode every version is its own "
                          "pretrained base with a new task adapter; drop init")
    if v.pretrain_epochs < 0:
        raise ConfigError(f"{key}.pretrain_epochs={v.pretrain_epochs} must be >= 0 "
                          "(0 = use the base as loaded)")
    if isinstance(v.base, str):
        raise ConfigError(f"{key}.base='{v.base}' must be a model node, e.g. "
                          "{name: hf_causal_lm, path: /models/llama-2-7b}")
    return {"base": _model_node(v.base, f"{key}.base"), "pretrain_epochs": int(v.pretrain_epochs)}


def _check_versions(cfg) -> list[dict]:
    """Validated version entries as plain dicts (model nodes validated against their schema)."""
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
        if (v.base is None) != (cfg.versions[0].base is None):
            raise ConfigError(f"{key}: version mode needs a base on every version "
                              f"(scenario.versions[0] has {'one' if k else 'none'}, {key} "
                              f"{'has none' if v.base is None else 'has one'})")
        if v.base is not None:
            out.append({"fraction": float(v.fraction), "model": None, "epochs": int(v.epochs),
                        "init": "scratch", **_check_base(v, key)})
            continue
        if v.pretrain_epochs:
            raise ConfigError(f"{key}.pretrain_epochs applies to a version-mode base; set "
                              f"{key}.base or drop pretrain_epochs")
        model = _model_node(v.model, key) if v.model is not None else None
        if k == 0 and v.init == "previous":
            raise ConfigError(f"{key}.init=previous but version 0 has no previous version "
                              "(use init: scratch)")
        if v.init == "previous" and model is not None:
            raise ConfigError(f"{key}: init=previous warm-starts from the previous version, so it "
                              "cannot also set a new model; drop `model` or use init: scratch")
        out.append({"fraction": float(v.fraction), "model": model, "epochs": int(v.epochs),
                    "init": str(v.init)})
    return out


def _source(cfg, seed: int):
    """The source scenario's stream and its learn experiences."""
    from omegaconf import OmegaConf

    from lethe import registry

    if cfg.source == "model_update":
        raise ConfigError("scenario.source cannot be model_update itself; name a data scenario "
                          "such as split_digits")
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
    return source, learn


def _nested_subsets(learn: list, versions: list[dict], data_seed: int) -> list:
    """Version k's share of the pooled training data of ``learn``: the first fraction_k of one
    seeded permutation, so a larger fraction keeps the smaller ones' samples."""
    import numpy as np

    pool = learn[0].train.dataset
    for e in learn[1:]:
        pool = pool.concat(e.train.dataset)
    perm = np.random.default_rng(data_seed).permutation(len(pool))
    return [pool.subset(sorted(int(i) for i in perm[:max(1, round(v["fraction"] * len(pool)))]))
            for v in versions]


def _benchmark(train_sets: list, test_ds):
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.benchmarks.scenarios.supervised import with_classes_timeline
    from avalanche.benchmarks.scenarios.task_aware import with_task_labels

    return with_classes_timeline(with_task_labels(benchmark_from_datasets(train=train_sets,
                                                                          test=[test_ds])))


def _version_mode(learn: list, versions: list[dict], data_seed: int):
    """Version mode: the fixed task data (the last learn experience, once per version) and
    each version's pretraining subset (None when its base is used as loaded)."""
    task, earlier = learn[-1], learn[:-1]
    pretrain = [None] * len(versions)
    if any(v["pretrain_epochs"] for v in versions):
        if not earlier:
            raise ConfigError("scenario.versions[*].pretrain_epochs > 0 pretrains the bases on the "
                              "source's learn experiences before the last one (the task), but "
                              "the source has only one; e.g. source_args: {markov_corpora: 2}")
        subsets = _nested_subsets(earlier, versions, data_seed)
        pretrain = [s if v["pretrain_epochs"] else None for s, v in zip(subsets, versions)]
    return [task.train.dataset] * len(versions), pretrain


@register_scenario("model_update", config=ModelUpdateConfig)
def model_update(cfg, seed: int):
    """Model versions (more data / new architecture / new base) on a fixed test set."""
    import torch

    from lethe.scenarios.streams import avalanche_dataset
    from lethe.scenarios.types import UPDATE, Experience, Stream, TestSet

    versions = _check_versions(cfg)
    source, learn = _source(cfg, seed)
    data_seed = seed if cfg.data_seed is None else int(cfg.data_seed)
    t = source.test   # the fixed evaluation set: one evaluation experience
    bases = versions[0].get("base") is not None
    if bases:   # the task's held-out part only (test rows are labelled by learn position)
        keep = t.exp == len(learn) - 1
        t = TestSet(x=t.x[keep], y=t.y[keep], exp=t.exp[keep], task=t.task[keep], ids=t.ids[keep])
        train_sets, pretrain = _version_mode(learn, versions, data_seed)
    else:
        train_sets, pretrain = _nested_subsets(learn, versions, data_seed), [None] * len(versions)
    test = TestSet(x=t.x, y=t.y, exp=torch.zeros_like(t.y), task=t.task, ids=t.ids)
    test_ds = avalanche_dataset(test.x, test.y, test.ids, 0)
    bm = _benchmark(train_sets, test_ds)
    pre = iter(_benchmark([p for p in pretrain if p is not None], test_ds).train_stream
               if any(p is not None for p in pretrain) else [])
    experiences = []
    for k, (v, exp) in enumerate(zip(versions, bm.train_stream)):
        payload = {"version": k, "n_train": len(exp.dataset), **v}
        if bases:   # the Avalanche experience the base pretrains on (None: used as loaded)
            payload["pretrain"] = next(pre) if pretrain[k] is not None else None
        experiences.append(Experience(index=k, kind=UPDATE, train=exp, payload=payload))
    stream = Stream(experiences=experiences, benchmark=bm, test=test,
                    input_shape=tuple(source.input_shape), n_classes=source.n_classes,
                    setting=source.setting, class_order=list(source.class_order),
                    task_type=getattr(source, "task_type", "classification"))  # LM: LMEvaluator
    if hasattr(source, "tokenizer"):
        stream.tokenizer = source.tokenizer
    return stream
