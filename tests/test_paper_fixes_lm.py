"""Language-model methods against their official protocols: train.epochs=0 on a TOFU stream
(the checkpoint is already fine-tuned), LoKU's official schedule and FILA's SVD, ConPET's
full-data replay and unmasked static head, ReLearn's official augmentation, cut and KL."""
from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from test_llm_unlearning import forget_rows, learned, make, my_ma, request_of  # noqa: E402, F401
from tofu_helpers import small, tiny_llama  # noqa: E402

from lethe.errors import ConfigError  # noqa: E402
from lethe.methods.base import MethodContext  # noqa: E402
from lethe.platform.config import load_config  # noqa: E402
from lethe.platform.runner import build_components  # noqa: E402

CPU = torch.device("cpu")
TINY = ["model.d_model=32", "model.heads=2", "model.layers=1", "device=cpu"]


# ====================================================== train.epochs=0 on a TOFU stream

def test_tofu_learn_with_zero_epochs_keeps_the_fine_tuned_checkpoint(tmp_path):
    """A checkpoint already fine-tuned on TOFU: train.epochs=0 serves the learn experience
    without a single update (weights bitwise the saved ones); 0 elsewhere, or without a
    checkpoint, is a config error naming the fix."""
    base = ["train.epochs=1", *small(tmp_path), *TINY]
    stream, _, _ = build_components(load_config("ga_tofu_synthetic", base))
    tiny_llama(stream, 7).lm.save_pretrained(tmp_path / "tofu_ft")
    saved = {n: w.clone() for n, w in tiny_llama(stream, 7).state_dict().items()}
    cfg = load_config("ga_tofu_synthetic", base + ["train.epochs=0", f"model.path={tmp_path / 'tofu_ft'}"])
    stream, model, entry = build_components(cfg)
    method = entry.obj(cfg.method, model, MethodContext(train=cfg.train, device=CPU, stream=stream,
                                                       seed=cfg.seed))
    learn = next(e for e in stream.experiences if e.kind == "learn")
    method.serve(learn)
    assert method.learned == [learn.index]
    for n, w in method.model.state_dict().items():
        assert torch.equal(w, saved[n]), n
    with pytest.raises(ConfigError, match="train.epochs=0 skips TOFU's fine-tuning.*set model.path"):
        load_config("ga_tofu_synthetic", base + ["train.epochs=0"])
    with pytest.raises(ConfigError, match="'train.epochs': must be ≥ 1 \\(0 is allowed only for "
                                          "scenario.name=tofu"):
        load_config("split_digits", ["train.epochs=0"])
    with pytest.raises(ConfigError, match="'train.epochs': must be ≥ 1"):
        load_config("ga_tofu_synthetic", base + ["train.epochs=-1", f"model.path={tmp_path}"])


# ====================================================== LoKU's official optimisation schedule

def stream_and_method(tmp_path, preset, overrides=()):
    """A small synthetic TOFU stream and a fresh ``preset`` method on an untrained tiny Llama."""
    from lethe import registry

    cfg = load_config(preset, ["train.epochs=1", *small(tmp_path), *TINY, *overrides])
    stream, _, _ = build_components(cfg)
    entry = registry.get("methods", cfg.method.name)
    entry.obj.check_stream(cfg.method, stream, cfg.seed)
    ctx = MethodContext(train=cfg.train, device=CPU, stream=stream, seed=cfg.seed)
    return stream, entry.obj(cfg.method, tiny_llama(stream, 3), ctx)


def record_optimizer(monkeypatch):
    """Patch the optimizer factory: the unlearning optimizer and the lr of each of its steps."""
    from lethe.engine import loop

    made, real = {}, loop.make_optimizer

    def spy(params, settings):
        opt = real(params, settings)
        made["opt"], made["lrs"] = opt, []
        opt.register_step_pre_hook(lambda o, a, k: made["lrs"].append(o.param_groups[0]["lr"]))
        return opt

    monkeypatch.setattr(loop, "make_optimizer", spy)
    return made


