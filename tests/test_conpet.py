"""ConPET: dynamic replay batches, static masking, dynamic experts frozen bitwise, selector,
cached old-expert logits, routing."""
from __future__ import annotations

import io
from collections import Counter

import pytest
import torch
from conftest import mlflow_client

from lethe.errors import ConfigError
from lethe.methods.base import MethodContext
from lethe.methods.conpet import DynamicReplaySampler
from lethe.platform.config import load_config
from lethe.platform.runner import build_components, run_experiment

# a small random BERT on the MiniLM tokenizer: the mechanics, fast on CPU
TINY = ["model.path=null", "model.hidden=32", "model.layers=2", "model.heads=2", "device=cpu",
        "scenario.generated_per_class=24", "scenario.max_length=16", "method.batch_limit=6",
        "method.mem_per_class=6", "train.epochs=2", "train.lr=0.01"]


def build(preset, overrides=(), plugins=()):
    cfg = load_config(preset, TINY + list(overrides))
    torch.manual_seed(cfg.seed)
    stream, model, entry = build_components(cfg)
    ctx = MethodContext(train=cfg.train, device=torch.device("cpu"), stream=stream, seed=cfg.seed,
                        plugins=list(plugins))
    return stream, entry.obj(cfg.method, model, ctx)


def test_dynamic_replay_batches_are_half_new_and_task_balanced():
    groups = [range(100, 110), range(110, 160), range(160, 165)]   # old tasks of 10, 50, 5 samples
    s = DynamicReplaySampler(100, groups, 16, 300, 1.0, seed=0)
    batches = list(s)
    assert len(batches) == len(s) == 300                          # fixed number, not data-driven
    task = Counter()
    for b in batches:
        assert len(b) == 16 and sum(i < 100 for i in b) == 8      # half new, half old
        task.update(next(k for k, g in enumerate(groups) if i in g) for i in b if i >= 100)
    assert all(abs(task[k] - 800) < 100 for k in range(3))        # balanced by task, not by size
    assert list(DynamicReplaySampler(100, groups, 16, 300, 1.0, seed=0)) == batches   # seeded
    new = [i for b in batches[:12] for i in b if i < 100]
    assert len(set(new[:96])) == 96                                # new data cycles a permutation


class Batches:
    def __init__(self):
        self.y = []

    def before_training_iteration(self, strategy, **kwargs):
        self.y.append(strategy.mb_y.clone())


def test_static_with_mask_unseen_masks_unseen_classes_and_replays_a_capped_memory():
    rec = Batches()
    stream, m = build("conpet_static_text", ["method.batch_limit_policy=per_task",
                                             "method.mask_unseen=true"], [rec])
    first, second = m.task_classes[0], m.task_classes[1]
    m.learn(stream.experiences[0])
    assert {len(v) for v in [m.memory[0][m.pool.y[m.memory[0]] == c] for c in first]} == {6}
    with torch.no_grad():
        logits = m.predict(stream.test.x[:5], stream.test.task[:5])
    unseen = [c for c in range(stream.n_classes) if c not in first]
    assert (logits[:, unseen] == -100.0).all() and (logits[:, first] != -100.0).all()
    n0 = len(rec.y)
    m.learn(stream.experiences[1])
    later = rec.y[n0:]
    assert len(later) == 2 * 6 * 2                                 # per_task: 6 × 2 tasks per epoch
    assert all(sum(int(c) in first for c in y) == 8 for y in later)  # half of 16 replayed
    assert set(torch.cat(later).tolist()) == set(first) | set(second)


class BatchIds:
    def __init__(self):
        self.ids = []

    def before_training_iteration(self, strategy, **kwargs):
        self.ids.append(strategy.mbatch[2].clone())   # (x, y, sample id, task) rows


# the official settings: no per-class cap on the replay memory
FULL = [o for o in TINY if not o.startswith("method.mem_per_class")]


