"""Vision / exact-unlearning fixes after comparing lethe with the papers' official code."""
from __future__ import annotations

import pytest
import torch

from lethe.errors import ConfigError
from lethe.models.vision import ModelInfo, ResNet18Config, resnet18


# --- resnet18: a pretrained conv1 is never silently replaced by a random stem ------------------
@pytest.fixture
def imagenet_like_weights(tmp_path):
    """A torchvision ResNet-18 state_dict (7x7 stem, 1000 classes) saved to a file."""
    from torchvision.models import resnet18 as tv_resnet18

    torch.manual_seed(0)
    state = tv_resnet18(weights=None).state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    return str(path), state


def test_resnet18_refuses_to_drop_pretrained_conv1(imagenet_like_weights):
    path, _ = imagenet_like_weights
    info = ModelInfo(input_shape=(3, 32, 32), n_classes=10)
    with pytest.raises(ConfigError, match=r"conv1.weight .* has shape \[64, 3, 7, 7\] but "
                                          r"model.small_input=true builds a 3x3 stem .*set "
                                          r"model.small_input=false"):
        resnet18(ResNet18Config(weights_path=path, small_input=True), info)


def test_resnet18_keeps_pretrained_conv1_with_the_imagenet_stem(imagenet_like_weights):
    path, state = imagenet_like_weights
    model = resnet18(ResNet18Config(weights_path=path, small_input=False),
                     ModelInfo(input_shape=(3, 32, 32), n_classes=10))
    assert torch.equal(model.conv1.weight, state["conv1.weight"])
    assert torch.equal(model.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    assert model.fc.out_features == 10              # the 1000-class head is the one skipped


def test_resnet18_small_stem_loads_weights_saved_with_a_small_stem(tmp_path):
    info = ModelInfo(input_shape=(3, 32, 32), n_classes=10)
    torch.manual_seed(1)
    own = resnet18(ResNet18Config(), info)          # e.g. lethe's own public pretraining
    torch.save(own.state_dict(), tmp_path / "small.pth")
    again = resnet18(ResNet18Config(weights_path=str(tmp_path / "small.pth")), info)
    assert torch.equal(again.conv1.weight, own.conv1.weight)


# --- LoRA on a fused qkv projection: query and value adapted, key untouched ----------------
def tiny_attention(d: int = 8):
    from torch import nn

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(d, 3 * d)
            self.proj = nn.Linear(d, d)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Attn()
            self.head = nn.Linear(d, 3)

        def forward(self, x):
            q, k, v = self.attn.qkv(x).chunk(3, dim=-1)
            return self.head(self.attn.proj(q * k + v))

    torch.manual_seed(0)
    return Net()


def test_fused_qkv_lora_adapts_query_and_value_but_not_key():
    from lethe.models.lora import LoraOptions, add_lora

    d, r, alpha = 8, 2, 4.0
    net = tiny_attention(d)
    base_w, base_b = net.attn.qkv.weight.detach().clone(), net.attn.qkv.bias.detach().clone()
    opts = LoraOptions(rank=r, alpha=alpha, dropout=0.0, rslora=True, fused_qkv="qv")
    net = add_lora(net, ["attn.qkv", "attn.proj"], opts, "head")
    qkv = net.attn.qkv
    with torch.no_grad():                     # a trained adapter: B no longer zero
        for name, p in qkv.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p))
    x = torch.randn(5, d)
    out = qkv(x)
    plain = x @ base_w.T + base_b             # the frozen layer, by hand
    # k: the base layer's output bit for bit; q, v: base + (α/√r)·x Aᵀ Bᵀ of their own adapter
    torch.testing.assert_close(out[:, d:2 * d], plain[:, d:2 * d])
    assert torch.equal(out[:, d:2 * d], qkv.base_layer(x)[:, d:2 * d])
    for part, cols in (("q", slice(0, d)), ("v", slice(2 * d, 3 * d))):
        a, b = getattr(qkv, f"lora_{part}_A").weight, getattr(qkv, f"lora_{part}_B").weight
        expected = plain[:, cols] + (alpha / r ** 0.5) * (x @ a.T @ b.T)
        torch.testing.assert_close(out[:, cols], expected)
        assert not torch.allclose(out[:, cols], plain[:, cols])
    # trainable: the four q/v adapter matrices, proj's peft adapter and the head; never k
    trainable = sorted(n for n, p in net.named_parameters() if p.requires_grad)
    assert [n for n in trainable if n.startswith("attn.qkv.")] == [
        "attn.qkv.lora_q_A.weight", "attn.qkv.lora_q_B.weight",
        "attn.qkv.lora_v_A.weight", "attn.qkv.lora_v_B.weight"]
    assert any(n.startswith("attn.proj.lora_A") for n in trainable)
    assert not qkv.base_layer.weight.requires_grad


