"""LoRA on a frozen backbone, through peft, for any lethe model.

Used by the exact-unlearning methods: S3T trains LoRA *groups* (consecutive target layers,
group 1 = the topmost) one slice at a time; SISA and the retrain oracle can train the same
adapters all at once (``lora.rank > 0``) so all three share one frozen backbone.

- the classifier head is found as the last ``nn.Linear`` with ``n_classes`` outputs and
  stays trainable (it is not a LoRA target);
- targets default to every ``nn.Linear`` / ``nn.Conv2d`` except the head, in module
  (forward) order; ``target_modules`` names them instead (exact names or name suffixes,
  e.g. ``[qkv]`` for a timm ViT's attention);
- peft's ``inject_adapter_in_model`` adds the adapters in place (no wrapper class), so
  parameter names stay ``<layer>.lora_A.default.weight``; LoRA B starts at zero, so a fresh
  adapter leaves the backbone's outputs unchanged bit for bit.
- a fused attention projection (timm's ``qkv``: one Linear(d, 3d) for query, key and value)
  gets, with ``fused_qkv: qv``, two adapters added to its query and value output slices only
  (:func:`fused_qv_lora`; parameters ``<layer>.lora_q_A.weight`` ...), the key untouched: what
  S3T's official code trains on Hugging Face's ViT (peft ``target_modules=["query",
  "value"]``). ``fused_qkv: qkv`` puts one peft adapter on the whole layer (k adapted too).

Only :class:`LoraOptions` is needed at import time (method config schemas), so torch is
imported inside the functions and ``lethe list`` stays fast.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cache, lru_cache

from lethe.errors import ConfigError


@dataclass
class LoraOptions:
    rank: int = 16                # LoRA rank r (S3T reference settings: 16)
    alpha: float = 16.0           # scaling alpha (alpha / sqrt(r) with rslora)
    dropout: float = 0.1          # dropout on the adapter input, as in S3T's code
    rslora: bool = True           # rank-stabilised scaling, as in S3T's code
    target_modules: list = field(default_factory=list)  # [] = every Linear/Conv2d but the head
    resize_to: int = 0            # > 0: resize inputs to this size first (32px CIFAR → 224 ViT)
    # > 0: first train the whole model this many epochs on the stream's non-deletable public
    # split (e.g. scenario.public_fraction), then freeze it as the backbone
    pretrain_epochs: int = 0
    # a fused q/k/v projection (a Linear named *qkv, 3x as many outputs as inputs): qv = adapt
    # only its query and value slices (as S3T's official query/value LoRA), qkv = the whole layer
    fused_qkv: str = "qkv"


FUSED_QKV = ("qv", "qkv")


@lru_cache(maxsize=None)
def _resize_class():
    from torch import nn

    class ResizeInput(nn.Module):
        """Bilinear resize of image inputs before a backbone trained at another resolution."""

        def __init__(self, net: nn.Module, size: int):
            super().__init__()
            self.net, self.size = net, int(size)

        def forward(self, x):
            if x.shape[-1] != self.size or x.shape[-2] != self.size:
                x = nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear",
                                              align_corners=False)
            return self.net(x)

    return ResizeInput


def resize_input(net, size: int):
    """``net`` behind a bilinear resize of its image inputs to ``size`` x ``size``."""
    return _resize_class()(net, size)


def find_head(model, n_classes: int) -> str:
    """Name of the classifier: the last nn.Linear with n_classes outputs."""
    from torch import nn

    heads = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and m.out_features == n_classes]
    if not heads:
        raise ConfigError(f"model: no nn.Linear classifier with {n_classes} outputs found; "
                          f"LoRA methods need a model whose last Linear layer is the head")
    return heads[-1]


def pick_layers(layers: list[str], names) -> list[str]:
    """The layer names equal to, or ending in ``.<name>`` of, one of ``names`` (in layer order)."""
    wanted = [str(t) for t in names]
    return [n for n in layers if any(n == t or n.endswith("." + t) for t in wanted)]


def layer_list(layers: list[str], most: int = 12) -> str:
    """The first layer names, for error messages."""
    return ", ".join(layers[:most]) + (" …" if len(layers) > most else "")


def lora_targets(model, head: str | None, names: list | None = None) -> list[str]:
    """Module names that get adapters, in module (forward) order: every Linear / Conv2d but
    the ``head`` module's (None: the head's too)."""
    from torch import nn

    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
              and (head is None or (n != head and not n.startswith(head + ".")))]
    besides = "" if head is None else " besides the head"
    return _chosen(layers, names, ConfigError, "Linear/Conv2d", "method.lora.target_modules: ",
                   f"model: no Linear/Conv2d layer{besides} to put LoRA adapters on")


def _chosen(layers: list[str], names, error: type, kinds: str, key: str, empty: str) -> list[str]:
    """``layers`` restricted to ``names`` (exact names or suffixes), all when none are given;
    ``error`` with the layers listed when nothing matches."""
    if names:
        picked = pick_layers(layers, names)
        if not picked:
            raise error(f"{key}{list(map(str, names))} match no {kinds} layer of the model "
                        f"(layers: {layer_list(layers)})")
        return picked
    if not layers:
        raise error(empty)
    return layers


def is_fused_qkv(name: str, module) -> bool:
    """A fused query/key/value projection: an nn.Linear named ``qkv`` (timm's Attention)
    whose output is three equal slices [q | k | v]."""
    from torch import nn

    return (isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] == "qkv"
            and module.out_features == 3 * module.in_features)


@cache
def _fused_qv_class():
    import math

    import torch
    from torch import nn

    class FusedQVLora(nn.Module):
        """A frozen fused qkv Linear plus LoRA updates of its q and v output slices; k is
        the base layer's, bit for bit. B starts at zero: a fresh adapter changes nothing."""

        def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float, rslora: bool):
            super().__init__()
            self.base_layer, d = base, base.out_features // 3
            self.scaling = alpha / (math.sqrt(rank) if rslora else rank)
            self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
            for part in ("q", "v"):
                a = nn.Linear(base.in_features, rank, bias=False)
                b = nn.Linear(rank, d, bias=False)
                nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))   # peft's default init
                nn.init.zeros_(b.weight)
                a.to(base.weight.device, base.weight.dtype)
                b.to(base.weight.device, base.weight.dtype)
                setattr(self, f"lora_{part}_A", a)
                setattr(self, f"lora_{part}_B", b)

        def forward(self, x):
            out = self.base_layer(x)
            # a dropout mask of its own per adapter, as two separate LoRA layers would draw
            dq = self.lora_q_B(self.lora_q_A(self.lora_dropout(x))) * self.scaling
            dv = self.lora_v_B(self.lora_v_A(self.lora_dropout(x))) * self.scaling
            # concatenated, not written in place: autograd and torch.func (vmap) friendly
            return out + torch.cat([dq, torch.zeros_like(dq), dv], dim=-1)

    return FusedQVLora


