"""Atomic, verified, resumable checkpoints: state_dicts + JSON metadata, one folder per run.

``<checkpoint.dir>/<mlflow run id>/`` holds ``state.pt`` (model, optimizer, method state,
RNG states, prediction store), ``state.prev.pt`` (the checkpoint before it), ``meta.json``
(progress, tracking coordinates, the SHA-256 of both state files) and the resolved
``config.yaml``. Writes go to a temp file renamed over the old one, so a crash (even SIGKILL)
leaves the previous checkpoint intact. Loads verify the checksum first, so a damaged file is
named instead of loaded (a zeroed block inside ``state.pt`` still unpickles, into different
weights), and fall back to ``state.prev.pt`` with a warning. Loads use ``weights_only=True``.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import random
from pathlib import Path

from lethe.errors import ConfigError, RunError

log = logging.getLogger("lethe")

STATE, PREVIOUS = "state.pt", "state.prev.pt"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def config_hash(config_yaml: str) -> str:
    return hashlib.sha256(config_yaml.encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _writing(path: Path, tmp: Path):
    """Around writing ``tmp`` for ``path``: on any failure the temp file is removed (``path``
    was not touched yet), and a full disk is said in words, naming the folder."""
    try:
        yield
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            kept = " (the previous one is intact)" if path.exists() else ""
            raise RunError(f"the disk is full: could not write {path.name} in {path.parent}{kept}; "
                           f"free space there or set checkpoint.dir to another disk, then continue "
                           f"with --resume") from None
        raise


def _atomic_write(path: Path, write) -> None:
    """``write(tmp)``, then rename ``tmp`` over ``path``: ``path`` is the old or the new file."""
    tmp = path.with_name(path.name + ".tmp")
    with _writing(path, tmp):
        write(tmp)
        os.replace(tmp, path)


def _write_text(text: str):
    def write(tmp: Path) -> None:
        with open(tmp, "w") as fh:
            fh.write(text)
    return write


def check_root(root: str | Path) -> Path:
    """Create ``checkpoint.dir``; a path that cannot be a folder is a user error, found before
    any MLflow run exists."""
    base = Path(root).expanduser()
    try:
        base.mkdir(parents=True, exist_ok=True)
        if not base.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(base))
    except OSError as exc:
        blocker = next((p for p in (base, *base.parents) if p.exists() and not p.is_dir()), None)
        why = (f"{blocker} is a file, not a folder" if blocker is not None
               else "the disk is full" if exc.errno in DISK_FULL else exc.strerror or str(exc))
        raise ConfigError(f"checkpoint.dir={root}: cannot create the folder {base}: {why} "
                          f"(set checkpoint.dir to a folder you can write)") from None
    return base.resolve()


class Checkpointer:
    def __init__(self, root: str | Path, run_id: str):
        self.dir = Path(root).expanduser().resolve() / run_id
        self.dir.mkdir(parents=True, exist_ok=True)
        # SHA-256 of the state files known good in this process (written or verified here):
        # only a good state.pt is kept as state.prev.pt when the next one is saved
        self._good: dict[str, str] = {}

    @property
    def state_path(self) -> Path:
        return self.dir / STATE

    @property
    def log_path(self) -> Path:
        return self.dir / "run.log"

    def save(self, state: dict, meta: dict) -> None:
        """Write the new state to a temp file and hash it; record its checksum and that of the
        checkpoint it replaces in meta.json; then keep the old state.pt as state.prev.pt and
        rename the new one into place. A crash between any two steps leaves a state file whose
        checksum meta.json records."""
        import torch

        tmp = self.dir / (STATE + ".tmp")

        def write(path: Path) -> None:
            with open(path, "wb") as fh:   # a Python file: a full disk raises OSError(ENOSPC)
                torch.save(state, fh)
                fh.flush()
                os.fsync(fh.fileno())

        with _writing(self.state_path, tmp):
            write(tmp)
            new = file_sha256(tmp)
            previous = self._good.get(STATE) or self._good.get(PREVIOUS)
            checksums = {STATE: new, **({PREVIOUS: previous} if previous else {})}
            self.write_meta({**meta, "checksums": checksums})
            if STATE in self._good:
                os.replace(self.state_path, self.dir / PREVIOUS)
            os.replace(tmp, self.state_path)
        self._good = checksums

    def write_meta(self, meta: dict) -> None:
        _atomic_write(self.dir / "meta.json", _write_text(json.dumps(meta, indent=1)))

    def write_config(self, text: str) -> None:
        _atomic_write(self.dir / "config.yaml", _write_text(text))

    def meta(self) -> dict:
        path = self.dir / "meta.json"
        return read_meta(path) if path.exists() else {}

    def load(self) -> dict:
        """The newest state whose checksum meta.json records, else the one before it (with a
        warning); a ConfigError naming every file and what is wrong with it when neither is good.
        Checkpoints written before checksums were recorded load unverified."""
        recorded = set(self.meta().get("checksums", {}).values())
        if not recorded:
            return _torch_load(self.state_path)
        problems = []
        for name in (STATE, PREVIOUS):
            path = self.dir / name
            problem, sha = _verify(path, recorded)
            if problem is None:
                state = _torch_load(path)
                if problems:
                    log.warning("checkpoint %s %s; resuming from the previous checkpoint %s "
                                "(experience %s)", self.state_path, problems[0], path, state.get("next"))
                self._good = {name: sha}
                return state
            problems.append(problem)
        raise ConfigError(f"cannot resume from {self.dir}: {STATE} {problems[0]}, and {PREVIOUS} "
                          f"{problems[1]}; this run cannot be continued: start it again without "
                          f"--resume")


def _verify(path: Path, recorded: set[str]) -> tuple[str | None, str | None]:
    """(what is wrong with ``path``, or None; its SHA-256)."""
    if not path.exists():
        return "is missing", None
    size = path.stat().st_size
    if size == 0:
        return "is empty (0 bytes)", None
    sha = file_sha256(path)
    if sha not in recorded:
        return (f"is damaged: its SHA-256 does not match the one recorded in meta.json when it was "
                f"saved ({size} bytes on disk: truncated or overwritten)"), sha
    return None, sha


def _torch_load(path: Path) -> dict:
    import torch

    if not path.exists() or path.stat().st_size == 0:
        raise ConfigError(f"cannot resume: checkpoint {path} is "
                          f"{'missing' if not path.exists() else 'empty (0 bytes)'}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"cannot resume: checkpoint {path} cannot be read, it is damaged or "
                          f"incomplete ({type(exc).__name__}: {first})") from None


def read_meta(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: it is damaged or half-written ({exc})") from None
    if not isinstance(meta, dict):
        raise ConfigError(f"cannot read {path}: it is damaged (not a JSON object)")
    return meta


def find_resumable(root: str | Path, run_id: str | None, cfg_hash: str) -> Path:
    """The checkpoint folder to resume: the given run's, or the newest unfinished one whose
    config matches. A damaged meta.json of another run is skipped with a warning."""
    base = Path(root).expanduser().resolve()
    if run_id:
        folder = base / run_id
        if not (folder / "meta.json").exists():
            raise ConfigError(f"--resume {run_id}: no checkpoint in {folder} "
                              f"(checkpoint.dir={root}); is it the right folder?")
        read_meta(folder / "meta.json")   # damaged: said here, naming the file
        return folder
    candidates = []
    for meta_path in base.glob("*/meta.json"):
        try:
            meta = read_meta(meta_path)
        except ConfigError as exc:
            log.warning("--resume: skipping another run's checkpoint: %s", exc)
            continue
        if not meta.get("finished") and meta.get("config_hash") == cfg_hash:
            candidates.append((meta_path.stat().st_mtime, meta_path.parent))
    if not candidates:
        raise ConfigError(f"--resume: no unfinished run of this config under {base}; "
                          f"pass the run id (--resume RUN_ID) or start it without --resume")
    return max(candidates)[1]


def rng_state() -> dict:
    import numpy as np
    import torch

    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_state[1].copy()),
             "numpy_pos": int(np_state[2]), "python": repr(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import ast

    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32),
                         state["numpy_pos"], 0, 0.0))
    random.setstate(ast.literal_eval(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
