"""Name → (builder, config schema) registries for scenarios, models and methods.

This module imports nothing else of lethe, so every layer may import it. Registration
happens at import time of the module that defines the component (a decorator);
:func:`load_all` imports every module of the packages ``lethe.scenarios``, ``lethe.models``
and ``lethe.methods``, so adding a component is adding one file (no list to edit). Component modules must keep heavy imports
(torch, avalanche, ...) inside functions so that ``lethe list`` stays fast.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import pkgutil
import re
from dataclasses import dataclass, field
from typing import Any, Callable

KINDS = ("scenarios", "models", "methods")


@dataclass(frozen=True)
class Entry:
    name: str
    obj: Any                       # builder function (scenarios, models) or method class
    config: type                   # dataclass schema of the node's keys (besides `name`)
    doc: str                       # one line, shown by `lethe list`
    extras: dict = field(default_factory=dict)  # e.g. supported settings / experience kinds


class UnknownName(KeyError):
    """An unknown component name; the message carries a "did you mean" suggestion."""

    def __init__(self, kind: str, name: str, known: list[str]):
        self.kind, self.name, self.known = kind, name, known
        super().__init__(name)

    def __str__(self) -> str:
        singular = self.kind[:-1]
        hint = suggest(self.name, self.known)
        return (f"unknown {singular} '{self.name}'{hint} "
                f"(known: {', '.join(sorted(self.known))}; see `lethe list {self.kind}`)")


def suggest(word: str, candidates) -> str:
    """`"; did you mean 'x'?"` for the closest candidate, or an empty string."""
    close = difflib.get_close_matches(str(word), list(candidates), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def check_choice(key: str, value, choices) -> None:
    """ConfigError ``bad value for '<key>': '<value>'; did you mean ...? (choose one of ...)``
    unless ``value`` is one of ``choices``: the one message every enumerated setting gives."""
    if value not in choices:
        from lethe.errors import ConfigError

        raise ConfigError(f"bad value for '{key}': '{value}'{suggest(value, choices)} "
                          f"(choose one of {', '.join(choices)})")


_REGISTRIES: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}


def _first_doc_line(obj: Any) -> str:
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0].strip() if doc else ""


def _register(kind: str, name: str, config: type | None, extras: dict) -> Callable:
    if config is not None and not dataclasses.is_dataclass(config):
        raise TypeError(f"config of {kind[:-1]} '{name}' must be a dataclass")

    def decorator(obj):
        if name in _REGISTRIES[kind] and _REGISTRIES[kind][name].obj is not obj:
            raise ValueError(f"{kind[:-1]} '{name}' is registered twice")
        schema = config if config is not None else dataclasses.make_dataclass(f"{name}_config", [])
        _REGISTRIES[kind][name] = Entry(name, obj, schema, _first_doc_line(obj), dict(extras))
        return obj

    return decorator


def register_scenario(name: str, config: type | None = None, **extras) -> Callable:
    """Register a stream builder ``fn(cfg, seed) -> Stream``.

    extras: ``settings`` — the CL settings the stream can offer, e.g. ("class_incremental",).
    """
    return _register("scenarios", name, config, extras)


def register_model(name: str, config: type | None = None, **extras) -> Callable:
    """Register a model builder ``fn(cfg, info) -> nn.Module`` (info: input shape, classes)."""
    return _register("models", name, config, extras)


def register_method(name: str, config: type | None = None, **extras) -> Callable:
    """Register a method class.

    extras: ``kinds`` — experience kinds it serves ("learn", "forget", "update");
    ``settings`` — CL settings it supports (None = any).
    """
    return _register("methods", name, config, extras)


_LOADED: set[str] = set()   # packages whose component modules were imported
_REGISTERS = re.compile(rb"\bregister_(scenario|model|method)\(")


def _component_modules(package: str) -> list[str]:
    """Modules of ``package`` that register a component (their source calls ``register_*``).

    Reading the source first keeps building-block modules that import torch at module level
    (lethe/models/adapters.py) out of ``lethe list``.
    """
    names = []
    for info in sorted(pkgutil.iter_modules(importlib.import_module(package).__path__),
                       key=lambda m: m.name):
        if info.ispkg or info.name.startswith("_"):
            continue
        spec = info.module_finder.find_spec(f"{package}.{info.name}")
        origin = getattr(spec, "origin", None)
        try:
            with open(origin, "rb") as fh:
                source = fh.read()
        except (OSError, TypeError):   # no readable source (e.g. a compiled module): import it
            source = b"register_method("
        if _REGISTERS.search(source):
            names.append(f"{package}.{info.name}")
    return names


def load_all() -> None:
    """Import every component module of ``lethe.scenarios``, ``lethe.models`` and
    ``lethe.methods`` so the registries are complete.

    Module names starting with ``_`` are skipped.
    """
    for kind in KINDS:
        package = f"lethe.{kind}"
        if package not in _LOADED:
            for name in _component_modules(package):
                importlib.import_module(name)
            _LOADED.add(package)


def entries(kind: str) -> dict[str, Entry]:
    load_all()
    return dict(_REGISTRIES[kind])


def get(kind: str, name: str) -> Entry:
    load_all()
    try:
        return _REGISTRIES[kind][name]
    except KeyError:
        raise UnknownName(kind, name, list(_REGISTRIES[kind])) from None