def test_fused_qkv_lora_starts_as_the_frozen_layer_and_qkv_mode_adapts_the_whole_layer():
    from lethe.models.lora import LoraOptions, add_lora

    x = torch.randn(4, 8)
    ref = tiny_attention()(x)
    fresh = add_lora(tiny_attention(), ["attn.qkv"], LoraOptions(rank=2, fused_qkv="qv"), "head")
    fresh.eval()
    assert torch.equal(fresh(x), ref)         # B = 0: bit for bit the frozen backbone
    whole = add_lora(tiny_attention(), ["attn.qkv"], LoraOptions(rank=2, fused_qkv="qkv"), "head")
    assert hasattr(whole.attn.qkv, "lora_A")  # peft's single adapter over q, k and v
    with pytest.raises(ConfigError, match="method.lora.fused_qkv"):
        add_lora(tiny_attention(), ["attn.qkv"], LoraOptions(rank=2, fused_qkv="k"), "head")


def test_s3t_defaults_to_query_value_lora_on_a_timm_vit():
    from lethe.methods.base import MethodContext
    from lethe.platform.config import load_config
    from lethe.platform.runner import build_components, seed_everything

    cfg = load_config("split_digits", [
        "device=cpu", "scenario.n_experiences=5", "model.name=timm",
        "model.arch=vit_tiny_patch16_224",
        "model.kwargs={img_size: 8, patch_size: 4, depth: 2, embed_dim: 16, num_heads: 2}",
        "train.epochs=1", "train.batch_size=32", "method.name=s3t", "method.shards=1",
        "method.slices=2", "method.lora.rank=2", "method.lora.target_modules=[qkv]"])
    seed_everything(cfg.seed, False)
    stream, model, entry = build_components(cfg)
    ctx = MethodContext(train=cfg.train, device=torch.device("cpu"), stream=stream, seed=cfg.seed)
    m = entry.obj(cfg.method, model, ctx)
    # S3T's groups hold the q/v adapters of the fused layers, never a k-covering adapter
    assert m.group_names[0] and all(".lora_q_" in n or ".lora_v_" in n
                                    for g in m.group_names for n in g)
    m.learn(stream.experiences[0])
    block = m.model.blocks[1].attn.qkv
    x = torch.randn(3, 16)
    d = 16
    # after training, k is still the frozen layer's; q and v moved (the top group trained)
    m.load(m.served_state(0))
    out, base = block(x), block.base_layer(x)
    assert torch.equal(out[:, d:2 * d], base[:, d:2 * d])
    assert not torch.allclose(out[:, :d], base[:, :d]) and not torch.allclose(out[:, 2 * d:], base[:, 2 * d:])


# --- the exact methods train every stage under train.lr_schedule ---------------------------
@pytest.mark.parametrize("method", [["method.name=s3t", "method.shards=2", "method.slices=2",
                                     "method.lora.rank=2", "model.layers=2"],
                                    ["method.name=sisa", "method.shards=2", "method.slices=2"],
                                    ["method.name=retrain"]], ids=["s3t", "sisa", "retrain"])
def test_exact_methods_follow_the_lr_schedule_in_every_stage(monkeypatch, method):
    import math

    from lethe.engine import loop
    from lethe.methods.base import MethodContext
    from lethe.platform.config import load_config
    from lethe.platform.runner import build_components, seed_everything

    cfg = load_config("split_digits", [
        "device=cpu", "scenario.n_experiences=5", "model.name=mlp", "model.hidden=16",
        "train.epochs=2", "train.batch_size=32", "train.optimizer=sgd", "train.lr=0.1",
        "train.lr_schedule.name=cosine", "train.lr_schedule.warmup_frac=0", *method])
    seed_everything(cfg.seed, False)
    stream, model, entry = build_components(cfg)
    ctx = MethodContext(train=cfg.train, device=torch.device("cpu"), stream=stream, seed=cfg.seed)
    m = entry.obj(cfg.method, model, ctx)
    made = loop.make_optimizer
    seen: list[list[float]] = []                # the lr of every optimizer step, per stage

    def spy(params, train):
        opt, lrs = made(params, train), []
        seen.append(lrs)
        step = opt.step

        def recording_step(*a, **k):
            lrs.append(opt.param_groups[0]["lr"])
            return step(*a, **k)
        opt.step = recording_step
        return opt
    monkeypatch.setattr(loop, "make_optimizer", spy)
    m.learn(stream.experiences[0])
    assert seen and all(seen)
    for lrs in seen:   # HF cosine without warm-up, restarted per stage: ½·0.1·(1 + cos(π s/T))
        T = len(lrs)
        expected = [0.5 * 0.1 * (1 + math.cos(math.pi * s / T)) for s in range(T)]
        assert lrs == pytest.approx(expected, rel=1e-12)


