"""Tracking URIs a user got wrong, found before a store is opened (or created).

MLflow reports these as internal errors ("Model registry functionality is unavailable" for an
unknown scheme, an SQLAlchemy traceback for a file that is not a database) or silently
creates a folder for a typo in a SQLite path. Here each is one :class:`ConfigError` (exit 2)
naming the URI and the fix, raised before any MLflow run exists.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

from lethe.errors import ConfigError

SQLITE_HEADER = b"SQLite format 3\x00"   # the first 16 bytes of every SQLite database file


def check_sqlite_store(uri: str) -> None:
    """A ``sqlite:///`` store must sit in an existing folder and be an SQLite file (or not
    exist yet). The default ``./mlflow.db`` always passes: its folder is the current one."""
    path = sqlite_path(uri)
    if path is None:
        return
    if not path.parent.is_dir():
        raise ConfigError(f"tracking.uri={uri}: the folder {path.parent} does not exist; create it "
                          f"first or give a database path in an existing folder")
    if path.is_dir():
        raise ConfigError(f"tracking.uri={uri}: {path} is a folder, not a database file")
    if path.is_file() and path.stat().st_size > 0:
        with open(path, "rb") as fh:
            header = fh.read(len(SQLITE_HEADER))
        if header != SQLITE_HEADER:
            raise ConfigError(f"tracking.uri={uri}: {path} is not an SQLite database (an MLflow "
                              f"store); point tracking.uri at the store's .db file, or at a new "
                              f"path to start one")


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other stores and in-memory ones)."""
    if not uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url  # MLflow's SQL stores are SQLAlchemy URLs

    database = make_url(uri).database
    return Path(database) if database and database != ":memory:" else None


@contextlib.contextmanager
def opening(uri: str):
    """Around opening the tracking store of ``uri`` (resolved: see
    :func:`lethe.platform.tracking.resolve_tracking_uri`): the checks above first, and MLflow's
    unknown-scheme error as a ConfigError."""
    from mlflow.tracking.registry import UnsupportedModelRegistryStoreURIException

    check_sqlite_store(uri)
    try:
        yield
    except UnsupportedModelRegistryStoreURIException as exc:
        schemes = ", ".join(f"{s}://" for s in exc.supported_uri_schemes if s)
        raise ConfigError(f"tracking.uri={uri}: MLflow has no store for this kind of URI "
                          f"(schemes it knows: {schemes}; e.g. sqlite:///mlflow.db, a folder "
                          f"path, or http://host:5000 for a tracking server)") from None


__all__ = ["check_sqlite_store", "opening", "sqlite_path"]
