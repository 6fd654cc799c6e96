"""Sweeps: a grid × seeds of `lethe run` members under one MLflow parent run.

``lethe sweep CONFIG --grid key=v1,v2 [--grid ...] [--seeds N] [key=value ...]`` (or a
``sweep:`` block in the YAML) expands every combination, validates *every* member config
before anything is submitted (:mod:`.plan`), creates an MLflow parent run and the sweep
folder (:mod:`.state`), and submits one job per member through submitit (:mod:`.jobs`):
``executor=local`` (subprocesses, bounded parallelism) or ``executor=slurm`` (one SLURM
array job). Each member is a ``lethe run`` of its resolved config
(``<sweep dir>/members/<k>.yaml``) in a child MLflow run tagged as in :mod:`lethe.tags`, so
the MLflow UI nests it under the parent and ``lethe compare`` shows the members as groups.
``lethe sweep --status`` reads it all back (:mod:`.status`); when the members ended, the
parent gets member counts, mean/std/CI over seeds and the comparison page ``compare.html``
(:mod:`.finalise`), which also lies in the sweep folder next to submitit's job folders
(``jobs/<job id>/``: stdout/stderr logs).
"""
from lethe.platform.sweep.finalise import finalize, finalize_job, launch, resume, sweep_exit_code
from lethe.platform.sweep.jobs import SLURM_ACTIVE, MemberJob, MemberSpec, SqueueMonitor
from lethe.platform.sweep.plan import (
    Member,
    SlurmOptions,
    SweepOptions,
    SweepPlan,
    parse_grid_args,
    parse_options,
    plan,
    resolve_tracking_uri,
    split_sweep_overrides,
    split_values,
)
from lethe.platform.sweep.status import MemberStatus, find_sweep, format_status, member_status

__all__ = ["SweepOptions", "SlurmOptions", "SweepPlan", "Member", "MemberSpec", "MemberJob",
           "MemberStatus", "SqueueMonitor", "SLURM_ACTIVE", "plan", "parse_grid_args",
           "parse_options", "split_values", "split_sweep_overrides", "resolve_tracking_uri",
           "launch", "resume", "finalize", "finalize_job", "member_status", "format_status",
           "find_sweep", "sweep_exit_code"]