@pytest.mark.parametrize("preset", ["conpet_static_text", "conpet_dynamic_text"])
def test_conpet_replays_from_full_earlier_data(preset):
    """By default (mem_per_class=0) the memory of a finished task is every one of its training
    rows, and the next stage's replayed half draws from all of them, not from a per-class cap."""
    from lethe.methods.conpet import ConPETStaticConfig

    rec = BatchIds()
    cfg = load_config(preset, FULL)
    torch.manual_seed(cfg.seed)
    stream, model, entry = build_components(cfg)
    m = entry.obj(cfg.method, model, MethodContext(train=cfg.train, device=torch.device("cpu"),
                                                   stream=stream, seed=cfg.seed, plugins=[rec]))
    pool = stream.train
    task0 = set(pool.ids[pool.exp == 0].tolist())      # every training row of task 0, by id
    m.learn(stream.experiences[0])
    assert set(pool.ids[m.memory[0]].tolist()) == task0
    n0 = len(rec.ids)
    m.learn(stream.experiences[1])
    old = [int(i) for b in rec.ids[n0:] for i in b if int(i) in task0]
    assert len(old) == len(rec.ids[n0:]) * 8           # half of each batch of 16 replayed
    # 6 batches × 2 epochs × 8 draws from task 0's rows: far more distinct rows than a cap of
    # 6 per class (12 for its 2 classes) could hold
    per_class = Counter(int(pool.y[pool.ids == i]) for i in set(old))
    assert len(per_class) == 2 and min(per_class.values()) > 6, per_class
    assert ConPETStaticConfig().mem_per_class == 0     # the default, not only the presets'


def test_conpet_static_head_is_unmasked():
    """Official static ConPET: one head over every label, unseen ones included: predictions are
    the model's raw logits, and training moves the head rows of classes not yet seen (a masked
    head gives them no gradient; no weight decay here)."""
    stream, m = build("conpet_static_text")
    assert m.ctx.train.weight_decay == 0
    head = dict(m.model.named_parameters())
    name = next(n for n in head if "head" in n.split(".")[0] and n.endswith("weight"))
    before = head[name].detach().clone()
    m.learn(stream.experiences[0])
    first = m.task_classes[0]
    unseen = [c for c in range(stream.n_classes) if c not in first]
    x = stream.test.x[:5]
    m.model.eval()
    with torch.no_grad():
        logits, raw = m.predict(x, stream.test.task[:5]), m.model(x)
    assert torch.equal(logits, raw) and (logits[:, unseen] != -100.0).all()
    after = dict(m.model.named_parameters())[name].detach()
    assert all(not torch.equal(before[c], after[c]) for c in unseen)   # trained against
    stream, m = build("conpet_static_text", ["method.mask_unseen=true"])
    before = dict(m.model.named_parameters())[name].detach().clone()
    m.learn(stream.experiences[0])
    after = dict(m.model.named_parameters())[name].detach()
    assert all(torch.equal(before[c], after[c]) for c in unseen)       # the masked option


def test_dynamic_old_experts_frozen_bitwise_cached_logits_and_routing():
    stream, m = build("conpet_dynamic_text")
    base0 = {n: p.clone() for n, p in m.model.base.named_parameters() if ".lora_" not in n}
    init1 = [p.clone() for p in m.expert_params(1)]
    m.learn(stream.experiences[0])
    expert0 = [p.clone() for p in m.expert_params(0)]
    calls, passes = Counter(), []
    real = m.model.mixed_logits

    def counted(x, experts):            # old experts' forward passes (one per step at most)
        calls.update(experts.tolist())
        passes.append(m.position)
        return real(x, experts)

    m.model.mixed_logits = counted
    for exp in stream.experiences[1:]:
        m.learn(exp)
        assert all(torch.equal(a, b) for a, b in zip(expert0, m.expert_params(0)))
    assert not all(torch.equal(a, b) for a, b in zip(init1, m.expert_params(1)))   # it trained
    assert all(torch.equal(p, base0[n]) for n, p in m.model.base.named_parameters() if n in base0)
    # k = 1 + teacher forcing: replayed samples go to their own (frozen) expert, whose logits
    # on its memory were cached when its task ended: old experts never run in a training step
    assert not passes and not calls
    assert {k for k in m.cache} == {(t, int(i)) for t in range(3) for i in m.pool.ids[m.memory[t]]}
    buf = io.BytesIO()                   # the cache survives checkpoints (weights_only load)
    torch.save(m.extra_state(), buf)
    buf.seek(0)
    cache, m.cache = m.cache, {}
    m.load_extra_state(torch.load(buf, weights_only=True))
    assert m.cache.keys() == cache.keys() and all(torch.equal(m.cache[k], cache[k]) for k in cache)
    stats = m.log_params()
    assert 0.0 <= stats["conpet/selector_acc"] <= 1.0 and "conpet/selector_train_acc" in stats
    m.model.eval()                       # as the evaluator runs it (no dropout)
    with torch.no_grad():
        logits = m.predict(stream.test.x, stream.test.task)
    scored = logits != -100.0
    owner = [frozenset(cls) for cls in m.task_classes]
    for row in scored:                                             # top-1: one expert's classes
        assert frozenset(row.nonzero().flatten().tolist()) in owner
    routed = torch.tensor([owner.index(frozenset(r.nonzero().flatten().tolist())) for r in scored])
    assert (routed == stream.test.exp).float().mean() == pytest.approx(stats["conpet/selector_acc"])
    with torch.no_grad():                # the shared mixed-adapter pass = each expert on its own
        for e in routed.unique().tolist():
            rows = (routed == e).nonzero().flatten()
            alone = m.model.expert_logits(e, stream.test.x[rows])
            assert torch.allclose(logits[rows][:, m.task_classes[e]], alone, atol=1e-5)


