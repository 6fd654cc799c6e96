"""Flip metrics against hand-worked tables (same table as tests/test_metrics_cl.py).

    sample        0 1 2 | 3 4 5 | 6 7 8      (experience 0 | 1 | 2)
    old (learn:1) 1 1 1 | 1 1 0 | 1 1 0      accuracy 7/9
    new (learn:2) 1 0 0 | 0 1 1 | 1 1 0      accuracy 5/9

Negative flips (old right, new wrong): samples 1, 2, 3 → NFR = 3/9 = 1/3.
Positive flips (old wrong, new right): sample 5 → PFR = 1/9.
Errors of new: samples 1, 2, 3, 8 → NFI = 3/4.
Relative NFR (Yan et al. Eq. 11) = NFR / ((1 − ER_old) · ER_new) = (1/3) / ((7/9)(4/9)) = 27/28.
Per experience:  exp0 NFR 2/3 PFR 0   NFI 2/2 = 1  rel (2/3)/(1 · 2/3) = 1
                 exp1 NFR 1/3 PFR 1/3 NFI 1/1 = 1  rel (1/3)/((2/3)(1/3)) = 3/2
                 exp2 NFR 0   PFR 0   NFI 0/1 = 0  rel 0/((2/3)(1/3)) = 0
"""
from __future__ import annotations

import math

import pytest
import torch

from lethe.metrics import flips

TARGETS = torch.tensor([0, 1, 0, 2, 3, 2, 4, 5, 4])
EXP = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
OLD_OK = [1, 1, 1, 1, 1, 0, 1, 1, 0]
NEW_OK = [1, 0, 0, 0, 1, 1, 1, 1, 0]
INIT_OK = [0, 0, 0, 1, 0, 0, 0, 0, 0]
LEARN0_OK = [1, 1, 0, 1, 1, 0, 0, 0, 0]


def preds_from(ok) -> torch.Tensor:
    ok = torch.tensor(ok, dtype=torch.bool)
    # the wrong answers differ between models: a flip is about right/wrong, not equality
    return torch.where(ok, TARGETS, (TARGETS + 1 + torch.arange(9) % 2) % 7)


OLD, NEW = preds_from(OLD_OK), preds_from(NEW_OK)


def test_flip_stats_hand_values():
    f = flips.flip_stats(OLD, NEW, TARGETS)
    assert f["nfr"] == pytest.approx(1 / 3, abs=1e-12)
    assert f["pfr"] == pytest.approx(1 / 9, abs=1e-12)
    assert f["nfi"] == pytest.approx(3 / 4, abs=1e-12)
    assert f["rel_nfr"] == pytest.approx(27 / 28, abs=1e-12)


def test_rel_nfr_uses_old_accuracy_times_new_error_rate():
    # Yan et al.'s denominator is (1 − ER_old) · ER_new = 7/9 · 4/9; the swapped product
    # ER_old · (1 − ER_new) = 2/9 · 5/9 would give 27/10
    assert flips.flip_stats(OLD, NEW, TARGETS)["rel_nfr"] != pytest.approx(27 / 10, abs=1e-3)
    # reversed roles: NFR(new→old) = 1/9, ER_old' = 4/9 → (1/9) / ((5/9)(2/9)) = 9/10
    back = flips.flip_stats(NEW, OLD, TARGETS)
    assert back["nfr"] == pytest.approx(1 / 9, abs=1e-12)
    assert back["pfr"] == pytest.approx(1 / 3, abs=1e-12)
    assert back["nfi"] == pytest.approx(1 / 2, abs=1e-12)       # 1 flip / 2 errors of old
    assert back["rel_nfr"] == pytest.approx(9 / 10, abs=1e-12)


def test_accuracy_change_equals_pfr_minus_nfr():
    f = flips.flip_stats(OLD, NEW, TARGETS)
    acc_old = (OLD == TARGETS).double().mean().item()
    acc_new = (NEW == TARGETS).double().mean().item()
    assert acc_new - acc_old == pytest.approx(f["pfr"] - f["nfr"], abs=1e-12)


