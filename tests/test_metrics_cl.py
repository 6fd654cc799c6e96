"""CL metrics against hand-worked prediction tables and against Avalanche's own metrics.

The hand table (3 experiences x 3 test samples; 1 = the point predicts the sample right):

    point     exp 0     exp 1     exp 2      accuracies
    init      0 0 0     1 0 0     0 0 0      0    1/3  0
    learn:0   1 1 0     1 1 0     0 0 0      2/3  2/3  0
    learn:1   1 1 1     1 1 0     1 1 0      1    2/3  2/3
    learn:2   1 0 0     0 1 1     1 1 0      1/3  2/3  2/3

Worked by hand (R = the learn rows, b = the init row):
    Chaudhry forgetting at i=2: exp0 max(2/3, 1) − 1/3 = 2/3, exp1 max(2/3, 2/3) − 2/3 = 0
        → mean 1/3   (Avalanche's first-value forgetting would be (1/3 + 0)/2 = 1/6)
    forgetting at i=1: 2/3 − 1 = −1/3
    BWT at i=2: ((1/3 − 2/3) + (2/3 − 2/3))/2 = −1/6;  at i=1: 1 − 2/3 = 1/3
    FWT at i=2: ((R[0,1] − b1) + (R[1,2] − b2))/2 = ((2/3 − 1/3) + (2/3 − 0))/2 = 1/2;  i=1: 1/3
    avg seen at i=2 = (1/3 + 2/3 + 2/3)/3 = 5/9; at i=1 = (1 + 2/3)/2 = 5/6; avg all at i=1 = 7/9
"""
from __future__ import annotations

import warnings

import pytest
import torch

from lethe.metrics import cl
from lethe.metrics.evaluator import PredictionStore
from lethe.metrics.summary import step_metrics

TARGETS = torch.tensor([0, 1, 0, 2, 3, 2, 4, 5, 4])
EXP = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
WRONG = 6                       # a class no sample has
TABLE = {
    "init":    [0, 0, 0, 0, 0, 0, 0, 0, 0],
    "learn:0": [1, 1, 0, 1, 1, 0, 0, 0, 0],
    "learn:1": [1, 1, 1, 1, 1, 0, 1, 1, 0],
    "learn:2": [1, 0, 0, 0, 1, 1, 1, 1, 0],
}
TABLE["init"][3] = 1


def preds_from(correct_pattern) -> torch.Tensor:
    ok = torch.tensor(correct_pattern, dtype=torch.bool)
    return torch.where(ok, TARGETS, torch.full_like(TARGETS, WRONG))


def hand_store(labels=("init", "learn:0", "learn:1", "learn:2")) -> PredictionStore:
    store = PredictionStore(TARGETS, EXP, torch.zeros_like(EXP), torch.arange(9), 3, 7)
    for lab in labels:
        store.add(lab, preds_from(TABLE[lab]))
    return store


def learn_R() -> torch.Tensor:
    P = torch.stack([preds_from(TABLE[f"learn:{i}"]) for i in range(3)])
    return cl.accuracy_matrix(P, TARGETS, EXP, 3)


def test_accuracy_matrix_matches_hand_table():
    R = hand_store().accuracy_matrix()
    expected = torch.tensor([[0, 1 / 3, 0], [2 / 3, 2 / 3, 0], [1, 2 / 3, 2 / 3],
                             [1 / 3, 2 / 3, 2 / 3]], dtype=torch.float64)
    assert R.dtype == torch.float64
    torch.testing.assert_close(R, expected, rtol=0, atol=1e-12)


def test_accuracy_matrix_with_unsorted_experience_ids_and_empty_experience():
    # samples of an experience need not be contiguous; an experience with no samples is 0
    perm = torch.tensor([8, 0, 4, 2, 6, 1, 7, 3, 5])
    p = preds_from(TABLE["learn:2"])[perm]
    R = cl.accuracy_matrix(p, TARGETS[perm], EXP[perm], 4)
    torch.testing.assert_close(R, torch.tensor([[1 / 3, 2 / 3, 2 / 3, 0.0]], dtype=torch.float64))


