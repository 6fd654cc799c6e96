"""Structure that a later change must not break: layers point down (import-linter contracts
in pyproject.toml) and adding a method is adding one file."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import LETHE, ROOT

LINT = [str(Path(sys.executable).with_name("lint-imports"))]


def lint(cwd: Path, pythonpath: Path | None = None):
    env = {**os.environ, **({"PYTHONPATH": str(pythonpath)} if pythonpath else {})}
    return subprocess.run(LINT + ["--no-cache"], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


def test_import_contracts_are_kept():
    res = lint(ROOT)
    assert res.returncode == 0, res.stdout[-3000:]
    assert "Contracts: 3 kept, 0 broken." in res.stdout


def test_an_upward_import_breaks_the_layers_contract_and_is_named(tmp_path):
    """A copy of the package where a metric imports the runner: lint-imports fails and names
    the offending import (so CI shows which line broke a layer)."""
    shutil.copytree(ROOT / "lethe", tmp_path / "lethe", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    cl = tmp_path / "lethe" / "metrics" / "cl.py"
    cl.write_text(cl.read_text() + "\n\ndef _up():\n    from lethe.platform import runner  # noqa\n")
    res = lint(tmp_path, pythonpath=tmp_path)
    assert res.returncode != 0
    assert "layers point down BROKEN" in res.stdout
    assert "lethe.metrics.cl -> lethe.platform.runner" in res.stdout


def test_a_new_method_file_is_discovered_without_editing_any_other_file(tmp_path):
    """One file with @register_method added to a copy of the package: it shows up in
    `lethe list methods` and runs (its predictions decide the logged accuracy)."""
    shutil.copytree(ROOT / "lethe", tmp_path / "lethe", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "lethe" / "methods" / "always_zero.py").write_text('''
from dataclasses import dataclass

from lethe.methods.base import Method
from lethe.registry import register_method


@dataclass
class AlwaysZeroConfig:
    pass


@register_method("always_zero", config=AlwaysZeroConfig, kinds=("learn",))
class AlwaysZero(Method):
    """Predicts class 0 for every sample, without training."""

    def learn(self, experience):
        self.learned.append(experience.index)

    def predict(self, x, task_ids):
        import torch

        out = torch.full((len(x), 10), -1.0)
        out[:, 0] = 1.0
        return out
''')
    env = {"PYTHONPATH": str(tmp_path)}
    listed = subprocess.run(LETHE + ["list", "methods"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120, env={**os.environ, **env})
    assert listed.returncode == 0, listed.stderr
    assert "always_zero" in listed.stdout and "Predicts class 0 for every sample" in listed.stdout
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    res = subprocess.run(LETHE + ["run", "split_digits", "method.name=always_zero", "train.epochs=1",
                                  f"tracking.uri={uri}", f"checkpoint.dir={tmp_path / 'runs'}",
                                  "eval.save_predictions=false"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, **env, "PYTHONWARNINGS": "ignore"})
    assert res.returncode == 0, res.stderr[-2000:]
    from lethe.platform.config import load_config
    from lethe.scenarios.split_digits import split_digits

    stream = split_digits(load_config("split_digits").scenario, 0)
    test = stream.test
    # accuracy on experience j is the share of its test samples whose label is 0
    first = test.exp == 0
    expected = float((test.y[first] == 0).double().mean())
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.search_runs([client.get_experiment_by_name("lethe").experiment_id])[0]
    assert run.data.metrics["acc/exp_0"] == expected