def test_flip_stats_per_experience_hand_values():
    per = flips.flip_stats_per_group(OLD, NEW, TARGETS, EXP, 3)
    expect = {"nfr": [2 / 3, 1 / 3, 0], "pfr": [0, 1 / 3, 0], "nfi": [1, 1, 0],
              "rel_nfr": [1, 3 / 2, 0]}
    for k, v in expect.items():
        torch.testing.assert_close(per[k], torch.tensor(v, dtype=torch.float64), rtol=0,
                                   atol=1e-12, msg=k)


def test_flip_stats_per_class_and_empty_group():
    # classes: 0 → samples 0, 2; 1 → 1; 2 → 3, 5; 3 → 4; 4 → 6, 8; 5 → 7; 6 → none
    per = flips.flip_stats_per_group(OLD, NEW, TARGETS, TARGETS, 7)
    torch.testing.assert_close(per["nfr"], torch.tensor([1 / 2, 1, 1 / 2, 0, 0, 0, 0],
                                                        dtype=torch.float64))
    torch.testing.assert_close(per["pfr"], torch.tensor([0, 0, 1 / 2, 0, 0, 0, 0],
                                                        dtype=torch.float64))
    assert torch.isnan(per["rel_nfr"][6]) and per["nfi"][6] == 0


def test_zero_denominators_follow_the_documented_conventions():
    perfect = TARGETS.clone()
    f = flips.flip_stats(OLD, perfect, TARGETS)
    assert f["nfr"] == 0 and f["nfi"] == 0.0           # no errors → no negative flips
    assert math.isnan(f["rel_nfr"])                      # expected flips 0 → undefined
    assert f["pfr"] == pytest.approx(2 / 9, abs=1e-12)


def test_nfr_matrix_between_every_pair_of_points():
    P = torch.stack([preds_from(o) for o in (INIT_OK, LEARN0_OK, OLD_OK, NEW_OK)])
    M = flips.nfr_matrix(P, TARGETS)
    assert M.shape == (4, 4)
    torch.testing.assert_close(torch.diagonal(M), torch.zeros(4, dtype=torch.float64))
    # learn:0 → learn:2: learn:0 right and learn:2 wrong on samples 1 and 3 → 2/9
    assert M[1, 3].item() == pytest.approx(2 / 9, abs=1e-12)
    assert M[2, 3].item() == pytest.approx(1 / 3, abs=1e-12)
    for a in range(4):
        for b in range(4):
            f = flips.flip_stats(P[a], P[b], TARGETS)
            assert M[a, b].item() == pytest.approx(f["nfr"], abs=1e-12)
            assert flips.pfr_matrix(P, TARGETS)[a, b].item() == pytest.approx(f["pfr"], abs=1e-12)


def test_between_two_points_of_a_store():
    from lethe.metrics.evaluator import PredictionStore

    store = PredictionStore(TARGETS, EXP, torch.zeros_like(EXP), torch.arange(9), 3, 7)
    for label, ok in (("init", INIT_OK), ("learn:0", LEARN0_OK), ("learn:1", OLD_OK),
                      ("learn:2", NEW_OK)):
        store.add(label, preds_from(ok))
    f = flips.between(store, "learn:1", "learn:2")
    assert f["all"]["nfr"] == pytest.approx(1 / 3, abs=1e-12)
    assert f["all"]["rel_nfr"] == pytest.approx(27 / 28, abs=1e-12)
    torch.testing.assert_close(f["per_experience"]["nfr"],
                               torch.tensor([2 / 3, 1 / 3, 0], dtype=torch.float64))
    # any two points, not only neighbours: learn:0 → learn:2 has NFR 2/9
    assert flips.between(store, "learn:0", "learn:2")["all"]["nfr"] == pytest.approx(2 / 9)
