"""MOS (Sun et al., AAAI 2025) on a tiny timm ViT: formulas, retrieval, resume, forgetting.

The backbone is a tiny VisionTransformer (8x8 digits, 2x2 patches, depth 2, width 32). A
random-init ViT gives features too weak for a pretrained-model method, so the module fixture
first pretrains it (a few seconds) on digits 0-3 — the training rows of the same seeded split
— and the continual stream then covers only digits 4-9 (3 experiences of 2 classes): the
pretraining shares neither classes nor test rows with the stream, as a real PTM would not.
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from typing import List

import pytest
import torch
from conftest import restored_registry

from lethe.errors import ConfigError
from lethe.methods.mos import (
    class_statistics,
    ensemble_logits,
    gaussian_factors,
    mean_adapter,
    merge_adapters,
    refine_retrieval,
    sample_gaussians,
)
from lethe.platform.config import load_config
from lethe.registry import register_scenario

# tiny matrices: intra-op threads only contend on a small shared machine's cores (≈10x slower)
pytestmark = pytest.mark.usefixtures("one_thread")

VIT = "{img_size: 8, patch_size: 2, depth: 2, embed_dim: 32, num_heads: 2}"
PRETRAIN_CLASSES = [0, 1, 2, 3]
STREAM_CLASSES = [4, 5, 6, 7, 8, 9]


# --- a stream of digits 4-9 only (the pretraining classes stay out) -----------------------
@dataclass
class DigitsSubsetConfig:
    classes: List[int] = field(default_factory=lambda: list(STREAM_CLASSES))
    n_experiences: int = 3


def _digits_split():
    from sklearn.datasets import load_digits

    from lethe.scenarios.streams import stratified_split

    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(d.target, dtype=torch.long)
    tr, te = stratified_split(d.target, 0.25, 0)   # split_digits' split (class_seed 0)
    return x, y, torch.as_tensor(tr), torch.as_tensor(te)


def digits_subset(cfg, seed):
    from lethe.scenarios.streams import class_incremental_stream, split_classes

    x, y, tr, te = _digits_split()
    ids = torch.arange(len(y))
    keep = torch.tensor(list(cfg.classes))
    tr, te = tr[torch.isin(y[tr], keep)], te[torch.isin(y[te], keep)]
    return class_incremental_stream((x[tr], y[tr], ids[tr]), (x[te], y[te], ids[te]),
                                    split_classes(list(cfg.classes), cfg.n_experiences),
                                    task_labels=False, input_shape=(1, 8, 8), n_classes=10)


@pytest.fixture(scope="module", autouse=True)
def digits_subset_scenario():
    """The test-only scenario, registered for this module's tests only."""
    with restored_registry():
        register_scenario("mos_test_digits_subset", config=DigitsSubsetConfig,
                          settings=("class_incremental",))(digits_subset)
        yield


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """State dict (no head) of the tiny ViT trained on digits 0-3; path to the file."""
    import timm

    x, y, tr, _ = _digits_split()
    tr = tr[torch.isin(y[tr], torch.tensor(PRETRAIN_CLASSES))]
    # 16 pretraining classes: (digit, rotation by k·90°); 4 plain classes give features
    # too specific to transfer (nearest-mean accuracy on digits 4-9: ~0.42 vs ~0.62).
    xs = torch.cat([torch.rot90(x[tr], k, (2, 3)) for k in range(4)])
    ys = torch.cat([y[tr] + len(PRETRAIN_CLASSES) * k for k in range(4)])
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=16, in_chans=1,
                            img_size=8, patch_size=2, depth=2, embed_dim=32, num_heads=2)
    opt = torch.optim.Adam(vit.parameters(), lr=2e-3)
    for _ in range(10):
        for idx in torch.randperm(len(ys), generator=gen).split(64):
            loss = torch.nn.functional.cross_entropy(vit(xs[idx]), ys[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    path = tmp_path_factory.mktemp("vit") / "tiny_vit.pt"
    torch.save({k: v for k, v in vit.state_dict().items() if not k.startswith("head.")}, path)
    return path


def tiny_cfg(pretrained, tmp_path, *extra, method="mos"):
    overrides = ["name=mos_test", "device=cpu", "scenario.name=mos_test_digits_subset",
                 "model.name=timm", "model.arch=vit_tiny_patch16_224", f"model.kwargs={VIT}",
                 f"model.weights_path={pretrained}", f"method.name={method}",
                 "train.epochs=4", "train.batch_size=32", "train.lr=0.03", "train.weight_decay=0.0005",
                 f"tracking.uri=sqlite:///{tmp_path / 'm.db'}", f"checkpoint.dir={tmp_path / 'ck'}"]
    if method == "mos":
        overrides.append("method.ca_epochs=10")
    return load_config("mos_digits", overrides + list(extra))


def build_method(cfg):
    """The method object the runner would build, driven directly (no MLflow)."""
    from avalanche.training.plugins import EvaluationPlugin

    from lethe.methods.base import MethodContext
    from lethe.platform.runner import build_components, seed_everything

    seed_everything(cfg.seed, False)
    stream, model, entry = build_components(cfg)
    with warnings.catch_warnings():   # "no loggers": metrics are read from the method here
        warnings.simplefilter("ignore", UserWarning)
        evaluator = EvaluationPlugin(loggers=[])
    ctx = MethodContext(train=cfg.train, device=torch.device("cpu"), stream=stream, seed=cfg.seed,
                        evaluator=evaluator)
    return entry.obj(cfg.method, model, ctx), stream


# --- the formulas --------------------------------------------------------------------------
def test_merge_formula_matches_an_independent_elementwise_computation():
    g = torch.Generator().manual_seed(1)
    stored = [{"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g)} for _ in range(3)]
    current = {"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g)}
    before = copy.deepcopy(stored), copy.deepcopy(current)
    merged = merge_adapters(current, mean_adapter(stored), 0.1)
    for key in ("a", "b"):
        flat_c = current[key].flatten().tolist()
        flat_s = [s[key].flatten().tolist() for s in stored]
        want = [0.9 * c + 0.1 * (s0 + s1 + s2) / 3 for c, s0, s1, s2 in zip(flat_c, *flat_s)]
        assert torch.allclose(merged[key].flatten(), torch.tensor(want), atol=1e-6)
    # stored copies and the current adapter are untouched (no in-place update while iterating)
    for s, s0 in zip(stored, before[0]):
        assert all(torch.equal(s[k], s0[k]) for k in s)
    assert all(torch.equal(current[k], before[1][k]) for k in current)


def test_ensemble_matches_hand_computation():
    refined = torch.tensor([[2.0, 0.0, -1.0]])
    proto = torch.tensor([[0.5, 0.2, 0.1]])
    e = [math.exp(v) for v in (2.0, 0.0, -1.0)]
    p = [math.exp(3 * v) for v in (0.5, 0.2, 0.1)]   # 3 tasks learned: T = 3
    want = [a / sum(e) + b / sum(p) for a, b in zip(e, p)]
    got = ensemble_logits(refined, proto, 3)
    assert torch.allclose(got, torch.tensor([want]), atol=1e-6)
    assert abs(float(got.sum()) - 2.0) < 1e-6


def test_retrieval_settles_on_a_stable_task_and_is_bounded():
    class_task = torch.tensor([0, 0, 1, 1, 2, 2])
    # Row i, classified with adapter t, predicts the first class of task route[i][t];
    # column 5 carries the adapter id so the returned logits show which adapter produced them.
    route = {0: {0: 0},                  # stable at once
             1: {0: 1, 1: 1},            # 0 -> 1, stable
             2: {0: 1, 1: 2, 2: 0},      # cycles 0 -> 1 -> 2 -> 0 -> ... never stable
             3: {2: 1, 1: 1}}            # starts at task 2 -> 1, stable
    calls = []

    def logits_for(rows, tasks):
        calls.append(rows.tolist())
        out = torch.zeros(len(rows), 6)
        for j, (r, t) in enumerate(zip(rows.tolist(), tasks.tolist())):
            out[j, 2 * route[r][t]] = 10.0
            out[j, 5] = t / 10
        return out

    init = torch.tensor([0, 0, 0, 2])
    logits, task, rounds = refine_retrieval(init, logits_for, class_task, max_iter=4)
    assert rounds.tolist() == [1, 2, 4, 2]
    assert task.tolist() == [0, 1, 0, 1]        # row 2 stopped by the bound after 0,1,2,0
    assert calls == [[0, 1, 2, 3], [1, 2, 3], [2], [2]]   # settled rows are not re-run
    assert torch.allclose(logits[:, 5], task.float() / 10)   # logits come from `task`'s adapter
    assert logits.argmax(1).tolist() == [0, 2, 2, 2]

    calls.clear()
    _, task1, rounds1 = refine_retrieval(init, logits_for, class_task, max_iter=1)
    assert rounds1.tolist() == [1, 1, 1, 1] and task1.tolist() == init.tolist() and len(calls) == 1


def test_gaussian_statistics_and_sampling_reproduce_the_class_distribution():
    g = torch.Generator().manual_seed(2)
    cov = torch.tensor([[2.0, 0.6, 0.0], [0.6, 1.0, -0.3], [0.0, -0.3, 0.5]])
    mean = torch.tensor([1.0, -2.0, 0.5])
    feats = mean + torch.randn(4000, 3, generator=g) @ torch.linalg.cholesky(cov).t()
    labels = torch.zeros(4000, dtype=torch.long)
    means, covs = class_statistics(feats, labels, [0], "covariance", 1e-4)
    centred = feats - feats.mean(0)
    assert torch.allclose(covs[0], centred.t() @ centred / 3999 + 1e-4 * torch.eye(3), atol=1e-5)
    _, variances = class_statistics(feats, labels, [0], "variance", 1e-4)
    assert torch.allclose(variances[0], covs[0].diagonal())
    torch.manual_seed(0)
    x, y = sample_gaussians(means, gaussian_factors(covs, "covariance"), 20000, "covariance")
    assert x.shape == (20000, 3) and (y == 0).all()
    assert torch.allclose(x.mean(0), mean, atol=0.08) and torch.allclose(torch.cov(x.t()), cov, atol=0.12)
    x, _ = sample_gaussians(means, gaussian_factors(variances, "variance"), 20000, "variance")
    assert torch.allclose(torch.cov(x.t()), torch.diag(cov.diagonal()), atol=0.12)


# --- the method on the tiny ViT ------------------------------------------------------------
def test_fresh_adapters_leave_the_pretrained_vit_unchanged_bitwise(pretrained):
    import timm

    from lethe.models.adapters import AdaptedViT

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, in_chans=1,
                            img_size=8, patch_size=2, depth=2, embed_dim=32, num_heads=2)
    vit.load_state_dict(torch.load(pretrained, weights_only=True), strict=False)
    vit.eval()
    x = _digits_split()[0][:64]
    with torch.no_grad():
        want = vit.forward_head(vit.forward_features(x), pre_logits=True)
        logits = vit(x)
        adapted = AdaptedViT(vit, 16, 0.1, 0.1).eval()
        assert torch.equal(adapted.features(x), want) and torch.equal(adapted(x), logits)
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable == set(adapted.adapter_names()) | {"vit.head.weight", "vit.head.bias"}
    assert len(adapted.adapter_names()) == 2 * 4   # depth 2 x (down, up) x (weight, bias)


def test_step_merging_pulls_towards_the_mean_of_the_stored_copies(pretrained, tmp_path):
    # A vanishing lr isolates the merge: after the initial merge and one per step, the
    # adapter is m + 0.9^(K+1)·(θ_last − m), m the mean of the stored copies.
    cfg = tiny_cfg(pretrained, tmp_path, "train.lr=1e-12", "train.epochs=1", "method.ca_epochs=0",
                   "train.weight_decay=0")
    mos, stream = build_method(cfg)
    g = torch.Generator().manual_seed(3)
    names = mos.model.adapter_names()
    live = dict(mos.model.named_parameters())
    stored = [{n: torch.randn(live[n].shape, generator=g) * 0.05 for n in names} for _ in range(2)]
    mos.task_adapters = copy.deepcopy(stored)
    mos.class_task[torch.tensor([0, 1, 2, 3])] = torch.tensor([0, 0, 1, 1])
    exp = stream.experiences[0]
    steps = math.ceil(len(exp.train.dataset) / cfg.train.batch_size)
    mos.learn(exp)
    assert mos.n_tasks == 3
    for n in names:
        m = (stored[0][n] + stored[1][n]) / 2
        want = m + 0.9 ** (steps + 1) * (stored[1][n] - m)
        assert torch.allclose(mos.task_adapters[2][n], want, atol=1e-6), n
        assert torch.equal(mos.task_adapters[0][n], stored[0][n])   # copies never change

    cfg = tiny_cfg(pretrained, tmp_path, "train.lr=1e-12", "train.epochs=1", "method.ca_epochs=0",
                   "train.weight_decay=0", "method.merge_every=task")
    mos, stream = build_method(cfg)
    mos.task_adapters = copy.deepcopy(stored)
    mos.learn(stream.experiences[0])
    for n in names:
        want = 0.9 * stored[1][n] + 0.1 * (stored[0][n] + stored[1][n]) / 2
        assert torch.allclose(mos.task_adapters[2][n], want, atol=1e-6), n


def independent_mos_scores(mos, x):
    """MOS inference written out per sample, as in the official loop, on a deep copy whose
    live adapter is overwritten with each stored copy."""
    model = copy.deepcopy(mos.model).eval()
    seen = (mos.class_task >= 0).nonzero().squeeze(1)
    col_task = mos.class_task[seen]

    def feats(t, xs):
        model.load_adapter(mos.task_adapters[t])
        return model.features(xs)

    f0 = feats(0, x)
    proto = torch.nn.functional.normalize(f0, dim=1) @ \
        torch.nn.functional.normalize(mos.prototypes[seen], dim=1).t()
    rows = []
    for i in range(len(x)):
        t = int(col_task[proto[i].argmax()])
        for loop in range(1, mos.cfg.max_iter + 1):
            logits = model.head(feats(t, x[i:i + 1]))[0, seen]
            nxt = int(col_task[logits.argmax()])
            if loop >= mos.cfg.max_iter or nxt == t:
                break
            t = nxt
        rows.append(logits)
    refined = torch.stack(rows)
    return refined.softmax(1) + (proto * mos.n_tasks).softmax(1), seen


def test_predict_equals_the_per_sample_official_loop_and_resume_is_exact(pretrained, tmp_path):
    cfg = tiny_cfg(pretrained, tmp_path)
    a, stream = build_method(cfg)
    frozen = {n: p.detach().clone() for n, p in a.model.named_parameters() if not p.requires_grad}
    for exp in stream.experiences[:2]:
        a.learn(exp)
    state = a.state_dict()
    torch.save(state, tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)   # state_dicts only

    b, _ = build_method(cfg)
    b.load_state_dict(state)
    for method in (a, b):
        torch.manual_seed(123)
        method.learn(stream.experiences[2])
    x = stream.test.x
    with torch.inference_mode():
        a.model.eval(), b.model.eval()
        out_a, out_b = a.predict(x, stream.test.task), b.predict(x, stream.test.task)
    assert torch.equal(out_a, out_b)                       # resumed run == uninterrupted run
    assert all(torch.equal(p, frozen[n]) for n, p in a.model.named_parameters() if n in frozen)

    with torch.no_grad():
        want, seen = independent_mos_scores(a, x)
    assert torch.allclose(out_a[:, seen], want, atol=1e-5)
    unseen = torch.ones(10, dtype=torch.bool)
    unseen[seen] = False
    assert seen.tolist() == STREAM_CLASSES and torch.isinf(out_a[:, unseen]).all()
    assert int(a.last_retrieval["rounds"].max()) <= a.cfg.max_iter


@pytest.mark.integration
def test_mos_forgets_less_than_sequential_adapter_tuning(pretrained, tmp_path):
    from lethe.platform.runner import run_experiment

    res = {m: run_experiment(tiny_cfg(pretrained, tmp_path / m, method=m)).final
           for m in ("mos", "seq_adapter")}
    mos, seq = res["mos"], res["seq_adapter"]
    print({m: {k: round(r[k], 3) for k in ("acc/avg_seen", "forgetting/avg")} for m, r in res.items()})
    assert mos["forgetting/avg"] < 0.6 * seq["forgetting/avg"], (mos, seq)
    assert mos["acc/avg_seen"] > seq["acc/avg_seen"] + 0.05, (mos, seq)


def test_config_errors_and_presets(pretrained, tmp_path):

    with pytest.raises(ConfigError, match="method.merge_every"):
        build_method(tiny_cfg(pretrained, tmp_path, "method.merge_every=epoch"))
    with pytest.raises(ConfigError, match="timm VisionTransformer"):
        build_method(load_config("mos_digits", ["model.name=mlp", "device=cpu"]))
    with pytest.raises(ConfigError, match="model.weights_path"):
        load_config("mos_cifar100_b0inc5")   # the preset names real weights by path
    data = tmp_path / "data"
    data.mkdir()
    cfg = load_config("mos_cifar100_b0inc5", [f"model.weights_path={pretrained}",
                                              f"scenario.dataset_root={data}"])
    assert (cfg.method.bottleneck, cfg.method.merge_momentum, cfg.method.reg, cfg.method.ca_epochs,
            cfg.method.max_iter) == (16, 0.1, 0.1, 30, 4)
    assert (cfg.train.epochs, cfg.train.lr, cfg.train.batch_size) == (20, 0.03, 48)
    assert cfg.scenario.kwargs.n_experiences == 20
    cfg = load_config("mos_imagenet_r", [f"model.weights_path={pretrained}",
                                         f"scenario.root={data}", f"scenario.test_root={data}"])
    assert cfg.scenario.n_experiences == 10 and cfg.train.lr == 0.05 and cfg.train.epochs == 10
