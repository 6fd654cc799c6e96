"""The batched evaluator: test data preloaded once, one large-batch pass per evaluation point.

Predictions of every evaluation point are kept as an integer tensor ``[point, sample]``
next to the targets, experience ids and class ids, and every metric is derived from that
store with tensor ops (:mod:`lethe.metrics.cl`, :mod:`lethe.metrics.flips`).
"""
from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch

PredictFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, task_ids) -> logits


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil ships with mlflow
        return 2 ** 31


def auto_batch_size(x: torch.Tensor, device: torch.device, activation_factor: int = 64) -> int:
    """Largest batch whose input and (estimated) activations fit in a quarter of free memory.

    The estimate is deliberately rough; CUDA out-of-memory halves the batch and retries.
    """
    n = max(len(x), 1)
    per_sample = max(x[0].numel() * x.element_size(), 1) * activation_factor if len(x) else 1
    fits = _free_bytes(device) // 4 // per_sample
    return int(max(1, min(n, fits, 65536)))


class PredictionStore:
    """Predictions of every evaluation point plus what they are compared against."""

    def __init__(self, targets, exp, task, ids, n_experiences: int, n_classes: int):
        self.targets, self.exp, self.task, self.ids = targets, exp, task, ids
        self.n_experiences, self.n_classes = n_experiences, n_classes
        self.labels: list[str] = []
        self._preds: list[torch.Tensor] = []

    def add(self, label: str, preds: torch.Tensor) -> None:
        self.labels.append(label)
        self._preds.append(preds)

    @property
    def preds(self) -> torch.Tensor:
        """[P, N] int64 predictions, one row per evaluation point."""
        if not self._preds:
            return torch.empty(0, len(self.targets), dtype=torch.long, device=self.targets.device)
        return torch.stack(self._preds)

    def __len__(self) -> int:
        return len(self._preds)

    def to_dict(self) -> dict:
        """Tensors only (for predictions.pt; loadable with weights_only=True)."""
        return {"preds": self.preds.cpu(), "targets": self.targets.cpu(), "exp": self.exp.cpu(),
                "task": self.task.cpu(), "ids": self.ids.cpu()}

    def load(self, labels: list[str], preds: torch.Tensor) -> None:
        self.labels = list(labels)
        self._preds = [p.to(self.targets.device) for p in preds]


class Evaluator:
    """Evaluates models on all test experiences of a stream in large batches."""

    def __init__(self, test, device: torch.device | str = "cpu", batch_size: int = 0,
                 amp: bool = False, n_classes: int | None = None):
        self.device = torch.device(device)
        on_cuda = self.device.type == "cuda"
        x = test.x.pin_memory() if on_cuda else test.x     # pinned: async host→device copy
        self.x = x.to(self.device, non_blocking=True)
        self.task = test.task.to(self.device)
        self.amp = amp and on_cuda
        self.batch_size = batch_size or auto_batch_size(self.x, self.device)
        n_classes = n_classes or int(test.y.max()) + 1
        self.store = PredictionStore(test.y.to(self.device), test.exp.to(self.device), self.task,
                                     test.ids, test.n_experiences, n_classes)

    # --- forward passes -----------------------------------------------------------------
    def _batched(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Apply fn over the preloaded data in batches; returns argmax predictions."""
        bs = self.batch_size
        while True:
            try:
                with torch.inference_mode(), torch.autocast(self.device.type, enabled=self.amp):
                    out = [fn(self.x[s:s + bs], self.task[s:s + bs]).argmax(-1)
                           for s in range(0, len(self.x), bs)]
                self.batch_size = bs
                return torch.cat(out, dim=-1)
            except torch.OutOfMemoryError:
                if bs == 1:
                    raise
                bs = max(1, bs // 2)
                torch.cuda.empty_cache()

    def predict(self, predict_fn: PredictFn, model: torch.nn.Module | None = None) -> torch.Tensor:
        """[N] predictions of one model (``model`` is put in eval mode for the pass)."""
        was_training = model.training if model is not None else False
        if model is not None:
            model.eval()
        try:
            return self._batched(predict_fn)
        finally:
            if model is not None and was_training:
                model.train()

    def evaluate(self, predict_fn: PredictFn, label: str,
                 model: torch.nn.Module | None = None) -> torch.Tensor:
        """Predict and add the result to the store as a new evaluation point."""
        preds = self.predict(predict_fn, model)
        self.store.add(label, preds)
        return preds

    def predict_many(self, models: Sequence[torch.nn.Module]) -> torch.Tensor:
        """[M, N] predictions of several models; one vmapped pass when they share an
        architecture (same module types, parameter names and shapes), a loop otherwise."""
        models = list(models)
        if len(models) > 1 and same_architecture(models):
            return self._predict_vmap(models)
        return torch.stack([self.predict(lambda x, t, m=m: m(x), m) for m in models])

    def evaluate_many(self, models: Sequence[torch.nn.Module], labels: Sequence[str]) -> torch.Tensor:
        preds = self.predict_many(models)
        for label, p in zip(labels, preds):
            self.store.add(label, p)
        return preds

    def _predict_vmap(self, models: list[torch.nn.Module]) -> torch.Tensor:
        from torch.func import functional_call, stack_module_state

        modes = [m.training for m in models]
        for m in models:
            m.eval()
        try:
            params, buffers = stack_module_state(models)
            base = copy.deepcopy(models[0]).to("meta")

            def one(p, b, x):
                return functional_call(base, (p, b), (x,))

            batched = torch.vmap(one, in_dims=(0, 0, None))
            return self._batched(lambda x, t: batched(params, buffers, x))
        finally:
            for m, mode in zip(models, modes):
                m.train(mode)


def same_architecture(models: Sequence[torch.nn.Module]) -> bool:
    """True when all models have the same module types and the same parameter/buffer shapes."""

    def signature(m):
        return ([type(s).__name__ for s in m.modules()],
                [(k, tuple(v.shape), v.dtype) for k, v in m.state_dict().items()])

    first = signature(models[0])
    return all(signature(m) == first for m in models[1:])
