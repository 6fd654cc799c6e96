"""PCT focal distillation and MUSCLE masked distillation vs references computed by hand."""
from __future__ import annotations

import math

import pytest
import torch

from lethe.methods.muscle import muscle_loss
from lethe.methods.pct import pct_loss

# two samples, three classes; sample 0: the old model predicts class 0 (= its label, right),
# sample 1: the old model predicts class 2 but the label is 1 (wrong)
OLD = [[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]]
NEW = [[1.0, 1.5, 0.0], [0.5, 2.0, -0.5]]
Y = [0, 1]


def softmax(z, T):
    e = [math.exp(v / T) for v in z]
    s = sum(e)
    return [v / s for v in e]


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def hand_pct(distance, alpha, beta, T):
    total = 0.0
    for z_old, z_new, y in zip(OLD, NEW, Y):
        old_right = max(range(3), key=lambda c: z_old[c]) == y
        w = alpha + beta * (1.0 if old_right else 0.0)
        if distance == "kl":
            d = T * T * kl(softmax(z_old, T), softmax(z_new, T))
        else:
            d = sum((a - b) ** 2 for a, b in zip(z_old, z_new)) / len(z_old) / 2   # ½·mean
        total += w * d
    return total / len(Y)


@pytest.mark.parametrize("distance,alpha,beta,T", [("kl", 1.0, 5.0, 100.0), ("kl", 1.0, 5.0, 2.0),
                                                   ("kl", 0.5, 2.0, 1.0), ("l2", 1.0, 5.0, 100.0),
                                                   ("l2", 0.0, 1.0, 1.0)])
def test_pct_loss_equals_hand_computed_reference(distance, alpha, beta, T):
    new = torch.tensor(NEW, dtype=torch.float64, requires_grad=True)
    old = torch.tensor(OLD, dtype=torch.float64)
    got = pct_loss(new, old, torch.tensor(Y), alpha, beta, distance, T)
    # at T = 100 the two distributions nearly coincide: both sides lose digits to cancellation
    assert float(got.detach()) == pytest.approx(hand_pct(distance, alpha, beta, T), rel=1e-9)


def test_pct_l2_matches_reference_scale():
    # jun-fang/PCT FD-LM: D = mean over the C = 3 classes of the squared difference, ÷ 2
    # sample 0: w = 1 + 5 = 6, (2−1)² + (0.5−1.5)² + (−1−0)² = 3 → 3/3/2 = 0.5 → 3.0
    # sample 1: w = 1,         (0−0.5)² + (1−2)² + (3+0.5)² = 13.5 → 13.5/3/2 = 2.25 → 2.25
    got = pct_loss(torch.tensor(NEW), torch.tensor(OLD), torch.tensor(Y), 1.0, 5.0, "l2")
    assert float(got) == pytest.approx((3.0 + 2.25) / 2)


@pytest.mark.parametrize("distance", ["l2", "kl"])
def test_pct_focal_weight_follows_the_old_models_correctness(distance):
    # sample 0: old right (argmax 0 = y), new wrong (argmax 1); sample 1: old wrong (argmax 2),
    # new right (argmax 1). α = 0, β = 1 keeps sample 0 only: D₀ / 2 (the batch mean over 2).
    # Weighting by the new model's correctness, or not at all, gives another number.
    T = 2.0
    d0 = {"l2": 0.5,   # from test_pct_l2_matches_reference_scale
          "kl": T * T * kl(softmax(OLD[0], T), softmax(NEW[0], T))}[distance]
    got = pct_loss(torch.tensor(NEW, dtype=torch.float64), torch.tensor(OLD, dtype=torch.float64),
                   torch.tensor(Y), 0.0, 1.0, distance, T)
    assert float(got) == pytest.approx(d0 / 2, rel=1e-9)
    # the focal part adds β·D only where the old model is right: (α=1, β=5) − (α=1, β=0) = 5·D₀/2
    both = [float(pct_loss(torch.tensor(NEW, dtype=torch.float64),
                           torch.tensor(OLD, dtype=torch.float64), torch.tensor(Y), 1.0, b,
                           distance, T)) for b in (5.0, 0.0)]
    assert both[0] - both[1] == pytest.approx(5 * d0 / 2, rel=1e-9)


