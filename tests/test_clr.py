"""CLR: surgery counts, identity init, frozen anchor, zero forgetting, resume, vs naive."""
from __future__ import annotations

import io

import pytest
import torch

from lethe.errors import ConfigError
from lethe.methods.base import MethodContext
from lethe.methods.clr import CLR
from lethe.metrics import cl
from lethe.metrics.evaluator import Evaluator
from lethe.platform.config import load_config
from lethe.platform.runner import build_components, run_experiment

FAST = ["scenario.n_experiences=3", "train.epochs=3", "model.channels=16",
        "method.anchor_pretrain=first_task", "method.anchor_pretrain_epochs=3"]


def build(overrides, model=None):
    cfg = load_config("clr_split_digits", overrides)
    torch.manual_seed(cfg.seed)
    stream, built, _ = build_components(cfg)
    ctx = MethodContext(train=cfg.train, device=torch.device("cpu"), stream=stream, seed=cfg.seed)
    return cfg, stream, CLR(cfg.method, model if model is not None else built, ctx)


def per_task_count(net: torch.nn.Module, head_classes: int, wrap_1x1: bool) -> int:
    """Independent count on the unmodified network: 3x3 depthwise kernel per output channel
    of each reprogrammed conv, BN affine parameters, a linear head over the task's classes."""
    n = 0
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d) and (m.kernel_size != (1, 1) or wrap_1x1):
            n += m.out_channels * 9
        elif isinstance(m, torch.nn.BatchNorm2d):
            n += 2 * m.num_features
    return n + net.fc.in_features * head_classes + head_classes


@pytest.mark.parametrize("wrap_1x1", [False, True])
def test_clr_trains_under_0_6_percent_of_resnet18_per_task(wrap_1x1):
    from torchvision.models import resnet18

    reference = resnet18()                      # torchvision's ImageNet architecture
    total = sum(p.numel() for p in reference.parameters())
    assert total == 11_689_512
    _, stream, method = build([f"method.wrap_1x1={wrap_1x1}"], model=resnet18())
    method._begin_task(0, [3, 7])               # a 2-class task, as in split digits
    got = method.log_params()
    expected = per_task_count(reference, 2, wrap_1x1)
    assert got["params/trainable"] == expected
    assert got["params/frac_trainable"] == pytest.approx(expected / total)
    assert got["params/frac_trainable"] < 0.006
    # stored per task: kernels + BN (affine, running stats, counter) + head (+ class ids)
    bn = [m for m in reference.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    stored = 4 * expected + sum(4 * 2 * m.num_features + 8 for m in bn) + 8 * 2
    assert got["params/stored_bytes_per_task"] == stored
    # the anchor's convs are frozen; only CLR kernels, BN and the head train
    names = {n for n, p in method.model.named_parameters() if p.requires_grad}
    assert all(".clr." in n or "bn" in n or "downsample.1" in n or n.startswith("fc.") for n in names)
    assert not any(n.endswith(".conv.weight") and p.requires_grad
                   for n, p in method.model.named_parameters())


def test_clr_identity_kernels_leave_the_anchor_function_unchanged():
    from torchvision.models import resnet18

    torch.manual_seed(0)
    reference = resnet18(num_classes=10).eval()
    _, _, method = build([], model=resnet18(num_classes=10))
    wrapped = method.model.eval()
    # copy the reference weights into the wrapped model (anchor convs, BN, head)
    with torch.no_grad():
        for name, m in reference.named_modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d)):
                target = wrapped.get_submodule(name)
                (target.conv if hasattr(target, "clr") else target).load_state_dict(m.state_dict())
        wrapped.fc.linear.weight.copy_(reference.fc.weight)
        wrapped.fc.linear.bias.copy_(reference.fc.bias)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(wrapped(x), reference(x))   # identity kernels are exact


def test_clr_rejects_models_without_convs():
    cfg = load_config("clr_split_digits", ["model.name=mlp"])
    stream, model, _ = build_components(cfg)
    ctx = MethodContext(train=cfg.train, device=torch.device("cpu"), stream=stream)
    with pytest.raises(ConfigError, match="needs a CNN"):
        CLR(cfg.method, model, ctx)


