"""Image pipelines (``scenario.transforms``) and class orders (``scenario.class_order``).

``transforms`` is a recipe name for both pipelines (``transforms: pilot``) or a mapping
``{train: ..., eval: ..., size: N}`` whose ``train`` / ``eval`` are each a recipe name or a
list of torchvision transforms by name with their keyword arguments::

    transforms:
      train: [{name: RandomResizedCrop, size: 224, scale: [0.05, 1.0]}, {name: ToTensor}]
      eval: pilot

Names resolve only from ``torchvision.transforms`` (no imports from YAML). Recipes:

- ``pilot``: LAMDA-PILOT's ``build_transform`` (utils/data.py), used by MOS, EASE, APER...:
  train RandomResizedCrop(224, scale=(0.05, 1), ratio=(3/4, 4/3)) + RandomHorizontalFlip +
  ToTensor; eval Resize(256, bicubic) + CenterCrop(224) + ToTensor. No normalisation.
- ``imagenet``: the torchvision ImageNet recipe: RandomResizedCrop(224) + flip, eval
  Resize(256) + CenterCrop(224); ToTensor + ImageNet mean/std.
- ``cifar``: RandomCrop(32, padding=4) + flip; ToTensor + CIFAR-100 mean/std (Avalanche's
  SplitCIFAR100 values); ``cifar10``: the same with CIFAR-10's mean/std.

Recipes end in ToTensor, so they expect PIL images (CIFAR, ImageNet, image folders);
Avalanche's MNIST family hands tensors already: give it a list without ToTensor.

``size`` scales a recipe's crop size (eval resize = size·256/224 as PILOT), so a small
digits-scale twin runs the very recipe on 8-pixel images.

``class_order: pilot`` is LAMDA-PILOT's shuffled order (utils/data_manager.py:
``np.random.seed(1993); np.random.permutation(n_classes)``; ``pilot:SEED`` for another seed);
Avalanche's own ``seed=1993`` draws a different order. A list gives the order explicitly.
"""
from __future__ import annotations

from typing import Any

from lethe.errors import ConfigError
from lethe.registry import suggest

PILOT_SEED = 1993     # LAMDA-PILOT's seed in every exps/*.json of MOS
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
CIFAR100 = {"mean": [0.5071, 0.4865, 0.4409], "std": [0.2673, 0.2564, 0.2762]}
CIFAR10 = {"mean": [0.4914, 0.4822, 0.4465], "std": [0.2023, 0.1994, 0.2010]}
RECIPE_SIZE = {"pilot": 224, "imagenet": 224, "cifar": 32, "cifar10": 32}
# torchvision.transforms names that are not a transform built from plain YAML values
NOT_TRANSFORMS = {"Compose", "Lambda", "InterpolationMode", "AutoAugmentPolicy",
                  "LinearTransformation", "RandomApply", "RandomChoice", "RandomOrder"}


def _recipe(name: str, train: bool, size: int | None) -> list[dict]:
    s = size or RECIPE_SIZE[name]
    resize = int(256 / 224 * s)          # PILOT: "to maintain same ratio w.r.t. 224 images"
    if name == "pilot":
        if train:
            return [{"name": "RandomResizedCrop", "size": s, "scale": [0.05, 1.0],
                     "ratio": [3 / 4, 4 / 3]}, {"name": "RandomHorizontalFlip", "p": 0.5},
                    {"name": "ToTensor"}]
        return [{"name": "Resize", "size": resize, "interpolation": "bicubic"},
                {"name": "CenterCrop", "size": s}, {"name": "ToTensor"}]
    if name == "imagenet":
        crop = ([{"name": "RandomResizedCrop", "size": s}, {"name": "RandomHorizontalFlip"}] if train
                else [{"name": "Resize", "size": resize}, {"name": "CenterCrop", "size": s}])
        return crop + [{"name": "ToTensor"}, {"name": "Normalize", **IMAGENET}]
    stats = CIFAR100 if name == "cifar" else CIFAR10
    crop = [{"name": "RandomCrop", "size": s, "padding": 4}, {"name": "RandomHorizontalFlip"}] \
        if train else ([] if s == 32 else [{"name": "Resize", "size": s}])
    return crop + [{"name": "ToTensor"}, {"name": "Normalize", **stats}]


def _normalise(raw) -> dict:
    """``transforms`` in its long form {train, eval, size}."""
    if isinstance(raw, str):
        return {"train": raw, "eval": raw, "size": None}
    if not isinstance(raw, dict):
        raise ConfigError(f"scenario.transforms: expected a recipe name ({', '.join(RECIPE_SIZE)}) "
                          f"or a mapping {{train: ..., eval: ...}}, got {raw!r}")
    unknown = sorted(set(raw) - {"train", "eval", "size"})
    if unknown:
        raise ConfigError(f"scenario.transforms: unknown key '{unknown[0]}'"
                          f"{suggest(unknown[0], ('train', 'eval', 'size'))} "
                          f"(valid keys: train, eval, size)")
    size = raw.get("size")
    if size is not None and (not isinstance(size, int) or size < 1):
        raise ConfigError(f"scenario.transforms.size: must be a positive integer, got {size!r}")
    return {"train": raw.get("train"), "eval": raw.get("eval"), "size": size}


