"""scenario.transforms (train/eval pipelines), scenario.class_order and lazy image folders."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import write_local_mnist
from omegaconf import OmegaConf
from torchvision import transforms as T

from lethe import registry
from lethe.errors import ConfigError
from lethe.platform.config import validate
from lethe.scenarios.transforms import build as build_transforms
from lethe.scenarios.transforms import class_order


def build(scenario: dict, seed: int = 0):
    cfg = validate({"scenario": scenario, "model": "mlp", "method": "naive"})
    return registry.get("scenarios", cfg.scenario.name).obj(cfg.scenario, seed)


def _steps(pipeline):
    return [type(t).__name__ for t in pipeline.transforms]


# --- recipes -----------------------------------------------------------------------------
def test_pilot_recipe_is_lamda_pilots_build_transform():
    train, eval_ = build_transforms("pilot")
    assert _steps(train) == ["RandomResizedCrop", "RandomHorizontalFlip", "ToTensor"]
    crop, flip = train.transforms[0], train.transforms[1]
    assert list(crop.size) == [224, 224] and tuple(crop.scale) == (0.05, 1.0)
    assert tuple(crop.ratio) == pytest.approx((3 / 4, 4 / 3)) and flip.p == 0.5
    assert _steps(eval_) == ["Resize", "CenterCrop", "ToTensor"]      # no Normalize
    resize = eval_.transforms[0]
    assert resize.size == 256 and resize.interpolation == T.InterpolationMode.BICUBIC
    assert list(eval_.transforms[1].size) == [224, 224]


def test_imagenet_and_cifar_recipes_normalise_with_their_statistics():
    train, eval_ = build_transforms("imagenet")
    assert _steps(train)[-2:] == ["ToTensor", "Normalize"] and _steps(train)[0] == "RandomResizedCrop"
    assert eval_.transforms[-1].mean == [0.485, 0.456, 0.406]
    assert eval_.transforms[-1].std == [0.229, 0.224, 0.225]
    train, eval_ = build_transforms("cifar")
    crop = train.transforms[0]
    assert type(crop).__name__ == "RandomCrop" and list(crop.size) == [32, 32] and crop.padding == 4
    assert _steps(eval_) == ["ToTensor", "Normalize"]           # 32-px CIFAR needs no resize
    assert eval_.transforms[-1].mean == [0.5071, 0.4865, 0.4409]


def test_size_scales_a_recipe_as_pilot_keeps_the_256_to_224_ratio():
    _, eval_ = build_transforms({"train": "pilot", "eval": "pilot", "size": 8})
    assert eval_.transforms[0].size == int(256 / 224 * 8) == 9
    assert list(eval_.transforms[1].size) == [8, 8]


def test_explicit_lists_from_a_dictconfig_equal_the_torchvision_pipeline():
    from PIL import Image

    spec = OmegaConf.create({"train": [{"name": "RandomResizedCrop", "size": 6, "scale": [0.5, 1.0]},
                                       "ToTensor"],
                             "eval": [{"name": "Resize", "size": 9, "interpolation": "bicubic"},
                                      {"name": "CenterCrop", "size": 6}, {"name": "ToTensor"},
                                      {"name": "Normalize", "mean": [0.5] * 3, "std": [0.5] * 3}]})
    train, eval_ = build_transforms(spec)
    assert tuple(train.transforms[0].scale) == (0.5, 1.0)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (12, 10, 3)).astype(np.uint8))
    by_hand = T.Compose([T.Resize(9, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(6),
                         T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    assert torch.equal(eval_(img), by_hand(img))
    assert eval_(img).min() < 0       # normalised: (x - 0.5) / 0.5


@pytest.mark.parametrize("spec, message", [
    ({"train": [{"name": "RandomResizedCrp", "size": 8}]}, "did you mean 'RandomResizedCrop'"),
    ({"train": [{"name": "os.system"}]}, "unknown transform 'os.system'"),
    ({"train": [{"name": "Lambda"}]}, "unknown transform 'Lambda'"),
    ({"eval": "pilott"}, "unknown recipe 'pilott'; did you mean 'pilot'"),
    ({"eval": [{"name": "Resize", "sise": 8}]}, r"Resize\(sise=8\) failed"),
    ({"eval": [{"name": "Resize", "size": 8, "interpolation": "bicubik"}]}, "did you mean 'bicubic'"),
    ({"train": "pilot", "evall": "pilot"}, "unknown key 'evall'; did you mean 'eval'"),
    (7, "expected a recipe name"),
])
def test_bad_transforms_are_config_errors_at_config_time(tmp_path, spec, message):
    (tmp_path / "a").mkdir()
    with pytest.raises(ConfigError, match=message):
        validate({"scenario": {"name": "image_folder", "root": str(tmp_path), "transforms": spec},
                  "model": "mlp", "method": "naive"})


# --- class orders ------------------------------------------------------------------------
def test_pilot_class_order_is_numpys_seeded_permutation():
    state = np.random.get_state()
    try:   # LAMDA-PILOT's data_manager: np.random.seed(seed); np.random.permutation(n)
        np.random.seed(1993)
        expected = np.random.permutation(100).tolist()
        np.random.seed(7)
        expected7 = np.random.permutation(10).tolist()
    finally:
        np.random.set_state(state)
    before = np.random.get_state()[1].copy()
    assert class_order("pilot", 100) == expected
    assert class_order("pilot:7", 10) == expected7
    assert np.array_equal(np.random.get_state()[1], before)     # numpy's global state untouched
    assert class_order([2, 0, 1], 3) == [2, 0, 1]
    with pytest.raises(ConfigError, match="must list every class id 0..2 exactly once"):
        class_order([0, 0, 1], 3)
    with pytest.raises(ConfigError, match="unknown order 'avalanche'"):
        class_order("avalanche", 3)


def _digit_folder(root, n_classes=4, per_class=6, size=12):
    """Class folders of PNGs whose brightness encodes the class."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(n_classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            arr = np.clip(rng.normal(30 + 50 * c, 5, (size, size + 2, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / f"c{c}" / f"{i}.png")
    return root


