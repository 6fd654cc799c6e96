"""Any Avalanche classic benchmark (SplitMNIST, SplitCIFAR100, PermutedMNIST, ...) by name."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from lethe.errors import ConfigError
from lethe.registry import register_scenario
from lethe.scenarios.transforms import check_config


@dataclass
class AvalancheConfig:
    benchmark: str = "???"          # a name from avalanche.benchmarks.classic, e.g. SplitMNIST
    dataset_root: Optional[str] = None  # where the data lives (or is downloaded to)
    kwargs: Any = field(default_factory=dict)  # passed to the benchmark, e.g. {n_experiences: 5}
    task_incremental: bool = False  # set when the benchmark returns task ids (return_task_id)
    forget_requests: list = field(default_factory=list)  # deletion requests (scenarios/forget.py)
    # train/eval pipelines passed as the benchmark's train_transform / eval_transform: a
    # recipe (pilot | imagenet | cifar | cifar10) or torchvision transforms by name
    # (lethe/scenarios/transforms.py); None (or an unset part) = the benchmark's own
    transforms: Any = None
    # pilot | pilot:SEED | [ids]: passed as fixed_class_order (kwargs.seed then has no effect)
    class_order: Any = None


# classes of the benchmarks a class_order can name without building the benchmark first
N_CLASSES = {"SplitMNIST": 10, "SplitFMNIST": 10, "SplitCIFAR10": 10, "SplitCIFAR100": 100,
             "SplitCIFAR110": 110, "SplitTinyImageNet": 200, "SplitCUB200": 200,
             "SplitImageNet": 1000}


def _classic_names() -> list[str]:
    import avalanche.benchmarks.classic as classic

    return sorted(n for n in dir(classic) if n[:1].isupper() and callable(getattr(classic, n)))


def _call_benchmark(cfg):
    import avalanche.benchmarks.classic as classic

    from lethe.registry import suggest

    names = _classic_names()
    if cfg.benchmark not in names:  # only Avalanche's own generators: no imports from YAML
        raise ConfigError(f"scenario.benchmark: unknown Avalanche benchmark "
                          f"'{cfg.benchmark}'{suggest(cfg.benchmark, names)} "
                          f"(known: {', '.join(names)})")
    kwargs = dict(cfg.kwargs or {})
    if cfg.dataset_root:
        kwargs["dataset_root"] = cfg.dataset_root
    kwargs.update(_data_kwargs(cfg))
    try:
        return getattr(classic, cfg.benchmark)(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"scenario.kwargs: {cfg.benchmark} rejected {sorted(kwargs)}: {exc}") from None
    except (OSError, RuntimeError, ConnectionError) as exc:
        where = cfg.dataset_root or "Avalanche's default data folder (~/.avalanche/data)"
        raise ConfigError(
            f"scenario.benchmark: the data of {cfg.benchmark} is not in {where} and could not "
            f"be downloaded ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); put the "
            f"dataset files there or set scenario.dataset_root to the folder that holds them") from None


def _check(cfg) -> None:
    """Config-time check: transforms and class_order, and that the class count is known."""
    from lethe.scenarios.transforms import class_order

    check_config(cfg)
    if cfg.class_order is None:
        return
    if cfg.benchmark not in N_CLASSES:
        raise ConfigError(f"scenario.class_order: the number of classes of {cfg.benchmark} is "
                          f"not known here; give kwargs.fixed_class_order instead")
    class_order(cfg.class_order, N_CLASSES[cfg.benchmark])


def _data_kwargs(cfg) -> dict:
    """train_transform / eval_transform / fixed_class_order from transforms and class_order."""
    from lethe.scenarios.transforms import build, class_order

    out = {}
    train, eval_ = build(cfg.transforms)
    if train is not None:
        out["train_transform"] = train
    if eval_ is not None:
        out["eval_transform"] = eval_
    if cfg.class_order is not None:   # the class count is checked at config time (_check)
        out["fixed_class_order"] = class_order(cfg.class_order, N_CLASSES[cfg.benchmark])
    return out


def _tensors(dataset, batch_size: int = 512):
    import torch

    loader = torch.utils.data.DataLoader(dataset.eval(), batch_size=batch_size, shuffle=False)
    xs, ys, ts = [], [], []
    for batch in loader:
        xs.append(batch[0])
        ys.append(batch[1])
        ts.append(batch[2] if len(batch) > 2 else torch.zeros_like(batch[1]))
    return torch.cat(xs), torch.cat(ys).long(), torch.cat(ts).long()


@register_scenario("avalanche", config=AvalancheConfig,
                   settings=("class_incremental", "task_incremental", "domain_incremental"),
                   check=_check)
def avalanche_benchmark(cfg, seed: int):
    """Any Avalanche classic benchmark by name, with kwargs and a dataset_root."""
    import torch

    from lethe.scenarios.types import LEARN, Experience, Stream, TestSet

    bm = _call_benchmark(cfg)
    offset = 0
    experiences = []
    # ids: running position over the train stream, then over the test stream: stable for a
    # fixed config (Avalanche's generators are seeded by their own `seed` kwarg).
    for i, exp in enumerate(bm.train_stream):
        n = len(exp.dataset)
        exp.dataset = exp.dataset.update_data_attribute("sample_id", list(range(offset, offset + n)))
        offset += n
        experiences.append(Experience(index=i, kind=LEARN, train=exp))
    parts = []
    for j, exp in enumerate(bm.test_stream):
        x, y, t = _tensors(exp.dataset)
        parts.append((x, y, t, torch.full_like(y, j), torch.arange(offset, offset + len(y))))
        offset += len(y)
    test = TestSet(*(torch.cat([p[k] for p in parts]) for k in (0, 1, 3, 2, 4)))
    n_classes = int(getattr(bm, "n_classes", 0) or int(test.y.max()) + 1)
    task_inc = cfg.task_incremental or bool(cfg.kwargs.get("return_task_id", False))
    setting = "task_incremental" if task_inc else (
        "domain_incremental" if "Permuted" in cfg.benchmark or "Rotated" in cfg.benchmark
        else "class_incremental")
    return Stream(experiences=experiences, benchmark=bm, test=test,
                  input_shape=tuple(test.x.shape[1:]), n_classes=n_classes, setting=setting)