def test_chaudhry_forgetting_is_max_based_not_first_value():
    R = learn_R()
    assert cl.forgetting(R, 0) == 0.0
    assert cl.forgetting(R, 1) == pytest.approx(-1 / 3, abs=1e-12)
    torch.testing.assert_close(cl.forgetting_per_experience(R, 2),
                               torch.tensor([2 / 3, 0.0], dtype=torch.float64))
    assert cl.forgetting(R, 2) == pytest.approx(1 / 3, abs=1e-12)
    # Avalanche-style first-value forgetting would be 1/6: the max makes the difference
    assert cl.forgetting(R, 2) != pytest.approx(1 / 6, abs=1e-3)


def test_bwt_and_fwt_match_hand_values():
    R = learn_R()
    b = hand_store().accuracy_matrix()[0]
    assert cl.bwt(R, 0) == 0.0
    assert cl.bwt(R, 1) == pytest.approx(1 / 3, abs=1e-12)
    assert cl.bwt(R, 2) == pytest.approx(-1 / 6, abs=1e-12)
    torch.testing.assert_close(cl.bwt_per_experience(R, 2),
                               torch.tensor([-1 / 3, 0.0], dtype=torch.float64))
    assert cl.fwt(R, b, 0) == 0.0
    assert cl.fwt(R, b, 1) == pytest.approx(1 / 3, abs=1e-12)
    assert cl.fwt(R, b, 2) == pytest.approx(1 / 2, abs=1e-12)


def test_average_accuracy_seen_and_all():
    R = learn_R()
    assert cl.average_accuracy(R, 2) == pytest.approx(5 / 9, abs=1e-12)
    assert cl.average_accuracy(R, 1) == pytest.approx(5 / 6, abs=1e-12)
    assert cl.average_accuracy(R, 1, seen_only=False) == pytest.approx(7 / 9, abs=1e-12)


def test_more_steps_than_experiences_count_every_experience():
    # a 4th learn step on a 3-experience test set (repeated domain): row [1, 1/3, 1]
    R = torch.cat([learn_R(), torch.tensor([[1, 1 / 3, 1]], dtype=torch.float64)])
    # forgetting: exp0 1 − 1 = 0, exp1 2/3 − 1/3 = 1/3, exp2 2/3 − 1 = −1/3 → 0
    torch.testing.assert_close(cl.forgetting_per_experience(R, 3),
                               torch.tensor([0.0, 1 / 3, -1 / 3], dtype=torch.float64))
    # BWT: (1 − 2/3) + (1/3 − 2/3) + (1 − 2/3) over 3 = 1/9
    assert cl.bwt(R, 3) == pytest.approx(1 / 9, abs=1e-12)


def test_per_class_accuracy_hand_values():
    # learn:2 right on samples 0, 4, 5, 6, 7 → class 0: 1/2, 1: 0, 2: 1/2, 3: 1, 4: 1/2, 5: 1
    acc = cl.per_class_accuracy(preds_from(TABLE["learn:2"]), TARGETS, 7)
    assert acc.shape == (1, 7)
    torch.testing.assert_close(acc[0, :6], torch.tensor([1 / 2, 0, 1 / 2, 1, 1 / 2, 1],
                                                        dtype=torch.float64))
    assert torch.isnan(acc[0, 6])          # class 6 has no test sample


