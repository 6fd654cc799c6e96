"""The training engine (lethe/engine/engine.py): accumulation, clipping, precision, optimizer
resets, gradient checkpointing — through Avalanche's template as every method trains, checked
against plain PyTorch computed here."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from lethe.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def train_cfg(**over):
    from omegaconf import OmegaConf

    from lethe.platform.config import TrainConfig

    return OmegaConf.merge(OmegaConf.structured(TrainConfig),
                           {"epochs": 1, "optimizer": "sgd", "lr": 0.1, "momentum": 0.0, **over})


def experience(n: int = 64, seed: int = 0):
    """One Avalanche learn experience of n random samples (8 features, 3 classes)."""
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets

    from lethe.scenarios.streams import avalanche_dataset

    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)
    bm = benchmark_from_datasets(train=[avalanche_dataset(x, y, range(n))],
                                 test=[avalanche_dataset(x[:4], y[:4], range(4))])
    return SimpleNamespace(train=bm.train_stream[0], index=0, kind="learn"), x, y


def mlp(seed: int = 0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def naive(model, train, plugins=()):
    from lethe.methods.base import MethodContext
    from lethe.methods.naive import Naive, NaiveConfig

    ctx = MethodContext(train=train, device=torch.device("cpu"), stream=None, plugins=list(plugins))
    return Naive(NaiveConfig(), model, ctx)


def learn(method, exp, seed: int = 7) -> None:
    torch.manual_seed(seed)            # the same shuffling order for every run
    method.learn(exp)


def test_four_accumulated_batches_of_16_equal_one_batch_of_64():
    """One epoch over 64 samples is one optimizer step either way (the window holds every
    sample, so the shuffling order does not matter): batch 16 × grad_accum_steps 4 must equal
    batch 64, and both equal one full-batch SGD step written here in plain PyTorch."""
    exp, x, y = experience(64)
    big = naive(mlp(), train_cfg(batch_size=64))
    small = naive(mlp(), train_cfg(batch_size=16, grad_accum_steps=4))
    start = copy.deepcopy(big.model.state_dict())
    learn(big, exp)
    learn(small, exp)
    ref = mlp()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.0)
    torch.nn.functional.cross_entropy(ref(x), y).backward()
    opt.step()
    for k, v in ref.state_dict().items():
        assert not torch.equal(v, start[k])                     # it trained
        assert torch.allclose(v, big.model.state_dict()[k], atol=1e-6), k
        assert torch.allclose(v, small.model.state_dict()[k], atol=1e-6), k


def test_grad_clip_norm_bounds_the_update_of_one_sgd_step():
    exp, x, y = experience(64)
    method = naive(mlp(), train_cfg(batch_size=64, lr=1.0, grad_clip_norm=0.01))
    before = [p.detach().clone() for p in method.model.parameters()]
    ref = mlp()
    torch.nn.functional.cross_entropy(ref(x), y).backward()
    raw = torch.sqrt(sum((p.grad ** 2).sum() for p in ref.parameters()))
    assert raw > 0.1                                           # the clip really bites
    learn(method, exp)
    step = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(method.model.parameters(), before)))
    assert step == pytest.approx(0.01, rel=1e-4)               # lr 1 × clipped norm 0.01


def test_bf16_mixed_keeps_fp32_master_weights_and_tracks_fp32_training():
    exp, _, _ = experience(64)
    half = mlp().to(torch.bfloat16)                            # a bf16 checkpoint
    mixed = naive(half, train_cfg(batch_size=16, precision="bf16-mixed"))
    assert all(p.dtype == torch.float32 for p in mixed.model.parameters())
    full = naive(mlp(), train_cfg(batch_size=16))
    full.model.load_state_dict({k: v.float() for k, v in mixed.model.state_dict().items()})
    learn(mixed, exp)
    learn(full, exp)
    assert all(p.dtype == torch.float32 for p in mixed.model.parameters())
    for (k, a), b in zip(mixed.model.state_dict().items(), full.model.state_dict().values()):
        # bf16 autocast rounds activations to 8 mantissa bits: 4 SGD steps stay within 1e-2
        assert (a - b).abs().max() < 1e-2, k
        assert not torch.equal(a, b)                           # autocast really ran


def tiny_llama(dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).to(dtype)


def lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def test_fp16_llama_stays_finite_with_fp16_mixed_where_plain_fp16_adamw_does_not():
    from lethe.engine.engine import Engine

    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(1))
    plain = tiny_llama(torch.float16)
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        lm_loss(plain, ids).backward()
        opt.step()
    assert not all(torch.isfinite(p).all() for p in plain.parameters())   # fp16 moments underflow

    engine = Engine(train_cfg(precision="fp16-mixed"), "cpu")
    model = engine.prepare_model(tiny_llama(torch.float16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine.begin_epoch(3)
    for _ in range(3):
        with engine.autocast():
            loss = lm_loss(model, ids)
        engine.backward(loss)
        assert engine.step(opt, model)
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in model.parameters())


class OptimizerStateAtStart:
    def __init__(self):
        self.sizes = []

    def before_training_epoch(self, strategy, **kwargs):
        if strategy.clock.train_exp_epochs == 0:
            self.sizes.append(len(strategy.optimizer.state))


@pytest.mark.parametrize("reset, second", [("never", "kept"), ("experience", "cleared")])
def test_optimizer_reset_experience_clears_the_moments_at_each_experience(reset, second):
    exp, _, _ = experience(64)
    watch = OptimizerStateAtStart()
    method = naive(mlp(), train_cfg(batch_size=16, optimizer="adam", lr=1e-3, optimizer_reset=reset),
                   [watch])
    learn(method, exp)
    learn(method, SimpleNamespace(train=exp.train, index=1, kind="learn"))
    assert watch.sizes[0] == 0                                 # a fresh optimizer
    n_params = len(list(method.model.parameters()))
    assert watch.sizes[1] == (0 if second == "cleared" else n_params)


def test_gradient_checkpointing_gives_the_same_gradients():
    from lethe.engine.engine import enable_gradient_checkpointing

    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(2))
    grads = []
    for checkpointing in (False, True):
        model = tiny_llama(torch.float32).train()
        if checkpointing:
            enable_gradient_checkpointing(model)
            assert model.model.gradient_checkpointing
        lm_loss(model, ids).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n, g in grads[0].items():
        assert torch.allclose(g, grads[1][n], atol=1e-6), n


def test_gradient_checkpointing_on_a_model_without_support_is_a_config_error():
    from lethe.engine.engine import enable_gradient_checkpointing

    with pytest.raises(ConfigError, match="train.gradient_checkpointing=true but model Sequential"):
        enable_gradient_checkpointing(mlp())


@pytest.mark.parametrize("override, message", [
    ("train.precision=bf16_mixed", "bad value for 'train.precision': 'bf16_mixed'; did you mean 'bf16-mixed'?"),
    ("train.grad_accum_steps=0", "'train.grad_accum_steps': 0 (must be ≥ 1"),
    ("train.grad_clip_norm=-1", "'train.grad_clip_norm': -1.0 (must be ≥ 0"),
    ("train.optimizer_reset=always", "'train.optimizer_reset': 'always' (choose one of never, experience)"),
])
def test_bad_engine_settings_fail_at_config_time(override, message):
    from lethe.platform.config import load_config

    with pytest.raises(ConfigError) as err:
        load_config("split_digits", [override])
    assert message in str(err.value)


def test_fit_sets_the_schedule_per_optimizer_step_and_stops_on_a_non_finite_loss():
    """warmup_linear over 2 epochs of 6 mini-batches with grad_accum_steps 2: T = 6 optimizer
    steps, W = ceil(0.34·6) = 3; HF's multiplier s/W below W, then (T−s)/(T−W)."""
    from omegaconf import OmegaConf

    from lethe.engine.engine import Engine
    from lethe.engine.loop import fit
    from lethe.engine.schedules import LRScheduleConfig
    from lethe.errors import RunError

    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    engine = Engine(train_cfg(grad_accum_steps=2), "cpu")
    x, y = torch.randn(12, 8), torch.randint(0, 3, (12,))
    seen = []
    steps = fit(engine, model, opt, 2, lambda e: list(torch.arange(12).split(2)),
                lambda idx: torch.nn.functional.cross_entropy(model(x[idx]), y[idx]), "test loop",
                lr_schedule=OmegaConf.structured(LRScheduleConfig(name="warmup_linear", warmup_frac=0.34)),
                base_lr=0.5, on_step=lambda s: seen.append(opt.param_groups[0]["lr"]) and False)
    assert steps == 6
    assert seen == pytest.approx([0.5 * m for m in (0 / 3, 1 / 3, 2 / 3, 3 / 3, 2 / 3, 1 / 3)])

    with pytest.raises(RunError, match=r"non-finite training loss in test loop, epoch 1: lower"):
        fit(engine, model, opt, 1, lambda e: [0, 1], lambda b: model(x[:2]).sum() * float("nan"),
            "test loop")


