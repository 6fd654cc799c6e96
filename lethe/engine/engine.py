"""The training engine: precision, gradient accumulation, clipping, optimizer resets and
gradient checkpointing, the same for every method (``train.*`` keys).

Built on Lightning Fabric (``lightning_fabric``): its precision plugins do the autocast, the
fp16 gradient scaler and the true-half conversion, it unscales gradients before clipping and
steps the optimizer through the scaler, and its DDP strategy runs ``lethe run --nproc N``
(:mod:`lethe.engine.distributed`: the DDP wrapper serves the training forward only).
Why Fabric and not Hugging Face Accelerate: Accelerate keeps its settings in process-wide
singletons (``AcceleratorState``, ``GradientState``), so a second ``Accelerator`` with another
precision in the same process raises ("AcceleratorState has already been initialized") — that
breaks notebooks, benchmarks and test suites that run several configs in one process; Fabric
objects are independent. Fabric is used without wrapping model or optimizer (``setup``):
Avalanche and several methods replace or edit the optimizer in place between experiences, and
the engine's calls take whatever optimizer is current.

Precision (``train.precision``):

- ``fp32``: plain fp32 training (a half-precision checkpoint is upcast to fp32).
- ``bf16-mixed`` / ``fp16-mixed``: fp32 master weights (the model is upcast to fp32 first) with
  autocast; fp16 adds a dynamic gradient scaler. fp16 autocast exists on CUDA only: on CPU
  ``fp16-mixed`` runs as ``bf16-mixed`` (said once in the log).
- ``bf16``: the model and its floating inputs in bfloat16, no master weights (the cheapest in
  memory; small updates can vanish in bf16 rounding).

Accumulation (``train.grad_accum_steps`` = k): the optimizer steps once every k mini-batches on
the mean of their losses (each loss is divided by the number of mini-batches in its window; a
shorter window at the end of an epoch is a mean over its own size), so batch b with k steps
equals one batch of k·b. ``train.grad_clip_norm`` > 0 clips the total gradient norm (after
unscaling) before every optimizer step. ``train.optimizer_reset: experience`` clears the
optimizer state (moments, step counts) at the start of every experience — each stage its own
fine-tuning, as in HFT.
"""
from __future__ import annotations

import logging
import os
import warnings
from contextlib import nullcontext

_NO_CONTEXT = nullcontext()   # reusable: one per iteration would be created for nothing

from lethe.engine import distributed
from lethe.errors import ConfigError

PRECISIONS = {"fp32": "32-true", "bf16-mixed": "bf16-mixed", "fp16-mixed": "16-mixed",
              "bf16": "bf16-true"}
OPTIMIZER_RESETS = ("never", "experience")
log = logging.getLogger("lethe")


def check_config(train) -> None:
    """ConfigError for a bad engine setting (called by the config loader)."""
    from lethe.registry import check_choice

    check_choice("train.precision", train.precision, PRECISIONS)
    check_choice("train.optimizer_reset", train.optimizer_reset, OPTIMIZER_RESETS)
    if train.grad_accum_steps < 1:
        raise ConfigError(f"bad value for 'train.grad_accum_steps': {train.grad_accum_steps} "
                          "(must be ≥ 1; 1 = no accumulation)")
    if train.grad_clip_norm < 0:
        raise ConfigError(f"bad value for 'train.grad_clip_norm': {train.grad_clip_norm} "
                          "(must be ≥ 0; 0 = no clipping)")


