"""Where a sweep lives: its MLflow parent run and member runs, and its folder
``<sweep.folder or checkpoint.dir/sweeps>/<parent run id>/`` with ``sweep.json`` (members,
job ids, log paths, outcomes) and the member configs ``members/<k>.yaml``."""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

from lethe import tags as T
from lethe.platform.sweep.plan import SweepOptions, SweepPlan, member_config_text


def write_state(sweep_dir: Path, state: dict) -> None:
    """Replace ``sweep.json`` atomically: a reader never sees half a file."""
    path = sweep_dir / "sweep.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, path)


def read_state(sweep_dir: Path) -> dict:
    return json.loads((sweep_dir / "sweep.json").read_text())


def threads_per_member(opts: SweepOptions) -> int:
    if opts.executor == "slurm":
        return opts.slurm.cpus
    return max(1, (os.cpu_count() or 1) // opts.max_parallel)


def create_sweep(p: SweepPlan, out) -> tuple[Path, dict]:
    """Start the parent run, write the sweep folder and its member configs; nothing submitted."""
    from lethe.platform.tracking import Tracker

    opts = p.options
    tracker = Tracker(p.tracking_uri, p.experiment)
    params = {f"sweep.grid.{k}": ",".join(v) for k, v in p.grid.items()}
    params.update({"sweep.seeds": str(opts.seeds), "sweep.executor": opts.executor,
                   "sweep.members": str(len(p.members)), "sweep.config": p.source})
    parent = tracker.start(f"sweep {p.name}", params,
                           {**T.parent_tags(T.SWEEP), T.SWEEP_EXECUTOR: opts.executor})
    root = Path(opts.folder).expanduser().resolve() if opts.folder else Path(p.checkpoint_dir) / "sweeps"
    sweep_dir = root / parent
    (sweep_dir / "members").mkdir(parents=True, exist_ok=True)
    tracker.set_tag(T.SWEEP_FOLDER, str(sweep_dir))
    members = []
    for m in p.members:
        path = sweep_dir / "members" / f"{m.index}.yaml"
        path.write_text(member_config_text(p, m))
        members.append({"index": m.index, "label": m.label, "grid": m.grid, "overrides": m.overrides,
                        "config": str(path), "jobs": [], "outcome": None})
    state = {"parent_run_id": parent, "tracking_uri": p.tracking_uri, "experiment": p.experiment,
             "name": p.name, "source": p.source, "executor": opts.executor,
             "options": dataclasses.asdict(opts), "grid": p.grid, "cwd": os.getcwd(),
             "threads": threads_per_member(opts), "created": time.time(), "members": members,
             "checkpoint_dir": p.checkpoint_dir, "finalized": False}
    write_state(sweep_dir, state)
    tracker.log_text(json.dumps({"grid": p.grid, "seeds": p.seeds, "options": state["options"]},
                                indent=1), "sweep.json")
    print(f"sweep {parent}: {len(members)} members ({opts.executor}) in experiment "
          f"'{p.experiment}' at {p.tracking_uri}\nsweep folder: {sweep_dir}", file=out, flush=True)
    return sweep_dir, state


def end_parent(state: dict, status: str) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(state["tracking_uri"]).set_terminated(state["parent_run_id"], status=status)


def member_runs(client, experiment: str, parent_id: str, index: int | None = None) -> list:
    """Live (not deleted) MLflow runs of the sweep's members, newest first.

    A member is found by its index tag, or by the older index tag in sweeps logged before the
    shared tag scheme (so those can still be resumed)."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    filt = f"tags.`{T.PARENT_RUN}` = '{parent_id}'"
    filters = [filt] if index is None else [f"{filt} and tags.`{key}` = '{index}'"
                                            for key in (T.MEMBER, T.LEGACY_SWEEP_MEMBER)]
    for text in filters:
        runs = client.search_runs([exp.experiment_id], filter_string=text, max_results=5000,
                                  order_by=["attributes.start_time DESC"])
        if runs:
            return runs
    return []
