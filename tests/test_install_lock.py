"""The install is the locked one: `make test` installs from requirements.lock, so every locked
package must be installed at exactly its locked version, and the lock must cover every
dependency pyproject.toml declares (a dependency added without `make lock` fails here)."""
from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def _locked() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        if m:
            pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def test_every_locked_package_is_installed_at_its_locked_version():
    pins = _locked()
    assert len(pins) > 100      # torch, transformers, mlflow... and their whole dependency tree
    wrong = {}
    for name, version in pins.items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = "absent"
        if installed != version:
            wrong[name] = f"locked {version}, installed {installed}"
    assert not wrong, f"not the locked install (rebuild with `make clean test`): {wrong}"


def test_the_lock_covers_every_declared_dependency_within_its_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + project["optional-dependencies"]["test"]
    pins = _locked()
    for spec in declared:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is declared but not locked: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"{req.name}=={pins[name]} in the lock is outside {req.specifier}: run `make lock`"
