"""Runner plugins for Avalanche's training template (duck-typed: no Avalanche import).

Every runner plugin derives from :class:`RunnerPlugin`: its state goes into the run's
checkpoints, so a resumed run continues exactly, and it may add metrics to each experience.
"""
from __future__ import annotations

import math

from lethe.errors import RunError


class RunnerPlugin:
    """What the runner asks of its plugins besides Avalanche's callbacks."""

    def state_dict(self) -> dict:
        """State that changes results when lost at a resume (checkpointed). None by default."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def experience_metrics(self, experience) -> dict[str, float]:
        """Metrics to log with the experience just served (e.g. which epoch was kept)."""
        return {}


class FiniteLossCheck(RunnerPlugin):
    """Stops training on a NaN/inf loss, naming where it happened."""

    def __init__(self, describe_experience):
        self.describe = describe_experience

    def before_backward(self, strategy, **kwargs):
        loss = float(strategy.loss.detach())
        if not math.isfinite(loss):
            clock = strategy.clock
            raise RunError(
                f"non-finite training loss ({loss}) in {self.describe()}, epoch "
                f"{clock.train_exp_epochs + 1}, iteration {clock.train_epoch_iterations + 1}: "
                f"lower train.lr, check the inputs for NaNs, or use gradient clipping")


class TrainProgress(RunnerPlugin):
    """A tqdm bar per epoch and train/lr on the iteration axis.

    log_lr: False when an lr schedule logs train/lr per step itself (LRSchedulePlugin).
    """

    def __init__(self, tracker, describe_experience, epochs: int, log_lr: bool = True):
        self.tracker, self.describe, self.epochs = tracker, describe_experience, epochs
        self.log_lr = log_lr
        self.bar = None

    def before_training_epoch(self, strategy, **kwargs):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=len(strategy.dataloader), leave=False, unit="it", disable=None,
                        desc=f"{self.describe()} epoch {strategy.clock.train_exp_epochs + 1}/{self.epochs}")

    def after_training_iteration(self, strategy, **kwargs):
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{strategy.loss.item():.3f}", refresh=False)

    def after_training_epoch(self, strategy, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.tracker is not None and self.log_lr:
            lr = strategy.optimizer.param_groups[0]["lr"]
            self.tracker.log_metrics({"train/lr": lr}, step=strategy.clock.train_iterations)
