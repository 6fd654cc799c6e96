"""MLflow tags that tie a group of runs to their parent run, for every kind of group.

``lethe run --seeds N`` (group ``seeds``) and ``lethe sweep`` (group ``sweep``) both make one
parent run holding the aggregates and one child run per member. The parent carries
``ROLE=PARENT`` and ``GROUP``; each child carries ``ROLE=CHILD``, the same ``GROUP``, its
index ``MEMBER`` and MLflow's own ``PARENT_RUN`` (so the MLflow UI nests it under the parent).

Runs logged by older versions used other names (``LEGACY_*``); the readers here accept both.
This module is the ground floor: it imports nothing of lethe.
"""
from __future__ import annotations

from collections.abc import Mapping

ROLE = "lethe.role"
PARENT = "parent"
CHILD = "child"
GROUP = "lethe.group"
SEEDS = "seeds"
SWEEP = "sweep"
MEMBER = "lethe.member"                   # the child's index in its group
PARENT_RUN = "mlflow.parentRunId"         # the parent's run id, on every child

N_SEEDS = "lethe.seeds"                   # on a seeds parent: how many seeds
SWEEP_LABEL = "lethe.sweep.label"         # on a sweep child: "method.mem_size=20 seed=1"
SWEEP_JOB = "lethe.sweep.job_id"          # on a sweep child: job id of the latest attempt
SWEEP_FOLDER = "lethe.sweep.folder"       # on a sweep parent: its sweep folder
SWEEP_EXECUTOR = "lethe.sweep.executor"   # on a sweep parent: local | slurm
SUBMISSION = "lethe.slurm.submission"     # on a `lethe run --slurm` run: its submission's id

LEGACY_SWEEP_ROLE = "lethe.sweep.role"    # "parent" on a sweep parent
LEGACY_SWEEP_PARENT = "lethe.sweep.parent"
LEGACY_SWEEP_MEMBER = "lethe.sweep.member"
LEGACY_SEEDS_PARENT = "seed-parent"       # the ROLE value of a seeds parent
LEGACY_SEED_INDEX = "lethe.seed_index"


def parent_tags(group: str) -> dict[str, str]:
    return {ROLE: PARENT, GROUP: group}


def child_tags(group: str, parent_run_id: str, member: int) -> dict[str, str]:
    return {ROLE: CHILD, GROUP: group, PARENT_RUN: parent_run_id, MEMBER: str(member)}


def is_parent(tags: Mapping[str, str]) -> bool:
    role = tags.get(ROLE)
    return role in (PARENT, LEGACY_SEEDS_PARENT) or tags.get(LEGACY_SWEEP_ROLE) == PARENT


def group_parent(tags: Mapping[str, str]) -> str | None:
    """The parent run id of a seeds/sweep child; None for any other run (a run that MLflow
    nests under some other tool's parent is not one of ours)."""
    ours = tags.get(ROLE) == CHILD or LEGACY_SWEEP_PARENT in tags or LEGACY_SEED_INDEX in tags
    return (tags.get(PARENT_RUN) or tags.get(LEGACY_SWEEP_PARENT)) if ours else None


def member_index(tags: Mapping[str, str]) -> int | None:
    for key in (MEMBER, LEGACY_SWEEP_MEMBER, LEGACY_SEED_INDEX):
        if key in tags:
            return int(tags[key])
    return None
