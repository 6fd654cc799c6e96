"""AdaptFormer adapters on a frozen timm VisionTransformer.

AdaptFormer (Chen et al., NeurIPS 2022): a bottleneck MLP in parallel with each block's MLP,
``x ← x + MLP(LN(x)) + s · up(ReLU(down(x)))``, whose input is the block's residual stream
after attention (not the normalised one). ``down`` is Kaiming-initialised and ``up`` zero-
initialised, so a fresh adapter leaves the pretrained network's outputs unchanged.

Used by the adapter-based class-incremental methods (``mos``, ``seq_adapter``). This module
is imported lazily by those methods, never by ``lethe list``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lethe.errors import ConfigError


class AdaptFormer(nn.Module):
    """Parallel bottleneck adapter: ``x ↦ scale · up(dropout(relu(down(x))))``."""

    def __init__(self, dim: int, bottleneck: int = 16, scale: float = 0.1, dropout: float = 0.1):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.scale, self.dropout = float(scale), float(dropout)
        with torch.no_grad():  # "lora" init: the adapter starts as an exact zero function
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, x):
        h = F.dropout(F.relu(self.down(x)), self.dropout, self.training)
        return self.up(h) * self.scale


class AdaptedBlock(nn.Module):
    """A timm ViT block with an AdaptFormer adapter in parallel with its MLP."""

    def __init__(self, block: nn.Module, adapter: AdaptFormer):
        super().__init__()
        self.block, self.adapter = block, adapter

    def forward(self, x, attn_mask=None, is_causal: bool = False):
        b = self.block
        h = b.norm1(x)
        h = b.attn(h, attn_mask=attn_mask, is_causal=is_causal) if (attn_mask is not None or is_causal) \
            else b.attn(h)
        x = x + b.drop_path1(b.ls1(h))
        return x + b.drop_path2(b.ls2(b.mlp(b.norm2(x)))) + self.adapter(x)


class AdaptedViT(nn.Module):
    """A frozen timm VisionTransformer with one live set of adapters and a trainable head.

    ``features(x, adapter)`` runs the backbone with another adapter set (a state dict of the
    adapter parameters, e.g. a stored copy of an earlier task's) without touching the live
    parameters: ``torch.func.functional_call`` swaps them in for that call only.
    Inputs whose size differs from the ViT's ``img_size`` are resized (bilinear) first, so
    32x32 CIFAR images feed a 224x224 ViT.
    """

    def __init__(self, vit: nn.Module, bottleneck: int = 16, scale: float = 0.1,
                 dropout: float = 0.1):
        super().__init__()
        self.vit = vit
        vit.requires_grad_(False)
        dim = int(vit.embed_dim)
        for i, block in enumerate(vit.blocks):
            vit.blocks[i] = AdaptedBlock(block, AdaptFormer(dim, bottleneck, scale, dropout))
        vit.head.requires_grad_(True)
        self.feature_dim = int(vit.num_features)
        self.last_features = None   # features of the latest training forward (for extra losses)

    @property
    def head(self) -> nn.Module:
        return self.vit.head

    def adapter_names(self) -> list[str]:
        return [n for n, _ in self.named_parameters() if ".adapter." in n]

    def adapter_state(self) -> dict:
        """A detached copy of the live adapter parameters (name → tensor)."""
        return {n: p.detach().clone() for n, p in self.named_parameters() if ".adapter." in n}

    @torch.no_grad()
    def load_adapter(self, state: dict) -> None:
        params = dict(self.named_parameters())
        for n, v in state.items():
            params[n].copy_(v)

    def _resize(self, x):
        size = getattr(self.vit.patch_embed, "img_size", None)
        strict = getattr(self.vit.patch_embed, "strict_img_size", True)
        if size is not None and strict and tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
        return x

    def forward(self, x, features_only: bool = False):
        f = self.vit.forward_head(self.vit.forward_features(self._resize(x)), pre_logits=True)
        if features_only:
            return f
        if self.training:
            self.last_features = f
        return self.vit.head(f)

    def features(self, x, adapter: dict | None = None):
        """Pre-logit features (the class token after the final norm) with an adapter set."""
        if adapter is None:
            return self(x, features_only=True)
        return torch.func.functional_call(self, adapter, (x,), {"features_only": True}, strict=False)


def adapted_vit(model: nn.Module, bottleneck: int, scale: float, dropout: float, prefix: str):
    """Wrap a timm VisionTransformer; a clear ConfigError for any other model."""

    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:  # pragma: no cover - timm is a dependency
        VisionTransformer = ()
    if not isinstance(model, VisionTransformer):
        raise ConfigError(f"method {prefix} needs a timm VisionTransformer: set model.name=timm and "
                          f"model.arch to a ViT (e.g. vit_base_patch16_224), got "
                          f"{type(model).__name__}")
    if not hasattr(model, "head") or not isinstance(model.head, nn.Linear):
        raise ConfigError(f"method {prefix} needs the ViT's linear classifier head "
                          f"(model.kwargs must not set num_classes=0)")
    return AdaptedViT(model, bottleneck, scale, dropout)
