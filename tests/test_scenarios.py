"""Scenario builders: real Avalanche streams with stable sample ids."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import write_local_mnist
from omegaconf import OmegaConf

from lethe import registry
from lethe.errors import ConfigError
from lethe.platform.config import validate


def build(scenario: dict, seed: int = 0):
    cfg = validate({"scenario": scenario, "model": "mlp", "method": "naive"})
    return registry.get("scenarios", cfg.scenario.name).obj(cfg.scenario, seed)


def test_split_digits_partitions_real_digits_by_seeded_class_order():
    from sklearn.datasets import load_digits

    digits = load_digits()
    s = build({"name": "split_digits", "n_experiences": 3})
    assert [e.kind for e in s.experiences] == ["learn"] * 3 and s.setting == "class_incremental"
    groups = [sorted(set(e.train.dataset.targets)) for e in s.experiences]
    assert [len(g) for g in groups] == [4, 3, 3]            # leftovers kept, not dropped
    assert sorted(c for g in groups for c in g) == list(range(10))
    train_ids = torch.tensor([i for e in s.experiences for i in e.train.dataset.sample_id])
    all_ids = torch.cat([train_ids, s.test.ids])
    assert len(set(all_ids.tolist())) == len(digits.target) == len(all_ids)  # disjoint, complete
    # ids are rows of load_digits(): pixels and labels match the source exactly
    for e in s.experiences:
        x, y, _ = e.train.dataset[0]
        sid = e.train.dataset.sample_id[0]
        assert torch.equal(x[0], torch.tensor(digits.images[sid] / 16.0, dtype=torch.float32))
        assert y == digits.target[sid]
    # test experiences hold exactly the classes of the matching train experience
    for j, g in enumerate(groups):
        assert sorted(set(s.test.y[s.test.exp == j].tolist())) == g
    # same seed → same order; another class_seed → another order
    again = build({"name": "split_digits", "n_experiences": 3})
    other = build({"name": "split_digits", "n_experiences": 3, "class_seed": 1})
    assert again.class_order == s.class_order != other.class_order


def test_split_digits_task_labels_make_a_task_incremental_stream():
    s = build({"name": "split_digits", "n_experiences": 5, "task_labels": True})
    assert s.setting == "task_incremental"
    assert [e.train.task_label for e in s.experiences] == [0, 1, 2, 3, 4]
    assert torch.equal(s.test.task, s.test.exp)


def test_image_folder_reads_generated_images(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(["cat", "dog", "emu", "fox"]):
        (tmp_path / name).mkdir()
        for i in range(6):  # class-specific brightness so labels are checkable from pixels
            arr = np.clip(rng.normal(40 + 50 * c, 5, (12, 12, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(tmp_path / name / f"{i}.png")
    s = build({"name": "image_folder", "root": str(tmp_path), "n_experiences": 2,
               "image_size": 8, "test_fraction": 0.5})
    assert s.input_shape == (3, 8, 8) and s.n_classes == 4
    assert sum(len(e.train.dataset) for e in s.experiences) == 12 and len(s.test.y) == 12
    brightness = s.test.x.mean(dim=(1, 2, 3))
    order = torch.argsort(brightness)
    assert torch.equal(s.test.y[order], torch.sort(s.test.y).values)   # labels follow pixels


def test_image_folder_without_class_folders_is_a_config_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="expected <root>/<class name>/<image files>"):
        build({"name": "image_folder", "root": str(tmp_path / "empty")})


@pytest.fixture
def local_mnist(tmp_path):
    """A small MNIST in torchvision's on-disk format (idx files), so no download happens."""
    return write_local_mnist(tmp_path, 200, 50)


@pytest.mark.integration
def test_avalanche_classic_benchmark_from_local_files(local_mnist):
    s = build({"name": "avalanche", "benchmark": "SplitMNIST", "dataset_root": str(local_mnist),
               "kwargs": {"n_experiences": 5, "seed": 0}})
    assert len(s.experiences) == 5 and s.n_classes == 10 and s.input_shape == (1, 28, 28)
    assert sum(len(e.train.dataset) for e in s.experiences) == 200 and len(s.test.y) == 50
    ids = [i for e in s.experiences for i in e.train.dataset.sample_id] + s.test.ids.tolist()
    assert len(set(ids)) == 250
    for j, exp in enumerate(s.benchmark.test_stream):
        assert sorted(set(s.test.y[s.test.exp == j].tolist())) == sorted(exp.classes_in_this_experience)


@pytest.mark.integration
def test_avalanche_benchmark_without_data_offline_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="is not in .* and could not be downloaded"):
        build({"name": "avalanche", "benchmark": "SplitMNIST", "dataset_root": str(tmp_path),
               "kwargs": {"n_experiences": 5}})


def test_adding_a_method_is_one_decorated_class(tmp_path, store, registry_snapshot):
    from dataclasses import dataclass

    from conftest import mlflow_client

    from lethe.methods.base import Method
    from lethe.platform.config import load_config
    from lethe.platform.runner import run_experiment

    @dataclass
    class ConstantConfig:
        label: int = 0

    @registry.register_method("constant_test", config=ConstantConfig)
    class Constant(Method):
        """Test method: never trains; predicts method.label for every sample."""

        def learn(self, experience):
            self.learned.append(experience.index)

        def predict(self, x, task_ids):
            return torch.nn.functional.one_hot(torch.full((len(x),), self.cfg.label), 10).float()

    cfg = load_config("split_digits", ["method.name=constant_test", "method.label=7"])
    assert cfg.method.label == 7 and OmegaConf.select(cfg, "method.name") == "constant_test"
    assert registry.get("methods", "constant_test").doc.startswith("Test method: never trains;")

    cfg = load_config("split_digits", ["method.name=constant_test", "method.label=7",
                                       "scenario.n_experiences=2", *store["overrides"]])
    result = run_experiment(cfg)
    # the method's predictions reached the logged metrics: after each experience, accuracy
    # on test experience j is the share of 7s among its test samples
    test = build({"name": "split_digits", "n_experiences": 2}).test
    expected = [(test.y[test.exp == j] == 7).double().mean().item() for j in (0, 1)]
    assert sorted(e > 0 for e in expected) == [False, True]   # 7 is in one experience only
    client = mlflow_client(store["uri"])
    for j in (0, 1):
        history = client.get_metric_history(result.run_id, f"acc/exp_{j}")
        logged = sorted((m.step, m.value) for m in history)
        assert logged == [(0, pytest.approx(expected[j])), (1, pytest.approx(expected[j]))]


def test_restored_registry_drops_what_was_registered_inside_and_keeps_the_built_ins():
    from conftest import restored_registry

    before = set(registry.entries("methods"))
    with restored_registry():
        registry.register_method("leak_test")(type("Leak", (), {"__doc__": "Test method."}))
        assert "leak_test" in registry.entries("methods")
    assert set(registry.entries("methods")) == before and {"naive", "sisa"} <= before
