"""Evaluation during training on a validation split carved from training data, and
best-checkpoint selection."""
from __future__ import annotations

import pytest
import torch
from conftest import mlflow_client

from lethe.errors import ConfigError
from lethe.platform.config import load_config

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


def digits_row_of_pixels():
    """Sample id (row of load_digits) of every split_digits input tensor: the images are
    pairwise distinct, so pixels identify the sample."""
    from sklearn.datasets import load_digits

    images = torch.tensor(load_digits().images / 16.0, dtype=torch.float32)
    row_of = {img.numpy().tobytes(): i for i, img in enumerate(images)}
    assert len(row_of) == len(images)
    return lambda x: {row_of[img.numpy().tobytes()] for img in x.detach().cpu().reshape(-1, 8, 8)}


def test_validation_split_never_trains_and_never_uses_test_data(tmp_path, store, monkeypatch):
    from lethe.methods.base import Method
    from lethe.platform.runner import run_experiment

    ids_of = digits_row_of_pixels()
    seen: list[dict] = []

    class TrainedSamples:
        """Sample ids of every training minibatch of the current experience, from its pixels."""

        def before_training_exp(self, strategy, **kwargs):
            self.ids = set()

        def after_training_iteration(self, strategy, **kwargs):
            self.ids |= ids_of(strategy.mb_x)

    orig = Method.learn

    def spy(self, experience):
        plugin = next(p for p in self.strategy.plugins if type(p).__name__ == "ValidationPlugin")
        trained = next((p for p in self.strategy.plugins if isinstance(p, TrainedSamples)), None)
        if trained is None:
            trained = TrainedSamples()
            self.strategy.plugins.append(trained)
        orig(self, experience)
        seen.append({"train": set(plugin.train_ids), "val": set(plugin.val_ids),
                     "val_pixels": ids_of(plugin.x), "trained": set(trained.ids),
                     "whole": {int(i) for i in experience.train.dataset.sample_id},
                     "test": set(self.ctx.stream.test.ids.tolist())})

    monkeypatch.setattr(Method, "learn", spy)
    cfg = load_config("split_digits", [*store["overrides"], "scenario.n_experiences=2",
                                       "method.name=naive", "train.epochs=1", "eval.every_steps=3"])
    run_experiment(cfg)
    assert len(seen) == 2                          # both experiences were served and looked at
    for s in seen:
        assert s["train"] and s["val"] and s["test"]
        assert not (s["train"] & s["val"]) and s["train"] | s["val"] == s["whole"]
        assert abs(len(s["val"]) - 0.1 * len(s["whole"])) <= 1
        # one epoch visits every sample it trains on: exactly the training part, never val
        assert s["trained"] == s["train"]
        # the tensors validated on are the held-out samples' own pixels, and none is a test sample
        assert s["val_pixels"] == s["val"]
        assert not (s["val"] & s["test"])


def test_select_best_without_validation_is_a_config_error():
    with pytest.raises(ConfigError, match="checkpoint.select=best needs validation"):
        load_config("split_digits", ["checkpoint.select=best"])
    with pytest.raises(ConfigError, match="did you mean 'val/acc'"):
        load_config("split_digits", ["checkpoint.select_metric=val/ac"])
