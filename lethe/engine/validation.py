"""Evaluation during training on a validation split, and best-model selection per experience.

The split is carved from each experience's (adapted) training data after Avalanche's dataset
adaptation, so the model never trains on it and the test data is never used for selection.

Under ``distributed.strategy=fsdp`` (weights sharded) every rank validates on the whole split
(each forward is a collective; every rank gets the same score, so all take the same decision),
under ``no_grad`` rather than ``inference_mode`` (FSDP reuses the buffers it gathers weights
into, and one allocated in inference mode cannot be written by a later training step). The
best-model copy is the whole state, gathered collectively to rank 0 (on the CPU), and restored
by rank 0 sending it and every rank keeping its shard.
"""
from __future__ import annotations

import copy

import torch

from lethe.engine import distributed
from lethe.engine.plugins import RunnerPlugin


class ValidationPlugin(RunnerPlugin):
    """Validates every N epochs/steps; with select=best restores the best weights at the end
    of the experience's last epoch (before any method's after_training_exp)."""

    def __init__(self, cfg, predict, tracker, seed: int):
        self.every_epochs, self.every_steps = cfg.eval.every_epochs, cfg.eval.every_steps
        self.fraction = cfg.eval.val_fraction
        self.select, self.metric = cfg.checkpoint.select, cfg.checkpoint.select_metric
        self.predict, self.tracker, self.seed = predict, tracker, seed
        self.selection: dict[str, float] = {}
        self.val_ids: list[int] = []      # sample ids held out for validation (this experience)
        self.train_ids: list[int] = []    # sample ids left for training
        self._n_exp = 0

    # --- checkpoints and metrics -----------------------------------------------------------
    def state_dict(self) -> dict:
        # the experience counter seeds each split: a resumed run must carve the same ids
        return {"n_exp": self._n_exp}

    def load_state_dict(self, state: dict) -> None:
        self._n_exp = int(state.get("n_exp", 0))

    def experience_metrics(self, experience) -> dict[str, float]:
        """select/epoch, select/step, select/val_acc, select/val_loss of a learn experience."""
        return dict(self.selection) if experience.kind == "learn" else {}

    # --- the split ----------------------------------------------------------------------
    def after_train_dataset_adaptation(self, strategy, **kwargs):
        data = strategy.adapted_dataset
        g = torch.Generator().manual_seed(self.seed * 10007 + self._n_exp)
        perm = torch.randperm(len(data), generator=g)
        n_val = max(1, int(round(self.fraction * len(data))))
        val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
        val = data.subset(val_idx.tolist()).eval()
        loader = torch.utils.data.DataLoader(val, batch_size=1024, shuffle=False)
        batches = list(loader)
        self.x = torch.cat([b[0] for b in batches]).to(strategy.device)
        self.y = torch.cat([b[1] for b in batches]).long().to(strategy.device)
        self.t = torch.cat([b[2] if len(b) > 2 else torch.zeros_like(b[1]) for b in batches]).to(strategy.device)
        self.val_ids = [int(i) for i in val.sample_id] if hasattr(val, "sample_id") else []
        strategy.adapted_dataset = data.subset(train_idx.tolist())
        self.train_ids = ([int(i) for i in strategy.adapted_dataset.sample_id]
                          if hasattr(strategy.adapted_dataset, "sample_id") else [])
        self._n_exp += 1
        self._epoch = 0
        self._best = None
        self.selection = {}

    # --- when to validate ---------------------------------------------------------------
    def after_training_iteration(self, strategy, **kwargs):
        if self.every_steps and strategy.clock.train_exp_iterations % self.every_steps == 0:
            self._validate(strategy)

    def after_training_epoch(self, strategy, **kwargs):
        self._epoch += 1
        if self.every_epochs and self._epoch % self.every_epochs == 0:
            self._validate(strategy)
        if self._epoch == strategy.train_epochs:
            self._finish(strategy)

    # --- validation and selection -------------------------------------------------------
    def _validate(self, strategy) -> None:
        model = strategy.model
        sharded = distributed.is_sharded(model)
        was_training = model.training
        model.eval()
        with torch.no_grad() if sharded else torch.inference_mode():
            logits = self.predict(self.x, self.t)
            loss = torch.nn.functional.cross_entropy(logits.float(), self.y).item()
            # class dimension 1: [B, C] logits, or LM logits [B, V, L] against targets [B, L]
            acc = (logits.argmax(1) == self.y).float().mean().item()
        model.train(was_training)
        step = strategy.clock.train_iterations + 1
        self.tracker.log_metrics({"val/acc": acc, "val/loss": loss}, step=step)
        score = acc if self.metric == "val/acc" else -loss
        if self._best is None or score > self._best[0]:
            state = None
            if self.select == "best":   # sharded: a collective, rank 0 holds the copy
                state = distributed.full_model_state(model) if sharded else copy.deepcopy(model.state_dict())
            self._best = (score, self._epoch, step, acc, loss, state)

    def _finish(self, strategy) -> None:
        if self._best is None:
            return
        score, epoch, step, acc, loss, state = self._best
        if self.select == "best" and distributed.is_sharded(strategy.model):
            distributed.load_full_model_state(strategy.model, state, from_rank0=True)
        elif self.select == "best":
            strategy.model.load_state_dict(state)
        self.selection = {"select/epoch": float(epoch), "select/step": float(step),
                          "select/val_acc": acc, "select/val_loss": loss}
