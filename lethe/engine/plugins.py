"""Runner plugins for Avalanche's training template (duck-typed: no Avalanche import).

Every runner plugin derives from :class:`RunnerPlugin`: its state goes into the run's
checkpoints, so a resumed run continues exactly, and it may add metrics to each experience.
"""
from __future__ import annotations

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
    """Stops training on a NaN/inf loss, naming where it happened.

    The check costs no host sync per iteration: the first non-finite iteration of the epoch is
    tracked on the device and read once, at the epoch's end (a GPU keeps running ahead).
    """

    def __init__(self, describe_experience):
        self.describe = describe_experience
        self._first_bad = None

    def before_training_epoch(self, strategy, **kwargs):
        self._first_bad = None

    def before_backward(self, strategy, **kwargs):
        import torch

        loss = strategy.loss.detach().reshape(())
        if self._first_bad is None:
            self._first_bad = torch.full((), -1, dtype=torch.long, device=loss.device)
        it = strategy.clock.train_epoch_iterations
        bad = ~torch.isfinite(loss) & (self._first_bad < 0)
        self._first_bad = torch.where(bad, torch.full_like(self._first_bad, it), self._first_bad)
        self._last_loss = loss

    def after_training_epoch(self, strategy, **kwargs):
        if self._first_bad is None or int(self._first_bad) < 0:
            return
        raise RunError(
            f"non-finite training loss in {self.describe()}, epoch {strategy.clock.train_exp_epochs + 1}, "
            f"iteration {int(self._first_bad) + 1}: lower train.lr, check the inputs for NaNs, or "
            f"set train.grad_clip_norm")


class TrainProgress(RunnerPlugin):
    """A tqdm bar per epoch, ``train/loss`` (the epoch's sample-weighted mean loss, or every
    iteration's with ``per_iteration``) and ``train/lr`` on the iteration axis.

    Losses are summed on the device and read once per epoch (the bar's loss only when the bar
    redraws), so the training loop has no host sync per iteration. Step axis and values are
    those of Avalanche's loss metric (``strategy.clock.train_iterations``).
    log_lr: False when an lr schedule logs train/lr per step itself (LRSchedulePlugin).
    """

    def __init__(self, tracker, describe_experience, epochs: int, log_lr: bool = True,
                 per_iteration: bool = False):
        self.tracker, self.describe, self.epochs = tracker, describe_experience, epochs
        self.log_lr, self.per_iteration = log_lr, per_iteration
        self.bar = None
        self._sum, self._n, self._points = None, 0, []

    def before_training_epoch(self, strategy, **kwargs):
        from tqdm.auto import tqdm

        self._sum, self._n, self._points = None, 0, []
        self.bar = tqdm(total=len(strategy.dataloader), leave=False, unit="it", disable=None,
                        desc=f"{self.describe()} epoch {strategy.clock.train_exp_epochs + 1}/{self.epochs}")

    def after_training_iteration(self, strategy, **kwargs):
        loss, n = strategy.loss.detach().float().reshape(()), len(strategy.mb_y)
        self._sum = loss * n if self._sum is None else self._sum + loss * n
        self._n += n
        if self.per_iteration:
            self._points.append((strategy.clock.train_iterations, loss))
        if self.bar is not None and self.bar.update(1):   # True only when the bar redraws
            self.bar.set_postfix(loss=f"{float(loss):.3f}", refresh=False)

    def after_training_epoch(self, strategy, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.tracker is None:
            return
        step = strategy.clock.train_iterations
        if self.per_iteration and self._points:
            import torch

            values = torch.stack([v.reshape(()) for _, v in self._points]).tolist()
            self.tracker.log_series("train/loss", [(s, v) for (s, _), v in zip(self._points, values)])
        elif self._sum is not None:
            self.tracker.log_metrics({"train/loss": float(self._sum) / max(self._n, 1)}, step=step)
        if self.log_lr:
            lr = strategy.optimizer.param_groups[0]["lr"]
            self.tracker.log_metrics({"train/lr": lr}, step=step)
