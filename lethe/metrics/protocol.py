"""The protocol every evaluator of a stream implements; the runner knows no other.

An evaluator holds a stream's evaluation data and, per evaluation point,

1. ``evaluate(predict, label, model, plain)`` — runs the served model over that data and adds
   a row to its :class:`~lethe.metrics.evaluator.PredictionStore` (``plain``: ``predict`` is the
   model's own forward, so an evaluator may use the model's faster paths, e.g. a language
   model's KV-cached ``generate``);
2. ``experience_metrics(served)`` — every metric for the experience just served: the standard
   keys from the store, the task's own keys, and the forget / update metrics of forget and
   update experiences;
3. ``state_dict()`` / ``load_state_dict()`` — everything a resumed run needs to continue
   exactly (the store's rows plus the evaluator's own history);
4. ``write_artifacts(folder, title)`` — its files for the run's final artifacts.

:class:`StreamEvaluator` implements the parts every task shares from the store; the
classification (lethe/metrics/evaluator.py), language-model corpus (lethe/metrics/lm.py) and
QA / TOFU (lethe/metrics/qa.py) evaluators extend it, and
:func:`lethe.metrics.evaluators.for_stream` picks one by ``Stream.task_type``.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Served:
    """One experience the method has just served, as the evaluator needs it."""

    experience: Any                       # lethe.scenarios.types.Experience
    predict: Callable                     # (x, task_ids) -> logits of the served model
    model: Any = None                     # the served nn.Module (put in eval mode for passes)
    serve_s: float = 0.0                  # wall time the method took to serve it
    stats: dict = field(default_factory=dict)   # the method's unlearn_stats() (forget only)


class StreamEvaluator(abc.ABC):
    """Shared parts of the protocol; subclasses set ``self.store`` and implement ``evaluate``."""

    store: Any   # PredictionStore

    @abc.abstractmethod
    def evaluate(self, predict, label: str, model=None, plain: bool = False):
        """One evaluation point: run ``predict`` over the data and add a row to the store."""

    # --- metrics ------------------------------------------------------------------------
    def n_learned(self) -> int:
        """Learn experiences served so far (store rows labelled ``learn:<index>``)."""
        return sum(1 for lab in self.store.labels if lab.startswith("learn:"))

    def point_metrics(self, n_learned: int) -> dict[str, float]:
        """The standard keys of the newest evaluation point (accuracy, forgetting, flips)."""
        from lethe.metrics.summary import step_metrics

        return step_metrics(self.store, n_learned)

    def forget_metrics(self, served: Served) -> dict[str, float]:
        """``unlearn/*`` after a forget experience; the method's own numbers by default."""
        stats = {"serve_s": served.serve_s} | dict(served.stats)
        return {f"unlearn/{k}": float(v) for k, v in stats.items()}

    def experience_metrics(self, served: Served) -> dict[str, float]:
        out = self.point_metrics(self.n_learned())
        kind = served.experience.kind
        if kind == "update":   # flips vs every earlier model version + accuracy gain
            from lethe.metrics.compat import update_metrics

            out.update(update_metrics(self.store))
        elif kind == "forget":
            out.update(self.forget_metrics(served))
        return out

    # --- checkpoints --------------------------------------------------------------------
    def extra_state(self) -> dict:
        """The evaluator's own history besides the store (e.g. held-out losses)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def state_dict(self) -> dict:
        return {"store_labels": list(self.store.labels), "store_preds": self.store.preds.cpu(),
                "extra": self.extra_state()}

    def load_state_dict(self, state: dict) -> None:
        self.store.load(state["store_labels"], state["store_preds"])
        self.load_extra_state(state.get("extra", {}))

    # --- artifacts ----------------------------------------------------------------------
    def write_artifacts(self, folder, title: str) -> list[str]:
        """Flip reports of model-update streams; subclasses add their own files."""
        if not any(lab.startswith("update:") for lab in self.store.labels):
            return []
        from lethe.metrics.compat import write_update_reports

        return write_update_reports(self.store, folder, title)


__all__ = ["Served", "StreamEvaluator"]
