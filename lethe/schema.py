"""Validation of a component node (``scenario``, ``model``, ``method``) against the dataclass
schema its ``name`` registered: the config loader uses it for the top-level nodes, and
scenarios that nest components (model-update streams name a model per version) use it for
theirs. It sits on the ground floor with the registry, so every layer may import it.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf import errors as oc_errors

from lethe import registry
from lethe.errors import ConfigError

COMPONENTS = {"scenario": "scenarios", "model": "models", "method": "methods"}


def node_error(exc: Exception, prefix: str, schema_keys) -> ConfigError:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None) or ""
    path = f"{prefix}.{key}" if prefix and key else (prefix or str(key))
    msg = getattr(exc, "msg", None) or str(exc).splitlines()[0]
    if isinstance(exc, oc_errors.ConfigKeyError):
        leaf = str(key).split(".")[-1]
        return ConfigError(f"unknown key '{path}'{registry.suggest(leaf, schema_keys)} "
                           f"(valid keys: {', '.join(sorted(schema_keys))})")
    if isinstance(exc, oc_errors.MissingMandatoryValue):
        return ConfigError(f"missing value for '{path}': set it in the YAML or as {path}=...")
    first = msg.splitlines()[0]
    return ConfigError(f"bad value for '{path}': {first}")


def validate_component(node_name: str, raw: Any) -> DictConfig:
    """The ``scenario`` / ``model`` / ``method`` node ``raw`` merged onto the schema its ``name``
    registered; every problem is one :class:`ConfigError` naming the key path."""
    kind = COMPONENTS[node_name]
    if raw is None or (isinstance(raw, str) and raw == "???"):
        raise ConfigError(f"missing '{node_name}' section: add {node_name}: {{name: ...}} "
                          f"(see `lethe list {kind}`)")
    if isinstance(raw, str):  # `method: naive` is shorthand for `method: {name: naive}`
        raw = {"name": raw}
    if not isinstance(raw, (dict, DictConfig)) or "name" not in raw:
        raise ConfigError(f"'{node_name}' needs a 'name' (see `lethe list {kind}`)")
    raw = OmegaConf.create(OmegaConf.to_container(raw) if isinstance(raw, DictConfig) else raw)
    name = raw.pop("name")
    try:
        entry = registry.get(kind, name)
    except registry.UnknownName as exc:
        raise ConfigError(f"{node_name}.name: {exc}") from None
    schema = OmegaConf.structured(entry.config)
    keys = [f.name for f in dataclasses.fields(entry.config)]
    try:
        merged = OmegaConf.merge(schema, raw)
        OmegaConf.to_container(merged, throw_on_missing=True)
    except oc_errors.OmegaConfBaseException as exc:
        raise node_error(exc, node_name, keys) from None
    _check_paths(merged, node_name, entry.config)
    if entry.extras.get("check"):   # a component's own config-time check (e.g. transforms)
        entry.extras["check"](merged)
    result = OmegaConf.create({"name": name})
    result.merge_with(OmegaConf.to_container(merged))
    return result


def _check_paths(node: DictConfig, prefix: str, schema: type) -> None:
    """Fields whose metadata says ``path=True`` must name existing files or folders."""
    for f in dataclasses.fields(schema):
        value = node.get(f.name)
        if f.metadata.get("path") and value not in (None, ""):
            if not Path(os.path.expanduser(str(value))).exists():
                raise ConfigError(f"{prefix}.{f.name}: file or folder not found: '{value}'")
