"""Runner plugins for Avalanche's training template (duck-typed: no Avalanche import).

Every runner plugin derives from :class:`RunnerPlugin`: its state goes into the run's
checkpoints, so a resumed run continues exactly, and it may add metrics to each experience.
"""
from __future__ import annotations

from lethe.engine import distributed
from lethe.errors import RunError


class RunnerPlugin:
    """What the runner asks of its plugins besides Avalanche's callbacks."""

    # its per-iteration callbacks compute no gradients (they read the loss, set the lr,
    # validate under inference_mode): the engine's loop may then keep the gradients its last
    # optimizer step zeroed instead of zeroing them again (lethe.engine.template)
    GRAD_FREE = True

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

    The check costs no host sync per iteration: each iteration's loss is kept on the device
    (one detach) and the epoch's losses are checked at once at its end (a GPU keeps running
    ahead; the weights a NaN reached are not checkpointed, since the run stops here).
    """

    def __init__(self, describe_experience):
        self.describe = describe_experience
        self._losses = []

    def before_training_epoch(self, strategy, **kwargs):
        self._losses = []

    def before_backward(self, strategy, **kwargs):
        self._losses.append(strategy.loss.detach())

    def after_training_epoch(self, strategy, **kwargs):
        import torch

        if not self._losses:
            return
        finite = torch.isfinite(torch.stack([v if v.dim() == 0 else v.reshape(()) for v in self._losses]))
        self._losses = []
        if bool(finite.all()):   # one read per epoch; where it failed is looked up only then
            return
        bad = (~finite).nonzero()
        raise RunError(
            f"non-finite training loss in {self.describe()}, epoch {strategy.clock.train_exp_epochs + 1}, "
            f"iteration {int(bad[0]) + 1}: lower train.lr, check the inputs for NaNs, or "
            f"set train.grad_clip_norm")


def bars_shown() -> bool:
    """Whether a progress bar would be drawn: a terminal or a notebook, and no TQDM_DISABLE.
    A disabled tqdm still costs ≈ 0.2 ms to create (it registers itself and starts its monitor
    thread): with one bar per epoch, that was a short epoch's largest overhead in a batch job."""
    import os
    import sys

    from tqdm.auto import tqdm

    if os.environ.get("TQDM_DISABLE", "").strip().lower() in ("1", "true", "yes"):
        return False
    notebook = any(k.__module__ == "tqdm.notebook" for k in tqdm.__mro__)   # tqdm.auto's pick
    return notebook or bool(getattr(sys.stderr, "isatty", lambda: False)())


class TrainProgress(RunnerPlugin):
    """A tqdm bar per epoch, ``train/loss`` (the epoch's sample-weighted mean loss, or every
    iteration's with ``per_iteration``) and ``train/lr`` on the iteration axis.

    Each iteration's loss stays on the device (one detach) and the epoch's are read once, at
    its end (the bar's loss only when the bar redraws), so the training loop has no host sync
    per iteration. Step axis and values are those of Avalanche's loss metric
    (``strategy.clock.train_iterations``).
    log_lr: False when an lr schedule logs train/lr per step itself (LRSchedulePlugin).
    """

    def __init__(self, tracker, describe_experience, epochs: int, log_lr: bool = True,
                 per_iteration: bool = False):
        self.tracker, self.describe, self.epochs = tracker, describe_experience, epochs
        self.log_lr, self.per_iteration = log_lr, per_iteration
        self.bar = None
        self._losses, self._sizes, self._steps = [], [], []
        self._terms = None

    def before_training_epoch(self, strategy, **kwargs):
        self._losses, self._sizes, self._steps = [], [], []
        self._terms = [] if distributed.world_size() > 1 else None
        if bars_shown():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=len(strategy.dataloader), leave=False, unit="it",
                            desc=f"{self.describe()} epoch {strategy.clock.train_exp_epochs + 1}/{self.epochs}")

    def after_training_iteration(self, strategy, **kwargs):
        self._losses.append(strategy.loss.detach())
        self._sizes.append(len(strategy.mb_y))
        if self._terms is not None:   # --nproc N: what each rank's mean loss averages
            self._terms.append(distributed.loss_terms(strategy.mb_y))
        if self.per_iteration:
            self._steps.append(strategy.clock.train_iterations)
        if self.bar is not None and self.bar.update(1):   # True only when the bar redraws
            self.bar.set_postfix(loss=f"{float(self._losses[-1].sum()):.3f}", refresh=False)

    def _epoch_losses(self) -> list[float]:
        """Every iteration's loss; under ``--nproc N`` the ranks' shard means weighted by their
        loss terms (rows, or target tokens of a token-mean LM loss), which is the
        single-process loss; ``_sizes`` becomes the global batch sizes."""
        import torch

        losses = torch.stack([v if v.dim() == 0 else v.reshape(()) for v in self._losses]).double()
        if self._terms is None:
            return losses.tolist()
        import torch.distributed as dist

        dev = losses.device
        sizes = torch.tensor(self._sizes, dtype=torch.float64, device=dev)
        terms = torch.stack([torch.as_tensor(t, device=dev) for t in self._terms]).double()
        self._terms = []
        both = torch.stack([losses * terms, terms, sizes])
        dist.all_reduce(both)   # every rank ends its epochs together: a collective is safe here
        self._sizes = both[2].tolist()
        return (both[0] / both[1].clamp(min=1)).tolist()

    def after_training_epoch(self, strategy, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.tracker is None:
            return
        step = strategy.clock.train_iterations
        if self._losses:
            losses = self._epoch_losses()
            if self.per_iteration:
                self.tracker.log_series("train/loss", list(zip(self._steps, losses)))
            else:
                mean = sum(v * n for v, n in zip(losses, self._sizes)) / max(sum(self._sizes), 1)
                self.tracker.log_metrics({"train/loss": mean}, step=step)
        if self.log_lr:
            lr = strategy.optimizer.param_groups[0]["lr"]
            self.tracker.log_metrics({"train/lr": lr}, step=step)
