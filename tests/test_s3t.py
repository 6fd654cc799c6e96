"""S3T: sequence selection, deletion by deactivation, and exactness proved bit for bit."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import train_by_hand

from lethe.errors import ConfigError, RunError
from lethe.methods.base import MethodContext
from lethe.methods.s3t import all_sequences, bipartite_sequences, cyclic_sequences, sequence_score
from lethe.platform.config import load_config
from lethe.platform.runner import build_components, seed_everything
from lethe.scenarios.forget import derive_seed, shard_of, slice_of
from lethe.scenarios.types import ForgetRequest

TINY = ["device=cpu", "scenario.n_experiences=5", "model.name=mlp", "model.layers=3",
        "model.hidden=16", "train.epochs=2", "train.batch_size=16", "train.optimizer=adam",
        "train.lr=0.01", "method.name=s3t", "method.shards=2", "method.slices=3",
        "method.lora.rank=2"]


def build(*overrides):
    """A fresh S3T instance (seeded exactly like a run) and its stream."""
    cfg = load_config("split_digits", [*TINY, *overrides])
    seed_everything(cfg.seed, False)
    stream, model, entry = build_components(cfg)
    ctx = MethodContext(train=cfg.train, device=torch.device("cpu"), stream=stream, seed=cfg.seed)
    return entry.obj(cfg.method, model, ctx), stream


def equal_states(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def sample_in(m, shard: int, position: int, b: int = 0) -> int:
    """A live sample id in the slice at ``position`` of sequence b of ``shard``."""
    k = m.seqs[shard][b][position]
    return int(m.ids_of(m.slice_rows(shard, [k]))[0])


# --- sequence selection -----------------------------------------------------------------
def test_cyclic_rotations_let_every_slice_lead_once():
    seqs = cyclic_sequences(4, 4)
    # the official get_cyclic rotates right: rotation k puts the last k slices first
    assert seqs == [[0, 1, 2, 3], [3, 0, 1, 2], [2, 3, 0, 1], [1, 2, 3, 0]]


def test_cyclic_beyond_L_rotates_suffixes_and_keeps_every_rotation():
    seqs = cyclic_sequences(4, 8)
    assert len({tuple(s) for s in seqs}) == 8 and all(sorted(s) == [0, 1, 2, 3] for s in seqs)
    assert {tuple(s) for s in cyclic_sequences(4, 4)} <= {tuple(s) for s in seqs}
    assert sorted(s[0] for s in seqs) == [0, 0, 1, 1, 2, 2, 3, 3]   # each slice leads twice
    assert len({tuple(s) for s in cyclic_sequences(3, 6)}) == 6 == math.factorial(3)


def test_bipartite_selection_grows_a_latin_square_from_one_leader_per_slice():
    probs = [0.7, 0.1, 0.1, 0.1]
    full = bipartite_sequences(probs, 4, t=1.0)     # t = 1: scores far apart, no ties
    # sequence i starts with slice i; each slice once per position (perfect matchings)
    assert [s[0] for s in full] == [0, 1, 2, 3]
    assert all(sorted(col) == [0, 1, 2, 3] for col in zip(*full))
    # the matching maximises the score of every round: position 2 of the four sequences
    # (slices still free: 0 → {2,3}, 1 → {0,2,3}, ...) has no better assignment
    import itertools

    def round_score(assign):
        return sum(sequence_score([probs[k] for k in full[i][:1] + [j]], 1.0)
                   for i, j in enumerate(assign))
    options = [p for p in itertools.permutations(range(4)) if all(p[i] != i for i in range(4))]
    assert round_score([s[1] for s in full]) >= max(round_score(p) for p in options) - 1e-12


def test_s3t_sequences_match_official_selection():
    # cyclic, L = 4 < B = 6 < 4!: the 4 right rotations, each parent keeping itself
    # (6 // 4 = 1); the 6 % 4 = 2 leftovers go to parents 0 and 1, rotating the suffix after
    # position 1 once: [0] + [3, 1, 2] and [3] + [2, 0, 1]; the list is then sorted
    assert cyclic_sequences(4, 6) == [[0, 1, 2, 3], [0, 3, 1, 2], [1, 2, 3, 0], [2, 3, 0, 1],
                                      [3, 0, 1, 2], [3, 2, 0, 1]]
    # bipartite with ties everywhere (p = .4, .3, .2, .1: every (1 − cum)^100 is ~0): the
    # official selection (scipy's matching from sequences [0], [1], [2], [3])
    got = bipartite_sequences([0.4, 0.3, 0.2, 0.1], 4)
    assert got == [[0, 1, 2, 3], [1, 0, 3, 2], [2, 3, 0, 1], [3, 2, 1, 0]]
    # B < L: the first B sequences, not the B best-scoring
    assert bipartite_sequences([0.4, 0.3, 0.2, 0.1], 2) == got[:2]
    assert cyclic_sequences(4, 2) == [[0, 1, 2, 3], [3, 0, 1, 2]]


def test_all_selection_is_every_permutation():
    assert sorted(map(tuple, all_sequences(3))) == sorted(
        {(a, b, c) for a in range(3) for b in range(3) for c in range(3) if len({a, b, c}) == 3})


# --- exactness ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained():
    m, stream = build()
    m.learn(stream.experiences[0])
    return m, stream


def test_groups_are_top_down_and_each_stage_trains_only_its_group(trained):
    m, _ = trained
    assert m.groups == [["5"], ["3"], ["1"]]   # MLP Linear layers 1, 3, 5 (head 7): top first
    full = m.ckpts[0][0]
    init = m.init_state
    for i in range(1, m.n_slices + 1):
        for g, names in enumerate(m.group_names):
            same = all(torch.equal(full[i][k], init[k]) for k in names)
            assert same == (g >= i), (i, g)   # groups after stage i still at their initial value


def test_deletion_serves_the_stored_prefix_checkpoint_bitwise_and_equals_fresh_training():
    m, stream = build()
    m.learn(stream.experiences[0])
    j = 0
    before_other = m.served_state(1)
    victim = sample_in(m, j, position=1, b=0)         # second slice of sequence 0
    m.unlearn(ForgetRequest(torch.tensor([victim]), after=0))

    assert m.stats["retrain_samples"] == 0          # served by deactivation: no gradient step
    assert m.served_state(1) is before_other          # the other shard is untouched
    b, p = m.served_sequence(j)
    seq = m.seqs[j][b]
    row = m.row_of[victim]
    assert int(m.slice[row]) not in seq[:p]           # the prefix excludes the victim's slice
    # every sequence lost exactly the stages from the victim's slice on
    k = int(m.slice[row])
    assert m.alive[j] == [s.index(k) for s in m.seqs[j]]
    served = m.served_state(j)
    # 1) the served model is bitwise its stored prefix checkpoint ...
    assert served is m.ckpts[j][b][p] and equal_states(served, m.ckpts[j][b][p])
    # ... which equals deactivating the later groups of the fully trained sequence
    assert equal_states(m.deactivate(j, b, p), served)
    # 2) training by hand on just those prefix slices, stage by stage with each stage's
    # documented seed (seed, shard, slices so far), from the same initial model, gives it too
    fresh, _ = build()
    pool = stream.train
    live = torch.isin(pool.ids, torch.as_tensor(list(stream.experiences[0].train.dataset.sample_id)))
    live &= pool.ids != victim
    shard = torch.as_tensor(shard_of(pool.ids.numpy(), 2, 0))
    slice_ = torch.as_tensor(slice_of(pool.ids.numpy(), 3, 0))
    for i in range(p):
        rows = live & (shard == j) & torch.isin(slice_, torch.tensor(seq[:i + 1]))
        train_by_hand(fresh.model, fresh.stage_names(i), pool.x[rows], pool.y[rows].long(),
                      fresh.ctx.train, derive_seed(0, 0x5115A, j, *seq[:i + 1]))
    by_hand = {**dict(fresh.model.named_parameters()), **dict(fresh.model.named_buffers())}
    assert equal_states(served, {k: by_hand[k] for k in served})
    # 3) its recorded training ids exclude the deleted sample and are the prefix slices
    ids = m.training_ids(j)
    assert victim not in set(ids.tolist())
    assert torch.equal(ids, pool.ids[rows].sort().values)   # rows: the last stage's, all p slices
    # the ensemble prediction is the mean of the shards' logits (vmapped pass vs a loop)
    x = stream.test.x[:50]
    ref = []
    for state in m.shard_states():
        m.load(state)
        with torch.no_grad():
            ref.append(m.model(x))
    torch.testing.assert_close(m.predict(x, None), torch.stack(ref).mean(0), rtol=1e-5, atol=1e-5)


def test_emptied_shard_is_retrained_or_left_out():
    m, stream = build()
    m.learn(stream.experiences[0])
    leaders = [sample_in(m, 0, position=0, b=b) for b in range(len(m.seqs[0]))]
    m.unlearn(ForgetRequest(torch.tensor(leaders), after=0))   # hits every sequence's first slice
    assert m.stats["retrain_samples"] > 0 and m.stats["requests_since_retrain"] == 1
    assert m.alive[0] == [m.n_slices] * len(m.seqs[0])
    assert not set(leaders) & set(m.training_ids(0).tolist())

    m2, stream = build("method.retrain_empty=false")
    m2.learn(stream.experiences[0])
    leaders = [sample_in(m2, 0, position=0, b=b) for b in range(len(m2.seqs[0]))]
    m2.unlearn(ForgetRequest(torch.tensor(leaders), after=0))
    assert m2.stats["retrain_samples"] == 0 and m2.served_sequence(0) is None
    assert len(m2.shard_states()) == 1 and m2.unlearn_stats()["live_shards"] == 1
    second = sample_in(m2, 0, position=1, b=0)
    m2.unlearn(ForgetRequest(torch.tensor([second]), after=0))
    assert m2.stats["requests_since_retrain"] == 2


def test_deletion_capacity_counts_until_every_shard_has_run_out():
    # the paper's deletion capacity: requests served until all shards are empty; retraining
    # one emptied shard (retrain_empty) does not restart the count
    m, stream = build()                                   # 2 shards
    m.learn(stream.experiences[0])

    def empty(shard):                                     # one sample of every leading slice
        return [sample_in(m, shard, position=0, b=b) for b in range(len(m.seqs[shard]))]

    counts = []
    requests = (lambda: empty(0), lambda: [sample_in(m, 0, position=2)], lambda: empty(1),
                lambda: [sample_in(m, 1, position=2)])   # live samples at the time of the request
    for ids in requests:
        m.unlearn(ForgetRequest(torch.tensor(ids()), after=0))
        counts.append((m.stats["requests_since_retrain"], m.stats["retrain_samples"] > 0))
    # 1: shard 0 emptied and retrained, 1 of 2 shards spent; 2: served by deactivation;
    # 3: shard 1 emptied too → the capacity is used up, the count restarts; 4: counts again
    assert counts == [(1, True), (2, False), (0, True), (1, False)]
    # a learn experience retrains every shard: the count restarts and no shard is spent
    m.learn(stream.experiences[1])
    assert m.stats["requests_since_retrain"] == 0 and m.emptied == set()


def test_bad_request_is_refused_and_never_half_applied(trained):
    m, stream = trained
    victim = sample_in(m, 1, position=2)
    m.unlearn(ForgetRequest(torch.tensor([victim]), after=0))
    alive = [list(a) for a in m.alive]
    deleted = m.deleted.clone()
    fresh_id = sample_in(m, 0, position=0)
    with pytest.raises(RunError, match="already deleted"):
        m.unlearn(ForgetRequest(torch.tensor([fresh_id, victim]), after=0))
    with pytest.raises(RunError, match="unknown sample ids"):
        m.unlearn(ForgetRequest(torch.tensor([fresh_id, 10 ** 9]), after=0))
    unseen = int(m.pool_ids[~m.seen][0])
    with pytest.raises(RunError, match="not learned yet"):
        m.unlearn(ForgetRequest(torch.tensor([fresh_id, unseen]), after=0))
    shard1 = m.ids_of(m.live & (m.shard == 1))
    with pytest.raises(RunError, match="every remaining sample of shard 1"):
        m.unlearn(ForgetRequest(torch.cat([torch.tensor([fresh_id]), shard1]), after=0))
    assert m.alive == alive and torch.equal(m.deleted, deleted)


def test_state_round_trips_through_a_weights_only_checkpoint(tmp_path, trained):
    m, stream = trained
    path = tmp_path / "state.pt"
    torch.save(m.state_dict(), path)
    m2, _ = build()
    m2.load_state_dict(torch.load(path, weights_only=True))
    assert m2.alive == m.alive and m2.seqs == m.seqs and torch.equal(m2.deleted, m.deleted)
    x = stream.test.x[:64]
    assert torch.equal(m2.predict(x, None), m.predict(x, None))


def test_backbone_pretrained_on_the_public_split_stays_frozen():
    m, stream = build("scenario.public_fraction=0.3", "method.lora.pretrain_epochs=2")
    frozen = {k: v.clone() for k, v in m.model.state_dict().items() if "base_layer" in k}
    untrained, _ = build("scenario.public_fraction=0.3")
    assert any(not torch.equal(v, untrained.model.state_dict()[k]) for k, v in frozen.items())
    m.learn(stream.experiences[0])
    m.unlearn(ForgetRequest(m.ids_of(m.live)[:2], after=0))
    assert all(torch.equal(v, m.model.state_dict()[k]) for k, v in frozen.items())
    with pytest.raises(ConfigError, match="pretrain_epochs > 0 needs a non-deletable public split"):
        build("method.lora.pretrain_epochs=2")


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="method.selection.*did you mean 'cyclic'"):
        build("method.selection=cyclc")
    with pytest.raises(ConfigError, match="method.lora.rank"):
        build("method.lora.rank=0")
    with pytest.raises(ConfigError, match="method.budget.*bipartite"):
        build("method.selection=bipartite", "method.budget=5")
    with pytest.raises(ConfigError, match="slices=4.*only 3 target layers"):
        build("method.slices=4")
    with pytest.raises(ConfigError, match="deletion_probs"):
        build("method.deletion_probs=[0.5,0.5]")


def test_digit_presets_share_data_model_and_requests():
    nodes = {name: load_config(name) for name in ("s3t_digits", "sisa_digits", "retrain_digits")}
    first = nodes["s3t_digits"]
    for cfg in nodes.values():
        assert cfg.scenario == first.scenario and cfg.model == first.model and cfg.train == first.train
        assert cfg.method.lora.rank == first.method.lora.rank
    assert {cfg.method.name for cfg in nodes.values()} == {"s3t", "sisa", "retrain"}


def test_vit_preset_puts_lora_groups_on_the_attention_of_consecutive_blocks():
    """s3t_cifar10_vit's method node on a tiny timm ViT over digits (no CIFAR, no weights)."""
    cfg = load_config("s3t_cifar10_vit", [
        "model.weights_path=null", "model.arch=vit_tiny_patch16_224", "device=cpu",
        "model.kwargs={img_size: 8, patch_size: 2, depth: 4, embed_dim: 16, num_heads: 2}",
        "scenario.name=split_digits", "scenario.n_experiences=5", "method.lora.resize_to=0",
        "method.shards=1", "method.budget=1", "method.lora.rank=2", "train.epochs=1",
        "train.batch_size=64"])
    seed_everything(cfg.seed, False)
    stream, model, entry = build_components(cfg)
    ctx = MethodContext(train=cfg.train, device=torch.device("cpu"), stream=stream, seed=cfg.seed)
    m = entry.obj(cfg.method, model, ctx)
    assert m.groups == [[f"blocks.{i}.attn.qkv"] for i in (3, 2, 1, 0)]   # top block first
    assert m.head == "head"
    assert all(n.startswith("head.") for n in m.head_names)
    m.learn(stream.experiences[0])
    victim = int(m.ids_of(m.slice_rows(0, [m.seqs[0][0][2]]))[0])
    m.unlearn(ForgetRequest(torch.tensor([victim]), after=0))
    assert m.served_sequence(0) == (0, 2) and m.stats["retrain_samples"] == 0
    assert m.predict(stream.test.x[:8], None).shape == (8, 10)
