"""Host memory of the QA evaluator (lethe/metrics/qa.py) at LLM vocabulary sizes: the logits
[N, V, L] of an evaluation set are tens of gigabytes at 32k vocabulary and 250-token answers,
so an evaluation pass must keep per-token quantities only. Measured on the tensors themselves:
a dispatch mode sees every CPU storage that aten ops create (torch's allocator is invisible to
tracemalloc) and records the most bytes alive at once."""
from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")

from torch.multiprocessing.reductions import StorageWeakRef  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402


class PeakCPUTensorBytes(TorchDispatchMode):
    """Most bytes of CPU tensor storages created inside the block alive at the same time
    (a view shares its base's storage, so it adds nothing)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                self.live.setdefault(storage._cdata, (StorageWeakRef(storage), storage.nbytes()))
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def tiny_llama(stream, vocab: int, seed: int):
    from lethe.models.hf import HFCausalLMConfig, hf_causal_lm
    from lethe.models.vision import ModelInfo

    torch.manual_seed(seed)
    return hf_causal_lm(HFCausalLMConfig(arch="llama", layers=1, d_model=16, heads=2),
                        ModelInfo(input_shape=stream.input_shape, n_classes=vocab)).eval()


def peak_of_one_pass(stream, vocab: int, bs: int) -> int:
    from lethe.metrics.qa import QAEvaluator

    stream = copy.copy(stream)
    stream.n_classes = vocab
    model, reference = tiny_llama(stream, vocab, 0), tiny_llama(stream, vocab, 1)
    ev = QAEvaluator(stream, "cpu", batch_size=bs, reference_fn=lambda: reference)
    with PeakCPUTensorBytes() as mem:
        metrics = ev.evaluate(lambda x, t: model(x), "learn:0", model, plain=True)
    # the reference passes ran (PrivLeak needs them): they are inside the measurement
    assert metrics["unlearn/privleak"] == metrics["unlearn/privleak"]
    return mem.peak


def test_measurement_sees_kept_logits():
    with PeakCPUTensorBytes() as mem:
        kept = [torch.zeros(4, 1000, 8) + i for i in range(3)]
    assert mem.peak >= 3 * 4 * 1000 * 8 * 4
    assert len(kept) == 3
    with PeakCPUTensorBytes() as mem:
        sums = [float((torch.zeros(4, 1000, 8) + i).sum()) for i in range(3)]
    assert mem.peak < 3 * 4 * 1000 * 8 * 4
    assert sums == [0.0, 32000.0, 64000.0]


def test_qa_evaluation_host_memory_does_not_grow_with_the_vocabulary(tmp_path):
    from lethe.scenarios.tofu import TofuConfig, tofu

    # el_n near the sequence length: EL_n decodes a few prefixes only (its greedy decoding
    # keeps no logits either way), the other passes run in full
    stream = tofu(TofuConfig(cache_dir=str(tmp_path / "cache"), embedder="exact", authors=6,
                             forget_percent=17, forget_split="forget17", unseen_authors=2,
                             el_n=41, max_new_tokens=2), 0)
    bs = 2
    n, length = stream.test.x.shape
    small, large = (peak_of_one_pass(stream, v, bs) for v in (1000, 32000))
    # the float32 logits of one evaluation row grow by this much from 1,000 to 32,000 tokens
    row = (32000 - 1000) * length * 4
    # keeping the evaluation set's logits would add n rows (here 64): the peak may grow by a
    # few batches of logits in flight (forward, log-softmax), never with the set's size
    assert n >= 32 * bs
    assert large - small < 8 * bs * row, (small, large, row)
