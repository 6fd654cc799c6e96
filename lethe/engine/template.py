"""Avalanche's training template with its optimisation run by the engine.

:func:`engine_template` derives, from any Avalanche template class a method trains with
(``SupervisedTemplate``, ``Cumulative``, a method's own subclass), the class whose epoch loop
calls the engine: autocast around forward and loss, the loss scaled per accumulation window,
clip + optimizer step + zero-grad once per window, and the optimizer reset of
``train.optimizer_reset``. Every Avalanche callback fires as in the template's own loop, except
``before_update`` / ``after_update``, which fire only when the optimizer really steps (plugins
that act on updates, such as MOS's adapter merging, see each real update once).
The loop also fires each per-iteration event only on the plugins that act on it
(:func:`iteration_hooks`) and, for preloaded tensor datasets, takes its mini-batches by tensor
indexing instead of Avalanche's per-sample loader (:mod:`lethe.engine.fastdata`): the same
batches, the same order, at a fraction of the cost.
"""
from __future__ import annotations

import functools

from lethe.engine.fastdata import TensorBatches, gather


@functools.cache
def engine_template(base: type) -> type:
    """``base`` with :class:`EngineLoop` in front (one class per base, created once)."""
    return type(f"Engine{base.__name__}", (EngineLoop, base), {})


def _template_makes_loader(cls) -> bool:
    """Whether ``cls`` builds its train loader with Avalanche's own ``make_train_dataloader``
    (a strategy with its own loader — a sampler, another order — keeps it)."""
    from avalanche.training.templates.base_sgd import BaseSGDTemplate

    for klass in cls.__mro__:
        if klass is not EngineLoop and "make_train_dataloader" in vars(klass):
            return vars(klass)["make_train_dataloader"] is vars(BaseSGDTemplate)["make_train_dataloader"]
    return False


ITERATION_EVENTS = ("before_training_iteration", "before_forward", "after_forward",
                    "before_backward", "after_backward", "before_update", "after_update",
                    "after_training_iteration")


def iteration_hooks(strategy) -> dict:
    """Per-iteration event → a callable firing it, calling only the plugins that act on it.

    Avalanche's trigger asks every plugin at every event, and its evaluation plugin answers
    each by copying the experience and polling its metrics and loggers — with no metric (lethe's
    default: train/loss comes from TrainProgress) that is all the work there is. Skipped: a
    plugin's event inherited unchanged from Avalanche's base plugin classes (they do nothing),
    and the evaluation plugin at an event when it has no metric and no logger of its acts on
    the event. A strategy class that overrides a trigger (``_before_forward``, ...) keeps it.
    """
    from avalanche.training.templates.base_sgd import BaseSGDTemplate

    fire = {}
    for event in ITERATION_EVENTS:
        trigger = "_" + event
        if getattr(type(strategy), trigger) is not getattr(BaseSGDTemplate, trigger):
            fire[event] = getattr(strategy, trigger)
            continue
        hooks = [getattr(p, event) for p in strategy.plugins if _acts(p, event)]
        fire[event] = functools.partial(_fire_all, strategy, hooks) if hooks else _nothing
    return fire


def _nothing(**kwargs) -> None:
    """An event no plugin acts on."""


def bare_loss(strategy, fire: dict) -> bool:
    """Whether the loss may be the criterion's value itself rather than Avalanche's
    ``zeros(1) + criterion`` (two ops and a backward node per iteration, ≈ 8 µs): when nothing
    can add to the loss before the criterion — no hook at before/after_forward and the template's
    own empty loss. The values are equal bitwise (0 + x = x); the loss is then a 0-d tensor."""
    from avalanche.training.templates.base_sgd import BaseSGDTemplate

    return (type(strategy)._make_empty_loss is BaseSGDTemplate._make_empty_loss
            and fire["before_forward"] is _nothing and fire["after_forward"] is _nothing)


BETWEEN_STEPS = ("after_update", "after_training_iteration", "before_training_iteration")


def zero_each_window(strategy) -> bool:
    """Whether gradients must be zeroed at every accumulation window's start, as Avalanche's
    loop does after ``before_training_iteration``: when a plugin acting between one optimizer
    step (which zeroes them) and the next forward may compute gradients (A-GEM computes its
    memory's in ``before_training_iteration``). False only when every plugin acting there is
    grad-free (:func:`_grad_free`); the first window of an epoch always zeroes."""
    from avalanche.training.templates.base_sgd import BaseSGDTemplate

    if type(strategy).optimizer_step is not EngineLoop.optimizer_step:
        return True   # a subclass's own step may not zero them
    for event in BETWEEN_STEPS:
        trigger = "_" + event
        if getattr(type(strategy), trigger) is not getattr(BaseSGDTemplate, trigger):
            return True
        if any(_acts(p, event) and not _grad_free(p) for p in strategy.plugins):
            return True
    return False


def _grad_free(plugin) -> bool:
    """Marked ``GRAD_FREE`` (lethe's runner plugins), or one of Avalanche's own plugins that
    only count, evaluate or read outputs: its clock and periodic evaluation (in every strategy;
    Avalanche evaluates under ``no_grad``) and its evaluation plugin (metrics read outputs and
    losses). A subclass of the first two may do more: it is not trusted."""
    from avalanche.training.plugins import EvaluationPlugin
    from avalanche.training.plugins.clock import Clock
    from avalanche.training.templates.base_sgd import PeriodicEval

    return getattr(plugin, "GRAD_FREE", False) or type(plugin) in (Clock, PeriodicEval) \
        or isinstance(plugin, EvaluationPlugin)