def _kwargs(where: str, kwargs: dict) -> dict:
    """YAML values to torchvision's: an interpolation by name, lists where tuples are meant."""
    from torchvision.transforms import InterpolationMode

    out = dict(kwargs)
    if isinstance(out.get("interpolation"), str):
        modes = [m.name.lower() for m in InterpolationMode]
        mode = out["interpolation"].lower()
        if mode not in modes:
            raise ConfigError(f"{where}.interpolation: unknown mode '{mode}'{suggest(mode, modes)} "
                              f"(choose one of {', '.join(modes)})")
        out["interpolation"] = InterpolationMode[mode.upper()]
    return {k: tuple(v) if isinstance(v, list) and k in ("scale", "ratio") else v
            for k, v in out.items()}


def _one(where: str, step) -> Any:
    import torchvision.transforms as T

    if isinstance(step, str):
        step = {"name": step}
    if not isinstance(step, dict) or not isinstance(step.get("name"), str):
        raise ConfigError(f"{where}: each step needs a name, e.g. {{name: RandomHorizontalFlip}}; "
                          f"got {step!r}")
    names = sorted(n for n in dir(T) if n[:1].isupper() and n not in NOT_TRANSFORMS)
    name = step["name"]
    if name not in names:
        raise ConfigError(f"{where}: unknown transform '{name}'{suggest(name, names)} "
                          f"(a class of torchvision.transforms: {', '.join(names)})")
    kwargs = _kwargs(where, {k: v for k, v in step.items() if k != "name"})
    try:
        return getattr(T, name)(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {name}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) "
                          f"failed: {exc}") from None


def _pipeline(where: str, spec, train: bool, size: int | None):
    import torchvision.transforms as T

    if isinstance(spec, str):
        if spec not in RECIPE_SIZE:
            raise ConfigError(f"{where}: unknown recipe '{spec}'{suggest(spec, list(RECIPE_SIZE))} "
                              f"(recipes: {', '.join(RECIPE_SIZE)}; or a list of "
                              f"{{name: <torchvision transform>, ...kwargs}})")
        spec = _recipe(spec, train, size)
    if not isinstance(spec, list) or not spec:
        raise ConfigError(f"{where}: expected a recipe name or a non-empty list of transforms, "
                          f"got {spec!r}")
    return T.Compose([_one(f"{where}[{i}]", s) for i, s in enumerate(spec)])


def build(raw) -> tuple:
    """(train, eval) torchvision pipelines from ``scenario.transforms``; None where unset."""
    if raw is None:
        return None, None
    spec = _normalise(_plain(raw))
    out = []
    for part in ("train", "eval"):
        value = spec[part]
        out.append(None if value is None else
                   _pipeline(f"scenario.transforms.{part}", value, part == "train", spec["size"]))
    return tuple(out)


def class_order(raw, n_classes: int) -> list[int] | None:
    """The class order ``scenario.class_order`` names (None = the scenario's own)."""
    import numpy as np

    if raw is None:
        return None
    raw = _plain(raw)
    if isinstance(raw, str):
        name, _, seed = raw.partition(":")
        if name != "pilot" or (seed and not seed.isdigit()):
            raise ConfigError(f"scenario.class_order: unknown order '{raw}' (use pilot, pilot:SEED "
                              f"or a list of all class ids)")
        # PILOT calls np.random.seed(seed) then np.random.permutation: the same legacy
        # Mersenne Twister stream as a RandomState, without touching numpy's global state
        return [int(c) for c in np.random.RandomState(int(seed or PILOT_SEED)).permutation(n_classes)]
    order = [int(c) for c in raw]
    if sorted(order) != list(range(n_classes)):
        raise ConfigError(f"scenario.class_order: must list every class id 0..{n_classes - 1} "
                          f"exactly once ({len(order)} ids given)")
    return order


def _plain(value):
    """An OmegaConf node as plain Python (lists and dicts); anything else unchanged."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value


def check_config(scenario) -> None:
    """Config-time check of ``transforms`` and ``class_order`` (every name and kwarg built once)."""
    if scenario.get("transforms") is not None:
        build(scenario.get("transforms"))
    order = _plain(scenario.get("class_order"))
    if isinstance(order, str):
        class_order(order, 2)
    elif order is not None and not isinstance(order, list):
        raise ConfigError(f"scenario.class_order: expected pilot or a list of class ids, got {order!r}")
