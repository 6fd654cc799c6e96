"""What a run needs to be traced and re-run: package versions, hardware, git state, data.

Everything here is captured on every run (tags + `environment.json`, `pip_freeze.txt`,
`git_diff.patch` when the source tree is dirty) and read back by `lethe reproduce`.
"""
from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

# Packages whose versions change numbers; `lethe reproduce` warns, naming them, on a mismatch.
KEY_PACKAGES = ("lethe-lab", "torch", "torchvision", "avalanche-lib", "peft", "transformers",
                "timm", "mlflow", "numpy", "scikit-learn")


def package_versions() -> dict[str, str]:
    out = {}
    for name in KEY_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def pip_freeze() -> str:
    """`name==version` of every installed distribution, sorted (what `pip freeze` lists)."""
    seen = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and name.lower() not in seen:
            seen[name.lower()] = f"{name}=={dist.version}"
    return "\n".join(seen[k] for k in sorted(seen)) + "\n"


def hardware() -> dict[str, str]:
    import torch

    info = {"cpu_count": str(os.cpu_count()), "machine": platform.machine(),
            "cuda": str(torch.version.cuda), "cuda_available": str(torch.cuda.is_available()),
            "torch_threads": str(torch.get_num_threads())}
    if torch.cuda.is_available():
        info["gpus"] = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return info


def git_state() -> dict[str, str]:
    """Commit, dirty flag and diff of the lethe source tree (empty outside a checkout)."""
    here = Path(__file__).resolve().parent

    def git(*args):
        return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {}
        status = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
        state = {"commit": head.stdout.strip(), "dirty": str(bool(status))}
        if status:
            state["diff"] = git("diff", "HEAD").stdout
        return state
    except (OSError, subprocess.SubprocessError):
        return {}


def _digest(*tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().to(dtype=t.dtype).numpy().tobytes())
    return h.hexdigest()[:16]


def data_fingerprints(stream) -> dict[str, str]:
    """Hash of (sample ids, labels) per learn experience and of the test set.

    Same ids and labels in the same order → same fingerprint; one changed label, one
    added/removed sample or another class order → a different one.
    """
    import torch

    out = {}
    for exp in stream.experiences:
        if exp.kind == "learn" and exp.train is not None:
            data = exp.train.dataset
            ids = torch.as_tensor(list(data.sample_id), dtype=torch.long)
            labels = torch.as_tensor(list(data.targets), dtype=torch.long)
            out[f"train_exp_{exp.index}"] = _digest(ids, labels)
        elif exp.kind == "forget" and exp.request is not None:
            out[f"forget_exp_{exp.index}"] = _digest(torch.as_tensor(exp.request.sample_ids).long())
    t = stream.test
    out["test"] = _digest(t.ids.long(), t.y.long(), t.exp.long())
    return out


def capture(stream) -> dict:
    """The whole record (JSON-able)."""
    return {"python": sys.version.split()[0], "packages": package_versions(),
            "hardware": hardware(), "git": {k: v for k, v in git_state().items() if k != "diff"},
            "data": data_fingerprints(stream)}


def tags_of(record: dict) -> dict[str, str]:
    """Flat MLflow tags of a captured record (searchable in the UI)."""
    tags = {"env.python": record["python"]}
    tags.update({f"env.pkg.{k}": v for k, v in record["packages"].items()})
    tags.update({f"env.hw.{k}": v for k, v in record["hardware"].items()})
    if record["git"]:
        tags["git.commit"] = record["git"]["commit"]
        tags["git.dirty"] = record["git"]["dirty"]
    tags.update({f"data.fp.{k}": v for k, v in record["data"].items()})
    return tags