class Engine:
    """Optimisation steps of one run: ``autocast`` around forward + loss, ``backward(loss)`` per
    mini-batch, ``step(optimizer, model)`` after it (a real step at the end of each
    accumulation window)."""

    def __init__(self, train, device):
        import torch

        self.device = torch.device(device)
        self.precision = str(train.precision)
        self.accum = int(train.grad_accum_steps)
        self.clip = float(train.grad_clip_norm)
        self.optimizer_reset = str(train.optimizer_reset)
        self.checkpointing = bool(train.gradient_checkpointing)
        self.fabric = self._fabric()
        self.dist = self._data_parallel()   # None in a single process
        # Fabric's backward and optimizer step add nothing but Python frames (≈ 5 µs per
        # mini-batch, measurable on small models) unless a gradient scaler or DDP is involved:
        # then torch's own calls are made directly (the same arithmetic, bitwise)
        self._direct = self.dist is None and self._scaler() is None
        self._window: list[int] = []   # sizes of the accumulation windows left in this epoch
        self._micro = 0                # mini-batches done in the current window

    def _fabric(self):
        Fabric = _import_fabric()
        precision = PRECISIONS[self.precision]
        if precision == "16-mixed" and self.device.type != "cuda":
            log.info("train.precision=fp16-mixed: fp16 autocast needs CUDA; running bf16-mixed on %s",
                     self.device.type)
            precision = "bf16-mixed"
        cuda = self.device.type == "cuda"
        dist = distributed.active()
        with warnings.catch_warnings():   # Fabric's hints about SLURM and AMP are not ours
            warnings.simplefilter("ignore")
            if dist is None:
                return Fabric(accelerator="cuda" if cuda else "cpu",
                              devices=[self.device.index or 0] if cuda else 1, precision=precision)
            from lightning_fabric.strategies import DDPStrategy

            # one rank of `lethe run --nproc N` (torchrun's environment) or of a SLURM job's
            # tasks: Fabric's DDP strategy, its process group opened by launch() (once per process)
            local = int(os.environ.get("LOCAL_WORLD_SIZE", distributed.world_size()))
            fabric = Fabric(accelerator="cuda" if cuda else "cpu", devices=local,
                            num_nodes=max(1, distributed.world_size() // local),
                            strategy=DDPStrategy(process_group_backend=distributed.backend_for(
                                dist["backend"], self.device)), precision=precision)
            # its lines on opening the group ("Initializing distributed", "All distributed
            # processes registered") are not ours
            chatter = [logging.getLogger(f"lightning_fabric.utilities.{name}")
                       for name in ("rank_zero", "distributed")]
            levels = [logger.level for logger in chatter]
            for logger in chatter:
                logger.setLevel(logging.WARNING)
            try:
                fabric.launch()
            finally:
                for logger, level in zip(chatter, levels):
                    logger.setLevel(level)
            return fabric

    def _data_parallel(self):
        dist = distributed.active()
        return None if dist is None else distributed.DataParallel(self.fabric, dist["seed"],
                                                                   fsdp=dist["strategy"] == "fsdp")

    # --- the model ----------------------------------------------------------------------
    def prepare_model(self, model):
        """The dtype policy (fp32 master weights unless ``bf16``) and gradient checkpointing."""
        import torch

        model.to(torch.bfloat16 if self.precision == "bf16" else torch.float32)
        if self.checkpointing:
            enable_gradient_checkpointing(model)
        if self.dist is not None and self.dist.fsdp:
            distributed.fully_shard_model(model)
        return model

    def convert_input(self, x):
        """Floating inputs in the model's dtype under ``bf16`` (other precisions: unchanged)."""
        import torch

        if self.precision == "bf16" and isinstance(x, torch.Tensor) and x.is_floating_point():
            return x.to(torch.bfloat16)
        return x

    # --- one optimisation step ----------------------------------------------------------
    def autocast(self):
        return self.fabric.autocast() if self.precision.endswith("-mixed") else _NO_CONTEXT

    def begin_epoch(self, n_batches: int) -> None:
        """Plan the accumulation windows of an epoch of ``n_batches`` mini-batches."""
        full, rest = divmod(int(n_batches), self.accum)
        self._window = [self.accum] * full + ([rest] if rest else [])
        self._micro = 0
        if self.dist is not None:   # the template's shard() sets each batch's weight; a loop
            self.dist.weight = 1.0  # that does not shard (fit: every rank computes it whole) keeps 1

    def window_starts(self) -> bool:
        return self._micro == 0

    def _window_size(self) -> int:
        return self._window[0] if self._window else 1

    def window_ends(self) -> bool:
        """True when the mini-batch being processed is the last of its window (a real step)."""
        return self._micro + 1 >= self._window_size()

    def shard(self, mbatch):
        """This rank's part of a mini-batch (the whole of it in a single process)."""
        return mbatch if self.dist is None else self.dist.shard(mbatch)

    def training_forward(self, model, step: int):
        """Around the template's training forward: routed through DDP when data-parallel."""
        if self.dist is None:
            return _NO_CONTEXT
        return self.dist.forward(model, sync=self.window_ends(), step=step)

    def backward(self, loss, retain_graph: bool = False) -> None:
        size = self._window_size()
        if self.dist is not None:   # this rank's share of the global batch's mean (distributed.py)
            loss = loss * self.dist.weight
        loss = loss / size if size > 1 else loss
        if self._direct:
            loss.backward(retain_graph=retain_graph)
        else:
            self.fabric.backward(loss, retain_graph=retain_graph)

    def step(self, optimizer, model) -> bool:
        """Count the mini-batch; at the end of its window clip, step and zero the gradients.
        Returns whether the optimizer stepped."""
        if not self.window_ends():
            self._micro += 1
            return False
        if self.clip > 0:
            self.fabric.clip_gradients(model, optimizer, max_norm=self.clip,
                                       error_if_nonfinite=False)   # fp16: the scaler skips inf steps
        if self._direct:
            optimizer.step()
        else:
            self.fabric.strategy.optimizer_step(optimizer)
        optimizer.zero_grad(set_to_none=True)
        if self._window:
            self._window.pop(0)
        self._micro = 0
        return True

    # --- checkpoints --------------------------------------------------------------------
    def _scaler(self):
        """fp16-mixed's gradient scaler (None for every other precision)."""
        return getattr(self.fabric.strategy.precision, "scaler", None)

    def state_dict(self) -> dict:
        """The fp16 gradient scaler's state (its scale carries over between experiences)."""
        scaler = self._scaler()
        return {"scaler": scaler.state_dict()} if scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        scaler = self._scaler()
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])

    def reset_optimizer(self, optimizer) -> None:
        """``optimizer_reset: experience``: moments and step counts cleared."""
        if self.optimizer_reset == "experience":
            optimizer.state.clear()


