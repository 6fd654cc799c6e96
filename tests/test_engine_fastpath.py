"""The engine's speed paths (lethe/engine/template.py, lethe/engine/fastdata.py) change no result:
the tensor fast path gives Avalanche's own loader's batches bitwise (and leaves torch's RNG as
the loader does), per-iteration events still reach every plugin that acts on them, and timm's
gradient checkpointing gives the gradients of a plain backward."""
from __future__ import annotations

import collections
import math

import pytest
import torch

from lethe.engine.fastdata import TensorBatches, gather

pytestmark = pytest.mark.usefixtures("one_thread")

BATCH = 32


def train_cfg(**over):
    from omegaconf import OmegaConf

    from lethe.platform.config import TrainConfig

    return OmegaConf.merge(OmegaConf.structured(TrainConfig),
                           {"epochs": 1, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9,
                            "batch_size": BATCH, **over})


def digits(task_labels: bool = False, n_experiences: int = 3):
    from lethe.scenarios.split_digits import SplitDigitsConfig, split_digits

    return split_digits(SplitDigitsConfig(n_experiences=n_experiences, task_labels=task_labels), 0)


def small_mlp(seed: int = 0):
    from lethe.models.vision import MLPConfig, ModelInfo, mlp

    torch.manual_seed(seed)
    return mlp(MLPConfig(hidden=32, layers=1), ModelInfo(input_shape=(1, 8, 8), n_classes=10))


def method(stream, cls=None, cfg=None, train=None, plugins=(), evaluator=None):
    from lethe.methods.base import MethodContext
    from lethe.methods.naive import Naive, NaiveConfig

    ctx = MethodContext(train=train or train_cfg(), device=torch.device("cpu"), stream=stream,
                        plugins=list(plugins), evaluator=evaluator)
    cls = cls or Naive
    return cls(cfg if cfg is not None else NaiveConfig(), small_mlp(), ctx)


def reference_loader(dataset):
    """Avalanche's train loader as BaseSGDTemplate.make_train_dataloader builds it on CPU for a
    task-aware experience (num_workers 0: persistent_workers dropped; pin_memory False)."""
    from avalanche.benchmarks.utils.data_loader import TaskBalancedDataLoader

    return TaskBalancedDataLoader(dataset, oversample_small_groups=True, batch_size=BATCH,
                                  shuffle=True, pin_memory=False, drop_last=False)


def epochs_of(loader, seed: int = 11, n: int = 2):
    """``n`` epochs of ``loader`` from torch.manual_seed(seed), and the RNG state after them."""
    torch.manual_seed(seed)
    batches = [[list(b) for b in loader] for _ in range(n)]
    return batches, torch.get_rng_state()


def assert_same_epochs(got, want) -> None:
    (got_b, got_rng), (want_b, want_rng) = got, want
    assert [len(e) for e in got_b] == [len(e) for e in want_b]
    for e, (ge, we) in enumerate(zip(got_b, want_b)):
        for i, (g, w) in enumerate(zip(ge, we)):
            assert len(g) == len(w) == 3, (e, i)          # x, y, task label
            for k, (a, b) in enumerate(zip(g, w)):
                assert a.dtype == b.dtype and torch.equal(a, b), (e, i, k)
    assert torch.equal(got_rng, want_rng)                 # later draws (init, dropout) unchanged


def strategy_on(stream, exp, dataset=None):
    """A lethe strategy with its train loader made for ``exp`` (``dataset``: its adapted data)."""
    strategy = method(stream).strategy
    strategy.experience = exp
    strategy.adapted_dataset = dataset if dataset is not None else exp.dataset.train()
    strategy.make_train_dataloader(shuffle=True)
    return strategy


# --- 1a/1b: the fast path's batches are the template's ------------------------------------
@pytest.mark.parametrize("task_labels, index", [(False, 0), (False, 2), (True, 1), (True, 2)])
def test_fast_batches_equal_avalanches_task_balanced_loader_bitwise(task_labels, index):
    """Class- and task-incremental split digits (task label = experience index): the batches
    the engine iterates (x, y, task label) and torch's RNG after two epochs are those of
    Avalanche's TaskBalancedDataLoader, and of the template's own loader."""
    stream = digits(task_labels)
    exp = stream.experiences[index].train
    strategy = strategy_on(stream, exp)
    fast = strategy.dataloader
    assert isinstance(fast, TensorBatches)               # the fast path applies here
    assert len(exp.dataset) % BATCH                      # a short last batch is covered
    want = epochs_of(reference_loader(exp.dataset.train()))
    assert_same_epochs(epochs_of(fast), want)
    tasks = torch.cat([b[2] for b in want[0][0]])
    assert torch.equal(tasks, torch.full_like(tasks, index if task_labels else 0))