def test_step_metrics_after_learn_steps():
    m = step_metrics(hand_store(), n_learned=3)
    expected = {"acc/exp_0": 1 / 3, "acc/exp_1": 2 / 3, "acc/exp_2": 2 / 3,
                "acc/avg_seen": 5 / 9, "acc/avg_all": 5 / 9, "forgetting/avg": 1 / 3,
                "bwt": -1 / 6, "fwt": 1 / 2,
                # learn:1 → learn:2 flips (worked in tests/test_flips.py)
                "nfr/prev": 1 / 3, "pfr/prev": 1 / 9, "nfi/prev": 3 / 4}
    assert set(expected) <= set(m)
    for k, v in expected.items():
        assert m[k] == pytest.approx(v, abs=1e-12), k
    m1 = step_metrics(hand_store(("init", "learn:0", "learn:1")), n_learned=2)
    assert m1["acc/avg_seen"] == pytest.approx(5 / 6, abs=1e-12)
    assert m1["acc/avg_all"] == pytest.approx(7 / 9, abs=1e-12)
    assert m1["forgetting/avg"] == pytest.approx(-1 / 3, abs=1e-12)
    assert m1["bwt"] == pytest.approx(1 / 3, abs=1e-12)
    assert m1["fwt"] == pytest.approx(1 / 3, abs=1e-12)


def test_step_metrics_after_a_forget_step_use_the_current_model():
    # forget:3 right on [1 1 1 | 0 0 0 | 1 1 1] → accuracies [1, 0, 1]
    store = hand_store()
    store.add("forget:3", preds_from([1, 1, 1, 0, 0, 0, 1, 1, 1]))
    m = step_metrics(store, n_learned=3)
    # forgetting over all 3 seen: exp0 1 − 1 = 0, exp1 2/3 − 0, exp2 2/3 − 1 → (0 + 2/3 − 1/3)/3
    assert m["forgetting/avg"] == pytest.approx(1 / 9, abs=1e-12)
    # BWT: (1 − 2/3) + (0 − 2/3) + (1 − 2/3) over 3 = 0
    assert m["bwt"] == pytest.approx(0.0, abs=1e-12)
    assert m["fwt"] == pytest.approx(1 / 2, abs=1e-12)      # learn rows only: unchanged
    # vs learn:2: negative flips samples 4, 5; positive flips 1, 2, 8; new errors 3, 4, 5
    assert m["nfr/prev"] == pytest.approx(2 / 9, abs=1e-12)
    assert m["pfr/prev"] == pytest.approx(1 / 3, abs=1e-12)
    assert m["nfi/prev"] == pytest.approx(2 / 3, abs=1e-12)


def test_last_and_average_incremental_accuracy_on_the_hand_table():
    # PyCIL / PILOT: A_t = hits / samples over the test data of experiences 0..t after step t
    # A_0 = 2/3 (exp 0), A_1 = (3 + 2)/6 = 5/6, A_2 = (1 + 2 + 2)/9 = 5/9
    # average incremental accuracy = (2/3 + 5/6 + 5/9)/3 = (12 + 15 + 10)/54 = 37/54
    m = step_metrics(hand_store(), n_learned=3)
    assert m["acc/last"] == pytest.approx(5 / 9, abs=1e-12)
    assert m["acc/avg_incremental"] == pytest.approx(37 / 54, abs=1e-12)
    m1 = step_metrics(hand_store(("init", "learn:0", "learn:1")), n_learned=2)
    assert m1["acc/last"] == pytest.approx(5 / 6, abs=1e-12)
    assert m1["acc/avg_incremental"] == pytest.approx((2 / 3 + 5 / 6) / 2, abs=1e-12)
    # a forget step is not an incremental step: the mean keeps the learn steps' A_t, acc/last
    # is the current model's (3 + 0 + 3)/9
    store = hand_store()
    store.add("forget:3", preds_from([1, 1, 1, 0, 0, 0, 1, 1, 1]))
    m2 = step_metrics(store, n_learned=3)
    assert m2["acc/last"] == pytest.approx(2 / 3, abs=1e-12)
    assert m2["acc/avg_incremental"] == pytest.approx(37 / 54, abs=1e-12)


