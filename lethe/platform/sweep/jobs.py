"""Sweep jobs: the member job that runs on the worker, and submitting members and waiting for
them where ``lethe sweep`` runs (local subprocesses with bounded parallelism, or one SLURM
array job).

Preemption and timeouts: a member is a ``submitit.helpers.Checkpointable``. SLURM signals
the job before its time limit (or when preempting it); submitit calls
:meth:`MemberJob.checkpoint` and requeues the job. Whether requeued that way or by hand
(``scontrol requeue``), the new job finds its member's MLflow run through the parent/member
tags and continues the same run from ``<checkpoint.dir>/<run id>/``, i.e. from the last
finished experience.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit  # light (no torch); this package is imported only by `lethe sweep`

from lethe import tags as T
from lethe.errors import ConfigError
from lethe.platform.sweep.plan import SweepOptions, options_of
from lethe.platform.sweep.state import end_parent, member_runs, write_state

LOCAL_TIMEOUT_MIN = 7 * 24 * 60           # local members have no time limit worth the name


@dataclass
class MemberSpec:
    """What a member job needs; pickled by submitit into the job folder."""
    index: int
    label: str
    config_path: str
    parent_run_id: str
    tracking_uri: str
    experiment: str
    cwd: str
    threads: int


def spec_of(state: dict, index: int) -> MemberSpec:
    m = state["members"][index]
    return MemberSpec(index=index, label=m["label"], config_path=m["config"],
                      parent_run_id=state["parent_run_id"], tracking_uri=state["tracking_uri"],
                      experiment=state["experiment"], cwd=state["cwd"], threads=state["threads"])


# --- the member job (runs on the worker) ------------------------------------------------------
class LetheJob(submitit.helpers.Checkpointable):
    """A job that runs lethe in its process (a sweep member, a `lethe run --slurm`): ``spec``
    names its ``cwd`` and torch ``threads``; subclasses implement ``_run(spec)``."""

    def __call__(self, spec) -> dict:
        with warnings.catch_warnings():
            # library deprecations (Avalanche warns on every run) would bury the job's log
            warnings.simplefilter("ignore", DeprecationWarning)
            # the job owns its process, as the CLI owns its: the run's progress reaches run.log
            logging.getLogger("lethe").setLevel(logging.INFO)
            os.chdir(spec.cwd)
            import torch

            if spec.threads > 0:
                torch.set_num_threads(spec.threads)
            return self._run(spec)


class MemberJob(LetheJob):
    """One sweep member; submitit pickles it and runs it in a job with this venv's python."""

    def _run(self, spec: MemberSpec) -> dict:
        from lethe.platform.config import load_config
        from lethe.platform.runner import run_experiment

        cfg = load_config(spec.config_path)
        job_id = _current_job_id()
        lead = join_ranks()
        resume_id, finished = _run_to_resume(spec, cfg.checkpoint.dir, job_id, lead)
        if finished:  # a requeue after the run ended: nothing to do
            return {"run_id": resume_id, "status": "FINISHED", "resumed": False}
        tags = {**T.child_tags(T.SWEEP, spec.parent_run_id, spec.index),
                T.SWEEP_LABEL: spec.label, T.SWEEP_JOB: job_id}
        result = run_experiment(cfg, resume_run_id=resume_id, tags=tags)
        if not lead:   # rank 0 reports the run
            return {"run_id": None, "status": result.status, "resumed": bool(resume_id)}
        print(result.summary, flush=True)
        return {"run_id": result.run_id, "status": result.status, "resumed": bool(resume_id),
                "final": {k: float(v) for k, v in result.final.items()}}

    def checkpoint(self, spec: MemberSpec):
        """Called by submitit on timeout/preemption: requeue the same member. The state is on
        disk (checkpoint after every experience), so the new job resumes the same run."""
        print(f"sweep member {spec.index}: preempted or timed out; requeued to resume from "
              f"its last checkpoint", flush=True)
        return submitit.helpers.DelayedSubmission(self, spec)