def test_clr_needs_task_labels(tmp_path):
    cfg = load_config("clr_split_digits", ["scenario.task_labels=false",
                                           f"tracking.uri=sqlite:///{tmp_path / 'm.db'}",
                                           f"checkpoint.dir={tmp_path / 'ck'}"])
    with pytest.raises(ConfigError, match="task_incremental.*set scenario.task_labels=true"):
        run_experiment(cfg)


@pytest.mark.integration
def test_clr_keeps_anchor_bitwise_and_forgets_nothing():
    """3 experiences of 4/3/3 classes (heads of different sizes)."""
    _, stream, method = build(FAST)
    ev = Evaluator(stream.test, "cpu", 0, False, stream.n_classes)
    anchor = None
    for exp in stream.experiences:
        method.learn(exp)
        if anchor is None:   # after the anchor's pre-training on the first task
            anchor = {k: v.clone() for k, v in method.model.state_dict().items()
                      if k not in method.task_keys}
            anchor_bn = {k: v.clone() for k, v in method.anchor_bn.items()}
        ev.evaluate(method.predict, f"learn:{exp.index}", method.model)
    state = method.model.state_dict()
    assert anchor and all(torch.equal(state[k], v) for k, v in anchor.items())
    assert all(torch.equal(method.anchor_bn[k], v) for k, v in anchor_bn.items())
    assert any(".conv.weight" in k for k in anchor)
    preds, exp_of = ev.store.preds, ev.store.exp
    for j in range(3):   # every later prediction on task j's test data is the same, bitwise
        mask = exp_of == j
        for i in range(j + 1, 3):
            assert torch.equal(preds[i][mask], preds[j][mask]), (i, j)
    R = cl.accuracy_matrix(preds, ev.store.targets, exp_of, 3)
    assert cl.forgetting(R, 2) == 0.0
    assert float(R[-1].mean()) > 0.6       # 3 short epochs on a small anchor: learning, not chance
    # heads really are per task: 4, 3 and 3 classes
    assert [len(method.stash[t][f"{method.head_name}.classes"]) for t in range(3)] == [4, 3, 3]


@pytest.mark.integration
def test_clr_resumes_from_a_checkpoint_to_the_same_predictions():
    _, stream, a = build(FAST)
    for exp in stream.experiences[:2]:
        a.learn(exp)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    _, _, b = build(FAST)                       # a fresh process's method
    b.load_state_dict(torch.load(buf, weights_only=True))
    rng = torch.get_rng_state()
    a.learn(stream.experiences[2])
    torch.set_rng_state(rng)
    b.learn(stream.experiences[2])
    x, t = stream.test.x, stream.test.task
    a.model.eval()
    b.model.eval()
    with torch.no_grad():
        assert torch.equal(a.predict(x, t), b.predict(x, t))
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k


@pytest.mark.integration
def test_clr_beats_naive_with_zero_forgetting_and_logs_param_metrics(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    common = [f"tracking.uri={uri}", f"checkpoint.dir={tmp_path / 'ck'}", "eval.save_predictions=false",
              "train.epochs=4", "method.anchor_pretrain_epochs=4"]
    clr = run_experiment(load_config("clr_split_digits", common))
    naive = run_experiment(load_config("clr_split_digits", common[:-1] + ["method.name=naive"]))
    assert clr.final["forgetting/avg"] == 0.0
    assert clr.final["acc/avg_seen"] > naive.final["acc/avg_seen"] + 0.4
    assert clr.final["acc/avg_seen"] > 0.85
    client = MlflowClient(uri)
    hist = client.get_metric_history(clr.run_id, "params/frac_trainable")
    assert sorted(m.step for m in hist) == [0, 1, 2, 3, 4]
    assert clr.final["params/trainable"] > 0 and clr.final["params/stored_bytes_per_task"] > 0