def test_last_accuracy_is_sample_weighted_not_a_mean_over_experiences():
    # exp 0 has 1 test sample, exp 1 has 3. After learn:1 the model is wrong on exp 0 and right
    # on all of exp 1: A_1 = 3/4, while acc/avg_seen = (0 + 1)/2 = 1/2; A_0 = 1/1
    targets, exp = torch.tensor([0, 1, 1, 1]), torch.tensor([0, 1, 1, 1])
    store = PredictionStore(targets, exp, torch.zeros_like(exp), torch.arange(4), 2, 3)
    store.add("learn:0", torch.tensor([0, 2, 2, 2]))
    store.add("learn:1", torch.tensor([2, 1, 1, 1]))
    m = step_metrics(store, n_learned=2)
    assert m["acc/avg_seen"] == pytest.approx(1 / 2, abs=1e-12)
    assert m["acc/last"] == pytest.approx(3 / 4, abs=1e-12)
    assert m["acc/avg_incremental"] == pytest.approx((1 + 3 / 4) / 2, abs=1e-12)   # 7/8


def test_store_preds_cache_follows_additions_and_load():
    store = hand_store(("init", "learn:0"))
    first = store.preds
    assert first.shape == (2, 9) and store.preds is first        # cached between reads
    store.add("learn:1", preds_from(TABLE["learn:1"]))
    assert store.preds.shape == (3, 9)
    assert torch.equal(store.row("learn:1"), preds_from(TABLE["learn:1"]))
    store.load(["a"], first[:1])
    assert store.labels == ["a"] and store.preds.shape == (1, 9)
    with pytest.raises(ValueError, match="expected \\(9,\\)"):
        store.add("bad", torch.zeros(4, dtype=torch.long))


# --- against Avalanche's own metrics, same model, same split-digits stream -----------------

def test_accuracy_matrix_and_bwt_agree_with_avalanche_metrics_on_split_digits(one_thread):
    from avalanche.evaluation.metrics import accuracy_metrics, bwt_metrics, forgetting_metrics
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin

    from lethe.metrics.evaluator import Evaluator
    from lethe.models.vision import MLPConfig, ModelInfo, mlp
    from lethe.scenarios.split_digits import SplitDigitsConfig, split_digits

    stream = split_digits(SplitDigitsConfig(n_experiences=3), seed=0)
    bm, E = stream.benchmark, stream.n_eval_experiences
    torch.manual_seed(0)
    model = mlp(MLPConfig(hidden=64), ModelInfo((1, 8, 8), 10))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")        # "No loggers specified"
        evaluation = EvaluationPlugin(accuracy_metrics(experience=True),
                                      forgetting_metrics(experience=True),
                                      bwt_metrics(experience=True, stream=True), loggers=[])
    strategy = Naive(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
                     train_mb_size=32, train_epochs=3, eval_mb_size=100, evaluator=evaluation)
    ev = Evaluator(stream.test, "cpu", batch_size=0, n_classes=10)
    key = "{}/eval_phase/test_stream/Task000/Exp{:03d}"
    for i, exp in enumerate(bm.train_stream):
        strategy.train(exp, num_workers=0)
        res = strategy.eval(bm.test_stream, num_workers=0)
        ev.evaluate(lambda x, t: model(x), f"learn:{i}", model)
        R = ev.store.accuracy_matrix()
        avalanche_row = torch.tensor([res[key.format("Top1_Acc_Exp", j)] for j in range(E)],
                                     dtype=torch.float64)
        assert torch.allclose(R[i], avalanche_row, rtol=0, atol=1e-6), (i, R[i], avalanche_row)
        assert cl.bwt(R, i) == pytest.approx(res.get("StreamBWT/eval_phase/test_stream", 0.0),
                                             abs=1e-6)
        for j in range(i):
            # Avalanche's experience forgetting is first-value based: R[j,j] − R[i,j] = −BWT_j;
            # Chaudhry's adds how far the best earlier accuracy was above R[j,j]
            first_value = res[key.format("ExperienceForgetting", j)]
            assert -cl.bwt_per_experience(R, i)[j].item() == pytest.approx(first_value, abs=1e-6)
            above_first = (R[:i, j].max() - R[j, j]).item()
            assert cl.forgetting_per_experience(R, i)[j].item() == pytest.approx(
                first_value + above_first, abs=1e-6)
    # the model learned something and forgot something, so the comparison had teeth
    assert R[0, 0] > 0.8 and R[-1, 0] < R[0, 0]