SUBSETS = ["sorted subset", "shuffled subset", "subset of a subset", "concat", "subset of a concat"]


def _subsets(d, other):
    g = torch.Generator().manual_seed(5)
    perm = torch.randperm(len(d), generator=g)
    return {
        # as ValidationPlugin carves the training part of an experience
        "sorted subset": lambda: d.subset(perm[len(d) // 5:].sort().values.tolist()),
        "shuffled subset": lambda: d.subset(perm[: len(d) // 2].tolist()),
        "subset of a subset": lambda: d.subset(perm[:200].tolist()).subset(list(range(0, 200, 3))),
        # as Cumulative (joint) concatenates experiences, and a subset of that
        "concat": lambda: other.concat(d),
        "subset of a concat": lambda: other.concat(d).subset(
            torch.randperm(len(other) + len(d), generator=g)[::2].tolist()),
    }


@pytest.mark.parametrize("task_labels", [False, True])
@pytest.mark.parametrize("kind", SUBSETS)
def test_subsets_and_concatenations_take_the_fast_path_or_fall_back_bitwise(kind, task_labels):
    """Datasets as lethe derives them from experiences: gather handles each one with the
    loader's exact batches, except a concatenation of two tasks, where the template balances
    the tasks and the engine keeps its loader."""
    stream = digits(task_labels)
    exp = stream.experiences[1].train
    d = exp.dataset.train()
    data = _subsets(d, stream.experiences[0].train.dataset.train())[kind]()
    several_tasks = task_labels and "concat" in kind
    assert (gather(data) is None) == several_tasks
    strategy = strategy_on(stream, exp, data)
    batches = strategy.dataloader
    assert isinstance(batches, TensorBatches) != several_tasks
    assert_same_epochs(epochs_of(batches), epochs_of(reference_loader(data)))


# --- 1c: a transform to apply: no fast path ----------------------------------------------
def double(x):
    return x * 2


def _transformed(d):
    from avalanche.benchmarks.utils import (
        TaskAwareSupervisedClassificationDataset,
        _make_taskaware_tensor_classification_dataset,
    )

    x, y = torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(3)), torch.arange(10)
    made = _make_taskaware_tensor_classification_dataset(x, y, transform=double, task_labels=0)
    return {   # name: (dataset, a row, the raw x it must show transformed)
        "current group replaced": (d.replace_current_transform_group(double), 0, d[0][0]),
        "frozen transform": (d.replace_current_transform_group(double).freeze_transforms(), 0, d[0][0]),
        "wrapped (inner node)": (TaskAwareSupervisedClassificationDataset(
            [d.replace_current_transform_group(double)]), 3, d[3][0]),
        "built with a transform": (made, 1, x[1]),
        "subset of it": (made.subset([4, 2]), 1, x[2]),
        "concat with it": (d.concat(made), len(d) + 5, x[5]),
    }


@pytest.mark.parametrize("kind", ["current group replaced", "frozen transform", "wrapped (inner node)",
                                  "built with a transform", "subset of it", "concat with it"])
def test_gather_refuses_a_dataset_with_a_transform(kind):
    """At any depth of the dataset tree: the engine then iterates the template's own loader."""
    stream = digits()
    exp = stream.experiences[1].train
    data, row, raw = _transformed(exp.dataset.train())[kind]
    assert torch.equal(data[row][0], double(raw))        # the transform really applies
    assert gather(data) is None
    strategy = strategy_on(stream, exp, data)
    assert not isinstance(strategy.dataloader, TensorBatches)


# --- 1d: whole runs, fast path on and off ----------------------------------------------
class PathSeen:
    """Which batches each epoch iterates: the fast path's or the (template's/plugin's) loader."""

    def __init__(self):
        self.fast = []

    def before_training_epoch(self, strategy, **kwargs):
        self.fast.append(isinstance(strategy.dataloader, TensorBatches))


class KeepSubset:
    """The adapted data cut to a subset after adaptation, as ValidationPlugin does."""

    def after_train_dataset_adaptation(self, strategy, **kwargs):
        data = strategy.adapted_dataset
        strategy.adapted_dataset = data.subset(list(range(1, len(data), 2)))


def run_stream(stream, name: str, fast: bool, monkeypatch, extra=()):
    """Train ``name`` over every experience of ``stream`` (2 epochs, seeded): final weights,
    torch's RNG state after it, which path each epoch took."""
    from lethe.engine import template
    from lethe.engine.plugins import FiniteLossCheck, TrainProgress
    from lethe.methods.replay import Replay, ReplayConfig

    with monkeypatch.context() as m:
        if not fast:   # lethe's own switch: no gathered tensors, the template's loader runs
            m.setattr(template, "gather", lambda dataset: None)
        seen = PathSeen()
        plugins = [FiniteLossCheck(lambda: "test"), TrainProgress(None, lambda: "test", 2), seen, *extra]
        cls, cfg = (Replay, ReplayConfig(mem_size=60)) if name == "replay" else (None, None)
        m_ = method(stream, cls, cfg, train_cfg(epochs=2), plugins)
        torch.manual_seed(7)
        for e in stream.experiences:
            m_.serve(e)
        return m_.model.state_dict(), torch.get_rng_state(), seen.fast


@pytest.mark.parametrize("name, task_labels, subset", [
    ("naive", False, False), ("naive", True, False), ("naive", False, True), ("replay", False, False)])
def test_runs_with_and_without_the_fast_path_are_bitwise_identical(name, task_labels, subset,
                                                                    monkeypatch):
    """Replay's plugin replaces the loader from the second experience on: those epochs run on
    its loader (the fast path must not shadow it), the first on the fast path."""
    stream = digits(task_labels)
    extra = [KeepSubset()] if subset else []
    fast_w, fast_rng, fast_seen = run_stream(stream, name, True, monkeypatch, extra)
    slow_w, slow_rng, slow_seen = run_stream(stream, name, False, monkeypatch, extra)
    assert slow_seen == [False] * 6
    assert fast_seen == ([True, True] + [False] * 4 if name == "replay" else [True] * 6)
    start = small_mlp().state_dict()
    for k, v in slow_w.items():
        assert not torch.equal(v, start[k]), k           # it trained
        assert torch.equal(fast_w[k], v), k
    assert torch.equal(fast_rng, slow_rng)


# --- 2: per-iteration events reach the plugins that act on them ---------------------------
def _counting_plugin():
    from avalanche.core import SupervisedPlugin

    class Counting(SupervisedPlugin):
        def __init__(self):
            super().__init__()
            self.calls = collections.Counter()

        def before_training_iteration(self, strategy, **kwargs):
            self.calls["before_training_iteration"] += 1

        def after_backward(self, strategy, **kwargs):
            self.calls["after_backward"] += 1

        def before_update(self, strategy, **kwargs):
            self.calls["before_update"] += 1

    return Counting()


def test_a_plugins_own_iteration_hooks_fire_once_per_iteration_and_update():
    """2 epochs of ceil(n/32) mini-batches, an optimizer step every 3 (a shorter last window)."""
    stream = digits()
    exp = stream.experiences[0]
    counting = _counting_plugin()
    m = method(stream, train=train_cfg(epochs=2, grad_accum_steps=3), plugins=[counting])
    m.learn(exp)
    iters = math.ceil(len(exp.train.dataset) / BATCH)
    assert counting.calls == {"before_training_iteration": 2 * iters, "after_backward": 2 * iters,
                              "before_update": 2 * math.ceil(iters / 3)}


class MinibatchAccuracy:
    """Each mini-batch's accuracy, computed here from the template's outputs and labels."""

    def __init__(self):
        self.values = []

    def after_training_iteration(self, strategy, **kwargs):
        right = int((strategy.mb_output.argmax(1) == strategy.mb_y).sum())
        self.values.append(right / len(strategy.mb_y))


def test_an_evaluation_plugin_with_a_minibatch_metric_gets_every_iteration():
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training.plugins import EvaluationPlugin

    stream = digits()
    exp = stream.experiences[0]
    evaluator = EvaluationPlugin(accuracy_metrics(minibatch=True), loggers=[])
    mine = MinibatchAccuracy()
    m = method(stream, train=train_cfg(epochs=2), plugins=[mine], evaluator=evaluator)
    m.learn(exp)
    iters = 2 * math.ceil(len(exp.train.dataset) / BATCH)
    steps, values = evaluator.get_all_metrics()["Top1_Acc_MB/train_phase/train_stream/Task000"]
    assert len(mine.values) == iters and len(set(mine.values)) > 1   # accuracies that differ
    assert steps == list(range(iters))                    # one value per iteration
    assert values == pytest.approx(mine.values, abs=1e-12)


def test_a_strategy_overriding_an_iteration_trigger_keeps_it():
    from avalanche.training.templates import SupervisedTemplate

    from lethe.methods.naive import Naive

    class Counted(SupervisedTemplate):
        triggered = 0

        def _before_training_iteration(self, **kwargs):
            self.triggered += 1
            super()._before_training_iteration(**kwargs)   # the plugins' hooks still run

    class CountedNaive(Naive):
        def strategy_class(self):
            return Counted

    stream = digits()
    exp = stream.experiences[0]
    counting = _counting_plugin()
    m = method(stream, CountedNaive, plugins=[counting])
    m.learn(exp)
    iters = math.ceil(len(exp.train.dataset) / BATCH)
    assert m.strategy.triggered == iters
    assert counting.calls["before_training_iteration"] == iters


class GradBefore:
    """Computes a gradient before each iteration's forward, as A-GEM does with its memory:
    the template must zero it before the forward (Avalanche's loop does), or it leaks into
    the step."""

    def before_training_iteration(self, strategy, **kwargs):
        sum(p.square().sum() for p in strategy.model.parameters()).backward()


@pytest.mark.parametrize("plugin", [None, "grad_before"])
def test_the_engine_loop_gives_avalanches_naive_weights_bitwise(plugin):
    """lethe's loop zeroes gradients once per step (the step's own zeroing) when no plugin acts
    between steps, and again before the forward when one may compute gradients there; both
    give the weights of Avalanche's own Naive loop, bit for bit (same data order, same seed)."""
    from avalanche.training import Naive as AvalancheNaive
    from avalanche.training.plugins import EvaluationPlugin

    from lethe.engine.template import zero_each_window

    stream = digits()
    extra = [GradBefore()] if plugin else []
    ours = method(stream, train=train_cfg(epochs=2), plugins=extra)
    model = small_mlp()
    with pytest.warns(UserWarning, match="No loggers"):
        evaluator = EvaluationPlugin(loggers=[])
    theirs = AvalancheNaive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                            train_mb_size=BATCH, train_epochs=2, device="cpu", evaluator=evaluator,
                            plugins=[GradBefore()] if plugin else None)
    for strategy, train in ((ours.strategy, lambda e: ours.learn(e)),
                            (theirs, lambda e: theirs.train(e.train, num_workers=0))):
        torch.manual_seed(5)
        for e in stream.experiences[:2]:
            train(e)
    start = small_mlp().state_dict()
    for k, v in theirs.model.state_dict().items():
        assert not torch.equal(v, start[k]), k
        assert torch.equal(ours.model.state_dict()[k], v), k
    assert zero_each_window(ours.strategy) is bool(plugin)


class EpochCounts:
    """Each epoch's (right, seen) counted here from the template's outputs and labels."""

    def __init__(self):
        self.epochs = []

    def before_training_epoch(self, strategy, **kwargs):
        self.epochs.append([0, 0])

    def after_training_iteration(self, strategy, **kwargs):
        self.epochs[-1][0] += int((strategy.mb_output.argmax(1) == strategy.mb_y).sum())
        self.epochs[-1][1] += len(strategy.mb_y)


def test_a_metric_added_to_the_runs_avalanche_evaluator_reaches_mlflow(tmp_path):
    """The run's evaluation plugin sits idle while it has no metric (it skips Avalanche's
    per-event work) and hands on every value once a method adds one."""
    from avalanche.evaluation.metrics import accuracy_metrics

    from lethe.platform.tracking import Tracker, make_avalanche_evaluator

    tracker = Tracker(f"sqlite:///{tmp_path}/m.db", "evaluator")
    tracker.start("t", {}, {})
    stream = digits()
    idle = make_avalanche_evaluator(tracker)
    method(stream, train=train_cfg(epochs=2), evaluator=idle).learn(stream.experiences[0])
    assert not [k for k in tracker.metric_keys() if k.startswith("avalanche/")]
    evaluator = make_avalanche_evaluator(tracker)
    evaluator.metrics.extend(accuracy_metrics(epoch=True))
    counts = EpochCounts()
    method(stream, train=train_cfg(epochs=2), plugins=[counts], evaluator=evaluator).learn(stream.experiences[0])
    (key,) = [k for k in tracker.metric_keys() if k.startswith("avalanche/Top1_Acc_Epoch")]
    values = [v for _, v in tracker.metric_history(key)]
    assert values == pytest.approx([right / seen for right, seen in counts.epochs], abs=1e-9)
    assert len(values) == 2 and values[0] != values[1]
    tracker.end("FINISHED")


# --- 3: timm gradient checkpointing -------------------------------------------------------
def tiny_vit():
    from lethe.models.vision import ModelInfo, TimmConfig, timm_model

    torch.manual_seed(0)
    cfg = TimmConfig(arch="vit_tiny_patch16_224",
                     kwargs={"img_size": 16, "patch_size": 8, "depth": 2, "embed_dim": 24, "num_heads": 2})
    return timm_model(cfg, ModelInfo(input_shape=(3, 16, 16), n_classes=5))


def test_timm_gradient_checkpointing_gives_the_same_gradients():
    """train.gradient_checkpointing=true through the engine on a timm ViT: the blocks really
    run again in backward (checkpointing is on), and every gradient equals plain backward's."""
    from lethe.engine.engine import Engine

    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2, 4])
    grads, forwards = [], []
    for checkpointing in (False, True):
        model = Engine(train_cfg(gradient_checkpointing=checkpointing), "cpu").prepare_model(tiny_vit())
        assert model.grad_checkpointing is checkpointing
        calls = []
        # a pre-hook: torch's non-reentrant recomputation stops early, before a block's end
        model.blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
        model.train()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        forwards.append(len(calls))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert forwards == [1, 2]                             # recomputed in backward
    assert grads[0].keys() == grads[1].keys()
    for n, g in grads[0].items():
        assert g.abs().sum() > 0, n
        assert torch.allclose(g, grads[1][n], atol=1e-6, rtol=0), n