def test_pct_gradient_reaches_only_the_new_model():
    new = torch.tensor(NEW, requires_grad=True)
    old = torch.tensor(OLD, requires_grad=True)
    pct_loss(new, old, torch.tensor(Y), distance="l2").backward()
    assert old.grad is None
    # d/dz_new of mean_i w_i · ½·mean_c (z_new − z_old)² = w_i (z_new − z_old) / (C·B), C = 3, B = 2
    expected = torch.tensor([[6 * (n - o) / (3 * 2) for n, o in zip(NEW[0], OLD[0])],
                             [1 * (n - o) / (3 * 2) for n, o in zip(NEW[1], OLD[1])]])
    assert torch.allclose(new.grad, expected)


def test_pct_kl_at_high_temperature_approaches_centred_logit_matching():
    # T²·KL(softmax(a/T) ‖ softmax(b/T)) → (1/2C) Σ_c (δ_c − mean δ)², δ = a − b, as T → ∞:
    # why the paper's T = 100 behaves like logit matching
    a = torch.tensor([[2.0, 0.5, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 1.5, 0.0]], dtype=torch.float64)
    got = pct_loss(b, a, torch.tensor([1]), 1.0, 0.0, "kl", 1e4)
    d = a - b
    assert float(got) == pytest.approx(float(((d - d.mean()) ** 2).sum() / (2 * 3)), rel=1e-3)


def test_unknown_distance_is_rejected():
    with pytest.raises(ValueError, match="unknown PCT distance 'cosine'"):
        pct_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, dtype=torch.long),
                 distance="cosine")


@pytest.mark.parametrize("right_target,T", [("new", 1.0), ("new", 2.0), ("label", 1.0)])
def test_muscle_masked_distillation_equals_hand_reference(right_target, T):
    # the NEW model predicts class 1 on both samples: wrong on sample 0 (label 0) → teacher is
    # the old model there; right on sample 1 → teacher is the new model itself (or nothing)
    compat = [[0.2, 0.1, 0.3], [1.0, -1.0, 0.5]]
    loss, mask = muscle_loss(torch.tensor(compat, dtype=torch.float64),
                             torch.tensor(NEW, dtype=torch.float64),
                             torch.tensor(OLD, dtype=torch.float64), torch.tensor(Y), T, right_target)
    assert mask.tolist() == [True, False]
    term0 = T * T * kl(softmax(OLD[0], T), softmax(compat[0], T))
    term1 = T * T * kl(softmax(NEW[1], T), softmax(compat[1], T)) if right_target == "new" else 0.0
    assert float(loss) == pytest.approx((term0 + term1) / 2, rel=1e-12)


def test_muscle_ignores_padding_positions():
    # an LM batch [B=1, V=3, L=4]: positions 1 and 3 are padding (-100). The KD must equal the
    # hand reference over positions 0 and 2 only, averaged over those 2 positions.
    compat = [[0.2, 0.1, 0.3], [5.0, -5.0, 0.0], [1.0, -1.0, 0.5], [-3.0, 4.0, 1.0]]
    new = [NEW[0], [9.0, 0.0, 0.0], NEW[1], [0.0, 0.0, 9.0]]
    old = [OLD[0], [0.0, 9.0, 0.0], OLD[1], [9.0, 0.0, 0.0]]
    targets = [Y[0], -100, Y[1], -100]

    def lm(rows):   # [L, V] → [1, V, L], lethe's LM logit layout
        return torch.tensor(rows, dtype=torch.float64).T.unsqueeze(0)

    loss, mask = muscle_loss(lm(compat), lm(new), lm(old), torch.tensor([targets]), 1.0, "new")
    # position 0: new predicts 1, label 0 → teacher old; position 2: new right → teacher new
    term0 = kl(softmax(OLD[0], 1.0), softmax(compat[0], 1.0))
    term2 = kl(softmax(NEW[1], 1.0), softmax(compat[2], 1.0))
    assert float(loss) == pytest.approx((term0 + term2) / 2, rel=1e-12)
    assert mask.tolist() == [True, False]        # only the counted positions