def fused_qv_lora(base, opts: LoraOptions):
    """``base`` (a fused qkv Linear) wrapped with query/value-only LoRA adapters."""
    return _fused_qv_class()(base, int(opts.rank), float(opts.alpha), float(opts.dropout),
                             bool(opts.rslora))


def add_lora(model, targets: list[str], opts: LoraOptions, head: str):
    """Inject LoRA adapters (peft) into ``targets``; freeze everything but adapters and head.
    With ``opts.fused_qkv == "qv"`` fused qkv targets get :func:`fused_qv_lora` instead."""
    from peft import LoraConfig, inject_adapter_in_model

    mode = str(getattr(opts, "fused_qkv", "qkv"))
    if mode not in FUSED_QKV:
        raise ConfigError(f"bad value for 'method.lora.fused_qkv': '{mode}' (choose qv: adapt "
                          f"the query and value slices of a fused qkv layer, or qkv: all of it)")
    modules = dict(model.named_modules())
    fused = [t for t in targets if mode == "qv" and is_fused_qkv(t, modules[t])]
    rest = [t for t in targets if t not in fused]
    if rest:
        config = LoraConfig(r=int(opts.rank), lora_alpha=float(opts.alpha),
                            lora_dropout=float(opts.dropout), use_rslora=bool(opts.rslora),
                            target_modules="(" + "|".join(re.escape(t) for t in rest) + ")",
                            bias="none")
        model = inject_adapter_in_model(config, model)
    for t in fused:
        parent, _, child = t.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, fused_qv_lora(getattr(owner, child), opts))
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name or name.startswith(head + "."))
    return model


def adapter_params(model, modules: list[str]) -> list[str]:
    """Names of the LoRA parameters of the given (target) modules."""
    prefixes = tuple(m + ".lora_" for m in modules)
    return [n for n, _ in model.named_parameters() if n.startswith(prefixes)]


def head_params(model, head: str) -> list[str]:
    return [n for n, _ in model.named_parameters() if n.startswith(head + ".")]


def group_top_down(targets: list[str], n_groups: int) -> list[list[str]]:
    """Split the ordered target layers into ``n_groups`` runs of consecutive layers;
    group 0 holds the topmost layers (S3T trains the top of the network first)."""
    import numpy as np

    if len(targets) < n_groups:
        raise ConfigError(f"method.slices={n_groups}: S3T needs one LoRA group per slice but the "
                          f"model has only {len(targets)} target layers ({', '.join(targets)}); "
                          f"use a deeper model (e.g. model.layers) or fewer slices")
    top_first = list(reversed(targets))
    return [list(reversed(part.tolist())) for part in np.array_split(np.array(top_first, dtype=object),
                                                                      n_groups)]


def freeze_norm_stats(model) -> None:
    """BatchNorm layers of a frozen backbone must not update running statistics (they would
    carry information about deletable data); eval mode keeps them fixed while training."""
    from torch import nn

    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def count(model, names) -> int:
    params = dict(model.named_parameters())
    return int(sum(params[n].numel() for n in names))


def is_conv1d(module) -> bool:
    """transformers' Conv1D (GPT-2): a linear map whose weight is stored [in, out]."""
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None \
        and module.weight.dim() == 2


def lm_linear_targets(lm, names=None) -> list[str]:
    """Module names of a causal LM that get LoRA adapters (LoKU's FILA, the LLM unlearning
    methods' plain LoRA): every nn.Linear / Conv1D except the LM head
    (``lm.get_output_embeddings()``), in module order; ``names`` restricts them to exact
    names or name suffixes (e.g. ``["q_proj", "v_proj"]``)."""
    from torch import nn

    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    layers = [n for n, m in lm.named_modules()
              if (isinstance(m, nn.Linear) or is_conv1d(m)) and m is not head]
    return _chosen(layers, names, ValueError, "Linear/Conv1D", "target_modules ",
                   "the model has no Linear/Conv1D layer besides the LM head")


__all__ = ["LoraOptions", "resize_input", "add_lora", "adapter_params", "count", "find_head",
           "freeze_norm_stats", "fused_qv_lora", "group_top_down", "head_params", "lora_targets",
           "is_conv1d", "is_fused_qkv", "lm_linear_targets"]