# --- 4: progress bars only where they are drawn ---------------------------------------------
class BarSeen:
    """Whether the TrainProgress plugin holds a bar while its epoch runs."""

    def __init__(self, progress):
        self.progress, self.seen = progress, []

    def after_training_iteration(self, strategy, **kwargs):
        self.seen.append(self.progress.bar is not None)


def bars_during_a_run(stream):
    from lethe.engine.plugins import TrainProgress

    progress = TrainProgress(None, lambda: "exp 1", 1)
    seen = BarSeen(progress)
    method(stream, plugins=[progress, seen]).learn(stream.experiences[0])
    return set(seen.seen)


def test_epoch_bars_exist_on_a_terminal_and_are_not_made_elsewhere(monkeypatch):
    """A terminal (a real pseudo-terminal here) gets the epoch bar; a pipe or TQDM_DISABLE=1
    gets none, and no tqdm object is made for it (a disabled one still costs its set-up)."""
    import io
    import os
    import sys

    from lethe.engine.plugins import bars_shown

    stream = digits()
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    master, slave = os.openpty()
    with os.fdopen(slave, "w") as terminal, os.fdopen(master, "rb", buffering=0):
        monkeypatch.setattr(sys, "stderr", terminal)
        assert bars_shown() and bars_during_a_run(stream) == {True}
        monkeypatch.setenv("TQDM_DISABLE", "1")
        assert not bars_shown()
        monkeypatch.setattr(sys, "stderr", io.StringIO())
    monkeypatch.delenv("TQDM_DISABLE")
    assert not bars_shown()
    made = []
    monkeypatch.setattr("tqdm.std.tqdm.__init__", lambda self, *a, **k: made.append(k))
    assert bars_during_a_run(stream) == {False} and made == []
