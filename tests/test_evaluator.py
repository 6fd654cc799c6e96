"""The batched evaluator: batching, task ids, batch sizing, many models in one pass, CUDA."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lethe.errors import RunError
from lethe.metrics import cl
from lethe.metrics.evaluator import (
    CPU_BATCH_BYTES,
    CPU_MIN_BATCH,
    Evaluator,
    PredictionStore,
    auto_batch_size,
    same_architecture,
)
from lethe.models.vision import MLPConfig, ModelInfo, SimpleCNNConfig, mlp, simple_cnn
from lethe.scenarios import types as scenario_types

INFO = ModelInfo(input_shape=(1, 8, 8), n_classes=10)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU: torch.cuda.is_available() is False")


@pytest.fixture(scope="module")
def digits_test():
    """Real digits as 3 test experiences; samples interleaved so experiences are not blocks."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images[:600] / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(d.target[:600], dtype=torch.long)
    exp = torch.arange(600) % 3
    return scenario_types.TestSet(x=x, y=y, exp=exp, task=exp.clone(), ids=torch.arange(600) + 1000)


def shaped(model: nn.Module, x: torch.Tensor, seed: int) -> nn.Module:
    """Give BatchNorm layers non-trivial running stats, then leave the model training."""
    torch.manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x[torch.randperm(len(x))[:128]] * (1 + seed % 3))
    return model


