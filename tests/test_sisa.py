"""SISA: a deletion retrains one shard from the checkpoint before the sample's slice, and
the result is bitwise the shard trained from scratch without the sample."""
from __future__ import annotations

import pytest
import torch
from conftest import train_by_hand

from lethe.errors import ConfigError, RunError
from lethe.methods.base import MethodContext
from lethe.platform.config import load_config
from lethe.platform.runner import build_components, seed_everything
from lethe.scenarios.forget import derive_seed, shard_of, slice_of
from lethe.scenarios.types import ForgetRequest

TINY = ["device=cpu", "scenario.n_experiences=5", "model.name=mlp", "model.layers=1",
        "model.hidden=16", "train.epochs=2", "train.batch_size=16", "train.optimizer=adam",
        "train.lr=0.01", "method.name=sisa", "method.shards=3", "method.slices=3"]


def build(*overrides):
    cfg = load_config("split_digits", [*TINY, *overrides])
    seed_everything(cfg.seed, False)
    stream, model, entry = build_components(cfg)
    ctx = MethodContext(train=cfg.train, device=torch.device("cpu"), stream=stream, seed=cfg.seed)
    return entry.obj(cfg.method, model, ctx), stream


def with_epochs(train, epochs: int):
    """``train`` (a config node) with another epoch count, for train_by_hand."""
    from types import SimpleNamespace

    keys = ("optimizer", "lr", "momentum", "weight_decay", "batch_size")
    return SimpleNamespace(**{k: train[k] for k in keys}, epochs=epochs)


def equal_states(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# official sisa.py, e = train.epochs = 3, R = 3 slices: a = 2·3/4 = 1.5, stage s trains
# int((s+1)·1.5) − int(s·1.5) epochs: int(1.5)−0 = 1, int(3.0)−int(1.5) = 2, int(4.5)−int(3.0) = 1
STAGE_EPOCHS_E3_R3 = [1, 2, 1]


@pytest.mark.parametrize("lora", [[], ["method.lora.rank=2"]], ids=["full", "lora"])
def test_deletion_equals_training_the_shard_from_scratch_without_the_sample(lora):
    m, stream = build("train.epochs=3", *lora)
    m.learn(stream.experiences[0])
    j, k = 1, 1                              # a sample in the middle slice of shard 1
    victim = int(m.ids_of(m.slice_rows(j, [k]))[0])
    kept = [m.ckpts[j][0][i] for i in range(k + 1)]
    others = {s: m.served_state(s) for s in (0, 2)}
    m.unlearn(ForgetRequest(torch.tensor([victim]), after=0))

    # from scratch, by hand: the same initial model (same seeds) trains shard j's live samples
    # in stages of cumulative slices 0..i, each with its documented seed (seed, shard, slices)
    # and its share of the epochs
    fresh, _ = build("train.epochs=3", *lora)
    pool, exp0 = stream.train, stream.experiences[0]
    live = torch.isin(pool.ids, torch.as_tensor(list(exp0.train.dataset.sample_id))) & (pool.ids != victim)
    shard = torch.as_tensor(shard_of(pool.ids.numpy(), 3, 0))
    slice_ = torch.as_tensor(slice_of(pool.ids.numpy(), 3, 0))
    names = [n for n, p in fresh.model.named_parameters() if p.requires_grad]
    for i in range(3):
        rows = live & (shard == j) & (slice_ <= i)
        train_by_hand(fresh.model, names, pool.x[rows], pool.y[rows].long(),
                      with_epochs(fresh.ctx.train, STAGE_EPOCHS_E3_R3[i]),
                      derive_seed(0, 0x5115A, j, *range(i + 1)))
    by_hand = {**dict(fresh.model.named_parameters()), **dict(fresh.model.named_buffers())}
    served = m.served_state(j)
    assert equal_states(served, {k: by_hand[k] for k in served})
    assert victim not in set(m.training_ids(j).tolist())
    # the checkpoints before the sample's slice were reused, not retrained ...
    assert all(m.ckpts[j][0][i] is kept[i] for i in range(k + 1))
    # ... so the request re-processed only stages k+1..L (cumulative slices), once each,
    # for that stage's epochs
    sizes = [len(m.slice_rows(j, range(i + 1))) for i in range(m.n_slices)]
    assert m.stats["retrain_samples"] == sum(n * e for n, e in
                                             list(zip(sizes, STAGE_EPOCHS_E3_R3))[k:])
    # and the other shards are untouched
    assert all(m.served_state(s) is others[s] for s in others)


def test_sisa_epoch_allocation_matches_official_formula():
    from lethe.methods.sisa import sisa_stage_epochs

    # R = 4: a = 2e/5. e = 4: a = 1.6, int(1.6, 3.2, 4.8, 6.4) = 1, 3, 4, 6 → 1, 2, 1, 2
    # e = 1: a = 0.4, int(0.4, 0.8, 1.2, 1.6) = 0, 0, 1, 1 → 0, 0, 1, 0
    # e = 10: a = 4 → 4 per stage (16 in all, not 40); e = 20 (the official default): 8 each
    for e, expected in [(4, [1, 2, 1, 2]), (1, [0, 0, 1, 0]), (10, [4, 4, 4, 4]),
                        (20, [8, 8, 8, 8])]:
        assert [sisa_stage_epochs(e, 4, s) for s in range(4)] == expected
    # a learn experience trains every shard's stages for those epochs, and counts them
    m, stream = build("train.epochs=3")
    m.learn(stream.experiences[0])
    by_hand = 0
    for j in range(3):
        for i, e in enumerate(STAGE_EPOCHS_E3_R3):
            by_hand += int((m.live & (m.shard == j) & (m.slice <= i)).sum()) * e
    assert m.stats["learn_samples"] == by_hand


def test_vote_ties_go_to_the_lowest_class_like_the_official_argmax(monkeypatch):
    m, stream = build("method.shards=2")
    m.learn(stream.experiences[0])
    # shard model 0 votes class 3 with near certainty, shard model 1 votes class 1 barely:
    # one vote each; np.argmax of the mean one-hot vote picks class 1 (the lower index),
    # although the mean softmax favours class 3
    sure = torch.full((10,), -20.0)
    sure[3] = 20.0
    barely = torch.zeros(10)
    barely[1] = 0.1
    monkeypatch.setattr(m, "stacked_logits", lambda states, x: torch.stack([sure, barely])[:, None])
    out = m.predict(torch.zeros(1, 64), None)
    assert int(out.argmax(-1)) == 1
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.exp()[0, [1, 3]], torch.tensor([0.5, 0.5]))


