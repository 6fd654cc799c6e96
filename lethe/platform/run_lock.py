"""One process at a time per run folder: two processes continuing one run would both train it
and log the same steps into one MLflow run, each overwriting the other's checkpoints."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

from lethe.errors import ConfigError

LOCK_NAME = ".lock"


@contextlib.contextmanager
def run_folder_lock(folder: str | Path, resuming: bool):
    """Hold an exclusive ``flock`` on ``<folder>/.lock`` for the block, or refuse at once
    (ConfigError, exit 2) naming the process that holds it. The kernel drops the lock when its
    holder exits, even by SIGKILL, so a killed run never leaves its folder locked; the file
    holds the holder's pid and whether it is resuming, for the message only."""
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fh = open(folder / LOCK_NAME, "a+")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            raise ConfigError(_held_message(folder.name, fh.read().split())) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()} {'resume' if resuming else 'run'}\n")
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
    finally:
        fh.close()


def _held_message(run_id: str, holder: list[str]) -> str:
    pid = holder[0] if holder else "unknown"   # the holder may not have written it yet
    doing = "already being resumed by" if holder[1:] == ["resume"] else "still running in"
    return (f"run {run_id} is {doing} another process (pid {pid}); wait for it to end, or stop "
            f"it, before resuming the run")
