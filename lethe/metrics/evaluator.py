"""The batched evaluator: test data preloaded once, one large-batch pass per evaluation point.

Predictions of every evaluation point are kept as an integer tensor ``[point, sample]``
next to the targets (class ids), experience ids and task ids, and every metric is derived
from that store with tensor ops (:mod:`lethe.metrics.cl`, :mod:`lethe.metrics.flips`).

Why it is fast: Avalanche's ``strategy.eval`` rebuilds a DataLoader per experience and
fetches every sample through Python ``__getitem__`` + collate, then updates metric objects
per mini-batch. Here the test tensors of all experiences sit on the device once, a pass
is a handful of slices of one tensor, and the accuracy matrix is one ``index_add``.
``benchmarks/eval_vs_avalanche.py`` measures both against a bare forward pass.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Sequence

import torch

from lethe.errors import RunError
from lethe.metrics.passes import gather_rows, inference, rank_rows
from lethe.metrics.protocol import Served, StreamEvaluator

PredictFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, task_ids) -> logits

# CPU passes are memory-bound: a batch whose activations stay around cache size beats one
# huge batch (measured 2-4x on the small CNN over 9,000 digits). GPUs get a share of free memory.
CPU_BATCH_BYTES = 16 * 2 ** 20
CPU_MIN_BATCH = 16
MAX_BATCH = 65536
# Rough activation bytes per input byte when no model is at hand to measure.
DEFAULT_ACTIVATION_FACTOR = 64


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil ships with mlflow
        return 2 ** 31


def auto_batch_size(x: torch.Tensor, device: torch.device | str,
                    per_sample_bytes: int | None = None, n_models: int = 1) -> int:
    """Evaluation batch size for the test tensor ``x`` on ``device``.

    ``per_sample_bytes``: activation bytes one sample costs (measured by
    :meth:`Evaluator.measure_activation_bytes`); without it the input size times
    ``DEFAULT_ACTIVATION_FACTOR``. ``n_models``: models evaluated side by side (vmap).
    CUDA: a quarter of free memory (out-of-memory halves the batch and retries).
    CPU: about ``CPU_BATCH_BYTES`` of activations, never more than a quarter of free RAM.
    """
    device = torch.device(device)
    n = len(x)
    if n == 0:
        return 1
    per = per_sample_bytes or x[0].numel() * x.element_size() * DEFAULT_ACTIVATION_FACTOR
    per = max(int(per), 1) * max(n_models, 1)
    hard = _free_bytes(device) // 4 // per
    if device.type == "cuda":
        bs = hard
    else:
        bs = min(max(CPU_BATCH_BYTES // per, CPU_MIN_BATCH), hard)
    bs = int(max(1, min(n, bs, MAX_BATCH)))
    n_batches = -(-n // bs)
    return -(-n // n_batches)   # equal batches: 9,000 as 2 x 4,500, not 6,452 + 2,548


def _nbytes(out) -> int:
    if isinstance(out, torch.Tensor):
        return out.numel() * out.element_size()
    if isinstance(out, (tuple, list)):
        return sum(_nbytes(o) for o in out)
    if isinstance(out, dict):
        return sum(_nbytes(o) for o in out.values())
    return 0


def _logits(out) -> torch.Tensor:
    """Logits from a model output (tensor, or an object with ``.logits`` such as HF outputs)."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise RunError(f"predict returned {type(out).__name__}; expected a logits tensor "
                   "[batch, classes] (or an object with a .logits tensor)")