def test_image_folder_class_order_pilot_orders_the_experiences(tmp_path):
    root = _digit_folder(tmp_path / "imgs")
    s = build({"name": "image_folder", "root": str(root), "n_experiences": 2, "image_size": 8,
               "test_fraction": 0.5, "class_order": "pilot"})
    expected = np.random.RandomState(1993).permutation(4).tolist()
    assert s.class_order == expected
    assert sorted(set(s.experiences[0].train.dataset.targets)) == sorted(expected[:2])


# --- lazy loading ------------------------------------------------------------------------
def _count_opens(monkeypatch):
    import PIL.Image

    opened, real = [], PIL.Image.open

    def counting(fp, *a, **k):
        opened.append(getattr(fp, "name", fp))
        return real(fp, *a, **k)

    monkeypatch.setattr(PIL.Image, "open", counting)
    return opened


def test_image_folder_decodes_training_images_only_when_iterated(tmp_path, monkeypatch):
    from torchvision import datasets

    root = _digit_folder(tmp_path / "imgs")
    opened = _count_opens(monkeypatch)
    s = build({"name": "image_folder", "root": str(root), "n_experiences": 2, "image_size": 8,
               "test_fraction": 0.5})
    n_test = len(s.test.y)
    assert len(opened) == n_test == 12      # only the test split became tensors; no train image
    train_ids = [i for e in s.experiences for i in e.train.dataset.sample_id]
    # the former eager loading, by torchvision's own ImageFolder: ids are its sample positions
    eager = datasets.ImageFolder(str(root), transform=T.Compose([T.Resize((8, 8)), T.ToTensor()]))
    for e in s.experiences:
        for k in range(len(e.train.dataset)):
            before = len(opened)
            x, y, _ = e.train.dataset.eval()[k]
            assert len(opened) == before + 1            # one decode per item, on demand
            ex, ey = eager[e.train.dataset.sample_id[k]]
            assert torch.equal(x, ex) and y == ey
    for x, y, i in zip(s.test.x, s.test.y, s.test.ids):
        ex, ey = eager[int(i)]
        assert torch.equal(x, ex) and int(y) == ey
    assert sorted(train_ids + s.test.ids.tolist()) == list(range(24))   # stable, disjoint ids


def test_image_folder_train_and_eval_pipelines_apply_to_their_splits(tmp_path):
    root = _digit_folder(tmp_path / "imgs")
    s = build({"name": "image_folder", "root": str(root), "n_experiences": 2, "test_fraction": 0.5,
               "transforms": {"train": "pilot", "eval": "pilot", "size": 8}})
    assert s.input_shape == (3, 8, 8) and tuple(s.test.x.shape[1:]) == (3, 8, 8)
    data = s.experiences[0].train.dataset
    torch.manual_seed(0)
    a = data[0][0]
    torch.manual_seed(1)
    b = data[0][0]
    assert a.shape == (3, 8, 8) and not torch.equal(a, b)      # random crop/flip in training
    assert torch.equal(data.eval()[0][0], data.eval()[0][0])    # eval pipeline deterministic


def test_image_folder_grayscale_default_keeps_the_eager_pixels(tmp_path):
    from torchvision import datasets

    root = _digit_folder(tmp_path / "imgs")
    s = build({"name": "image_folder", "root": str(root), "n_experiences": 2, "image_size": 8,
               "test_fraction": 0.5, "grayscale": True})
    eager = datasets.ImageFolder(str(root), transform=T.Compose(
        [T.Resize((8, 8)), T.Grayscale(), T.ToTensor()]))
    assert s.input_shape == (1, 8, 8)
    for x, i in zip(s.test.x, s.test.ids):
        assert torch.equal(x, eager[int(i)][0])


# --- Avalanche classic benchmarks --------------------------------------------------------
@pytest.fixture
def local_mnist(tmp_path):
    """A small MNIST in torchvision's on-disk format (idx files), so no download happens."""
    return write_local_mnist(tmp_path, 100, 30)


@pytest.mark.integration
def test_avalanche_benchmark_takes_transforms_and_the_pilot_class_order(local_mnist):
    s = build({"name": "avalanche", "benchmark": "SplitMNIST", "dataset_root": str(local_mnist),
               "kwargs": {"n_experiences": 5, "seed": 0}, "class_order": "pilot",
               # Avalanche's MNIST hands tensors already (no ToTensor)
               "transforms": {"train": [{"name": "RandomCrop", "size": 20}],
                              "eval": [{"name": "CenterCrop", "size": 20}]}})
    expected = np.random.RandomState(1993).permutation(10).tolist()
    groups = [sorted(e.classes_in_this_experience) for e in s.benchmark.train_stream]
    assert groups == [sorted(expected[2 * k:2 * k + 2]) for k in range(5)]
    assert s.input_shape == (1, 20, 20)                        # the eval pipeline's crop
    assert tuple(s.experiences[0].train.dataset[0][0].shape) == (1, 20, 20)


def test_avalanche_class_order_of_an_unknown_benchmark_is_a_config_error():
    with pytest.raises(ConfigError, match="number of classes of PermutedMNIST is not known"):
        validate({"scenario": {"name": "avalanche", "benchmark": "PermutedMNIST",
                               "class_order": "pilot"}, "model": "mlp", "method": "naive"})
