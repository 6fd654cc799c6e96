"""Deletion requests in the stream: placement, policies, and clear errors for bad requests."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import ROOT, run_cli

from lethe.errors import ConfigError
from lethe.platform.config import load_config
from lethe.platform.runner import build_components
from lethe.scenarios.forget import add_forget_requests, shard_of, slice_of
from lethe.scenarios.split_digits import SplitDigitsConfig, split_digits


def stream3():
    return split_digits(SplitDigitsConfig(n_experiences=3), 0)


def requests_of(stream):
    return [e for e in stream.experiences if e.kind == "forget"]


def test_forget_experiences_follow_their_learn_experience_and_steps_are_renumbered():
    s = stream3()
    two = s.train.ids[s.train.exp == 0][:2].tolist()
    add_forget_requests(s, [{"after": 1, "n": 4}, {"after": 0, "ids": two}, {"after": 0, "n": 3}],
                        seed=0)
    assert [e.kind for e in s.experiences] == ["learn", "forget", "forget", "learn", "forget", "learn"]
    assert [e.index for e in s.experiences] == list(range(6))
    f = requests_of(s)
    assert [len(e.request.sample_ids) for e in f] == [2, 3, 4]   # YAML order within a step
    assert [e.request.after for e in f] == [0, 0, 1]
    assert f[0].request.sample_ids.tolist() == two
    # drawn ids are training samples learned by then, each deleted once
    pool = s.train
    exp_of = dict(zip(pool.ids.tolist(), pool.exp.tolist()))
    for e in f:
        assert all(exp_of[i] <= e.request.after for i in e.request.sample_ids.tolist())
    all_ids = torch.cat([e.request.sample_ids for e in f]).tolist()
    assert len(all_ids) == len(set(all_ids))


def test_draws_are_seeded_and_the_seed_changes_them():
    a = requests_of(add_forget_requests(stream3(), [{"after": 0, "n": 5}], seed=0))
    b = requests_of(add_forget_requests(stream3(), [{"after": 0, "n": 5}], seed=0))
    c = requests_of(add_forget_requests(stream3(), [{"after": 0, "n": 5, "seed": 9}], seed=0))
    assert torch.equal(a[0].request.sample_ids, b[0].request.sample_ids)
    assert not torch.equal(a[0].request.sample_ids, c[0].request.sample_ids)


def test_class_policy_draws_one_class_or_the_named_ones():
    s = stream3()
    y_of = dict(zip(s.train.ids.tolist(), s.train.y.tolist()))
    classes0 = set(s.train.y[s.train.exp == 0].tolist())
    f = requests_of(add_forget_requests(s, [{"after": 0, "n": 10, "policy": "class"}], seed=0))
    drawn = {y_of[i] for i in f[0].request.sample_ids.tolist()}
    assert len(drawn) == 1 and drawn <= classes0
    c = sorted(classes0)[-1]
    s = stream3()
    f = requests_of(add_forget_requests(s, [{"after": 0, "n": 10, "policy": "class",
                                             "classes": [c]}], seed=0))
    assert {y_of[i] for i in f[0].request.sample_ids.tolist()} == {c}


def test_slice_skewed_policy_follows_the_slice_weights():
    s = stream3()
    f = requests_of(add_forget_requests(s, [{"after": 2, "n": 40, "policy": "slice_skewed",
                                             "slices": 4, "weights": [0, 0, 1, 0]}], seed=3))
    assert set(slice_of(f[0].request.sample_ids.numpy(), 4, 3).tolist()) == {2}
    s = stream3()
    f = requests_of(add_forget_requests(s, [{"after": 2, "n": 200, "policy": "slice_skewed"}], seed=3))
    counts = np.bincount(slice_of(f[0].request.sample_ids.numpy(), 4, 3), minlength=4)
    assert counts[0] > counts[1] > counts[2] and counts[0] > 3 * counts[3]   # default 8:4:2:1


def test_pool_rebuilt_from_the_experience_datasets_matches_the_tensor_pool():
    """Streams without a tensor pool (Avalanche classic benchmarks) get it from their
    experiences' datasets; on split digits both routes give the same tensors."""
    from lethe.scenarios.forget import train_pool

    s = stream3()
    expected = s.train
    s.train = None
    rebuilt = train_pool(s)
    assert s.train is rebuilt
    for field in ("x", "y", "exp", "task", "ids"):
        assert torch.equal(getattr(rebuilt, field), getattr(expected, field)), field