def _fire_all(strategy, hooks, **kwargs) -> None:
    for hook in hooks:
        hook(strategy, **kwargs)


def _acts(plugin, event: str) -> bool:
    from avalanche.logging import BaseLogger
    from avalanche.training.plugins import EvaluationPlugin
    from avalanche.training.templates.base_sgd import PeriodicEval

    if isinstance(plugin, PeriodicEval) and event == "after_training_iteration" \
            and type(plugin).after_training_iteration is PeriodicEval.after_training_iteration:
        # the template's own periodic evaluation (in every strategy) acts per iteration only
        # in its iteration mode with a period
        return plugin.peval_mode == "iteration" and plugin.eval_every > 0
    if isinstance(plugin, EvaluationPlugin):
        return bool(plugin.metrics) or any(
            hasattr(logger, event) or type(logger).log_metrics is not BaseLogger.log_metrics
            for logger in plugin.loggers)
    if not hasattr(plugin, event):
        return False
    owner = next((k for k in type(plugin).__mro__ if event in vars(k)), None)
    return owner is None or owner.__module__ != "avalanche.core"   # avalanche.core's do nothing


class EngineLoop:
    """Mixin for an Avalanche SGD template; ``self.engine`` is set by the method."""

    engine = None

    _hooks = None   # (the plugins they were computed for, iteration_hooks, zero_each_window)

    def make_train_dataloader(self, **kwargs):
        """The tensor fast path when it applies (lethe.engine.fastdata) — the template's own
        loader, default arguments but ``shuffle``, a plain tensor dataset: its batches stand in
        for the template's loader (a plugin may still replace them, as replay does) — else the
        template's own loader."""
        if not set(kwargs) - {"num_workers", "shuffle", "pin_memory", "persistent_workers"} \
                and _template_makes_loader(type(self)):
            columns = gather(self.adapted_dataset)
            if columns is not None:
                self.dataloader = TensorBatches(columns, self.train_mb_size,
                                                kwargs.get("shuffle", True), self.device)
                return
        super().make_train_dataloader(**kwargs)

    def _iteration_hooks(self) -> tuple[dict, bool, bool]:
        """iteration_hooks, zero_each_window and bare_loss, computed again only when the
        plugins changed."""
        key = tuple(map(id, self.plugins))
        if self._hooks is None or self._hooks[0] != key:
            fire = iteration_hooks(self)
            self._hooks = (key, fire, zero_each_window(self), bare_loss(self, fire))
        return self._hooks[1:]

    def _shortcuts(self, batches) -> tuple[bool, bool]:
        """(unpack, direct) for this epoch: whether the template's ``_unpack_minibatch`` has
        work to do (not for the fast path's batches already on the device), and whether its
        ``forward`` is just ``model(x)`` (a single-task model: the template asks the
        experience for task labels and the model for its type at every iteration otherwise)."""
        from avalanche.models.utils import is_multi_task_module
        from avalanche.training.templates.problem_type.supervised_problem import SupervisedProblem

        cls = type(self)
        unpack = not (isinstance(batches, TensorBatches) and batches.on(self.device)
                      and cls._unpack_minibatch is SupervisedProblem._unpack_minibatch)
        direct = cls.forward is SupervisedProblem.forward and not is_multi_task_module(self.model)
        return unpack, direct

    def training_epoch(self, **kwargs):
        engine = self.engine
        batches = self.dataloader   # the fast path's batches or a loader (replay's, ...)
        fire, zero_always, bare = self._iteration_hooks()
        unpack, direct = self._shortcuts(batches)
        engine.begin_epoch(len(batches))
        first = True
        for self.mbatch in batches:
            if self._stop_training:
                break
            self.mbatch = engine.shard(self.mbatch)   # this rank's rows (--nproc N)
            if unpack:
                self._unpack_minibatch()
            self.mbatch[0] = engine.convert_input(self.mbatch[0])
            fire["before_training_iteration"](**kwargs)
            if engine.window_starts() and (first or zero_always):
                self.optimizer.zero_grad(set_to_none=True)   # else the last step zeroed them
                first = False
            if not bare:
                self.loss = self._make_empty_loss()
            fire["before_forward"](**kwargs)
            with engine.autocast():
                with engine.training_forward(self.model, self.clock.train_iterations):
                    self.mb_output = self.model(self.mbatch[0]) if direct else self.forward()
                fire["after_forward"](**kwargs)
                if bare:
                    self.loss = self.criterion()
                else:
                    self.loss += self.criterion()
            fire["before_backward"](**kwargs)
            self.backward()
            fire["after_backward"](**kwargs)
            if engine.window_ends():
                fire["before_update"](**kwargs)
                self.optimizer_step()
                fire["after_update"](**kwargs)
            else:
                engine.step(self.optimizer, self.model)   # counts the mini-batch, no step
            fire["after_training_iteration"](**kwargs)

    def backward(self):
        self.engine.backward(self.loss, retain_graph=self.retain_graph)

    def optimizer_step(self):
        self.engine.step(self.optimizer, self.model)

    def make_optimizer(self, **kwargs):
        super().make_optimizer(**kwargs)
        self.engine.reset_optimizer(self.optimizer)


__all__ = ["engine_template", "EngineLoop", "iteration_hooks", "zero_each_window", "bare_loss",
           "ITERATION_EVENTS"]
