"""Evaluation during training on a validation split carved from training data, and
best-checkpoint selection."""
from __future__ import annotations

import pytest

from conftest import mlflow_client
from lethe.platform.config import load_config
from lethe.platform.errors import ConfigError

pytestmark = pytest.mark.integration


def test_select_best_keeps_the_best_validated_epoch(tmp_path, store):
    from lethe.platform.runner import run_experiment

    cfg = load_config("split_digits", [*store["overrides"], "scenario.n_experiences=2",
                                       "method.name=naive", "train.epochs=4", "train.lr=0.3",
                                       "eval.every_epochs=1", "eval.val_fraction=0.2",
                                       "checkpoint.select=best"])
    result = run_experiment(cfg)
    client = mlflow_client(store["uri"])
    val = sorted(client.get_metric_history(result.run_id, "val/acc"), key=lambda m: m.step)
    assert len(val) == 2 * 4                       # every epoch of both experiences
    chosen = {m.step: m.value for m in client.get_metric_history(result.run_id, "select/epoch")}
    chosen_acc = {m.step: m.value for m in client.get_metric_history(result.run_id, "select/val_acc")}
    for exp_index in (0, 1):
        per_epoch = [m.value for m in val[4 * exp_index: 4 * exp_index + 4]]
        best = max(range(4), key=lambda e: (per_epoch[e], -e))   # first best epoch
        assert chosen[exp_index] == best + 1
        assert chosen_acc[exp_index] == per_epoch[best]
    # 20% of each experience's training data was held out: fewer iterations per epoch
    loss_steps = [m.step for m in client.get_metric_history(result.run_id, "train/loss")]
    assert len(loss_steps) == 8


def test_validation_split_never_trains_and_never_uses_test_data(tmp_path, store):
    from lethe.methods.base import Method
    from lethe.platform.runner import run_experiment

    seen: list[int] = []
    orig = Method.learn

    def spy(self, experience):
        plugin = next(p for p in self.strategy.plugins if type(p).__name__ == "ValidationPlugin")
        out = orig(self, experience)
        seen.append((set(plugin.train_ids), set(plugin.val_ids),
                     set(int(i) for i in experience.train.dataset.sample_id)))
        return out

    Method.learn = spy
    try:
        cfg = load_config("split_digits", [*store["overrides"], "scenario.n_experiences=2",
                                           "method.name=naive", "train.epochs=1", "eval.every_steps=3"])
        run_experiment(cfg)
    finally:
        Method.learn = orig
    for trained, val, whole in seen:
        assert val and not (trained & val) and trained | val == whole
        assert abs(len(val) - 0.1 * len(whole)) <= 1


def test_select_best_without_validation_is_a_config_error():
    with pytest.raises(ConfigError, match="checkpoint.select=best needs validation"):
        load_config("split_digits", ["checkpoint.select=best"])
    with pytest.raises(ConfigError, match="did you mean 'val/acc'"):
        load_config("split_digits", ["checkpoint.select_metric=val/ac"])
