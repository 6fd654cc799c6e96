"""`lethe reproduce RUN_ID [key=value ...]`: re-run a run from its MLflow record alone."""
from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path

from lethe.errors import ConfigError

NOT_COMPARED = ("time/", "train/")


def _tracking_override(overrides: list[str]) -> tuple[str | None, list[str]]:
    uri, rest = None, []
    for item in overrides:
        if item.startswith("tracking.uri="):
            uri = item.split("=", 1)[1]
        rest.append(item)
    return uri, rest


def fetch_record(client, run_id: str) -> tuple[object, str]:
    """The run and its resolved config.yaml text."""
    try:
        run = client.get_run(run_id)
    except Exception:
        raise ConfigError(f"run '{run_id}' not found in the tracking store {client.tracking_uri} "
                          f"(pass tracking.uri=... where it was logged)") from None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, "config.yaml", tmp)
        except Exception:
            raise ConfigError(f"run '{run_id}' has no config.yaml artifact: it was not made by "
                              f"`lethe run`, so it cannot be reproduced") from None
        return run, Path(path).read_text()


def version_warnings(run) -> list[str]:
    from lethe.platform.environment import package_versions

    now = package_versions()
    warnings = []
    for key, recorded in run.data.tags.items():
        if key.startswith("env.pkg."):
            name = key[len("env.pkg."):]
            if now.get(name, "absent") != recorded:
                warnings.append(f"{name} {recorded} was recorded, {now.get(name, 'absent')} is installed")
    return warnings


def side_by_side(original: dict[str, float], new: dict[str, float]) -> str:
    keys = sorted(k for k in set(original) | set(new) if not k.startswith(NOT_COMPARED))
    width = max((len(k) for k in keys), default=10)
    lines = [f"{'metric':<{width}}  {'original':>10}  {'reproduced':>10}  {'difference':>11}"]
    for k in keys:
        a, b = original.get(k, math.nan), new.get(k, math.nan)
        diff = b - a
        mark = "" if a == b else "  ≠"
        lines.append(f"{k:<{width}}  {a:10.6f}  {b:10.6f}  {diff:+11.6f}{mark}")
    return "\n".join(lines)


def reproduce(run_id: str, overrides: list[str]):
    """Re-run RUN_ID into a new run tagged with it; returns (result, original metrics, text)."""
    from mlflow.tracking import MlflowClient

    from lethe.platform.config import load_config
    from lethe.platform.runner import run_experiment
    from lethe.platform.tracking import Tracker

    uri, overrides = _tracking_override(overrides)
    uri = uri or Tracker.default_uri()
    client = MlflowClient(tracking_uri=uri)
    run, config_text = fetch_record(client, run_id)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as fh:
        fh.write(config_text)
    experiment = client.get_experiment(run.info.experiment_id).name
    cfg = load_config(fh.name, [f"tracking.uri={uri}", f"tracking.experiment={experiment}",
                                *overrides])
    Path(fh.name).unlink()
    warnings = version_warnings(run)
    for warning in warnings:
        print(f"lethe: warning: {warning}; numbers may differ", file=sys.stderr)
    if warnings:
        print(f"lethe: to recreate the recorded environment: `mlflow artifacts download -r {run_id} "
              f"-a pip_freeze.txt` and `pip install -c pip_freeze.txt -e .` in a fresh venv at the "
              f"run's git.commit (docs/sweeps.md#reproduce-a-run)", file=sys.stderr)
    changes_data = any(o.startswith("scenario.") for o in overrides)
    expected = None if changes_data else {
        k[len("data.fp."):]: v for k, v in run.data.tags.items() if k.startswith("data.fp.")}
    if changes_data:
        print("lethe: note: scenario overrides given, so the data fingerprint check is skipped",
              file=sys.stderr)
    result = run_experiment(cfg, tags={"lethe.reproduces": run_id,
                                       "lethe.reproduce_overrides": " ".join(overrides) or "-"},
                            expect_fingerprints=expected)
    original = dict(run.data.metrics)
    return result, original, side_by_side(original, result.final)
