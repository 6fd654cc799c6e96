"""HFT — Half Fine-Tuning (Hui et al., "HFT: Half Fine-Tuning for Large Language Models", 2024).

Before every stage (learn experience) about half of the parameters are frozen, chosen at
random per transformer layer, whole matrices only: in the attention block 2 of the 4
projections (q, k, v, o), in the feed-forward block 2 of the 3 matrices in a random half of
the layers and 1 of 3 in the other half, and 1 of the 2 norms. The choice is resampled at
every new stage; the rest of the model trains as in full fine-tuning. Frozen matrices keep
the previous stages' knowledge (the paper's argument against forgetting), and their weight
gradients and optimizer updates are skipped (the paper reports ~30% less time per step).

Generalisation to any layout (choice): per layer and per group (attention matrices, FFN
matrices, norms) half of the units are frozen; with an odd count (GPT-2's fused c_attn
gives 2 attention matrices, Llama's FFN has 3) ⌈n/2⌉ are frozen in a random half of the
layers and ⌊n/2⌋ in the others. For Llama this is exactly the paper's rule. Embeddings,
the final norm and the LM head stay trainable (``train_outside_layers``; the paper leaves
this open).

Each stage is its own fine-tuning run in the paper, so the presets set
``train.optimizer_reset: experience``: AdamW's moments and step counts are cleared when a stage
starts, and a matrix frozen in one stage and trainable again later does not resume moments
that are stages old (tests/test_hft.py checks the optimizer state).

A run should show: ``hft/frac_frozen`` ≈ 0.5 every stage, a different frozen set
each stage, frozen matrices bitwise unchanged through their stage, less forgetting than full
fine-tuning on a shifting corpus stream, and faster steps (benchmarks/lm_cost.py).
Logged: ``params/trainable``, ``params/frac_trainable``, ``hft/frac_frozen``.
"""
from __future__ import annotations

from dataclasses import dataclass

from lethe.errors import ConfigError
from lethe.methods.base import Method
from lethe.registry import register_method


@dataclass
class HFTConfig:
    train_outside_layers: bool = True  # embeddings, final norm, LM/classifier head trainable
                                       # (choice; the paper fixes only the layers' matrices)


def _is_matrix(module) -> bool:
    from torch import nn

    w = getattr(module, "weight", None)
    return (isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D") and \
        w is not None and w.dim() == 2


def _is_norm(module) -> bool:
    return "norm" in type(module).__name__.lower() and any(True for _ in module.parameters(recurse=False))


def transformer_layers(model) -> list[tuple[str, object]]:
    """(name, module) of the transformer blocks: the children of the ModuleList holding the
    most parameters whose every child has matrices."""
    from torch import nn

    best, best_size = [], 0
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if not all(any(_is_matrix(m) for m in child.modules()) for child in mod):
            continue
        size = sum(p.numel() for p in mod.parameters())
        if size > best_size:
            best, best_size = [(f"{name}.{i}", child) for i, child in enumerate(mod)], size
    return best


def layer_units(block) -> dict[str, list[str]]:
    """Freezable units of one block by group: attention / ffn matrices and norms (relative
    module names, in module order)."""
    groups = {"attention": [], "ffn": [], "norm": []}
    for name, mod in block.named_modules():
        if not name:
            continue
        if _is_norm(mod):
            groups["norm"].append(name)
        elif _is_matrix(mod):
            parts = name.lower().split(".")
            attn = any("attn" in p or "attention" in p for p in parts)
            groups["attention" if attn else "ffn"].append(name)
    return groups


def sample_frozen(layers: list[dict[str, list[str]]], generator) -> list[str]:
    """Units to freeze (``<layer index>:<unit>``): half of each group per layer; odd groups
    freeze ⌈n/2⌉ in a random half of the layers and ⌊n/2⌋ in the others."""
    import torch

    n_layers = len(layers)
    frozen = []
    high = {g: set(torch.randperm(n_layers, generator=generator)[:(n_layers + 1) // 2].tolist())
            for g in ("attention", "ffn", "norm")}
    for i, groups in enumerate(layers):
        for g, units in groups.items():
            n = len(units)
            if n == 0:
                continue
            k = n // 2 + (1 if n % 2 and i in high[g] else 0)
            pick = torch.randperm(n, generator=generator)[:k].tolist()
            frozen += [f"{i}:{units[j]}" for j in sorted(pick)]
    return frozen


@register_method("hft", config=HFTConfig, kinds=("learn",))
class HFT(Method):
    """Half Fine-Tuning: freeze a random half of each layer's matrices, resampled every stage."""

    name = "hft"

    def setup(self, model):
        self.layers = transformer_layers(model)
        if not self.layers:
            raise ConfigError("method hft needs a transformer (a ModuleList of blocks with "
                              "Linear/Conv1D matrices), e.g. model.name=hf_causal_lm or hf_encoder")
        self.units = [layer_units(block) for _, block in self.layers]
        self.stage = 0
        self.frozen: list[str] = []            # module names frozen in the current stage
        self.history: list[list[str]] = []     # frozen names of every stage (this process)
        return model

    def _module_name(self, unit: str) -> str:
        i, name = unit.split(":", 1)
        return f"{self.layers[int(i)][0]}.{name}"

    def resample(self, stage: int) -> list[str]:
        """Freeze a fresh random half for ``stage`` (seeded by run seed and stage)."""
        import torch

        g = torch.Generator().manual_seed(int(self.ctx.seed) * 1_000_003 + 7919 * int(stage) + 17)
        frozen = [self._module_name(u) for u in sample_frozen(self.units, g)]
        inside = tuple(name + "." for name, _ in self.layers)
        frozen_prefixes = tuple(f + "." for f in frozen)
        for name, p in self.model.named_parameters():
            if name.startswith(frozen_prefixes):
                p.requires_grad_(False)
            elif name.startswith(inside):
                p.requires_grad_(True)
            else:
                p.requires_grad_(bool(self.cfg.train_outside_layers))
        self.frozen = frozen
        self.history.append(list(frozen))
        return frozen

    def before_training_exp(self, strategy, **kwargs):
        self.resample(self.stage)

    def after_training_exp(self, strategy, **kwargs):
        self.stage += 1

    def log_params(self) -> dict:
        params = list(self.model.parameters())
        total = sum(p.numel() for p in params)
        trainable = sum(p.numel() for p in params if p.requires_grad)
        n_units = sum(len(u) for groups in self.units for u in groups.values())
        return {"params/trainable": float(trainable), "params/frac_trainable": trainable / max(total, 1),
                "hft/frac_frozen": len(self.frozen) / max(n_units, 1)}

    def extra_state(self) -> dict:
        return {"stage": int(self.stage)}

    def load_extra_state(self, state: dict) -> None:
        self.stage = int(state["stage"])