class PredictionStore:
    """Predictions of every evaluation point plus what they are compared against.

    ``targets`` are the class ids, ``exp`` the test experience of each sample, ``task`` its
    task label and ``ids`` its stable sample id (kept on CPU).
    """

    def __init__(self, targets, exp, task, ids, n_experiences: int, n_classes: int):
        self.targets, self.exp, self.task, self.ids = targets, exp, task, ids
        self.n_experiences, self.n_classes = n_experiences, n_classes
        self.labels: list[str] = []
        self._preds: list[torch.Tensor] = []
        self._stacked: torch.Tensor | None = None   # cache: metrics read preds every step

    def add(self, label: str, preds: torch.Tensor) -> None:
        if preds.shape != self.targets.shape:
            raise ValueError(f"predictions of '{label}' have shape {tuple(preds.shape)}, "
                             f"expected {tuple(self.targets.shape)} (one per test sample)")
        self.labels.append(label)
        self._preds.append(preds.to(self.targets.device, torch.long))
        self._stacked = None

    @property
    def preds(self) -> torch.Tensor:
        """[P, N] int64 predictions, one row per evaluation point."""
        if self._stacked is None:
            if not self._preds:
                self._stacked = torch.empty(0, len(self.targets), dtype=torch.long,
                                            device=self.targets.device)
            else:
                self._stacked = torch.stack(self._preds)
        return self._stacked

    def row(self, label: str) -> torch.Tensor:
        """Predictions of the (last) evaluation point called ``label``."""
        idx = len(self.labels) - 1 - self.labels[::-1].index(label)
        return self._preds[idx]

    def accuracy_matrix(self) -> torch.Tensor:
        """[P, E] accuracy of every stored evaluation point on every test experience."""
        from lethe.metrics.cl import accuracy_matrix

        return accuracy_matrix(self.preds, self.targets, self.exp, self.n_experiences)

    def __len__(self) -> int:
        return len(self._preds)

    def to_dict(self) -> dict:
        """Tensors only (for predictions.pt; loadable with weights_only=True)."""
        return {"preds": self.preds.cpu(), "targets": self.targets.cpu(), "exp": self.exp.cpu(),
                "task": self.task.cpu(), "ids": self.ids.cpu()}

    def load(self, labels: list[str], preds: torch.Tensor) -> None:
        if len(labels) != len(preds):
            raise ValueError(f"{len(labels)} labels for {len(preds)} prediction rows")
        self.labels = list(labels)
        self._preds = [p.to(self.targets.device, torch.long) for p in preds]
        self._stacked = None


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a CPU tensor to ``device``; through pinned memory and asynchronously for CUDA."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class BatchedPass:
    """Preloaded inputs and the machinery of one large-batch pass over them: batch sizing,
    autocast and the out-of-memory fallback (shared by the classification and LM evaluators).

    batch_size: 0 sizes it automatically at the first pass (see :func:`auto_batch_size`).
    amp: autocast on CUDA (bfloat16 where supported, else float16); ignored on CPU.
    """

    def __init__(self, x: torch.Tensor, task: torch.Tensor, device: torch.device | str = "cpu",
                 batch_size: int = 0, amp: bool = False):
        self.device = torch.device(device)
        on_cuda = self.device.type == "cuda"
        self.x = _to_device(x, self.device)
        self.task = _to_device(task.long(), self.device)
        self.amp = bool(amp) and on_cuda
        self.amp_dtype = (torch.bfloat16 if on_cuda and torch.cuda.is_bf16_supported()
                          else torch.float16)
        self.batch_size = int(batch_size or 0)
        self.last_path = ""            # "single", "vmap" or "loop": how the last pass ran
        self._last_bs = self.batch_size

    # --- batch size ---------------------------------------------------------------------
    def measure_activation_bytes(self, fn: PredictFn, model: torch.nn.Module) -> int:
        """Bytes per sample of every leaf module's output plus the input, on a few samples.

        An upper bound on what one sample keeps alive during an inference pass (a
        sequential net frees each activation once the next layer has consumed it).
        """
        k = min(len(self.x), 8)
        total = 0

        def hook(_mod, _inp, out):
            nonlocal total
            total += _nbytes(out)

        leaves = [m for m in model.modules() if next(m.children(), None) is None]
        handles = [m.register_forward_hook(hook) for m in leaves]
        try:
            with inference(), self._autocast():
                fn(self.x[:k], self.task[:k])
        finally:
            for h in handles:
                h.remove()
        return total // max(k, 1) + self.x[0].numel() * self.x.element_size()

    def _resolve_batch_size(self, fn: PredictFn, model: torch.nn.Module | None) -> int:
        if not self.batch_size:
            per = None
            if model is not None and len(self.x):
                per = self.measure_activation_bytes(fn, model)
            self.batch_size = auto_batch_size(self.x, self.device, per)
        return self.batch_size

    # --- forward passes -----------------------------------------------------------------
    def _autocast(self):
        if self.amp:
            return torch.autocast("cuda", dtype=self.amp_dtype)
        return nullcontext()

    def _with_oom_retry(self, attempt, bs: int):
        """``attempt(bs)``; on CUDA out-of-memory halve the batch and restart the pass.

        The size that worked is kept for the next passes (``self._last_bs``).
        """
        # Not accelerate's find_executable_batch_size: its wrapper runs gc.collect() and a
        # device cache flush at the start of every call, even when nothing fails (measured
        # ~0.4 s per pass in a process holding torch + transformers + mlflow, against a few ms
        # for a small model's CPU pass; the evaluator runs many passes per experience), and
        # when batch size 1 still fails it raises "No executable batch size found, reached
        # zero." in place of the out-of-memory error, which then no longer says what ran out.
        while True:
            try:
                result = attempt(bs)
                self._last_bs = bs
                return result
            except torch.OutOfMemoryError:
                if bs == 1:
                    raise
                bs = max(1, bs // 2)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()

class Evaluator(BatchedPass, StreamEvaluator):
    """Evaluates classifiers on all test experiences of a stream in large batches.

    test: a :class:`lethe.scenarios.types.TestSet` (x, y, exp, task, ids as CPU tensors).
    stream, seed: the stream the test set belongs to and the run's seed, for the ``unlearn/*``
    metrics after forget experiences (:func:`lethe.metrics.unlearning.forget_step_metrics`).
    """

    def __init__(self, test, device: torch.device | str = "cpu", batch_size: int = 0,
                 amp: bool = False, n_classes: int | None = None, stream=None, seed: int = 0):
        super().__init__(test.x, test.task, device, batch_size, amp)
        self.stream, self.seed = stream, int(seed)
        n_classes = n_classes or (int(test.y.max()) + 1 if len(test.y) else 0)
        self.store = PredictionStore(_to_device(test.y.long(), self.device),
                                     _to_device(test.exp.long(), self.device), self.task,
                                     test.ids.cpu(), test.n_experiences, n_classes)

    def forget_metrics(self, served: Served) -> dict[str, float]:
        """Forget / retain / test accuracy, MIA AUC and the method's cost numbers."""
        from lethe.metrics.unlearning import forget_step_metrics

        if self.stream is None:
            raise ValueError("Evaluator(stream=...) is needed for the metrics of forget experiences")
        return forget_step_metrics(served.predict, self.stream, served.experience.index, self.device,
                                   served.stats, serve_s=served.serve_s, model=served.model,
                                   seed=self.seed)

    def _run(self, fn: PredictFn, bs: int) -> torch.Tensor:
        """argmax of fn over the preloaded data in batches of ``bs``: [..., N] int64. In a
        data-parallel run each rank predicts its share of the rows and the shares are gathered
        (every rank holds the same model, so the result is the single-process one)."""
        lo, hi = rank_rows(len(self.x))
        n = hi - lo

        def attempt(bs: int) -> torch.Tensor:
            out = None
            with inference(), self._autocast():
                for s in range(lo, hi, bs):
                    e = min(s + bs, hi)
                    p = _logits(fn(self.x[s:e], self.task[s:e])).argmax(-1)
                    if out is None:   # [N] for one model, [M, N] for a vmapped stack
                        out = torch.empty((*p.shape[:-1], n), dtype=torch.long, device=p.device)
                    out[..., s - lo:e - lo] = p
            if out is None:
                return torch.empty(0, dtype=torch.long, device=self.device)
            # a normal tensor, not an inference tensor: users may edit rows in place
            return out.clone()

        return gather_rows(self._with_oom_retry(attempt, bs), len(self.x), dim=-1)

    def predict(self, predict_fn: PredictFn, model: torch.nn.Module | None = None) -> torch.Tensor:
        """[N] predictions of one model (``model`` is put in eval mode for the pass)."""
        was_training = model.training if model is not None else False
        if model is not None:
            model.eval()
        try:
            bs = self._resolve_batch_size(predict_fn, model)
            preds = self._run(predict_fn, bs)
            self.batch_size = self._last_bs
            self.last_path = "single"
            return preds
        finally:
            if model is not None and was_training:
                model.train()

    def evaluate(self, predict_fn: PredictFn, label: str, model: torch.nn.Module | None = None,
                 plain: bool = False) -> torch.Tensor:
        """Predict and add the result to the store as a new evaluation point."""
        preds = self.predict(predict_fn, model)
        self.store.add(label, preds)
        return preds

    # --- many models --------------------------------------------------------------------
    def predict_many(self, models: Sequence[torch.nn.Module],
                     vmap: bool | None = None) -> torch.Tensor:
        """[M, N] predictions of several models (their plain forward).

        One ``torch.func`` pass (stack_module_state + functional_call + vmap) when they share
        an architecture (:func:`same_architecture`), a loop over :meth:`predict` otherwise;
        ``self.last_path`` says which ran. ``vmap=False`` forces the loop (``True`` asks for
        the vmapped pass and fails when the architectures differ). Both give the same
        predictions. The vmapped pass is for GPUs (one kernel per layer for all models); on
        CPU it measured as fast as the loop for MLPs but ~4x slower for BatchNorm CNNs,
        whose batched BatchNorm copies activations per model.
        """
        models = list(models)
        if not models:
            return torch.empty(0, len(self.x), dtype=torch.long, device=self.device)
        same = len(models) > 1 and same_architecture(models)
        if vmap and not same and len(models) > 1:
            raise ValueError("predict_many(vmap=True) needs models of one architecture "
                             "(same module types, hyperparameters and parameter shapes)")
        if same and vmap is not False:
            return self._predict_vmap(models)
        preds = torch.stack([self.predict(lambda x, t, m=m: m(x), m) for m in models])
        self.last_path = "loop" if len(models) > 1 else "single"
        return preds

    def evaluate_many(self, models: Sequence[torch.nn.Module], labels: Sequence[str],
                      vmap: bool | None = None) -> torch.Tensor:
        """:meth:`predict_many` and one store row per model, labelled ``labels``."""
        models, labels = list(models), list(labels)
        if len(models) != len(labels):
            raise ValueError(f"{len(models)} models but {len(labels)} labels")
        preds = self.predict_many(models, vmap=vmap)
        for label, p in zip(labels, preds):
            self.store.add(label, p)
        return preds

    def _predict_vmap(self, models: list[torch.nn.Module]) -> torch.Tensor:
        from torch.func import functional_call, stack_module_state

        modes = [m.training for m in models]
        for m in models:
            m.eval()
        try:
            with torch.no_grad():
                params, buffers = stack_module_state(models)
            base = models[0]   # functional_call only borrows its structure; weights are swapped in

            def one(p, b, x):
                return functional_call(base, (p, b), (x,))

            batched = torch.vmap(one, in_dims=(0, 0, None))
            if self.batch_size:
                # a set size is the single-model budget; M models share it
                bs = max(1, self.batch_size // len(models))
            else:
                per = self.measure_activation_bytes(lambda x, t: base(x), base)
                bs = auto_batch_size(self.x, self.device, per, n_models=len(models))
            preds = self._run(lambda x, t: batched(params, buffers, x), bs)
            self.last_path = "vmap"
            return preds
        finally:
            for m, mode in zip(models, modes):
                m.train(mode)


def _module_signature(model: torch.nn.Module):
    """Module tree with each module's type and plain hyperparameters (stride, padding, eps,
    p, ...), plus every parameter/buffer's name, shape, dtype and device.

    Shapes alone are not enough: two Conv2d with equal weights but different stride would be
    silently evaluated with the first model's stride by the vmapped pass.
    """
    plain = (bool, int, float, str, tuple, type(None))
    modules = []
    for name, mod in model.named_modules():
        attrs = sorted(((k, v) for k, v in vars(mod).items()
                        if not k.startswith("_") and k != "training" and isinstance(v, plain)),
                       key=lambda kv: kv[0])
        modules.append((name, type(mod), attrs))
    tensors = [(k, tuple(v.shape), v.dtype, v.device) for k, v in model.state_dict().items()]
    return modules, tensors


def same_architecture(models: Sequence[torch.nn.Module]) -> bool:
    """True when all models have the same module types and hyperparameters and the same
    parameter/buffer names, shapes, dtypes and devices (so one vmapped pass is exact)."""
    models = list(models)
    if not models:
        return True
    first = _module_signature(models[0])
    return all(_module_signature(m) == first for m in models[1:])