# --- the exact methods train through the training pipeline, evaluate through eval ----------
def build_with_train_transform(method: list, transform):
    """An exact method on split_digits whose learn experiences carry ``transform`` in their
    Avalanche 'train' transform group only (eval untouched), and its stream."""
    from lethe.methods.base import MethodContext
    from lethe.platform.config import load_config
    from lethe.platform.runner import build_components, seed_everything

    cfg = load_config("split_digits", [
        "device=cpu", "scenario.n_experiences=5", "model.name=mlp", "model.hidden=16",
        "model.layers=2", "train.epochs=2", "train.batch_size=16", "train.optimizer=adam",
        "train.lr=0.01", *method])
    seed_everything(cfg.seed, False)
    stream, model, entry = build_components(cfg)
    for exp in stream.experiences:
        if exp.kind == "learn":
            # DatasetExperience.dataset is read-only: Avalanche keeps it in _dataset
            exp.train._dataset = exp.train.dataset.train().replace_current_transform_group(transform)
    ctx = MethodContext(train=cfg.train, device=torch.device("cpu"), stream=stream, seed=cfg.seed)
    return entry.obj(cfg.method, model, ctx), stream


EXACT = {"retrain": ["method.name=retrain"],
         "sisa": ["method.name=sisa", "method.shards=2", "method.slices=2"],
         "s3t": ["method.name=s3t", "method.shards=2", "method.slices=2", "method.lora.rank=2"]}


@pytest.mark.parametrize("name", sorted(EXACT))
def test_exact_methods_train_on_the_train_transform_and_evaluate_on_eval(monkeypatch, name):
    from lethe.methods import exact
    from lethe.scenarios.forget import train_pool

    m, stream = build_with_train_transform(EXACT[name], lambda x: -x)   # train: negated
    calls = []
    real = exact.train_loop

    def spy(model, names, x, y, *args, **kwargs):
        calls.append((x[torch.arange(len(y))].clone(), y.clone()))
        return real(model, names, x, y, *args, **kwargs)
    monkeypatch.setattr(exact, "train_loop", spy)
    m.learn(stream.experiences[0])
    assert calls
    pool = train_pool(stream)              # evaluation's tensors: the eval transform
    by_id = {int(i): r for r, i in enumerate(pool.ids.tolist())}
    exp0 = stream.experiences[0].train.dataset
    eval_x = torch.stack([exp0.eval()[j][0] for j in range(len(exp0))])
    ids = list(exp0.sample_id)
    assert torch.equal(pool.x[[by_id[int(i)] for i in ids]], eval_x)
    # every input trained on is the negation of an eval input of the same sample (label kept)
    eval_rows = {tuple(pool.x[by_id[int(i)]].flatten().tolist()): int(pool.y[by_id[int(i)]])
                 for i in ids}
    for x, y in calls:
        for xi, yi in zip(x, y):
            key = tuple((-xi).flatten().tolist())
            assert key in eval_rows and eval_rows[key] == int(yi)


def test_random_augmentation_is_fresh_per_epoch_and_stages_still_repeat_bit_for_bit():
    def noise(x):                                   # a random shift: augmentation
        return x + torch.rand(())
    m, stream = build_with_train_transform(EXACT["sisa"], noise)
    assert m._sources is not None                    # detected: train differs from eval
    rows = m.slice_rows(0, [0], live=torch.ones(len(m.pool_ids), dtype=torch.bool))[:4]
    x, _ = m.training_inputs(rows)
    a, b = x[torch.arange(4)], x[torch.arange(4)]
    assert not torch.equal(a, b)                      # each access draws anew
    m.learn(stream.experiences[0])
    again, _ = build_with_train_transform(EXACT["sisa"], noise)
    again.learn(stream.experiences[0])
    for j in range(2):                                # same seeds: the same augmentations
        s1, s2 = m.served_state(j), again.served_state(j)
        assert all(torch.equal(s1[k], s2[k]) for k in s1)
