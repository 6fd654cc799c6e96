"""Avalanche's training template with its optimisation run by the engine.

:func:`engine_template` derives, from any Avalanche template class a method trains with
(``SupervisedTemplate``, ``Cumulative``, a method's own subclass), the class whose epoch loop
calls the engine: autocast around forward and loss, the loss scaled per accumulation window,
clip + optimizer step + zero-grad once per window, and the optimizer reset of
``train.optimizer_reset``. Every Avalanche callback fires as in the template's own loop, except
``before_update`` / ``after_update``, which fire only when the optimizer really steps (plugins
that act on updates, such as MOS's adapter merging, see each real update once).
"""
from __future__ import annotations

import functools


@functools.cache
def engine_template(base: type) -> type:
    """``base`` with :class:`EngineLoop` in front (one class per base, created once)."""
    return type(f"Engine{base.__name__}", (EngineLoop, base), {})


class EngineLoop:
    """Mixin for an Avalanche SGD template; ``self.engine`` is set by the method."""

    engine = None

    def training_epoch(self, **kwargs):
        engine = self.engine
        engine.begin_epoch(len(self.dataloader))
        for self.mbatch in self.dataloader:
            if self._stop_training:
                break
            self._unpack_minibatch()
            self.mbatch[0] = engine.convert_input(self.mbatch[0])
            self._before_training_iteration(**kwargs)
            if engine.window_starts():
                self.optimizer.zero_grad(set_to_none=True)
            self.loss = self._make_empty_loss()
            self._before_forward(**kwargs)
            with engine.autocast():
                self.mb_output = self.forward()
                self._after_forward(**kwargs)
                self.loss += self.criterion()
            self._before_backward(**kwargs)
            self.backward()
            self._after_backward(**kwargs)
            if engine.window_ends():
                self._before_update(**kwargs)
                self.optimizer_step()
                self._after_update(**kwargs)
            else:
                engine.step(self.optimizer, self.model)   # counts the mini-batch, no step
            self._after_training_iteration(**kwargs)

    def backward(self):
        self.engine.backward(self.loss, retain_graph=self.retain_graph)

    def optimizer_step(self):
        self.engine.step(self.optimizer, self.model)

    def make_optimizer(self, **kwargs):
        super().make_optimizer(**kwargs)
        self.engine.reset_optimizer(self.optimizer)


__all__ = ["engine_template", "EngineLoop"]
