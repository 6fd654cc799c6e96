"""Vision backbones: MLP, a small CNN, torchvision ResNet-18 and any timm model."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from lethe.errors import ConfigError
from lethe.registry import register_model


@dataclass
class ModelInfo:
    """What a model builder knows about the stream."""

    input_shape: tuple
    n_classes: int


@dataclass
class MLPConfig:
    hidden: int = 128
    layers: int = 2               # hidden layers
    dropout: float = 0.0


@dataclass
class SimpleCNNConfig:
    channels: int = 32            # width of the first conv; doubled by the second
    dropout: float = 0.0


@dataclass
class ResNet18Config:
    weights_path: Optional[str] = field(default=None, metadata={"path": True})  # local state_dict
    # 3x3 stem without max-pool, for 32x32 images (CIFAR-style); with ImageNet weights set it
    # false: the 3x3 stem cannot take their 7x7 conv1 (a ConfigError says so)
    small_input: bool = True


@dataclass
class TimmConfig:
    arch: str = "vit_tiny_patch16_224"   # any timm model name
    weights_path: Optional[str] = field(default=None, metadata={"path": True})
    kwargs: Any = field(default_factory=dict)  # e.g. {img_size: 32, patch_size: 8, depth: 2}


def _flat_dim(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


@register_model("mlp", config=MLPConfig)
def mlp(cfg, info: ModelInfo):
    """Multi-layer perceptron over flattened inputs."""
    from torch import nn

    dims = [_flat_dim(info.input_shape)] + [cfg.hidden] * cfg.layers
    body: list = [nn.Flatten()]
    for a, b in zip(dims[:-1], dims[1:]):
        body += [nn.Linear(a, b), nn.ReLU()] + ([nn.Dropout(cfg.dropout)] if cfg.dropout else [])
    return nn.Sequential(*body, nn.Linear(dims[-1], info.n_classes))


@register_model("simple_cnn", config=SimpleCNNConfig)
def simple_cnn(cfg, info: ModelInfo):
    """Two 3x3 conv blocks with BatchNorm, global average pooling and a linear head."""
    from torch import nn

    c_in, c = int(info.input_shape[0]), cfg.channels
    return nn.Sequential(
        nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
        nn.Conv2d(c, 2 * c, 3, padding=1, bias=False), nn.BatchNorm2d(2 * c), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(cfg.dropout),
        nn.Linear(2 * c, info.n_classes))


def read_state(path: str, prefix: str) -> dict:
    """The state_dict in a local weights file (ConfigError naming the file if unreadable)."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"{prefix}.weights_path: cannot load '{path}': {exc}") from None
    return state.get("state_dict", state) if isinstance(state, dict) else state


def load_weights(model, path: str, prefix: str, state: dict | None = None):
    """Load a local state_dict, skipping the classifier when its shape differs."""
    state = read_state(path, prefix) if state is None else state
    own = model.state_dict()
    kept = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not kept:
        raise ConfigError(f"{prefix}.weights_path: no tensor in '{path}' matches the model")
    model.load_state_dict(kept, strict=False)
    return model


def check_stem(state: dict, model, cfg, info: ModelInfo) -> None:
    """Refuse weights whose conv1 the built stem cannot take: loading would skip it and leave
    a random first layer under pretrained blocks (frozen, for the LoRA methods)."""
    theirs, ours = state.get("conv1.weight"), model.conv1.weight
    if theirs is None or tuple(theirs.shape) == tuple(ours.shape):
        return
    why = ("model.small_input=true builds a 3x3 stem" if cfg.small_input else
           f"the input has {int(info.input_shape[0])} channels")
    raise ConfigError(f"model.weights_path: conv1.weight in '{cfg.weights_path}' has shape "
                      f"{list(theirs.shape)} but {why} ({list(ours.shape)}), so the pretrained stem "
                      f"would be dropped: set model.small_input=false (and feed 3-channel images) "
                      f"to keep it")


@register_model("resnet18", config=ResNet18Config)
def resnet18(cfg, info: ModelInfo):
    """torchvision ResNet-18 (random init or a local weights file).

    ``small_input`` (default) swaps the 7x7/stride-2 stem and max-pool for a 3x3/stride-1
    stem, for 32x32 images. Weights whose conv1 does not fit the built stem (ImageNet weights
    with small_input=true) are a ConfigError naming the fix, not a silently random stem; we
    chose an error over switching the stem off automatically so that a config means one
    architecture whatever weights it loads."""
    from torch import nn
    from torchvision.models import resnet18 as tv_resnet18

    model = tv_resnet18(weights=None, num_classes=info.n_classes)
    if int(info.input_shape[0]) != 3 or cfg.small_input:
        model.conv1 = nn.Conv2d(int(info.input_shape[0]), 64, 3 if cfg.small_input else 7,
                                stride=1 if cfg.small_input else 2,
                                padding=1 if cfg.small_input else 3, bias=False)
    if cfg.small_input:
        model.maxpool = nn.Identity()
    if not cfg.weights_path:
        return model
    state = read_state(cfg.weights_path, "model")
    check_stem(state, model, cfg, info)
    return load_weights(model, cfg.weights_path, "model", state)


@register_model("timm", config=TimmConfig)
def timm_model(cfg, info: ModelInfo):
    """Any timm architecture by name (random init or a local weights file)."""
    import timm

    from lethe.registry import suggest

    if cfg.arch not in timm.list_models():
        raise ConfigError(f"model.arch: unknown timm model '{cfg.arch}'"
                          f"{suggest(cfg.arch, timm.list_models())}")
    kwargs = dict(cfg.kwargs or {})
    kwargs.setdefault("in_chans", int(info.input_shape[0]))
    model = timm.create_model(cfg.arch, pretrained=False, num_classes=info.n_classes, **kwargs)
    return load_weights(model, cfg.weights_path, "model") if cfg.weights_path else model
