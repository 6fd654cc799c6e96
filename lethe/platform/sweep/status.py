"""``lethe sweep --status``: find a sweep's folder, tell each member's state from its job, its
MLflow run and its checkpoint, and format it with the paths of its logs."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from lethe import tags as T
from lethe.errors import ConfigError
from lethe.platform.sweep.jobs import SqueueMonitor, ended_outcome, rebuild_job
from lethe.platform.sweep.plan import resolve_tracking_uri, split_sweep_overrides
from lethe.platform.sweep.state import member_runs, read_state

TERMINAL = ("FINISHED", "FAILED", "KILLED")


@dataclass
class MemberStatus:
    index: int
    label: str
    state: str                # FINISHED | FAILED | KILLED | RUNNING | PENDING | ... | NOT SUBMITTED
    run_id: str | None
    progress: str             # "3/5 experiences" from the checkpoint metadata
    job_id: str | None
    logs: list                # paths: job stdout/stderr, the run's run.log
    error: str | None = None


def find_sweep(parent_id: str, overrides: list[str] | None = None) -> Path:
    """The sweep folder of a parent run: under the default/given folder, else via MLflow."""
    sweep_items, rest = split_sweep_overrides(list(overrides or []))
    dot = OmegaConf.from_dotlist(rest) if rest else OmegaConf.create()
    folder = OmegaConf.select(OmegaConf.from_dotlist(sweep_items), "folder") if sweep_items else None
    ck = OmegaConf.select(dot, "checkpoint.dir") or "lethe_runs"
    root = Path(folder).expanduser() if folder else Path(ck).expanduser() / "sweeps"
    if (root / parent_id / "sweep.json").exists():
        return (root / parent_id).resolve()
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(OmegaConf.select(dot, "tracking.uri"))
    try:
        run = MlflowClient(uri).get_run(parent_id)
    except Exception:
        raise ConfigError(f"no sweep '{parent_id}': no {root / parent_id / 'sweep.json'} and no such "
                          f"MLflow run at {uri} (pass tracking.uri=... or checkpoint.dir=... as "
                          f"when the sweep was started)") from None
    folder = run.data.tags.get(T.SWEEP_FOLDER)
    if not folder or not (Path(folder) / "sweep.json").exists():
        raise ConfigError(f"run {parent_id} is not a sweep parent with a readable sweep folder "
                          f"(tag {T.SWEEP_FOLDER}={folder!r})")
    return Path(folder)


def member_status(sweep_dir: Path) -> tuple[dict, list[MemberStatus]]:
    from mlflow.tracking import MlflowClient

    state = read_state(sweep_dir)
    client = MlflowClient(state["tracking_uri"])
    runs: dict[int, Any] = {}
    for run in member_runs(client, state["experiment"], state["parent_run_id"]):
        runs.setdefault(T.member_index(run.data.tags), run)  # newest first
    last_jobs = [m["jobs"][-1] for m in state["members"] if m.get("jobs")]
    live = SqueueMonitor().live_states([j["job_id"] for j in last_jobs]) \
        if state["executor"] == "slurm" else {}
    rows = [_member_row(state, m, runs.get(m["index"]), live) for m in state["members"]]
    return state, rows


def _member_row(state: dict, m: dict, run, live: dict | None) -> MemberStatus:
    job = m["jobs"][-1] if m.get("jobs") else None
    logs = [job["stdout"], job["stderr"]] if job else []
    progress = ""
    if run is not None:
        folder = Path(state["checkpoint_dir"]) / run.info.run_id
        meta = folder / "meta.json"
        if meta.exists():
            info = json.loads(meta.read_text())
            progress = f"{info.get('next_experience')}/{info.get('n_experiences')} experiences"
        if (folder / "run.log").exists():
            logs.append(str(folder / "run.log"))
    st, error = _member_state(state, m, job, run, live)
    if st == "FAILED" and run is not None and not error:
        error = "the run is FAILED in MLflow; see run.log"
    return MemberStatus(m["index"], m["label"], st, run.info.run_id if run else None, progress,
                        job["job_id"] if job else None, logs, error)


def _member_state(state: dict, m: dict, job: dict | None, run, live: dict | None):
    """(state, error): the scheduler's word while the job lives, else MLflow's, else the
    outcome recorded by the waiting `lethe sweep`, else what the job left behind."""
    error = (m.get("outcome") or {}).get("error")
    slurm = state["executor"] == "slurm"
    if job and job["job_id"] in (live or {}) and (run is None or run.info.status != "FINISHED"):
        return live[job["job_id"]], error
    if run is not None and run.info.status in TERMINAL:
        return run.info.status, error
    if m.get("outcome"):
        return m["outcome"]["state"], error
    if job is None:
        return "NOT SUBMITTED", error
    if not slurm and _pid_alive(job["job_id"]):
        return "RUNNING", error
    if run is not None and run.info.status == "RUNNING" and slurm:
        if live is None:
            return "UNKNOWN", error or "squeue did not answer; try again"
        return "LOST", error or "the run is RUNNING in MLflow but its job is gone"
    outcome = ended_outcome(rebuild_job(state["executor"], job))
    return outcome["state"], error or outcome.get("error")


def _pid_alive(job_id: str) -> bool:
    """A local member's job id is the pid of its process."""
    try:
        os.kill(int(job_id), 0)
        return True
    except (ValueError, OSError):
        return False


def format_status(state: dict, rows: list[MemberStatus]) -> str:
    lines = [f"sweep {state['parent_run_id']} · experiment '{state['experiment']}' · "
             f"{state['executor']} · {len(rows)} members · {state['tracking_uri']}"]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.state] = counts.get(r.state, 0) + 1
    lines.append("  " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    for r in rows:
        lines.append(f"  [{r.index}] {r.state:<9} {r.label}"
                     + (f"  run {r.run_id}" if r.run_id else "")
                     + (f"  job {r.job_id}" if r.job_id else "")
                     + (f"  {r.progress}" if r.progress else ""))
        if r.error:
            lines.append(f"      error: {r.error}")
        for path in r.logs:
            lines.append(f"      log: {path}")
    page = Path(state.get("page") or "")
    if state.get("page") and page.exists():
        lines.append(f"comparison page: {page}")
    return "\n".join(lines)