def join_ranks() -> bool:
    """In a job of several tasks (slurm.nodes × slurm.tasks_per_node), make this task one rank
    of the run: submitit's TorchDistributedEnvironment exports RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR and MASTER_PORT from SLURM's variables, and the training engine then opens the
    process group as under ``--nproc``. Returns whether this task is rank 0."""
    try:
        env = submitit.JobEnvironment()
    except RuntimeError:   # not in a submitit job (called directly)
        return True
    if env.num_tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return env.global_rank == 0


def _run_to_resume(spec: MemberSpec, checkpoint_dir: str, job_id: str,
                   lead: bool = True) -> tuple[str | None, bool]:
    """The member's run to continue (see :func:`resumable_run`), tagged with this job's id."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(spec.tracking_uri)
    runs = member_runs(client, spec.experiment, spec.parent_run_id, spec.index)
    resume_id, finished = resumable_run(client, runs, checkpoint_dir, lead)
    if resume_id and not finished and lead:
        client.set_tag(resume_id, T.SWEEP_JOB, job_id)
        print(f"sweep member {spec.index} ({spec.label}): resuming MLflow run {resume_id} "
              f"from its checkpoint (job {job_id})", flush=True)
    return resume_id, finished


def resumable_run(client, runs: list, checkpoint_dir: str, lead: bool) -> tuple[str | None, bool]:
    """Of a job's earlier attempts (``runs``, newest first): the newest with a checkpoint, and
    whether it already FINISHED. Attempts that died before their first checkpoint are deleted
    (by rank 0 only: every rank reads the same answer), having nothing to continue."""
    resume_id = None
    for run in runs:
        has_checkpoint = (Path(checkpoint_dir) / run.info.run_id / "meta.json").exists()
        if resume_id is None and has_checkpoint:
            resume_id = run.info.run_id
            if run.info.status == "FINISHED":
                return resume_id, True
        elif lead:
            client.delete_run(run.info.run_id)
    return resume_id, False


def _current_job_id() -> str:
    try:
        return str(submitit.JobEnvironment().job_id)
    except Exception:
        return "?"


# --- job states and outcomes ----------------------------------------------------------------------
class SqueueMonitor:
    """Which SLURM jobs are still queued or running, asked of ``squeue``.

    submitit's own job state (``job.state``, ``job.done()``) comes from ``sacct``, which needs
    SLURM's accounting storage. Clusters without it (the test cluster of scripts/slurm_up.sh
    among them) answer nothing there, so a member cancelled or lost before writing its result
    would look unfinished forever. ``squeue`` answers on every cluster, for all of a sweep's
    jobs in one call; this class is the only place that parses it.
    """

    ACTIVE = frozenset({"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED",
                        "REQUEUE_FED", "REQUEUE_HOLD", "RESIZING", "SUSPENDED", "SIGNALING",
                        "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD"})

    def live_states(self, job_ids: list[str]) -> dict[str, str] | None:
        """job id → state for jobs SLURM still schedules or runs (array tasks as ``A_i``);
        None when squeue cannot answer (then nobody may conclude that a job is gone)."""
        if not job_ids:
            return {}
        if shutil.which("squeue") is None:
            return None
        arrays = sorted({j.split("_")[0] for j in job_ids})
        try:
            out = subprocess.run(["squeue", "-h", "-r", "--states=all", "-o", "%i|%T", "-j",
                                  ",".join(arrays)], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return None
        if out.returncode != 0 and "Invalid job id" not in out.stderr:
            return None
        states = {}
        for line in out.stdout.splitlines():
            jid, _, st = line.strip().partition("|")
            if st in self.ACTIVE:
                states[jid] = st
        return states


SLURM_ACTIVE = SqueueMonitor.ACTIVE


def rebuild_job(executor: str, record: dict) -> submitit.Job:
    """The submitit job of a recorded attempt, rebuilt from its folder and id (asks no scheduler)."""
    cls = submitit.SlurmJob if executor == "slurm" else submitit.LocalJob
    return cls(folder=Path(record["stdout"]).parent, job_id=record["job_id"])


def has_result(job: submitit.Job) -> bool:
    return job.paths.result_pickle.exists()


def ended_outcome(job: submitit.Job) -> dict:
    """The outcome of a job that no longer runs: what the member returned, the exception line
    of its traceback, or FAILED when it was cancelled, killed or lost before writing a result."""
    if job.num_tasks > 1:   # a job of several ranks: rank 0 reports the run
        job = job.task(0)
    if not has_result(job):
        return {"state": "FAILED", "error": f"job {job.job_id} ended without a result "
                f"(cancelled, killed or lost); see {job.paths.stderr}"}
    exc = job.exception()
    if exc is not None:
        return {"state": "FAILED", "error": _error_line(str(exc)) or type(exc).__name__}
    value = job.result()
    return {"state": value.get("status", "FINISHED"), "run_id": value.get("run_id"),
            "resumed": value.get("resumed", False)}


def _error_line(text: str) -> str:
    """``module.SomeError: message`` from a traceback text (submitit appends log paths after it)."""
    found = [ln.strip() for ln in text.splitlines()
             if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b", ln.strip())]
    return found[-1] if found else ""


# --- submission and waiting (runs where `lethe sweep` runs) -----------------------------------
def make_executor(opts: SweepOptions, jobs_dir: Path, name: str):
    if opts.executor == "local":
        ex = submitit.LocalExecutor(folder=jobs_dir / "%j", python=sys.executable,
                                    max_num_timeout=opts.slurm.max_requeues)
        ex.update_parameters(timeout_min=LOCAL_TIMEOUT_MIN)
        return ex
    s = opts.slurm
    ex = submitit.SlurmExecutor(folder=jobs_dir / "%j", python=sys.executable,
                                max_num_timeout=s.max_requeues)
    params: dict[str, Any] = dict(job_name=f"lethe-{name}", time=s.time, cpus_per_task=s.cpus,
                                  array_parallelism=s.array_parallelism,
                                  signal_delay_s=s.signal_delay_s)
    if s.nodes * s.tasks_per_node > 1:   # one rank per task (MemberJob joins them); a rank
        # that fails ends the job's other tasks (they would wait for it in a collective)
        params.update(nodes=s.nodes, ntasks_per_node=s.tasks_per_node,
                      srun_args=["--kill-on-bad-exit=1"])
    optional = {"partition": s.partition, "mem": s.mem, "gpus_per_node": s.gpus_per_node or s.gpus,
                "setup": [str(x) for x in s.setup],
                "additional_parameters": {str(k): v for k, v in s.extra.items()}}
    params.update({k: v for k, v in optional.items() if v})
    try:
        ex.update_parameters(**params)
    except Exception as exc:
        raise ConfigError(f"sweep.slurm: {exc}") from None
    return ex


class Submitter:
    """Submits members and collects their outcomes: local with at most P running, SLURM as one
    array job. A job that ends without a result (scancel, node lost) counts as failed."""

    def __init__(self, state: dict, sweep_dir: Path, opts: SweepOptions):
        self.state, self.dir, self.opts = state, sweep_dir, opts
        self.ex = make_executor(opts, sweep_dir / "jobs", state["name"])
        self.queue = SqueueMonitor()
        self.jobs: dict[int, Any] = {}
        self.gone_since: dict[int, float] = {}

    def save(self) -> None:
        write_state(self.dir, self.state)

    def submit(self, indices: list[int]) -> None:
        if not indices:
            return
        if self.opts.executor == "slurm" and len(indices) > 1:
            with self.ex.batch():
                jobs = [self.ex.submit(MemberJob(), spec_of(self.state, i)) for i in indices]
        else:
            jobs = [self.ex.submit(MemberJob(), spec_of(self.state, i)) for i in indices]
        for i, job in zip(indices, jobs):
            self.jobs[i] = job
            self.state["members"][i].setdefault("jobs", []).append(
                {"job_id": str(job.job_id), "stdout": str(job.paths.stdout),
                 "stderr": str(job.paths.stderr), "submitted": time.time()})
            self.state["members"][i]["outcome"] = None
        self.save()

    def _ended_without_result(self, i: int, job, live: dict | None) -> bool:
        if self.opts.executor == "local":
            return job.done()
        if live is None or str(job.job_id) in live:  # running, or squeue did not answer
            self.gone_since.pop(i, None)
            return False
        # absent from squeue (or in a terminal state) and no result file: allow for a shared
        # file system being slow to show the result before calling it lost
        first = self.gone_since.setdefault(i, time.time())
        return time.time() - first > 30

    def poll(self) -> dict[int, dict]:
        """Outcomes of jobs that ended since the last poll."""
        live = self.queue.live_states([str(j.job_id) for j in self.jobs.values()]) \
            if self.opts.executor == "slurm" and self.jobs else {}
        ended = {}
        for i, job in list(self.jobs.items()):
            if has_result(job) or self._ended_without_result(i, job, live):
                ended[i] = self.state["members"][i]["outcome"] = ended_outcome(job)
                del self.jobs[i]
        if ended:
            self.save()
        return ended

    def cancel_all(self) -> None:
        for job in self.jobs.values():
            job.cancel(check=False)


def run_members(sweep_dir: Path, state: dict, indices: list[int], wait: bool, out,
                finalizer: Callable[[str], dict]) -> bool:
    """Submit the members and wait until every one ended (failed ones re-submitted up to
    ``retries`` times); True when all ended. A SLURM sweep that does not wait submits
    ``finalizer(sweep dir)`` as a job after the members instead and returns False."""
    opts = options_of(state)
    sub = Submitter(state, sweep_dir, opts)
    retries = {i: opts.retries for i in indices}
    try:
        if opts.executor == "slurm":
            sub.submit(indices)
            ids = sorted({state["members"][i]["jobs"][-1]["job_id"].split("_")[0] for i in indices})
            print(f"submitted SLURM job(s) {', '.join(ids)}; logs under {sweep_dir / 'jobs'}",
                  file=out, flush=True)
            if not wait:
                _submit_finalizer(sub, finalizer, ids)
                print(f"not waiting: follow with `lethe sweep --status {state['parent_run_id']}`",
                      file=out, flush=True)
                return False
            indices = []
        _wait(sub, list(indices), retries, out)
    except KeyboardInterrupt:
        if opts.executor == "local":
            sub.cancel_all()
            end_parent(state, "KILLED")
        else:
            print(f"\nstopped waiting; the SLURM jobs keep running. Follow them with "
                  f"`lethe sweep --status {state['parent_run_id']}`", file=sys.stderr)
        raise
    return True


def _wait(sub: Submitter, pending: list[int], retries: dict[int, int], out) -> None:
    opts = sub.opts
    while pending or sub.jobs:
        room = opts.max_parallel - len(sub.jobs) if opts.executor == "local" else len(pending)
        if pending and room > 0:
            sub.submit(pending[:room])
            pending = pending[room:]
        for i, outcome in sub.poll().items():
            label = sub.state["members"][i]["label"]
            if outcome["state"] == "FINISHED":
                print(f"  member {i} ({label}): FINISHED, run {outcome.get('run_id')}",
                      file=out, flush=True)
            elif retries.get(i, 0) > 0:
                retries[i] -= 1
                print(f"  member {i} ({label}): {outcome['state']} ({outcome.get('error')}); "
                      f"retrying from its checkpoint", file=out, flush=True)
                pending.append(i)
            else:
                print(f"  member {i} ({label}): {outcome['state']}: {outcome.get('error')}",
                      file=out, flush=True)
        if pending or sub.jobs:
            time.sleep(opts.poll_s)


def _submit_finalizer(sub: Submitter, finalizer: Callable[[str], dict], array_ids: list[str]) -> None:
    """A small job after the members (afterany) that ends the parent run and logs the page."""
    ex = submitit.SlurmExecutor(folder=sub.dir / "jobs" / "%j", python=sys.executable)
    params = dict(sub.ex.parameters)
    params.pop("array_parallelism", None)
    params.pop("gpus_per_node", None)
    extra = dict(params.pop("additional_parameters", None) or {})
    extra["dependency"] = "afterany:" + ":".join(array_ids)
    params.update(additional_parameters=extra, cpus_per_task=1, time=30,
                  job_name=f"lethe-{sub.state['name']}-finalize")
    ex.update_parameters(**params)
    job = ex.submit(finalizer, str(sub.dir))
    sub.state["finalizer_job"] = {"job_id": str(job.job_id), "stdout": str(job.paths.stdout),
                                  "stderr": str(job.paths.stderr)}
    sub.save()