def fitted(model: nn.Module, test, steps: int = 60) -> nn.Module:
    """A few full-batch Adam steps on the digits, so logits have clear winners (bf16 tests)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = test.x.to(next(model.parameters()).device), test.y.to(next(model.parameters()).device)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def per_model(ev: Evaluator, models) -> torch.Tensor:
    return torch.stack([ev.predict(lambda x, t, m=m: m(x), m) for m in models])


def reference(models, x) -> torch.Tensor:
    """Plain eval-mode forward of the whole set at once: the independent reference."""
    out = []
    for m in models:
        m.eval()
        with torch.no_grad():
            out.append(m(x).argmax(-1))
    return torch.stack(out)


# --- one model -----------------------------------------------------------------------

def hand_auto_batch_size(model: nn.Sequential, x: torch.Tensor) -> int:
    """The CPU auto size worked out by hand: one sample's activation bytes from a plain loop
    over the layers (plus its input), ~CPU_BATCH_BYTES of them per batch, equal batches."""
    model.eval()
    h, per_sample = x[:1], x[0].numel() * x.element_size()
    with torch.no_grad():
        for layer in model:
            h = layer(h)
            per_sample += h.numel() * h.element_size()
    n_batches = -(-len(x) // (CPU_BATCH_BYTES // per_sample))
    return -(-len(x) // n_batches)


def test_predictions_do_not_depend_on_batch_size(digits_test):
    torch.manual_seed(0)
    model = shaped(simple_cnn(SimpleCNNConfig(channels=32), INFO), digits_test.x, 0)
    ref = reference([model], digits_test.x)[0]
    auto = hand_auto_batch_size(model, digits_test.x)
    assert auto == 200            # 74,792 B per sample: 224 fit in 16 MiB → 3 batches of 200
    # auto, a ragged last batch, exactly N, more than N
    for bs, expected in ((0, auto), (7, 7), (600, 600), (5000, 5000)):
        ev = Evaluator(digits_test, batch_size=bs)
        assert torch.equal(ev.predict(lambda x, t: model(x), model), ref), bs
        assert ev.batch_size == expected, bs


def test_evaluate_restores_training_mode_and_stores_row(digits_test):
    model = mlp(MLPConfig(hidden=32), INFO).train()
    ev = Evaluator(digits_test, batch_size=64)
    preds = ev.evaluate(lambda x, t: model(x), "learn:0", model)
    assert model.training
    assert ev.store.labels == ["learn:0"] and preds.dtype == torch.long
    assert torch.equal(ev.store.preds[0], preds)
    R = ev.store.accuracy_matrix()
    manual = [((preds == digits_test.y) & (digits_test.exp == j)).sum().item()
              / (digits_test.exp == j).sum().item() for j in range(3)]
    assert R[0].tolist() == pytest.approx(manual, abs=1e-12)


def test_task_ids_reach_predict_aligned_with_samples(digits_test):
    # a task-routed "model": predicts its task id, so accuracy == share of targets equal to it
    ev = Evaluator(digits_test, batch_size=37)
    preds = ev.predict(lambda x, t: nn.functional.one_hot(t, 10).float())
    assert torch.equal(preds, digits_test.task)


def test_logits_objects_and_bad_outputs(digits_test):
    class Out:
        def __init__(self, logits):
            self.logits = logits

    model = mlp(MLPConfig(hidden=16), INFO)
    ev = Evaluator(digits_test, batch_size=100)
    assert torch.equal(ev.predict(lambda x, t: Out(model(x)), model),
                       reference([model], digits_test.x)[0])
    with pytest.raises(RunError, match="expected a logits tensor"):
        ev.predict(lambda x, t: {"scores": model(x)})


def test_store_to_dict_is_tensors_only_and_reloads(digits_test, tmp_path):
    model = mlp(MLPConfig(hidden=16), INFO)
    ev = Evaluator(digits_test, batch_size=0)
    ev.evaluate(lambda x, t: model(x), "init", model)
    ev.evaluate(lambda x, t: -model(x), "learn:0", model)
    torch.save(ev.store.to_dict(), tmp_path / "p.pt")
    d = torch.load(tmp_path / "p.pt", weights_only=True)
    assert set(d) == {"preds", "targets", "exp", "task", "ids"}
    assert d["preds"].shape == (2, 600) and torch.equal(d["ids"], digits_test.ids)
    fresh = Evaluator(digits_test)
    fresh.store.load(["init", "learn:0"], d["preds"])
    assert torch.equal(fresh.store.accuracy_matrix(), ev.store.accuracy_matrix())


# --- batch sizing --------------------------------------------------------------------

def test_measured_activation_bytes_of_an_mlp(digits_test):
    # leaf outputs per sample: Flatten 64 + Linear 128 + ReLU 128 + Linear 128 + ReLU 128
    # + Linear 10 = 586 floats, plus the 64-float input: 650 * 4 bytes
    model = mlp(MLPConfig(hidden=128, layers=2), INFO).eval()
    ev = Evaluator(digits_test)
    assert ev.measure_activation_bytes(lambda x, t: model(x), model) == 650 * 4


def test_auto_batch_size_cpu_budget_and_equal_batches():
    x = torch.zeros(9000, 1, 8, 8)
    # 16 MiB / 2600 B = 6452 samples → 2 batches → 2 x 4500 (not 6452 + 2548)
    assert CPU_BATCH_BYTES == 16 * 2 ** 20
    assert auto_batch_size(x, "cpu", per_sample_bytes=2600) == 4500
    # 4 models side by side: 16 MiB / 10400 B = 1613 → 6 batches → 1500
    assert auto_batch_size(x, "cpu", per_sample_bytes=2600, n_models=4) == 1500
    # a huge per-sample cost still gets the CPU floor (RAM allows it)
    assert auto_batch_size(x, "cpu", per_sample_bytes=10 ** 6) == CPU_MIN_BATCH
    assert auto_batch_size(x[:10], "cpu") == 10
    assert auto_batch_size(x[:0], "cpu") == 1


def test_auto_batch_size_is_set_at_first_pass_from_the_model(digits_test):
    small, big = mlp(MLPConfig(hidden=16), INFO), simple_cnn(SimpleCNNConfig(channels=64), INFO)
    sizes = []
    for model in (small, big):
        ev = Evaluator(digits_test)
        assert ev.batch_size == 0
        ev.predict(lambda x, t, m=model: m(x), model)
        sizes.append(ev.batch_size)
    assert sizes[0] == 600 and sizes[1] < 600   # the wide CNN's activations cap its batch


# --- many models ---------------------------------------------------------------------

def test_evaluate_many_vmap_equals_per_model_for_mlps(digits_test):
    models = []
    for seed in range(4):
        torch.manual_seed(seed)
        models.append(mlp(MLPConfig(hidden=48), INFO))
    assert same_architecture(models)
    ev = Evaluator(digits_test, batch_size=128)
    many = ev.evaluate_many(models, [f"m{i}" for i in range(4)])
    assert ev.last_path == "vmap"
    assert torch.equal(many, per_model(ev, models))
    assert torch.equal(many, reference(models, digits_test.x))
    assert ev.store.labels[:4] == ["m0", "m1", "m2", "m3"]
    assert len({tuple(p.tolist()) for p in many}) == 4       # the models really differ


def test_evaluate_many_vmap_equals_per_model_for_cnns_with_batchnorm(digits_test):
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(shaped(simple_cnn(SimpleCNNConfig(channels=6), INFO), digits_test.x, seed))
    assert same_architecture(models)
    ev = Evaluator(digits_test)                 # auto batch size, shared by 3 models
    many = ev.predict_many(models)
    assert ev.last_path == "vmap"
    assert all(m.training for m in models)      # modes restored
    ref = per_model(ev, models)
    assert torch.equal(many, ref) and torch.equal(many, reference(models, digits_test.x))
    # BatchNorm running stats are used: resetting them changes the predictions
    for m in models:
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.reset_running_stats()
    assert not torch.equal(ev.predict_many(models), many)


def test_evaluate_many_mixed_architectures_loops(digits_test):
    torch.manual_seed(0)
    models = [mlp(MLPConfig(hidden=32), INFO), simple_cnn(SimpleCNNConfig(channels=4), INFO),
              mlp(MLPConfig(hidden=16), INFO)]
    assert not same_architecture(models)
    ev = Evaluator(digits_test, batch_size=50)
    many = ev.predict_many(models)
    assert ev.last_path == "loop"
    assert torch.equal(many, reference(models, digits_test.x))


def test_same_shapes_but_different_hyperparameters_are_not_one_architecture(digits_test):
    def net(stride):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 4, 3, stride=stride, padding=1),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))

    a, b = net(1), net(2)
    assert [p.shape for p in a.parameters()] == [p.shape for p in b.parameters()]
    assert not same_architecture([a, b])
    ev = Evaluator(digits_test, batch_size=100)
    many = ev.predict_many([a, b])
    assert ev.last_path == "loop"
    assert torch.equal(many, reference([a, b], digits_test.x))
    # what a vmap with a's structure would compute for b: not b's logits, as stride matters
    from torch.func import functional_call

    with torch.no_grad():
        borrowed = functional_call(a, dict(b.named_parameters()), (digits_test.x,))
        assert not torch.allclose(borrowed, b(digits_test.x))


def test_store_rejects_mismatched_labels(digits_test):
    ev = Evaluator(digits_test)
    with pytest.raises(ValueError, match="2 models but 1 labels"):
        ev.evaluate_many([mlp(MLPConfig(), INFO), mlp(MLPConfig(), INFO)], ["only"])
    assert isinstance(ev.store, PredictionStore)


# --- CUDA ----------------------------------------------------------------------------

@needs_cuda
def test_cuda_preload_matches_cpu_predictions(digits_test):
    torch.manual_seed(0)
    model = fitted(simple_cnn(SimpleCNNConfig(channels=8), INFO), digits_test)
    cpu = Evaluator(digits_test, "cpu").predict(lambda x, t: model(x), model)
    model.cuda()
    ev = Evaluator(digits_test, "cuda")
    assert ev.x.is_cuda and ev.store.targets.is_cuda and ev.task.is_cuda
    assert not ev.store.ids.is_cuda
    gpu = ev.evaluate(lambda x, t: model(x), "learn:0", model)
    assert gpu.is_cuda
    # different kernels (TF32 convolutions) may flip a near-tie; all but a handful agree
    assert (gpu.cpu() == cpu).float().mean() > 0.99
    assert ev.store.accuracy_matrix().is_cuda


@needs_cuda
def test_cuda_amp_and_vmap(digits_test):
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = simple_cnn(SimpleCNNConfig(channels=8), INFO).cuda()
        models.append(fitted(model, digits_test))
    ev = Evaluator(digits_test, "cuda", amp=True)
    assert ev.amp and ev.amp_dtype in (torch.bfloat16, torch.float16)
    ref = Evaluator(digits_test, "cuda")
    fp32 = ref.predict_many(models)
    assert ref.last_path == "vmap"
    # batched and single-model kernels may round differently: a near-tie may flip, no more
    assert (fp32 == per_model(ref, models)).float().mean() > 0.99
    amp = ev.predict_many(models)
    assert ev.last_path == "vmap" and amp.shape == (3, 600) and amp.is_cuda
    # reduced precision flips only near-ties of these fitted models (CPU bf16 check: > 0.99)
    assert (amp == fp32).float().mean() > 0.97


def test_amp_is_ignored_on_cpu(digits_test):
    ev = Evaluator(digits_test, "cpu", amp=True)
    assert not ev.amp
    model = mlp(MLPConfig(hidden=16), INFO)
    assert torch.equal(ev.predict(lambda x, t: model(x), model),
                       reference([model], digits_test.x)[0])


def test_cl_metrics_work_on_store_tensors(digits_test):
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(mlp(MLPConfig(hidden=16), INFO))
    ev = Evaluator(digits_test)
    ev.evaluate_many(models, ["learn:0", "learn:1", "learn:2"])
    R = ev.store.accuracy_matrix()
    assert R.shape == (3, 3)
    assert cl.bwt(R, 2) == pytest.approx(((R[2, :2] - torch.diagonal(R)[:2]).mean()).item())


def test_predictions_are_ordinary_tensors(digits_test):
    model = mlp(MLPConfig(hidden=16), INFO)
    preds = Evaluator(digits_test).predict(lambda x, t: model(x), model)
    assert not preds.is_inference()
    preds[:3] = 0                       # would raise for an inference-mode tensor


def test_vmap_switch_forces_the_loop_or_refuses_mixed_models(digits_test):
    torch.manual_seed(0)
    same = [mlp(MLPConfig(hidden=24), INFO) for _ in range(3)]
    ev = Evaluator(digits_test, batch_size=200)
    looped = ev.predict_many(same, vmap=False)
    assert ev.last_path == "loop"
    assert torch.equal(looped, ev.predict_many(same)) and ev.last_path == "vmap"
    with pytest.raises(ValueError, match="one architecture"):
        ev.predict_many([same[0], simple_cnn(SimpleCNNConfig(channels=4), INFO)], vmap=True)
