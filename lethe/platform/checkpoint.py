"""Atomic, resumable checkpoints: state_dicts + JSON metadata, one folder per run.

``<checkpoint.dir>/<mlflow run id>/`` holds ``state.pt`` (model, optimizer, method state,
RNG states, prediction store), ``meta.json`` (progress, tracking coordinates) and the
resolved ``config.yaml``. Writes go to a temp file renamed over the old one, so a crash
(even SIGKILL) leaves the previous checkpoint intact. Loads use ``weights_only=True``.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

from lethe.errors import ConfigError


def config_hash(config_yaml: str) -> str:
    return hashlib.sha256(config_yaml.encode()).hexdigest()[:16]


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


class Checkpointer:
    def __init__(self, root: str | Path, run_id: str):
        self.dir = Path(root).expanduser().resolve() / run_id
        self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def state_path(self) -> Path:
        return self.dir / "state.pt"

    @property
    def log_path(self) -> Path:
        return self.dir / "run.log"

    def save(self, state: dict, meta: dict) -> None:
        import torch

        _atomic_write(self.state_path, lambda p: torch.save(state, p))
        self.write_meta(meta)

    def write_meta(self, meta: dict) -> None:
        _atomic_write(self.dir / "meta.json", lambda p: p.write_text(json.dumps(meta, indent=1)))

    def write_config(self, text: str) -> None:
        _atomic_write(self.dir / "config.yaml", lambda p: p.write_text(text))

    def meta(self) -> dict:
        path = self.dir / "meta.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def load(self) -> dict:
        import torch

        return torch.load(self.state_path, map_location="cpu", weights_only=True)


def find_resumable(root: str | Path, run_id: str | None, cfg_hash: str) -> Path:
    """The checkpoint folder to resume: the given run's, or the newest unfinished one whose
    config matches."""
    base = Path(root).expanduser().resolve()
    if run_id:
        folder = base / run_id
        if not (folder / "meta.json").exists():
            raise ConfigError(f"--resume {run_id}: no checkpoint in {folder} "
                              f"(checkpoint.dir={root}); is it the right folder?")
        return folder
    candidates = []
    for meta_path in base.glob("*/meta.json"):
        meta = json.loads(meta_path.read_text())
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
