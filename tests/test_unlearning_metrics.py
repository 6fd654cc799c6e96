"""Unlearning metrics against independent references (sklearn, hand counts)."""
from __future__ import annotations

import csv

import numpy as np
import torch

from lethe.metrics import unlearning as U
from lethe.scenarios.forget import add_forget_requests
from lethe.scenarios.split_digits import SplitDigitsConfig, split_digits


def test_mia_auc_matches_sklearn_roc_auc_with_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    member = np.round(rng.gamma(1.0, 0.5, 300), 1)      # rounding makes many ties
    non = np.round(rng.gamma(2.0, 0.5, 200), 1)
    # members have lower loss: score = -loss, label 1 = member
    ref = roc_auc_score(np.r_[np.ones(300), np.zeros(200)], -np.r_[member, non])
    assert abs(U.mia_auc(member, non) - ref) < 1e-12
    assert U.mia_auc([0.1, 0.2], [0.1, 0.2]) == 0.5
    assert U.mia_auc([0.0], [1.0]) == 1.0 and U.mia_auc([1.0], [0.0]) == 0.0


def test_mia_efficacy_counts_forget_samples_judged_non_members():
    rng = np.random.default_rng(1)
    retain = np.clip(rng.normal(0.97, 0.02, 500), 0, 1)   # members: confident
    test = np.clip(rng.normal(0.40, 0.10, 500), 0, 1)     # non-members: not
    assert U.mia_efficacy(retain, test, np.full(20, 0.4)) == 1.0
    assert U.mia_efficacy(retain, test, np.full(20, 0.98)) == 0.0
    half = np.r_[np.full(10, 0.4), np.full(10, 0.98)]
    assert U.mia_efficacy(retain, test, half) == 0.5


def test_accuracy_losses_and_confidence():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    y = torch.tensor([0, 0, 0])
    assert abs(U.accuracy(logits, y) - 2 / 3) < 1e-7
    torch.testing.assert_close(U.sample_losses(logits, y),
                               -torch.log_softmax(logits, -1)[:, 0])
    torch.testing.assert_close(U.true_class_confidence(logits, y), logits.softmax(-1)[:, 0])


def test_forget_step_metrics_use_the_right_forget_retain_and_test_sets():
    s = split_digits(SplitDigitsConfig(n_experiences=3), 0)
    add_forget_requests(s, [{"after": 0, "n": 7}, {"after": 1, "n": 5}], seed=0)
    steps = [e.index for e in s.experiences if e.kind == "forget"]    # [1, 3]

    def always_zero(x, t):             # predicts class 0: accuracy = share of class 0
        out = torch.zeros(len(x), 10)
        out[:, 0] = 1.0
        return out

    out = U.forget_step_metrics(always_zero, s, steps[1], "cpu", {"serve_s": 0.5, "x/y": 2})
    pool = s.train
    forgotten = torch.cat([e.request.sample_ids for e in s.experiences if e.kind == "forget"])
    is_f = torch.isin(pool.ids, forgotten)
    retain = (pool.exp <= 1) & ~is_f
    test = s.test.exp <= 1
    share0 = lambda y: float((y == 0).float().mean())  # noqa: E731
    assert out["unlearn/n_forgotten"] == 12.0
    assert abs(out["unlearn/forget_acc"] - share0(pool.y[is_f])) < 1e-7
    assert abs(out["unlearn/retain_acc"] - share0(pool.y[retain])) < 1e-7
    assert abs(out["unlearn/test_acc"] - share0(s.test.y[test])) < 1e-7
    assert out["unlearn/serve_s"] == 0.5 and out["unlearn/x/y"] == 2.0
    # at the first forget step only the first request and experience 0 count
    first = U.forget_step_metrics(always_zero, s, steps[0], "cpu", None, serve_s=0.25)
    assert first["unlearn/n_forgotten"] == 7.0 and first["unlearn/serve_s"] == 0.25
    is_f1 = torch.isin(pool.ids, s.experiences[steps[0]].request.sample_ids)
    assert abs(first["unlearn/retain_acc"] - share0(pool.y[(pool.exp == 0) & ~is_f1])) < 1e-7


def test_write_csv_has_one_row_per_step(tmp_path):
    path = U.write_csv({"unlearn/a": [(1, 0.5), (3, 0.25)], "unlearn/b": [(3, 2.0)]},
                       tmp_path / "u.csv")
    rows = list(csv.reader(path.open()))
    assert rows == [["step", "unlearn/a", "unlearn/b"], ["1", "0.5", ""], ["3", "0.25", "2.0"]]