def _import_fabric():
    """``lightning_fabric.Fabric``, without the process-wide setting its import makes.

    Importing lightning_fabric sets ``PYTORCH_NVML_BASED_CUDA_CHECK=1`` for the whole process
    (against CUDA fork-poisoning in its fork-based launchers, which lethe does not use). With it,
    every ``torch.cuda.is_available()`` loads NVML through ctypes — and torch's optimizers ask
    at every ``step()``: ≈ 0.7 ms per step on a CPU machine, as much as a small model's whole
    step. The user's own value of the variable is kept."""
    before = os.environ.get(_NVML_CHECK)
    from lightning_fabric import Fabric

    if before is None:
        os.environ.pop(_NVML_CHECK, None)
    return Fabric


_NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"


def enable_gradient_checkpointing(model) -> None:
    """Hugging Face models (``gradient_checkpointing_enable``, also inside lethe's wrappers) and
    timm models (``set_grad_checkpointing``); ConfigError for a model that has neither."""
    found = False
    for module in model.modules():
        if callable(getattr(module, "gradient_checkpointing_enable", None)):
            # non-reentrant: works with frozen inputs (LoRA) and gives the same gradients
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            found = True
        elif callable(getattr(module, "set_grad_checkpointing", None)):
            module.set_grad_checkpointing(True)
            found = True
    if not found:
        raise ConfigError(f"train.gradient_checkpointing=true but model {type(model).__name__} "
                          "supports none (Hugging Face and timm models do); set it to false")


__all__ = ["Engine", "PRECISIONS", "OPTIMIZER_RESETS", "check_config",
           "enable_gradient_checkpointing"]
