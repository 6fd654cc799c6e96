"""One evaluator per task type of a stream (``Stream.task_type``), built from the run's settings.

Adding a task type is one entry in :data:`BUILDERS`; the runner calls :func:`for_stream` and
then only the protocol of :class:`lethe.metrics.protocol.StreamEvaluator`.
"""
from __future__ import annotations

from typing import Callable, Optional


def _classification(stream, device, eval_cfg, seed: int, reference: Optional[Callable]):
    from lethe.metrics.evaluator import Evaluator

    return Evaluator(stream.test, device, eval_cfg.batch_size, eval_cfg.amp, stream.n_classes,
                     stream=stream, seed=seed)


def _lm(stream, device, eval_cfg, seed: int, reference: Optional[Callable]):
    from lethe.metrics.lm import LMEvaluator

    return LMEvaluator(stream.test, device, eval_cfg.batch_size, eval_cfg.amp, stream.n_classes)


def _qa(stream, device, eval_cfg, seed: int, reference: Optional[Callable]):
    from lethe.metrics.qa import QAEvaluator

    return QAEvaluator(stream, device, eval_cfg.batch_size, reference_fn=reference)


BUILDERS = {"classification": _classification, "lm": _lm, "qa": _qa}


def for_stream(stream, device, eval_cfg, seed: int = 0, reference: Optional[Callable] = None):
    """The evaluator of ``stream``'s task type.

    reference: a zero-argument callable returning the retain-only model that TOFU's forget
    quality and MUSE's PrivLeak compare against (QA streams; trained by the caller, once).
    """
    task_type = getattr(stream, "task_type", "classification")
    try:
        build = BUILDERS[task_type]
    except KeyError:
        raise ValueError(f"no evaluator for task type '{task_type}' (known: "
                         f"{', '.join(sorted(BUILDERS))})") from None
    return build(stream, device, eval_cfg, seed, reference)


__all__ = ["BUILDERS", "for_stream"]