LOOPS = {   # preset, overrides, the label of its method-specific loop
    "exact methods (retrain)": ("retrain_digits", ["train.epochs=1",
                                                    "method.lora.pretrain_epochs=1"], "retrain"),
    "CLR anchor pre-training": ("clr_split_digits", ["scenario.n_experiences=2", "train.epochs=1",
                                                     "model.channels=8", "method.anchor_pretrain=first_task",
                                                     "method.anchor_pretrain_epochs=1"],
                                "CLR anchor pre-training"),
    "ConPET selector": ("conpet_dynamic_text", ["model.path=null", "model.hidden=16", "model.layers=1",
                                                "model.heads=2", "scenario.generated_per_class=8",
                                                "scenario.max_length=8", "method.batch_limit=2",
                                                "method.mem_per_class=2", "train.epochs=1"],
                        "ConPET selector"),
    "LLM unlearning": ("ga_tofu_synthetic", ["scenario.authors=4", "scenario.forget_percent=25",
                                             "scenario.forget_split=forget25", "scenario.unseen_authors=1",
                                             "model.d_model=16", "model.heads=2", "train.epochs=1",
                                             "method.epochs=1", "method.stop_at_target=false"],
                       "unlearning (grad_ascent)"),
}


@pytest.mark.integration
@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_every_method_specific_loop_runs_through_the_engine_with_the_schedule(loop, store, tmp_path,
                                                                               monkeypatch):
    """Each method-specific training stage goes through lethe.engine.loop.fit (the engine, the
    non-finite loss check tested above) with train.lr_schedule: the lr it sets at every step
    is the schedule's (checked against warmup_linear's formula)."""
    from lethe.engine import loop as engine_loop
    from lethe.platform.config import load_config
    from lethe.platform.runner import run_experiment

    preset, overrides, label = LOOPS[loop]
    real, calls = engine_loop.fit, []

    def spy(engine, model, optimizer, epochs, batches, loss_fn, lbl, lr_schedule=None, base_lr=None,
            on_step=None, after_epoch=None):
        lrs = []

        def record(steps):
            lrs.append((steps, optimizer.param_groups[0]["lr"]))
            return on_step(steps) if on_step is not None else False

        n = real(engine, model, optimizer, epochs, batches, loss_fn, lbl, lr_schedule, base_lr,
                 record, after_epoch)
        calls.append((lbl, lr_schedule, base_lr, lrs, n))
        return n

    monkeypatch.setattr(engine_loop, "fit", spy)
    extra = [f"scenario.cache_dir={tmp_path}"] if preset == "ga_tofu_synthetic" else []
    cfg = load_config(preset, overrides + extra + store["overrides"] + [
        "train.lr_schedule.name=warmup_linear", "train.lr_schedule.warmup_steps=1"])
    run_experiment(cfg)
    mine = [c for c in calls if c[0].startswith(label)]
    assert mine, [c[0] for c in calls]
    for _, schedule, base_lr, lrs, n in mine:
        assert schedule.name == "warmup_linear" and n == len(lrs) and n >= 2
        # HF linear with W = 1: step s (0-based, set before the step) → max(0, (T−s)/(T−1))
        expected = [base_lr * (0.0 if s == 0 else max(0.0, (n - s) / (n - 1))) for s in range(n)]
        assert [lr for _, lr in lrs] == pytest.approx(expected)
