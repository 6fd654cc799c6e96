"""What the LLM-unlearning methods share (grad_ascent, grad_diff, loku, relearn).

They learn like plain fine-tuning (the Avalanche template; on a TOFU-style stream the loss
counts answer tokens only) and serve a deletion request with a few epochs of an unlearning
objective: each step takes a batch of forget rows and a batch of retain rows (drawn with
replacement from the live training rows outside the request, as the papers pair them) and
minimises ``unlearn_loss``. Subclasses change the objective and hooks (LoKU wraps the model in
FILA-initialised LoRA, ReLearn replaces the forget rows by augmented ones).

``stop_at_target``: stop as soon as memorisation accuracy on the forget answers is at or below
its value on unseen answers (Jang et al., 2023: unlearning is "done" then) — the common
forget target that benchmarks/llm_unlearning.py compares the methods at.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from types import SimpleNamespace

from lethe.errors import ConfigError, RunError
from lethe.methods.base import Method


@dataclass
class UnlearnConfig:
    epochs: int = 5            # unlearning epochs over the forget rows (upper bound with stop_at_target)
    lr: float = 1e-4           # unlearning learning rate (the papers: 1e-5 .. 2e-4 on real LLMs)
    batch_size: int = 8        # forget rows per step (and as many retain rows)
    optimizer: str = "adamw"   # adamw | adam | sgd
    stop_at_target: bool = False  # stop once forget MA ≤ unseen MA (checked every check_every steps)
    check_every: int = 1
    # the unlearning phase's own optimisation (the official TOFU-lineage scripts: AdamW with
    # weight decay 0.01, 2 × 16 accumulated rows per step, one epoch of linear warm-up, linear decay)
    weight_decay: float = 0.0  # weight decay of the unlearning optimizer
    grad_accum_steps: int = 0  # forget batches per optimizer step; 0 = train.grad_accum_steps
    lr_schedule: str = ""      # "" = train.lr_schedule; none | warmup_linear | cosine: this phase's own
    warmup_epochs: float = 0.0  # warm-up of method.lr_schedule in unlearning epochs (official: 1)
    warmup_steps: int = 0      # ... or in optimizer steps; both 0 = train.lr_schedule.warmup_frac

UNLEARN_SCHEDULES = ("", "none", "warmup_linear", "cosine")


def lm_nll(logits, targets):
    """Mean next-token NLL over counted positions (logits [B, V, L], targets −100 = ignored)."""
    import torch

    return torch.nn.functional.cross_entropy(logits.float(), targets, ignore_index=-100)


def check_unlearn_optimisation(cfg) -> None:
    """ConfigError for a bad unlearning-phase optimisation setting."""
    if cfg.lr_schedule not in UNLEARN_SCHEDULES:
        raise ConfigError(f"bad value for 'method.lr_schedule': '{cfg.lr_schedule}' (choose none, "
                          f"warmup_linear or cosine; empty = follow train.lr_schedule)")
    for key in ("weight_decay", "grad_accum_steps", "warmup_epochs", "warmup_steps"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"bad value for 'method.{key}': {getattr(cfg, key)} (must be ≥ 0)")
    if (cfg.warmup_epochs or cfg.warmup_steps) and cfg.lr_schedule not in ("warmup_linear", "cosine"):
        raise ConfigError("method.warmup_epochs / method.warmup_steps set a warm-up of the unlearning "
                          "schedule: set method.lr_schedule=warmup_linear (or cosine) too")


def unlearn_schedule(cfg, train_schedule, steps_per_epoch: int):
    """The lr schedule node of the unlearning phase: train.lr_schedule unless method.lr_schedule
    names one; a warm-up of ``warmup_epochs`` epochs is ``max(1, round(epochs × steps per
    epoch))`` optimizer steps of this loop."""
    from omegaconf import OmegaConf

    if not cfg.lr_schedule:
        return train_schedule
    warm = int(cfg.warmup_steps)
    if cfg.warmup_epochs:
        warm = max(1, round(float(cfg.warmup_epochs) * steps_per_epoch))
    return OmegaConf.merge(train_schedule, {"name": cfg.lr_schedule, "warmup_steps": warm,
                                            "eta_max": None})


class LLMUnlearner(Method):
    """Base: plain fine-tuning to learn; ``unlearn_loss`` steps on forget/retain pairs to forget."""

    name = "llm_unlearner"

    @classmethod
    def check_stream(cls, cfg, stream, seed: int) -> None:
        if getattr(stream, "task_type", "") != "qa":
            raise ConfigError(f"method '{cls.name}' unlearns language models on a TOFU-style QA "
                              f"stream (scenario.name: tofu); scenario '{type(stream).__name__}' "
                              f"is {getattr(stream, 'task_type', 'classification')}")
        if cfg.stop_at_target and "unseen" not in stream.qa.splits:
            raise ConfigError("method.stop_at_target needs an unseen split (unseen_perturbed.json) "
                              "to compare memorisation accuracy with; set stop_at_target: false")
        check_unlearn_optimisation(cfg)

    # --- hooks ------------------------------------------------------------------------------
    def unlearn_loss(self, fx, fy, rx, ry):
        """The objective of one step (forget batch fx/fy, retain batch rx/ry)."""
        raise TypeError(f"{type(self).__name__} must define unlearn_loss")

    def forget_rows(self, fx, fy, request):
        """The rows the unlearning loop iterates over (ReLearn: augmented ones)."""
        return fx, fy

    def prepare_unlearning(self, fx, fy, rx, ry) -> None:
        """Set-up with the request's data (LoKU: FILA; ReLearn: the reference model)."""

    def finish_unlearning(self) -> None:
        """Merge LoRA adapters (if any) so the served model is a plain LM again."""
        from peft import PeftModel

        if isinstance(self.model.lm, PeftModel):
            self.edit_lm(lambda lm: lm.merge_and_unload())

    def wrap_lora(self, rank: int, alpha: float, targets=None, dropout: float = 0.0) -> None:
        """Plain LoRA (B = 0: the model is unchanged) on every linear layer but the head."""
        from peft import LoraConfig, get_peft_model

        from lethe.models.lora import is_conv1d, lm_linear_targets

        def wrap(lm):
            names = lm_linear_targets(lm, targets or None)
            conv = all(is_conv1d(lm.get_submodule(n)) for n in names)
            return get_peft_model(lm, LoraConfig(
                r=rank, lora_alpha=alpha or 2 * rank, target_modules=names,
                lora_dropout=float(dropout), bias="none", fan_in_fan_out=conv, task_type="CAUSAL_LM"))

        self.edit_lm(wrap)

    # --- sharded models (distributed.strategy=fsdp) -----------------------------------------
    @property
    def sharded(self) -> bool:
        from lethe.engine.distributed import is_sharded

        return is_sharded(self.model)

    def unsharded_copy(self):
        """An unsharded copy of the sharded model on every rank: its whole weights gathered
        collectively (every rank calls this), loaded into a model built like it."""
        from lethe.engine.distributed import full_model_state
        from lethe.models.hf import unsharded_like

        full = full_model_state(self.model, everywhere=True)
        plain = unsharded_like(self.model)
        plain.load_state_dict(full)
        return plain

    def edit_lm(self, edit) -> None:
        """``self.model.lm = edit(self.model.lm)`` (add adapters, merge them). A sharded model
        cannot take new modules in place (FSDP2 manages the parameters it was given), so
        there the edit is made on an unsharded copy of the gathered weights, on every rank
        alike, and the result sharded again as the method's model (the template's too)."""
        if not self.sharded:
            self.model.lm = edit(self.model.lm)
            return
        plain = self.unsharded_copy()
        plain.lm = edit(plain.lm)
        self.model = self.engine.prepare_model(plain)
        self.strategy.model = self.model

    def frozen_copy(self):
        """A frozen copy of the model in eval mode (a reference p_ref): a deep copy, or under
        FSDP a sharded copy rebuilt from the gathered weights (a sharded module cannot be
        deep-copied)."""
        import copy

        if not self.sharded:
            return copy.deepcopy(self.model).eval().requires_grad_(False)
        return self.engine.prepare_model(self.unsharded_copy().requires_grad_(False)).eval()

    def trainable(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    # --- serving a request --------------------------------------------------------------------
    def unlearn(self, request) -> None:
        import torch

        from lethe.engine.loop import make_optimizer

        t0 = time.perf_counter()
        cfg = self.cfg
        pool = self.ctx.stream.train
        gone = torch.isin(pool.ids, torch.as_tensor(request.sample_ids))
        self.deleted = gone | getattr(self, "deleted", torch.zeros_like(gone))
        fx, fy = pool.x[gone], pool.y[gone]
        rx, ry = pool.x[~self.deleted], pool.y[~self.deleted]
        if len(rx) == 0:
            raise RunError("the deletion request leaves no retain rows to pair the forget rows with")
        self.model.train()
        # a sharded model that is rebuilt (adapters: edit_lm) takes the template's optimizer
        # state along, by parameter name, as the unsharded model keeps its parameters
        learned, before = self.model, dict(self.model.named_parameters()) if self.sharded else None
        self.prepare_unlearning(fx, fy, rx, ry)
        fx, fy = self.forget_rows(fx, fy, request)
        opt = make_optimizer(self.trainable(), SimpleNamespace(
            optimizer=cfg.optimizer, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay))
        train_accum = self.engine.accum
        self.engine.accum = int(cfg.grad_accum_steps) or train_accum   # this phase only
        try:
            reached, steps = self._unlearn_loop(opt, fx, fy, rx, ry)
        finally:
            self.engine.accum = train_accum
        self.finish_unlearning()
        if before is not None and self.model is not learned:
            self._rebind_template(before)
        self.model.eval()
        self.stats = {"serve_s": time.perf_counter() - t0, "unlearn_steps": steps,
                      "target_reached": float(reached) if cfg.stop_at_target else float("nan")}

    def _rebind_template(self, before: dict) -> None:
        from lethe.engine.distributed import rebind_optimizer

        rebind_optimizer(self.strategy.optimizer, before, self.model)
        known = getattr(self.strategy, "optimized_param_id", None)   # Avalanche's name -> param
        if known is not None:
            now = dict(self.model.named_parameters())
            self.strategy.optimized_param_id = {n: now.get(n, p) for n, p in known.items()}

    def _unlearn_loop(self, opt, fx, fy, rx, ry) -> tuple[bool, int]:
        """The unlearning epochs through the engine; returns (target reached, optimizer steps)."""
        import torch
        from tqdm.auto import tqdm

        from lethe.engine.loop import fit

        cfg, dev = self.cfg, self.ctx.device
        gen = torch.Generator().manual_seed(self.ctx.seed + 7919)
        target = self._target_rows() if cfg.stop_at_target else None
        state = {"calls": 0, "reached": False}

        def batches(epoch):   # forget rows in a seeded order, each paired with random retain rows
            return [(idx, torch.randint(len(rx), (len(idx),), generator=gen))
                    for idx in torch.randperm(len(fx), generator=gen).split(cfg.batch_size)]

        def loss_fn(batch):
            idx, ridx = batch
            loss = self.unlearn_loss(fx[idx].to(dev), fy[idx].to(dev), rx[ridx].to(dev), ry[ridx].to(dev))
            if not torch.isfinite(loss):   # per step: ascent can blow up within an epoch
                raise RunError(f"unlearning loss is {float(loss)} at step {state['calls']} "
                               f"({self.name}); lower method.lr or method.epochs")
            state["calls"] += 1
            return loss

        per_epoch = -(-len(fx) // cfg.batch_size)             # mini-batches (ceil)
        steps_per_epoch = -(-per_epoch // self.engine.accum)  # optimizer steps (ceil)
        bar = tqdm(total=cfg.epochs * steps_per_epoch, desc=f"unlearn ({self.name})", unit="step",
                   disable=None)

        def on_step(steps: int) -> bool:
            bar.update(1)
            if target is not None and steps % max(1, cfg.check_every) == 0 and self._reached(target):
                state["reached"] = True
            return state["reached"]

        steps = fit(self.engine, self.model, opt, cfg.epochs, batches, loss_fn,
                    f"unlearning ({self.name})", base_lr=cfg.lr, on_step=on_step,
                    lr_schedule=unlearn_schedule(cfg, self.ctx.train.lr_schedule, steps_per_epoch))
        bar.close()
        return state["reached"], steps

    def unlearn_stats(self) -> dict:
        return dict(getattr(self, "stats", {}))

    # --- the forget target ----------------------------------------------------------------------
    def _target_rows(self):
        qa = self.ctx.stream.qa
        return {k: qa.item_rows(qa.splits[k]) for k in ("forget", "unseen")}

    def _reached(self, rows) -> bool:
        """Forget-answer memorisation accuracy at or below the unseen answers'."""

        from lethe.metrics.qa import token_stats
        from lethe.metrics.tofu import memorisation_accuracy

        was = self.model.training
        self.model.eval()
        fn = lambda x, t: self.model(x)  # noqa: E731
        # in batches, argmax on the device: never the logits of a whole split at once
        ma = {k: float(memorisation_accuracy(token_stats(fn, x, y, self.ctx.device, self.cfg.batch_size)[0],
                                             y).mean())
              for k, (x, y) in rows.items()}
        self.model.train(was)
        return ma["forget"] <= ma["unseen"]
