"""Ending a sweep: the parent run's status, member counts, mean/std/CI over seeds and the
comparison page; and the two ways into a sweep that end there, ``launch`` and ``resume``."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from lethe.errors import ConfigError, RunError
from lethe.platform.sweep.jobs import SLURM_ACTIVE, run_members
from lethe.platform.sweep.plan import SweepPlan, options_of
from lethe.platform.sweep.state import create_sweep, write_state
from lethe.platform.sweep.status import find_sweep, format_status, member_status


def launch(p: SweepPlan, wait: bool | None = None, out=sys.stdout) -> dict:
    """Create the parent run and the sweep folder, submit every member, and (by default) wait
    for them and finalize. Returns the sweep state (``sweep.json`` content)."""
    wait = p.options.wait if wait is None else wait
    if p.options.executor == "local":
        wait = True  # local members are children of this process
    sweep_dir, state = create_sweep(p, out)
    return _run_and_finalize(sweep_dir, state, [m["index"] for m in state["members"]], wait, out)


def resume(parent_id: str, overrides: list[str] | None = None, wait: bool | None = None,
           out=sys.stdout) -> dict:
    """Re-submit every member that did not finish; each continues its run from its checkpoint."""
    sweep_dir = find_sweep(parent_id, overrides)
    state, rows = member_status(sweep_dir)
    active = [r for r in rows if r.state in SLURM_ACTIVE or r.state == "RUNNING"]
    if active:
        raise ConfigError(f"sweep {parent_id}: members {[r.index for r in active]} are still "
                          f"{'/'.join(sorted({r.state for r in active}))}; wait for them "
                          f"(lethe sweep --status {parent_id}) or cancel them first")
    todo = [r.index for r in rows if r.state != "FINISHED"]
    if not todo:
        print(f"sweep {parent_id}: every member FINISHED; nothing to resume", file=out)
        return state
    from mlflow.tracking import MlflowClient

    MlflowClient(state["tracking_uri"]).update_run(parent_id, status="RUNNING")
    state["finalized"] = False
    print(f"sweep {parent_id}: resuming members {todo}", file=out, flush=True)
    opts = options_of(state)
    return _run_and_finalize(sweep_dir, state, todo, opts.wait if wait is None else wait, out)


def _run_and_finalize(sweep_dir: Path, state: dict, indices: list[int], wait: bool, out) -> dict:
    if run_members(sweep_dir, state, indices, wait, out, finalizer=finalize_job):
        return finalize(sweep_dir, out=out)
    return state


def finalize_job(sweep_dir: str) -> dict:
    """The finalizer job of a SLURM sweep that was not waited for."""
    return finalize(Path(sweep_dir))


def _log_seed_aggregates(client, parent: str, run_ids: list[str]) -> None:
    """mean / std / 95% CI over the seeds of each grid point, on the parent run.

    One grid point: ``<metric>/mean`` etc.; several: ``g<i>/<metric>/mean`` with the grid
    values of g<i> in the parent's ``seed_groups.txt`` artifact.
    """
    from mlflow.entities import Metric

    from lethe.platform.seeds import aggregate_finals

    groups: dict[tuple, list] = {}
    for run_id in run_ids:
        run = client.get_run(run_id)
        key = tuple(sorted((k, v) for k, v in run.data.params.items()
                           if k not in ("seed", "tracking.run_name")))   # the name carries the seed
        groups.setdefault(key, []).append(run.data.metrics)
    groups = {k: v for k, v in groups.items() if len(v) > 1}
    if not groups:
        return
    ts, metrics, lines = int(time.time() * 1000), [], []
    for i, (key, finals) in enumerate(sorted(groups.items())):
        prefix = "" if len(groups) == 1 else f"g{i}/"
        for name, value in aggregate_finals(finals).items():
            metrics.append(Metric(prefix + name, value, ts, 0))
        varying = {k: v for k, v in key if any(dict(other).get(k) != v for other in groups)}
        lines.append(f"{prefix.rstrip('/') or 'all'}: {len(finals)} seeds, {varying or 'single grid point'}")
    for i in range(0, len(metrics), 500):
        client.log_batch(parent, metrics=metrics[i:i + 500])
    client.log_text(parent, "\n".join(lines) + "\n", "seed_groups.txt")


def finalize(sweep_dir: Path, out=None) -> dict:
    """End the parent run (FINISHED only when every member FINISHED), log member counts, and
    write + log the comparison page of the members."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    state, rows = member_status(sweep_dir)
    client = MlflowClient(state["tracking_uri"])
    parent = state["parent_run_id"]
    counts = {s: sum(1 for r in rows if r.state == s) for s in ("FINISHED", "FAILED", "KILLED")}
    ts = int(time.time() * 1000)
    client.log_batch(parent, metrics=[Metric(f"sweep/{k.lower()}", float(v), ts, 0)
                                      for k, v in counts.items()]
                     + [Metric("sweep/members", float(len(rows)), ts, 0)])
    _log_seed_aggregates(client, parent, [r.run_id for r in rows if r.state == "FINISHED" and r.run_id])
    _write_page(sweep_dir, state, [r.run_id for r in rows if r.run_id])
    all_ok = counts["FINISHED"] == len(rows)
    client.set_terminated(parent, status="FINISHED" if all_ok else "FAILED")
    state["finalized"] = True
    state["result"] = {r.index: r.state for r in rows}
    write_state(sweep_dir, state)
    if out is not None:
        print(format_status(state, rows), file=out, flush=True)
    return state


def _write_page(sweep_dir: Path, state: dict, run_ids: list[str]) -> None:
    """compare.html of the members, in the sweep folder and on the parent run."""
    if not run_ids:
        return
    from lethe.dashboards.compare import write_compare

    parent = state["parent_run_id"]
    try:
        page = write_compare(state["tracking_uri"], run_ids=run_ids, out=sweep_dir / "compare.html",
                             title=f"sweep {state['name']} ({parent[:8]})", log_to=parent)
        state["page"] = str(page.path)
    except ConfigError as exc:  # e.g. no member logged a metric: the page is optional
        state["page_error"] = str(exc)


def sweep_exit_code(state: dict) -> int:
    if not state.get("finalized"):
        return 0
    bad = {i: s for i, s in (state.get("result") or {}).items() if s != "FINISHED"}
    return 0 if not bad else RunError.exit_code

