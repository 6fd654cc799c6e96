"""lethe's stratified split and digits reader against scikit-learn, the reference they replace
on the start-up path (scikit-learn stays installed as the test's oracle)."""
import numpy as np
import pytest

from lethe.errors import ConfigError
from lethe.scenarios.splits import load_digits, stratified_split


def sklearn_split(y, fraction, seed):
    from sklearn.model_selection import train_test_split

    return train_test_split(np.arange(len(y)), test_size=fraction, random_state=seed, stratify=y)


def labels():
    rng = np.random.default_rng(7)
    from sklearn.datasets import load_digits as sk_digits

    yield "digits", sk_digits().target
    # uneven classes whose shares leave remainders to share out (ties broken at random)
    yield "uneven", rng.choice(5, size=203, p=[0.4, 0.3, 0.15, 0.1, 0.05])
    yield "string labels, equal classes", np.repeat(np.array(["b", "a", "c"]), 7)


@pytest.mark.parametrize("fraction", [0.25, 0.1, 0.5, 0.33])
@pytest.mark.parametrize("seed", [0, 1, 1993])
def test_stratified_split_draws_what_scikit_learn_draws(fraction, seed):
    for name, y in labels():
        ours, theirs = stratified_split(y, fraction, seed), sklearn_split(y, fraction, seed)
        for a, b in zip(ours, theirs):
            assert np.array_equal(a, b), (name, fraction, seed)


def test_digits_equal_scikit_learns_load_digits():
    from sklearn.datasets import load_digits as sk_digits

    images, target = load_digits()
    ref = sk_digits()
    assert images.shape == (1797, 8, 8) and images.dtype == ref.images.dtype
    assert np.array_equal(images, ref.images) and np.array_equal(target, ref.target)


def test_a_split_that_leaves_a_class_out_names_the_fix():
    y = np.repeat(np.arange(10), 3)   # 30 rows: 2 test rows cannot cover 10 classes
    with pytest.raises(ConfigError, match=r"test_fraction=0.05 leaves 2 samples on one side for "
                                          r"10 classes.*move test_fraction towards 0.5"):
        stratified_split(y, 0.05, 0)
    with pytest.raises(ConfigError, match="class 3 has only 1 sample"):
        stratified_split(np.array([0, 0, 1, 1, 2, 2, 3]), 0.5, 0)
