"""Config loading and validation: every user mistake names the key and the fix."""
from __future__ import annotations

import pytest

from lethe.errors import ConfigError
from lethe.platform.config import load_config


def error_of(*overrides, config="split_digits") -> str:
    with pytest.raises(ConfigError) as info:
        load_config(config, list(overrides))
    msg = str(info.value)
    assert "\n" not in msg, "errors are one line"
    return msg


def test_preset_loads_with_component_defaults():
    cfg = load_config("split_digits")
    assert cfg.method.name == "replay" and cfg.method.mem_size == 200
    assert cfg.method.batch_size_mem is None          # default from ReplayConfig
    assert cfg.scenario.n_experiences == 5 and cfg.scenario.test_fraction == 0.25
    assert cfg.train.epochs == 8 and cfg.tracking.uri is None


def test_dotlist_overrides_are_typed():
    cfg = load_config("split_digits", ["train.lr=0.2", "method.mem_size=50", "seed=7"])
    assert cfg.train.lr == 0.2 and cfg.method.mem_size == 50 and cfg.seed == 7


def test_switching_method_name_starts_from_the_new_methods_defaults():
    cfg = load_config("split_digits", ["method.name=ewc", "method.ewc_lambda=5"])
    assert cfg.method.name == "ewc" and cfg.method.ewc_lambda == 5.0
    assert "mem_size" not in cfg.method               # replay's key is gone, not an error


def test_method_shorthand_string():
    cfg = load_config("split_digits", ["method=naive"])
    assert cfg.method.name == "naive"


def test_unknown_top_level_key_suggests_the_closest():
    msg = error_of("trian.epochs=3")
    assert "unknown key 'trian'" in msg and "did you mean 'train'" in msg


def test_unknown_nested_key_names_full_path():
    msg = error_of("train.epoch=3")
    assert "train.epoch" in msg and "did you mean 'epochs'" in msg


def test_unknown_method_key_is_checked_against_the_method_schema():
    msg = error_of("method.mem_sise=3")
    assert "method.mem_sise" in msg and "did you mean 'mem_size'" in msg


def test_key_of_another_method_is_rejected():
    msg = error_of("method.name=naive", "method.mem_size=3")
    assert "unknown key 'method.mem_size'" in msg


def test_wrong_type_names_key():
    assert "bad value for 'train.epochs'" in error_of("train.epochs=abc")
    assert "bad value for 'model.hidden'" in error_of("model.hidden=1.5")


def test_bad_choice_suggests():
    msg = error_of("train.optimizer=adm")
    assert "train.optimizer" in msg and "did you mean 'adam'" in msg


def test_unknown_component_names():
    msg = error_of("method.name=repaly")
    assert "unknown method 'repaly'" in msg and "did you mean 'replay'" in msg
    assert "lethe list methods" in msg
    assert "did you mean 'split_digits'" in error_of("scenario.name=split_digit")
    assert "unknown model 'resnet19'" in error_of("model.name=resnet19")


def test_missing_config_file_lists_presets():
    msg = error_of(config="no_such_file.yaml")
    assert "config file not found" in msg and "split_digits" in msg


def test_missing_data_path_is_caught_before_running():
    msg = error_of("scenario.name=image_folder", "scenario.root=/does/not/exist")
    assert "scenario.root" in msg and "not found" in msg


def test_missing_required_value():
    msg = error_of("scenario.name=image_folder")
    assert "missing value for 'scenario.root'" in msg


def test_malformed_override_and_yaml(tmp_path):
    assert "key=value" in error_of("trainlr")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmethod: {name: naive\n")
    assert "cannot parse" in error_of(config=str(bad))


def test_value_ranges():
    assert "train.epochs" in error_of("train.epochs=0")
    assert "train.lr" in error_of("train.lr=-1")
    assert "device" in error_of("device=tpu")


def test_config_is_read_only_after_validation():
    cfg = load_config("split_digits")
    with pytest.raises(Exception):
        cfg.train.lr = 1.0