def test_loku_schedule_matches_official_steps(tmp_path, monkeypatch):
    """The official protocol (HF Trainer: AdamW, weight decay 0.01, batch × accumulation, one
    epoch of linear warm-up, then linear decay to 0) through method.* settings: the number of
    optimizer steps and the lr of each one follow the hand formula below."""
    lr, bs, accum, epochs = 0.002, 2, 4, 3
    stream, m = stream_and_method(tmp_path, "loku_tofu_synthetic", [
        f"method.lr={lr}", f"method.batch_size={bs}", f"method.grad_accum_steps={accum}",
        f"method.epochs={epochs}", "method.lr_schedule=warmup_linear", "method.warmup_epochs=1",
        "method.weight_decay=0.01", "method.stop_at_target=false"])
    made = record_optimizer(monkeypatch)
    req = next(e.request for e in stream.experiences if e.request is not None)
    m.unlearn(req)
    n_forget = len(req.sample_ids)
    # hand formula: ⌈N / bs⌉ mini-batches an epoch, one step per `accum` of them (a shorter window
    # closes each epoch: every forget row is seen every epoch), W = 1 epoch of steps, T in all.
    # (The official script takes ⌊epochs·N / (bs·accum)⌋ steps; both agree when bs·accum divides
    # N; forget10's 400 rows at 2 × 16 give 65 steps here, 62 there.)
    per_epoch = math.ceil(math.ceil(n_forget / bs) / accum)
    total, warm = epochs * per_epoch, per_epoch
    assert n_forget == 13 and (per_epoch, total) == (2, 6)           # 7 mini-batches → 4 + 3
    hand = [lr * s / warm if s < warm else lr * (total - s) / (total - warm) for s in range(total)]
    assert m.unlearn_stats()["unlearn_steps"] == total == len(made["lrs"])
    assert made["lrs"] == pytest.approx(hand, rel=1e-12)
    assert made["lrs"][:3] == pytest.approx([0.0, lr / 2, lr])       # 0 → peak after W steps
    assert made["opt"].param_groups[0]["weight_decay"] == 0.01
    assert isinstance(made["opt"], torch.optim.AdamW)


# ====================================================== LoKU: FILA vs zero-initialised LoRA

def test_fila_is_not_faster_than_zero_init_lora_to_the_forget_target_on_synthetic_tofu(learned):  # noqa: F811
    """LoKU with FILA vs the paper's ablation (plain LoRA, B = 0), same seed, lr and batches,
    stopped at forget MA ≤ unseen MA. Both reach the target (checked with test_llm_unlearning's
    teacher-forced MA, not the method's);
    on this tiny synthetic stream FILA needs at least as many steps as zero-initialised LoRA —
    the paper's speed-up (on Phi-1.5 / Llama-2 with real TOFU) does not show at this scale
    (docs/unlearning.md says so). Should FILA become faster here, this test and that line change."""
    stream = learned["stream"]
    tok, splits = stream.qa.tokenizer, stream.qa.splits
    cap_epochs, batch = 30, 4
    steps = {}
    for fila in (True, False):
        m = make(learned, "loku_tofu_synthetic", ["method.stop_at_target=true", f"method.fila={fila}",
                                                  f"method.epochs={cap_epochs}", "method.lr=0.003",
                                                  f"method.batch_size={batch}"])
        m.unlearn(request_of(stream))
        assert m.unlearn_stats()["target_reached"] == 1.0
        assert my_ma(m.model, splits["forget"], tok) <= my_ma(m.model, splits["unseen"], tok)
        steps[fila] = m.unlearn_stats()["unlearn_steps"]
    cap = cap_epochs * -(-len(forget_rows(stream)[0]) // batch)
    assert 1 < steps[False] <= steps[True] < cap, steps