def test_vote_and_mean_softmax_aggregate_the_shard_models():
    m, stream = build()
    m.learn(stream.experiences[0])
    x = stream.test.x[:100]
    shard_logits = []
    for state in m.shard_states():          # a plain loop, one model at a time
        m.load(state)
        with torch.no_grad():
            shard_logits.append(m.model(x))
    shard_logits = torch.stack(shard_logits)
    votes = torch.nn.functional.one_hot(shard_logits.argmax(-1), 10).sum(0)
    pred = m.predict(x, None).argmax(-1)
    # the predicted class has the most votes (ties: any of the tied classes)
    assert torch.equal(votes.gather(1, pred[:, None]).squeeze(1), votes.max(1).values)
    m2, _ = build("method.aggregation=mean_softmax")
    m2.learn(stream.experiences[0])
    torch.testing.assert_close(m2.predict(x, None).exp(), shard_logits.softmax(-1).mean(0),
                               rtol=1e-5, atol=1e-6)


def test_a_request_that_empties_a_shard_is_refused_whole():
    m, stream = build()
    m.learn(stream.experiences[0])
    shard0 = m.ids_of(m.live & (m.shard == 0))
    other = m.ids_of(m.live & (m.shard == 1))[:1]
    state = [list(a) for a in m.alive], m.deleted.clone(), m.served_state(1)
    with pytest.raises(RunError, match="every remaining sample of shard 0"):
        m.unlearn(ForgetRequest(torch.cat([other, shard0]), after=0))
    assert ([list(a) for a in m.alive], m.served_state(1)) == (state[0], state[2])
    assert torch.equal(m.deleted, state[1])


def test_emptying_a_shard_is_a_config_error_before_any_work(tmp_path):
    import numpy as np

    from lethe.scenarios.split_digits import SplitDigitsConfig, split_digits

    stream = split_digits(SplitDigitsConfig(n_experiences=5), 0)
    ids = stream.train.ids[stream.train.exp == 0].numpy()
    shard0 = ids[shard_of(ids, 3, 0) == 0].tolist()
    cfg = load_config("split_digits", [*TINY, f"tracking.uri=sqlite:///{tmp_path / 'm.db'}",
                                       f"scenario.forget_requests=[{{after: 0, ids: {shard0}}}]"])
    with pytest.raises(ConfigError, match=r"request at stream step 1.*every remaining sample of "
                                          r"shard 0 \(method.shards=3\)"):
        build_components(cfg)
    assert not (tmp_path / "m.db").exists()   # no MLflow run was started
    assert np.all(shard_of(np.array(shard0), 3, 0) == 0)


def test_unknown_aggregation_suggests_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'vote'"):
        build("method.aggregation=vot")