def test_shard_and_slice_keys_are_stable_and_balanced():
    ids = np.arange(20000)
    shards = shard_of(ids, 5, 0)
    assert np.array_equal(shards, shard_of(ids, 5, 0)) and not np.array_equal(shards, shard_of(ids, 5, 1))
    assert np.abs(np.bincount(shards) / len(ids) - 0.2).max() < 0.02
    # slices are independent of shards: every shard has every slice
    sl = slice_of(ids, 4, 0)
    assert all(len(set(sl[shards == j])) == 4 for j in range(5))


@pytest.mark.parametrize("request_, message", [
    ({"after": 0, "ids": [100000]}, r"forget_requests\[0\].ids: unknown sample ids \[100000\]"),
    ({"after": 3, "n": 1}, r"forget_requests\[0\].after': 3 \(the stream has 3 learn experiences"),
    ({"after": 0, "n": 1, "policy": "randon"}, r"policy': 'randon'; did you mean 'random'"),
    ({"after": 0, "n": 1, "polcy": "class"},
     r"unknown key 'scenario.forget_requests\[0\].polcy'; did you mean 'policy'"),
    ({"after": 0}, r"give n ≥ 1 samples"),
    ({"after": 0, "n": 100000}, r"asks for n=100000 samples but only \d+ live training samples"),
    ({"after": 0, "ids": [5, 5]}, r"ids \[5\] are listed more than once"),
])
def test_bad_requests_are_config_errors_naming_the_entry(request_, message):
    with pytest.raises(ConfigError, match=message):
        add_forget_requests(stream3(), [request_], seed=0)


def test_test_ids_later_ids_and_deleted_ids_are_refused():
    s = stream3()
    test_id = int(s.test.ids[0])
    with pytest.raises(ConfigError, match="are test samples, which cannot be deleted"):
        add_forget_requests(s, [{"after": 2, "ids": [test_id]}], seed=0)
    late = int(s.train.ids[s.train.exp == 2][0])
    with pytest.raises(ConfigError, match=rf"samples \[{late}\] are learned only in experience 2, "
                                          r"after this request \(after: 0\)"):
        add_forget_requests(stream3(), [{"after": 0, "ids": [late]}], seed=0)
    first = int(s.train.ids[0])
    with pytest.raises(ConfigError, match=rf"forget_requests\[1\].ids: samples \[{first}\] were "
                                          r"already deleted by scenario.forget_requests\[0\]"):
        add_forget_requests(stream3(), [{"after": 0, "ids": [first]}, {"after": 1, "ids": [first]}],
                            seed=0)
    everything = s.train.ids[s.train.exp == 0].tolist()
    with pytest.raises(ConfigError, match="deletes every remaining training sample"):
        add_forget_requests(stream3(), [{"after": 0, "ids": everything}], seed=0)


def test_public_samples_cannot_be_deleted():
    s = split_digits(SplitDigitsConfig(n_experiences=3, public_fraction=0.3), 0)
    assert not set(s.public.ids.tolist()) & set(s.train.ids.tolist())
    pub = int(s.public.ids[0])
    with pytest.raises(ConfigError, match=rf"\[{pub}\] are in the non-deletable public split"):
        add_forget_requests(s, [{"after": 0, "ids": [pub]}], seed=0)


def test_a_bad_request_leaves_the_stream_unchanged():
    s = stream3()
    before = [(e.index, e.kind) for e in s.experiences]
    with pytest.raises(ConfigError):
        add_forget_requests(s, [{"after": 0, "n": 2}, {"after": 1, "ids": [100000]}], seed=0)
    assert [(e.index, e.kind) for e in s.experiences] == before


def test_a_method_that_cannot_unlearn_fails_at_config_time():
    cfg = load_config("split_digits", ["method.name=naive",
                                       "scenario.forget_requests=[{after: 0, n: 3}]"])
    with pytest.raises(ConfigError, match="method 'naive' cannot serve forget experiences"):
        build_components(cfg)


def test_cli_bad_request_exits_2_with_one_message(tmp_path, store):
    res = run_cli(["run", "split_digits", *store["overrides"], "method.name=retrain",
                   "scenario.forget_requests=[{after: 0, ids: [123456]}]"], cwd=ROOT)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "unknown sample ids [123456]" in res.stderr and "Traceback" not in res.stderr
