"""``lethe run CONFIG --slurm``: one run as one SLURM job, through the sweep's machinery.

The job (``slurm.nodes`` × ``slurm.tasks_per_node`` tasks, one rank each) runs the resolved
config written to ``<checkpoint.dir>/slurm/<submission id>/run.yaml``; its MLflow run carries
the submission id as a tag. Requeued (preemption, timeout, ``scontrol requeue``), the new job
finds that run and continues it from its checkpoint, as a sweep member does.
"""
from __future__ import annotations

import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import submitit

from lethe import tags as T
from lethe.errors import ConfigError, LetheError
from lethe.platform.sweep.jobs import (
    LetheJob,
    SqueueMonitor,
    ended_outcome,
    has_result,
    join_ranks,
    make_executor,
    resumable_run,
)
from lethe.platform.sweep.plan import (
    Member,
    _check_ranks,
    member_config_text,
    parse_options,
    split_sweep_overrides,
)


@dataclass
class RunSpec:
    config_path: str
    submission: str
    tracking_uri: str
    experiment: str
    cwd: str
    threads: int


class RunJob(LetheJob):
    """The job: ``lethe run`` of the spec's config, continuing its own run after a requeue."""

    def _run(self, spec: RunSpec) -> dict:
        from mlflow.tracking import MlflowClient

        from lethe.platform.config import load_config
        from lethe.platform.runner import run_experiment

        cfg = load_config(spec.config_path)
        lead = join_ranks()
        client = MlflowClient(spec.tracking_uri)
        exp = client.get_experiment_by_name(spec.experiment)
        runs = [] if exp is None else client.search_runs(
            [exp.experiment_id], filter_string=f"tags.`{T.SUBMISSION}` = '{spec.submission}'",
            order_by=["attributes.start_time DESC"])
        resume_id, finished = resumable_run(client, runs, cfg.checkpoint.dir, lead)
        if finished:
            return {"run_id": resume_id, "status": "FINISHED"}
        result = run_experiment(cfg, resume_run_id=resume_id, tags={T.SUBMISSION: spec.submission})
        if lead:
            print(result.summary, flush=True)
        return {"run_id": result.run_id, "status": result.status}

    def checkpoint(self, spec: RunSpec):
        """Timeout or preemption: requeue; the new job resumes the run from its checkpoint."""
        return submitit.helpers.DelayedSubmission(self, spec)


def submit(config: str, overrides: list[str], wait: bool = True, out=sys.stdout) -> int:
    """Validate, submit the job and (by default) wait for it; returns the exit code."""
    from lethe.platform.config import load_config
    from lethe.platform.tracking import Tracker, resolve_tracking_uri

    items, cfg_overrides = split_sweep_overrides(overrides)
    opts = parse_options({}, [*items, "executor=slurm"])
    cfg = load_config(config, cfg_overrides)
    _check_ranks([Member(0, "run", {}, [], cfg)], opts)
    # the store and experiment exist before the job's ranks look for their run (two processes
    # creating one SQLite schema at once collide)
    Tracker(cfg.tracking.uri, cfg.tracking.experiment)
    folder = Path(os.path.expanduser(cfg.checkpoint.dir)).resolve() / "slurm" / uuid.uuid4().hex[:12]
    folder.mkdir(parents=True)
    plan = _Paths(resolve_tracking_uri(cfg.tracking.uri), str(folder.parent.parent))
    (folder / "run.yaml").write_text(member_config_text(plan, Member(0, "slurm", {}, [], cfg)))
    spec = RunSpec(str(folder / "run.yaml"), folder.name, plan.tracking_uri,
                   cfg.tracking.experiment, os.getcwd(), opts.slurm.cpus)
    job = make_executor(opts, folder / "jobs", cfg.name).submit(RunJob(), spec)
    print(f"submitted SLURM job {job.job_id} (submission {folder.name}); logs: {job.paths.stdout}",
          file=out, flush=True)
    if not wait:
        return 0
    outcome = _wait(job, opts.poll_s)
    if outcome["state"] != "FINISHED":
        raise LetheError(f"SLURM job {job.job_id}: {outcome['state']}: {outcome.get('error')}")
    print(f"MLflow run {outcome['run_id']} FINISHED — experiment '{cfg.tracking.experiment}' at "
          f"{plan.tracking_uri}", file=out)
    return 0


@dataclass
class _Paths:   # what member_config_text needs of a plan
    tracking_uri: str
    checkpoint_dir: str


def _wait(job, poll_s: float) -> dict:
    """The job's outcome once it ended (squeue: it works without SLURM accounting)."""
    monitor, gone = SqueueMonitor(), None
    while not has_result(job.task(0) if job.num_tasks > 1 else job):
        live = monitor.live_states([str(job.job_id)])
        if live is not None and str(job.job_id) not in live:
            gone = gone or time.time()
            if time.time() - gone > 30:    # a shared file system may show the result late
                break
        time.sleep(poll_s)
    return ended_outcome(job)


__all__ = ["RunJob", "RunSpec", "submit", "ConfigError"]