def test_conpet_needs_a_text_encoder():
    cfg = load_config("split_digits", ["method.name=conpet_static"])
    stream, model, entry = build_components(cfg)
    with pytest.raises(ConfigError, match="needs a text encoder"):
        entry.obj(cfg.method, model, MethodContext(train=cfg.train, device=torch.device("cpu"),
                                                   stream=stream))


@pytest.mark.integration
def test_dynamic_on_pretrained_minilm_logs_selector_accuracy_and_keeps_old_tasks(store):
    """The real all-MiniLM-L6-v2: the selector routes well above chance and old tasks survive
    (class-incremental naive fine-tuning forgets them entirely)."""
    small = ["model.path=minilm", "scenario.generated_per_class=12", "scenario.max_length=12",
             "method.batch_limit=4", "method.mem_per_class=4", "train.lr=0.005"]
    res = run_experiment(load_config("conpet_dynamic_text", TINY + small + store["overrides"]))
    client = mlflow_client(store["uri"])
    hist = sorted(client.get_metric_history(res.run_id, "conpet/selector_acc"), key=lambda m: m.step)
    assert [m.step for m in hist] == [1, 2]
    assert hist[-1].value > 0.6                                    # chance: 1/3
    assert res.final["acc/avg_seen"] > 0.6 and res.final["forgetting/avg"] < 0.3


@pytest.mark.integration
def test_dynamic_run_resumes_to_the_same_numbers(store, tmp_path, monkeypatch):
    """Interrupted after task 2's checkpoint, resumed: memory, frozen experts and the logit
    cache come back from the checkpoint and the run ends where the uninterrupted one does."""
    from lethe.metrics.evaluator import Evaluator

    full = run_experiment(load_config("conpet_dynamic_text", TINY + store["overrides"]))
    cfg = load_config("conpet_dynamic_text", TINY + store["overrides"] + [f"checkpoint.dir={tmp_path / 'b'}"])
    real, calls = Evaluator.evaluate, []

    def interrupted(self, fn, label, model=None, plain=False):
        calls.append(label)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(self, fn, label, model, plain)

    monkeypatch.setattr(Evaluator, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg)
    resumed = run_experiment(cfg, resume=True)
    assert calls[-2:] == ["learn:2", "learn:2"]
    for key in ("acc/exp_0", "acc/exp_1", "acc/exp_2", "conpet/selector_acc"):
        assert resumed.final[key] == pytest.approx(full.final[key], abs=1e-9), key
    a = torch.load(full.checkpoint_dir / "state.pt", weights_only=True)["method"]["model"]
    b = torch.load(resumed.checkpoint_dir / "state.pt", weights_only=True)["method"]["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)   # every expert, bitwise


@pytest.mark.integration
def test_conpet_dynamic_keeps_the_best_validated_epoch(store):
    """The official best-epoch selection through the platform (conpet_dynamic_local's settings:
    eval.every_epochs=1, eval.val_fraction=0.2, checkpoint.select=best): every learn stage logs
    the epoch it kept, and the kept model's validation accuracy is the best one validated in
    that stage."""
    sel = ["eval.every_epochs=1", "eval.val_fraction=0.2", "checkpoint.select=best", "train.epochs=3"]
    res = run_experiment(load_config("conpet_dynamic_text", TINY + sel + store["overrides"]))
    client = mlflow_client(store["uri"])
    val = sorted(client.get_metric_history(res.run_id, "val/acc"), key=lambda m: m.step)
    kept = sorted(client.get_metric_history(res.run_id, "select/val_acc"), key=lambda m: m.step)
    epochs = sorted(client.get_metric_history(res.run_id, "select/epoch"), key=lambda m: m.step)
    assert len(val) == 3 * 3 and len(kept) == len(epochs) == 3      # 3 stages × 3 epochs
    for stage in range(3):
        accs = [m.value for m in val[3 * stage:3 * stage + 3]]
        assert kept[stage].value == max(accs)
        assert accs[int(epochs[stage].value) - 1] == max(accs)      # the first best epoch
