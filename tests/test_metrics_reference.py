"""docs/metrics.md is generated from the code, and the session-end check of tests/conftest.py
(every metric key a session's runs logged is documented) fails exactly when it should."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from lethe.metrics import reference

ROOT = Path(__file__).resolve().parents[1]

# An inner session: a unit test, and a test that starts a real (tiny) lethe run whose store is
# where $INNER_STORE says (default: its tmp_path) and that logs $INNER_EXTRA_KEY besides.
INNER = '''
import os


def test_unit():
    assert sorted("cba") == ["a", "b", "c"]


def test_run(tmp_path):
    from mlflow.tracking import MlflowClient

    from lethe.platform.config import load_config
    from lethe.platform.runner import run_experiment

    uri = os.environ.get("INNER_STORE") or f"sqlite:///{tmp_path / 'm.db'}"
    cfg = load_config("split_digits", [f"tracking.uri={uri}", "tracking.experiment=t",
                                       f"checkpoint.dir={tmp_path / 'runs'}", "device=cpu",
                                       "scenario.n_experiences=2", "train.epochs=1",
                                       "method.name=naive", "eval.save_predictions=false"])
    result = run_experiment(cfg)
    if os.environ.get("INNER_EXTRA_KEY"):
        MlflowClient(uri).log_metric(result.run_id, os.environ["INNER_EXTRA_KEY"], 1.0)
'''


@pytest.fixture
def inner_dir():
    """Outside this session's temp root, so that its own check does not read the inner stores."""
    with tempfile.TemporaryDirectory(prefix="lethe-inner-") as folder:
        yield Path(folder)


def inner_session(folder: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """pytest on INNER with tests/conftest.py as its only conftest (loaded as a plugin)."""
    (folder / "test_inner.py").write_text(INNER)
    full_env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "PYTHONWARNINGS": "ignore", **env}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-p", "conftest", f"--basetemp={folder / 'basetemp'}",
                           str(folder / "test_inner.py"), *args],
                          cwd=folder, capture_output=True, text=True, timeout=600, env=full_env)


def test_docs_metrics_md_is_generated_from_the_code():
    assert (ROOT / "docs" / "metrics.md").read_text() == reference.as_markdown(), (
        "regenerate it: python -m lethe.metrics.reference > docs/metrics.md")


def test_lookup_matches_placeholders_only_where_they_are():
    assert reference.lookup("acc/exp_12").key == "acc/exp_<j>"
    assert reference.lookup("acc/exp_x") is None
    assert reference.lookup("forgetting/avg").variant.startswith("Chaudhry")


def test_a_session_without_runs_passes_the_check(inner_dir):
    res = inner_session(inner_dir, "-k", "unit")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 passed, 1 deselected" in res.stdout and "metric-key check" not in res.stdout


def test_an_undocumented_key_fails_the_session_and_is_named(inner_dir):
    res = inner_session(inner_dir, INNER_EXTRA_KEY="made_up/key")
    assert "2 passed" in res.stdout, res.stdout + res.stderr
    assert res.returncode == 1
    # the real run's own keys are all documented: the message names the extra key alone
    assert "not documented: made_up/key; add them to lethe/metrics/reference.py" in res.stdout


def test_a_run_tracked_outside_the_temp_root_fails_the_session_as_missing_input(inner_dir):
    elsewhere = inner_dir / "elsewhere"
    elsewhere.mkdir()
    res = inner_session(inner_dir, INNER_STORE=f"sqlite:///{elsewhere / 'm.db'}")
    assert "2 passed" in res.stdout, res.stdout + res.stderr
    assert res.returncode == 1
    assert "1 lethe run(s) started by this session are in no MLflow SQLite store" in res.stdout
    assert str(inner_dir / "basetemp") in res.stdout   # the message names the run folder
