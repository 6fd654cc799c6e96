"""HFT: half of each layer's matrices frozen (whole matrices), resampled every stage, frozen
ones bitwise unchanged through their stage."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import mlflow_client

from lethe.errors import ConfigError
from lethe.methods.base import MethodContext
from lethe.methods.hft import HFT
from lethe.platform.config import load_config
from lethe.platform.runner import build_components, run_experiment

SMALL = ["scenario.markov_tokens=3000", "scenario.block_size=16", "train.epochs=1", "device=cpu"]


class StageWatch:
    """Snapshots every parameter when a stage starts (after HFT froze its half) and compares
    them when it ends."""

    def __init__(self):
        self.start, self.changed = {}, []

    def before_training_exp(self, strategy, **kwargs):
        self.start = {n: p.detach().clone() for n, p in strategy.model.named_parameters()}

    def after_training_exp(self, strategy, **kwargs):
        self.changed.append({n for n, p in strategy.model.named_parameters()
                             if not torch.equal(p, self.start[n])})


def build(overrides, plugins=()):
    cfg = load_config("hft_lm_corpora", SMALL + list(overrides))
    torch.manual_seed(cfg.seed)
    stream, model, _ = build_components(cfg)
    ctx = MethodContext(train=cfg.train, device=torch.device("cpu"), stream=stream, seed=cfg.seed,
                        plugins=list(plugins))
    return stream, HFT(cfg.method, model, ctx)


def test_llama_half_frozen_per_layer_as_the_paper_whole_matrices_new_half_each_stage():
    watch = StageWatch()
    stream, hft = build([], [watch])
    for exp in stream.experiences:
        hft.learn(exp)
    assert len(hft.history) == 3
    n_layers = len(hft.layers)
    for frozen in hft.history:
        per_layer = [Counter() for _ in range(n_layers)]
        for name in frozen:
            i = next(k for k, (lname, _) in enumerate(hft.layers) if name.startswith(lname + "."))
            kind = "attn" if ".self_attn." in name else "ffn" if ".mlp." in name else "norm"
            per_layer[i][kind] += 1
        assert all(c["attn"] == 2 and c["norm"] == 1 for c in per_layer)      # 2 of 4, 1 of 2
        assert sorted(c["ffn"] for c in per_layer) == [1, 1, 2, 2]            # 2 of 3 in half
    assert len({tuple(f) for f in hft.history}) == 3                          # resampled
    params = dict(hft.model.named_parameters())
    for frozen, changed in zip(hft.history, watch.changed):
        frozen_params = {n for n in params if any(n.startswith(f + ".") for f in frozen)}
        assert frozen_params and not (frozen_params & changed)                # bitwise unchanged
        inside = {n for n in params if any(n.startswith(l + ".") for l, _ in hft.layers)}
        assert inside - frozen_params <= changed                              # the rest trained
        assert "lm.model.embed_tokens.weight" in changed                      # outside: trainable
    # whole matrices only: each module's parameters are all frozen or all trainable
    for name, mod in hft.model.named_modules():
        flags = {p.requires_grad for p in mod.parameters(recurse=False)}
        assert len(flags) <= 1, name
    m = hft.log_params()
    assert m["hft/frac_frozen"] == pytest.approx(18 / 36)                      # 4 × (2+1.5+1) / 4 × 9
    layer_params = sum(p.numel() for l, blk in hft.layers for p in blk.parameters())
    frozen_now = sum(p.numel() for n, p in params.items() if any(n.startswith(f + ".") for f in hft.frozen))
    assert 0.4 < frozen_now / layer_params < 0.6
    assert m["params/trainable"] == sum(p.numel() for p in params.values() if p.requires_grad)


def test_gpt2_fused_attention_counts_as_one_matrix_and_the_rule_generalises():
    stream, hft = build(["model.arch=gpt2", "model.layers=4"])
    frozen = hft.resample(0)
    per_layer = Counter(name.split(".h.")[1].split(".")[0] for name in frozen)
    assert set(per_layer.values()) == {3}                    # 1 of 2 attention, ffn, norm each
    assert all(not name.endswith(("q_proj", "k_proj")) for name in frozen)
    assert hft.resample(1) != frozen and hft.resample(0) == frozen            # seeded per stage
    stream, other_seed = build(["model.arch=gpt2", "model.layers=4", "seed=1"])
    assert other_seed.resample(0) != frozen


def test_train_outside_layers_false_freezes_embeddings_and_head():
    _, hft = build(["method.train_outside_layers=false"])
    hft.resample(0)
    params = dict(hft.model.named_parameters())
    assert not params["lm.model.embed_tokens.weight"].requires_grad
    assert not params["lm.lm_head.weight"].requires_grad


def test_hft_needs_a_transformer():
    with pytest.raises(ConfigError, match="hft needs a transformer"):
        cfg = load_config("split_digits", ["method.name=hft", "model.name=mlp"])
        stream, model, entry = build_components(cfg)
        entry.obj(cfg.method, model, MethodContext(train=cfg.train, device=torch.device("cpu"),
                                                   stream=stream))


@pytest.mark.integration
def test_hft_run_logs_trainable_fraction_every_stage(store):
    res = run_experiment(load_config("hft_lm_corpora", SMALL + store["overrides"]))
    client = mlflow_client(store["uri"])
    hist = client.get_metric_history(res.run_id, "hft/frac_frozen")
    assert [m.step for m in sorted(hist, key=lambda m: m.step)] == [0, 1, 2]
    assert all(m.value == pytest.approx(0.5) for m in hist)
    assert 0.3 < res.final["params/frac_trainable"] < 0.8
    assert "ppl/exp_2" in res.final


class MomentWatch:
    """Records the optimizer's state when every stage starts, and the first AdamW update of
    each stage: the gradient going in (before_update) and the moments coming out (after_update)."""

    def __init__(self):
        self.state_at_start, self.first = [], []
        self._grads = None

    def before_training_epoch(self, strategy, **kwargs):
        if len(self.first) == len(self.state_at_start):          # first epoch of a new stage
            self.state_at_start.append(len(strategy.optimizer.state))
            self._grads = None

    def before_update(self, strategy, **kwargs):
        if self._grads is None:
            self._grads = {n: p.grad.detach().clone() for n, p in strategy.model.named_parameters()
                           if p.grad is not None}

    def after_update(self, strategy, **kwargs):
        if len(self.first) < len(self.state_at_start):
            named = dict(strategy.model.named_parameters())
            st = strategy.optimizer.state
            self.first.append({n: {k: v.detach().clone() if torch.is_tensor(v) else v
                                   for k, v in st[named[n]].items()}
                               for n in self._grads if named[n] in st})
            self.first[-1]["__grads__"] = self._grads


def test_hft_resets_optimizer_moments_each_stage():
    watch = MomentWatch()
    stream, hft = build([], [watch])          # the preset itself: optimizer_reset=experience
    assert hft.ctx.train.optimizer_reset == "experience"
    for exp in stream.experiences:
        hft.learn(exp)
    # the state is empty when every stage starts (the first stage trivially)
    assert watch.state_at_start == [0, 0, 0]
    # a matrix trained in stage 0, frozen in stage 1 (AdamW keeps its moments: no grad, no
    # update) and trained again in stage 2 must start stage 2 from fresh moments
    frozen1 = tuple(f + "." for f in hft.history[1])
    frozen0 = tuple(f + "." for f in hft.history[0])
    frozen2 = tuple(f + "." for f in hft.history[2])
    inside = tuple(name + "." for name, _ in hft.layers)
    revived = [n for n, _ in hft.model.named_parameters() if n.startswith(inside) and
               n.startswith(frozen1) and not n.startswith(frozen0) and not n.startswith(frozen2)]
    assert revived, "the seeded frozen sets should give a trained-frozen-trained matrix"
    b1, b2 = hft.strategy.optimizer.param_groups[0]["betas"]
    first2 = watch.first[2]
    for n in revived:
        g, st = first2["__grads__"][n], first2[n]
        # a fresh AdamW after one step (by hand): step 1, m = (1-b1)·g, v = (1-b2)·g²
        assert float(st["step"]) == 1.0
        torch.testing.assert_close(st["exp_avg"], (1 - b1) * g)
        torch.testing.assert_close(st["exp_avg_sq"], (1 - b2) * g * g)
