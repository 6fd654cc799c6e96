"""Sweeps: a grid × seeds of `lethe run` members under one MLflow parent run.

``lethe sweep CONFIG --grid key=v1,v2 [--grid ...] [--seeds N] [key=value ...]`` (or a
``sweep:`` block in the YAML) expands every combination, validates *every* member config
before anything is submitted, creates an MLflow parent run, and submits one job per member
through submitit: ``executor=local`` (subprocesses, bounded parallelism) or
``executor=slurm`` (one SLURM array job). Each member is a ``lethe run`` of its resolved
config (``<sweep dir>/members/<k>.yaml``) in a child MLflow run tagged
``mlflow.parentRunId``, so the MLflow UI nests it under the parent.

Preemption and timeouts: a member is a ``submitit.helpers.Checkpointable``. SLURM signals
the job before its time limit (or when preempting it); submitit calls
:meth:`MemberJob.checkpoint` and requeues the job. Whether requeued that way or by hand
(``scontrol requeue``), the new job finds its member's MLflow run through the parent/member
tags and continues the same run from ``<checkpoint.dir>/<run id>/`` (the ``--resume RUN_ID``
machinery of the runner), i.e. from the last finished experience.

The sweep folder ``<sweep.folder or checkpoint.dir/sweeps>/<parent run id>/`` holds
``sweep.json`` (members, job ids, log paths, outcomes), the member configs, submitit's job
folders (``jobs/<job id>/``: stdout/stderr logs) and the comparison page ``compare.html``,
which is also logged as an artifact of the parent run.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import submitit  # light (no torch); this module is imported only by `lethe sweep`
from omegaconf import OmegaConf
from omegaconf import errors as oc_errors

from lethe.platform.errors import ConfigError, RunError

PARENT_ROLE_TAG = "lethe.sweep.role"      # "parent" on the sweep's own run
PARENT_TAG = "lethe.sweep.parent"         # parent run id, on every member run
MEMBER_TAG = "lethe.sweep.member"         # member index, on every member run
LABEL_TAG = "lethe.sweep.label"           # "method.mem_size=20 seed=1"
JOB_TAG = "lethe.sweep.job_id"            # scheduler job id of the latest attempt
LOCAL_TIMEOUT_MIN = 7 * 24 * 60           # local members have no time limit worth the name
# Tracking coordinates are the parent's; sweeping them would scatter members over stores.
UNSWEEPABLE = ("tracking.uri", "tracking.experiment", "checkpoint.dir")


@dataclass
class SlurmOptions:
    partition: Optional[str] = None   # sbatch --partition; None = the cluster's default partition
    time: int = 60                    # minutes per job; members checkpoint and requeue at the limit
    cpus: int = 1                     # --cpus-per-task; the member's torch uses as many threads
    mem: Optional[str] = None         # --mem, e.g. "8G"; None = the partition default
    gpus: int = 0                     # --gpus-per-node (set device=cuda or auto in the config)
    array_parallelism: int = 64       # members running at once (--array=0-N%P)
    max_requeues: int = 3             # timeouts a member survives (submitit's max_num_timeout)
    signal_delay_s: int = 120         # USR2 this long before the limit: checkpoint, then requeue
    setup: list = field(default_factory=list)   # shell lines before the job (module load ...)
    extra: dict = field(default_factory=dict)   # other sbatch options, e.g. {account: ml, qos: high}


@dataclass
class SweepOptions:
    seeds: int = 1                    # each grid point runs with seed, seed+1, ..., seed+seeds-1
    executor: str = "local"           # local | slurm
    max_parallel: int = 2             # local: members running at once (each gets cpus/P threads)
    folder: Optional[str] = None      # sweep folders go here; None = <checkpoint.dir>/sweeps
    wait: bool = True                 # slurm: stay until every member ended (local always waits)
    retries: int = 0                  # re-submissions of a failed member (resumes its checkpoint)
    precheck: bool = True             # build each distinct scenario/model/method once before submitting
    poll_s: float = 2.0               # seconds between job state checks
    slurm: SlurmOptions = field(default_factory=SlurmOptions)


@dataclass
class Member:
    index: int
    label: str                        # grid values + seed, e.g. "method.mem_size=20 seed=1"
    grid: dict                        # key -> value of this member (seed included when swept)
    overrides: list                   # the dotlist applied on top of the base config
    cfg: Any = None                   # validated DictConfig


@dataclass
class SweepPlan:
    source: str                       # the CONFIG argument
    options: SweepOptions
    grid: dict                        # key -> list of value strings
    seeds: list
    members: list
    tracking_uri: str
    experiment: str
    checkpoint_dir: str
    name: str


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


# --- planning: parse, expand, validate (no side effects) ------------------------------------
def split_values(text: str) -> list[str]:
    """``"20,50"`` → ``["20", "50"]``; commas inside [], {}, () or quotes do not split."""
    out, depth, quote, cur = [], 0, None, []
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    out.append("".join(cur).strip())
    return out


def parse_grid_args(items: list[str]) -> dict[str, list[str]]:
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        vals = split_values(values) if sep else []
        if not sep or not key or not values.strip() or any(v == "" for v in vals):
            raise ConfigError(f"--grid '{item}' must look like key=v1,v2 (e.g. --grid method.mem_size=20,50)")
        if key in grid:
            raise ConfigError(f"--grid {key} is given twice; list all its values once: "
                              f"--grid {key}={','.join(grid[key] + vals)}")
        grid[key] = vals
    return grid


def _value_text(value: Any) -> str:
    """A YAML grid value as dotlist text (JSON is valid YAML flow)."""
    return value if isinstance(value, str) else json.dumps(value)


def _yaml_grid(block: Any) -> dict[str, list[str]]:
    if block is None:
        return {}
    if not isinstance(block, dict):
        raise ConfigError("sweep.grid must map keys to lists of values, e.g. "
                          "grid: {method.mem_size: [20, 50]}")
    grid = {}
    for key, values in block.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep.grid.{key} must be a non-empty list of values, e.g. [20, 50]")
        grid[str(key)] = [_value_text(v) for v in values]
    return grid



def split_sweep_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """Separate sweep options (``sweep.*``, ``executor=``, ``slurm.*``) from config overrides."""
    sweep, rest = [], []
    for item in overrides:
        key = item.split("=", 1)[0]
        if key.startswith("sweep."):
            sweep.append(item[len("sweep."):])
        elif key == "executor" or key.startswith("slurm."):
            sweep.append(item)
        else:
            rest.append(item)
    return sweep, rest


def parse_options(block: Any, dotlist: list[str]) -> SweepOptions:
    schema = OmegaConf.structured(SweepOptions)
    keys = [f.name for f in dataclasses.fields(SweepOptions)] + ["grid"]
    try:
        merged = OmegaConf.merge(schema, block or {}, OmegaConf.from_dotlist(dotlist))
    except oc_errors.ConfigKeyError as exc:
        from lethe import registry

        key = str(getattr(exc, "full_key", "") or getattr(exc, "key", ""))
        leaf = key.split(".")[-1]
        inner = [f.name for f in dataclasses.fields(SlurmOptions)] if key.startswith("slurm.") else keys
        raise ConfigError(f"unknown sweep option 'sweep.{key}'{registry.suggest(leaf, inner)} "
                          f"(valid: {', '.join(sorted(inner))})") from None
    except oc_errors.OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", "") or ""
        msg = (getattr(exc, "msg", None) or str(exc)).splitlines()[0]
        raise ConfigError(f"bad value for 'sweep.{key}': {msg}") from None
    opts: SweepOptions = OmegaConf.to_object(merged)
    if opts.executor not in ("local", "slurm"):
        raise ConfigError(f"bad value for 'sweep.executor': '{opts.executor}' (use local or slurm)")
    for key, value, low in (("seeds", opts.seeds, 1), ("max_parallel", opts.max_parallel, 1),
                            ("retries", opts.retries, 0), ("slurm.time", opts.slurm.time, 1),
                            ("slurm.cpus", opts.slurm.cpus, 1), ("slurm.gpus", opts.slurm.gpus, 0),
                            ("slurm.array_parallelism", opts.slurm.array_parallelism, 1),
                            ("slurm.max_requeues", opts.slurm.max_requeues, 0)):
        if value < low:
            raise ConfigError(f"bad value for 'sweep.{key}': {value} (must be ≥ {low})")
    if opts.executor == "slurm" and shutil.which("sbatch") is None:
        raise ConfigError("executor=slurm but `sbatch` is not on PATH: run the sweep on a SLURM "
                          "login node (for a one-machine test cluster: scripts/slurm_up.sh), "
                          "or use executor=local")
    return opts


def resolve_tracking_uri(uri: Optional[str]) -> str:
    """The URI a child anywhere on the cluster reaches: relative sqlite/file paths made absolute."""
    if not uri:
        uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        import mlflow

        uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    if uri.startswith("file:") or "://" not in uri:
        path = uri[len("file:"):] if uri.startswith("file:") else uri
        path = path[2:] if path.startswith("//") else path
        return Path(path).resolve().as_uri()
    return uri


def plan(config: str, overrides: list[str] | None = None, grid_args: list[str] | None = None,
         seeds: int | None = None) -> SweepPlan:
    """Expand the grid × seeds and validate every member; raises ConfigError before any work."""
    from lethe.platform import config as C

    sweep_items, cfg_overrides = split_sweep_overrides(list(overrides or []))
    path = C.resolve_path(config)
    raw = C._load_yaml(path)
    block = OmegaConf.to_container(raw.pop("sweep")) if "sweep" in raw else {}
    if not isinstance(block, dict):
        raise ConfigError(f"{path}: 'sweep' must be a mapping (grid, seeds, executor, slurm, ...)")
    grid = _yaml_grid(block.pop("grid", None))
    for key, values in parse_grid_args(list(grid_args or [])).items():
        grid[key] = values  # the command line replaces the YAML's values for that key
    opts = parse_options(block, sweep_items + ([f"seeds={seeds}"] if seeds is not None else []))
    bad = [k for k in grid if k in UNSWEEPABLE or k.startswith("sweep.")]
    if bad:
        raise ConfigError(f"--grid {bad[0]}: cannot be swept (all members share the parent run's "
                          f"tracking store and checkpoint folder); set it as a plain override")
    if not grid and opts.seeds == 1:
        raise ConfigError("nothing to sweep: give --grid key=v1,v2 (or a sweep.grid block) "
                          "and/or --seeds N")
    if "seed" in grid and opts.seeds > 1:
        raise ConfigError("both --grid seed=... and --seeds N given: use one of them")

    with tempfile.TemporaryDirectory() as tmp:
        base_path = Path(tmp) / path.name
        base_path.write_text(OmegaConf.to_yaml(raw))
        base = C.load_config(str(base_path), cfg_overrides)
        seed_list = [base.seed + i for i in range(opts.seeds)] if "seed" not in grid else []
        keys = list(grid)
        points = list(itertools.product(*(grid[k] for k in keys))) or [()]
        members = []
        for point in points:
            for seed in seed_list or [None]:
                values = dict(zip(keys, point))
                over = [f"{k}={v}" for k, v in values.items()]
                if seed is not None:
                    over.append(f"seed={seed}")
                    if opts.seeds > 1:
                        values["seed"] = str(seed)
                index = len(members)
                label = " ".join(f"{k}={v}" for k, v in values.items()) or f"seed={seed}"
                try:
                    cfg = C.load_config(str(base_path), cfg_overrides + over)
                except ConfigError as exc:
                    raise ConfigError(f"sweep member {index} ({label}): {exc}") from None
                members.append(Member(index, label, values, over, cfg))
    if opts.precheck:
        _precheck(members)
    return SweepPlan(source=config, options=opts, grid=grid, seeds=seed_list, members=members,
                     tracking_uri=resolve_tracking_uri(base.tracking.uri),
                     experiment=base.tracking.experiment,
                     checkpoint_dir=str(Path(os.path.expanduser(base.checkpoint.dir)).resolve()),
                     name=base.name)


def _precheck(members: list[Member]) -> None:
    """Build each distinct scenario/model/method combination once: an incompatible pair or a
    missing data file fails here, not hours later in a queued job."""
    from lethe.platform.runner import build_components

    seen = set()
    for m in members:
        cfg = m.cfg
        key = OmegaConf.to_yaml(OmegaConf.masked_copy(cfg, ["scenario", "model"])) + cfg.method.name
        if key in seen:
            continue
        seen.add(key)
        try:
            build_components(cfg)
        except ConfigError as exc:
            raise ConfigError(f"sweep member {m.index} ({m.label}): {exc}") from None


# --- the sweep folder -----------------------------------------------------------------------
def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _read_state(sweep_dir: Path) -> dict:
    return json.loads((sweep_dir / "sweep.json").read_text())


def member_config_text(plan_: SweepPlan, m: Member) -> str:
    """The member's resolved config with the paths every job on every node must share."""
    data = OmegaConf.to_container(m.cfg)
    data["tracking"]["uri"] = plan_.tracking_uri
    data["tracking"]["run_name"] = f"{data['tracking'].get('run_name') or data['name']} [{m.label}]"
    data["checkpoint"]["dir"] = plan_.checkpoint_dir
    return OmegaConf.to_yaml(OmegaConf.create(data))


# --- the member job (runs on the worker) ------------------------------------------------------
class MemberJob(submitit.helpers.Checkpointable):
    """One sweep member; submitit pickles it and runs it in a job with this venv's python."""

    def __call__(self, spec: MemberSpec) -> dict:
        import warnings

        warnings.filterwarnings("ignore", category=DeprecationWarning)
        os.chdir(spec.cwd)
        import torch

        if spec.threads > 0:
            torch.set_num_threads(spec.threads)
        from mlflow.tracking import MlflowClient

        from lethe.platform.config import load_config
        from lethe.platform.runner import run_experiment

        cfg = load_config(spec.config_path)
        client = MlflowClient(spec.tracking_uri)
        job_id = _current_job_id()
        resume_id = None
        for run in member_runs(client, spec.experiment, spec.parent_run_id, spec.index):
            has_checkpoint = (Path(cfg.checkpoint.dir) / run.info.run_id / "meta.json").exists()
            if resume_id is None and has_checkpoint:
                resume_id = run.info.run_id
                if run.info.status == "FINISHED":  # a requeue after the run ended: nothing to do
                    return {"run_id": resume_id, "status": "FINISHED", "resumed": False}
            else:  # started but died before its first checkpoint: nothing to continue
                client.delete_run(run.info.run_id)
        tags = {"mlflow.parentRunId": spec.parent_run_id, PARENT_TAG: spec.parent_run_id,
                MEMBER_TAG: str(spec.index), LABEL_TAG: spec.label, JOB_TAG: job_id}
        if resume_id:
            client.set_tag(resume_id, JOB_TAG, job_id)
            print(f"sweep member {spec.index} ({spec.label}): resuming MLflow run {resume_id} "
                  f"from its checkpoint (job {job_id})", flush=True)
        result = run_experiment(cfg, resume_run_id=resume_id, tags=tags)
        print(result.summary, flush=True)
        return {"run_id": result.run_id, "status": result.status, "resumed": bool(resume_id),
                "final": {k: float(v) for k, v in result.final.items()}}

    def checkpoint(self, spec: MemberSpec):
        """Called by submitit on timeout/preemption: requeue the same member. The state is on
        disk (checkpoint after every experience), so the new job resumes the same run."""
        print(f"sweep member {spec.index}: preempted or timed out; requeued to resume from "
              f"its last checkpoint", flush=True)
        return submitit.helpers.DelayedSubmission(self, spec)


def _current_job_id() -> str:
    try:
        return str(submitit.JobEnvironment().job_id)
    except Exception:
        return "?"


def member_runs(client, experiment: str, parent_id: str, index: int | None = None) -> list:
    """Live (not deleted) MLflow runs of the sweep's members, newest first."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    filt = f"tags.`{PARENT_TAG}` = '{parent_id}'"
    if index is not None:
        filt += f" and tags.`{MEMBER_TAG}` = '{index}'"
    return client.search_runs([exp.experiment_id], filter_string=filt, max_results=5000,
                              order_by=["attributes.start_time DESC"])


# --- submission and waiting (runs where `lethe sweep` runs) -----------------------------------
def _executor(opts: SweepOptions, jobs_dir: Path, name: str):
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
    if s.partition:
        params["partition"] = s.partition
    if s.mem:
        params["mem"] = s.mem
    if s.gpus:
        params["gpus_per_node"] = s.gpus
    if s.setup:
        params["setup"] = [str(x) for x in s.setup]
    if s.extra:
        params["additional_parameters"] = {str(k): v for k, v in s.extra.items()}
    try:
        ex.update_parameters(**params)
    except Exception as exc:
        raise ConfigError(f"sweep.slurm: {exc}") from None
    return ex


def _threads(opts: SweepOptions) -> int:
    if opts.executor == "slurm":
        return opts.slurm.cpus
    return max(1, (os.cpu_count() or 1) // opts.max_parallel)


def _spec(state: dict, index: int) -> MemberSpec:
    m = state["members"][index]
    return MemberSpec(index=index, label=m["label"], config_path=m["config"],
                      parent_run_id=state["parent_run_id"], tracking_uri=state["tracking_uri"],
                      experiment=state["experiment"], cwd=state["cwd"], threads=state["threads"])


def _record_job(state: dict, index: int, job) -> None:
    state["members"][index].setdefault("jobs", []).append(
        {"job_id": str(job.job_id), "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr),
         "submitted": time.time()})
    state["members"][index]["outcome"] = None


class _Waiter:
    """Submits members and collects their outcomes: local with at most P running, SLURM as one
    array job. A job that ends without a result file (scancel, node lost) counts as failed."""

    def __init__(self, state: dict, sweep_dir: Path, opts: SweepOptions):
        self.state, self.dir, self.opts = state, sweep_dir, opts
        self.ex = _executor(opts, sweep_dir / "jobs", state["name"])
        self.jobs: dict[int, Any] = {}
        self.gone_since: dict[int, float] = {}

    def save(self) -> None:
        _write_json(self.dir / "sweep.json", self.state)

    def submit(self, indices: list[int]) -> None:
        if not indices:
            return
        if self.opts.executor == "slurm" and len(indices) > 1:
            with self.ex.batch():
                jobs = [self.ex.submit(MemberJob(), _spec(self.state, i)) for i in indices]
        else:
            jobs = [self.ex.submit(MemberJob(), _spec(self.state, i)) for i in indices]
        for i, job in zip(indices, jobs):
            self.jobs[i] = job
            _record_job(self.state, i, job)
        self.save()

    def _ended_without_result(self, i: int, job, live: dict) -> bool:
        if self.opts.executor == "local":
            return job.done() and not job.paths.result_pickle.exists()
        if live is None or str(job.job_id) in live:  # running, or squeue did not answer
            self.gone_since.pop(i, None)
            return False
        # absent from squeue (or in a terminal state) and no result file: allow for a shared
        # file system being slow to show the result before calling it lost
        first = self.gone_since.setdefault(i, time.time())
        return time.time() - first > 30

    def poll(self) -> dict[int, dict]:
        """Outcomes of jobs that ended since the last poll."""
        live = slurm_live_states([str(j.job_id) for j in self.jobs.values()]) \
            if self.opts.executor == "slurm" and self.jobs else {}
        ended = {}
        for i, job in list(self.jobs.items()):
            if job.paths.result_pickle.exists():
                ended[i] = _outcome(job)
            elif self._ended_without_result(i, job, live):
                ended[i] = {"state": "FAILED", "error": f"job {job.job_id} ended without a result "
                            f"(cancelled, killed or lost); see {job.paths.stderr}"}
            else:
                continue
            del self.jobs[i]
            self.state["members"][i]["outcome"] = ended[i]
        if ended:
            self.save()
        return ended


def _outcome(job) -> dict:
    try:
        value = job.result()
    except Exception as exc:  # the member raised: keep the exception line of its traceback
        return {"state": "FAILED", "error": _error_line(str(exc)) or type(exc).__name__}
    return {"state": value.get("status", "FINISHED"), "run_id": value.get("run_id"),
            "resumed": value.get("resumed", False)}


def _error_line(text: str) -> str:
    """``module.SomeError: message`` from a traceback text (submitit appends log paths after it)."""
    found = [ln.strip() for ln in text.splitlines()
             if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b", ln.strip())]
    return found[-1] if found else ""


SLURM_ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_FED",
                "REQUEUE_HOLD", "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT", "STOPPED",
                "RESV_DEL_HOLD"}


def slurm_live_states(job_ids: list[str]) -> dict[str, str] | None:
    """job id → state for jobs SLURM still schedules or runs (array tasks as ``A_i``);
    None when squeue cannot answer (then nobody may conclude that a job is gone)."""
    if not job_ids:
        return {}
    if shutil.which("squeue") is None:
        return None
    arrays = sorted({j.split("_")[0] for j in job_ids})
    try:
        out = subprocess.run(["squeue", "-h", "-r", "--states=all", "-o", "%i|%T", "-j", ",".join(arrays)],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0 and "Invalid job id" not in out.stderr:
        return None
    states = {}
    for line in out.stdout.splitlines():
        jid, _, st = line.strip().partition("|")
        if st in SLURM_ACTIVE:
            states[jid] = st
    return states


def launch(p: SweepPlan, wait: bool | None = None, out=sys.stdout) -> dict:
    """Create the parent run and the sweep folder, submit every member, and (by default) wait
    for them and finalize. Returns the sweep state (``sweep.json`` content)."""
    from lethe.platform.tracking import Tracker

    opts = p.options
    wait = opts.wait if wait is None else wait
    if opts.executor == "local":
        wait = True  # local members are children of this process
    tracker = Tracker(p.tracking_uri, p.experiment)
    params = {f"sweep.grid.{k}": ",".join(v) for k, v in p.grid.items()}
    params.update({"sweep.seeds": str(opts.seeds), "sweep.executor": opts.executor,
                   "sweep.members": str(len(p.members)), "sweep.config": p.source})
    parent = tracker.start(f"sweep {p.name}", params,
                           {PARENT_ROLE_TAG: "parent", "lethe.sweep.executor": opts.executor})
    root = Path(opts.folder).expanduser().resolve() if opts.folder else Path(p.checkpoint_dir) / "sweeps"
    sweep_dir = root / parent
    (sweep_dir / "members").mkdir(parents=True, exist_ok=True)
    tracker.set_tag("lethe.sweep.folder", str(sweep_dir))
    members = []
    for m in p.members:
        path = sweep_dir / "members" / f"{m.index}.yaml"
        path.write_text(member_config_text(p, m))
        members.append({"index": m.index, "label": m.label, "grid": m.grid, "overrides": m.overrides,
                        "config": str(path), "jobs": [], "outcome": None})
    state = {"parent_run_id": parent, "tracking_uri": p.tracking_uri, "experiment": p.experiment,
             "name": p.name, "source": p.source, "executor": opts.executor,
             "options": dataclasses.asdict(opts), "grid": p.grid, "cwd": os.getcwd(),
             "threads": _threads(opts), "created": time.time(), "members": members,
             "checkpoint_dir": p.checkpoint_dir, "finalized": False}
    _write_json(sweep_dir / "sweep.json", state)
    tracker.log_text(json.dumps({"grid": p.grid, "seeds": p.seeds, "options": state["options"]},
                                indent=1), "sweep.json")
    print(f"sweep {parent}: {len(members)} members ({opts.executor}) in experiment "
          f"'{p.experiment}' at {p.tracking_uri}\nsweep folder: {sweep_dir}", file=out, flush=True)
    return run_members(sweep_dir, state, [m["index"] for m in members], wait, out)


def run_members(sweep_dir: Path, state: dict, indices: list[int], wait: bool, out) -> dict:
    opts = _options(state)
    waiter = _Waiter(state, sweep_dir, opts)
    retries = {i: opts.retries for i in indices}
    pending = list(indices)
    try:
        if opts.executor == "slurm":
            waiter.submit(pending)
            pending = []
            ids = sorted({state["members"][i]["jobs"][-1]["job_id"].split("_")[0] for i in indices})
            print(f"submitted SLURM job(s) {', '.join(ids)}; logs under {sweep_dir / 'jobs'}",
                  file=out, flush=True)
            if not wait:
                _submit_finalizer(waiter, sweep_dir, ids)
                print(f"not waiting: follow with `lethe sweep --status {state['parent_run_id']}`",
                      file=out, flush=True)
                return state
        while pending or waiter.jobs:
            room = opts.max_parallel - len(waiter.jobs) if opts.executor == "local" else len(pending)
            if pending and room > 0:
                waiter.submit(pending[:room])
                pending = pending[room:]
            for i, outcome in waiter.poll().items():
                label = state["members"][i]["label"]
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
            if pending or waiter.jobs:
                time.sleep(opts.poll_s)
    except KeyboardInterrupt:
        if opts.executor == "local":
            for job in waiter.jobs.values():
                job.cancel(check=False)
            _end_parent(state, "KILLED")
        else:
            print(f"\nstopped waiting; the SLURM jobs keep running. Follow them with "
                  f"`lethe sweep --status {state['parent_run_id']}`", file=sys.stderr)
        raise
    return finalize(sweep_dir, out=out)


def _submit_finalizer(waiter: _Waiter, sweep_dir: Path, array_ids: list[str]) -> None:
    """A small job after the members (afterany) that ends the parent run and logs the page."""
    ex = submitit.SlurmExecutor(folder=sweep_dir / "jobs" / "%j", python=sys.executable)
    params = dict(waiter.ex.parameters)
    params.pop("array_parallelism", None)
    params.pop("gpus_per_node", None)
    extra = dict(params.pop("additional_parameters", None) or {})
    extra["dependency"] = "afterany:" + ":".join(array_ids)
    params.update(additional_parameters=extra, cpus_per_task=1, time=30,
                  job_name=f"lethe-{waiter.state['name']}-finalize")
    ex.update_parameters(**params)
    job = ex.submit(finalize_job, str(sweep_dir))
    waiter.state["finalizer_job"] = {"job_id": str(job.job_id), "stdout": str(job.paths.stdout),
                                     "stderr": str(job.paths.stderr)}
    waiter.save()


def finalize_job(sweep_dir: str) -> dict:
    return finalize(Path(sweep_dir))


def _options(state: dict) -> SweepOptions:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SweepOptions), state["options"]))


def _end_parent(state: dict, status: str) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(state["tracking_uri"]).set_terminated(state["parent_run_id"], status=status)


# --- status and finalization --------------------------------------------------------------------
@dataclass
class MemberStatus:
    index: int
    label: str
    state: str                # FINISHED | FAILED | KILLED | RUNNING | PENDING | ... | NOT SUBMITTED
    run_id: Optional[str]
    progress: str             # "3/5 experiences" from the checkpoint metadata
    job_id: Optional[str]
    logs: list                # paths: job stdout/stderr, the run's run.log
    error: Optional[str] = None


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
    folder = run.data.tags.get("lethe.sweep.folder")
    if not folder or not (Path(folder) / "sweep.json").exists():
        raise ConfigError(f"run {parent_id} is not a sweep parent with a readable sweep folder "
                          f"(tag lethe.sweep.folder={folder!r})")
    return Path(folder)


def member_status(sweep_dir: Path) -> tuple[dict, list[MemberStatus]]:
    from mlflow.tracking import MlflowClient

    state = _read_state(sweep_dir)
    client = MlflowClient(state["tracking_uri"])
    runs: dict[int, Any] = {}
    for run in member_runs(client, state["experiment"], state["parent_run_id"]):
        idx = int(run.data.tags.get(MEMBER_TAG, -1))
        runs.setdefault(idx, run)  # newest first
    last_jobs = [m["jobs"][-1] for m in state["members"] if m.get("jobs")]
    live = slurm_live_states([j["job_id"] for j in last_jobs]) if state["executor"] == "slurm" else {}
    squeue_ok = live is not None
    live = live or {}
    out = []
    for m in state["members"]:
        i = m["index"]
        job = m["jobs"][-1] if m.get("jobs") else None
        run = runs.get(i)
        logs = [job["stdout"], job["stderr"]] if job else []
        progress, error = "", (m.get("outcome") or {}).get("error")
        if run is not None:
            folder = Path(state["checkpoint_dir"]) / run.info.run_id
            meta = folder / "meta.json"
            if meta.exists():
                info = json.loads(meta.read_text())
                progress = f"{info.get('next_experience')}/{info.get('n_experiences')} experiences"
            if (folder / "run.log").exists():
                logs.append(str(folder / "run.log"))
        if job and job["job_id"] in live and (run is None or run.info.status != "FINISHED"):
            st = live[job["job_id"]]
        elif run is not None and run.info.status in ("FINISHED", "FAILED", "KILLED"):
            st = run.info.status
        elif m.get("outcome"):
            st = m["outcome"]["state"]
        elif job is None:
            st = "NOT SUBMITTED"
        elif state["executor"] == "local" and _pid_alive(job["job_id"]):
            st = "RUNNING"
        elif run is not None and run.info.status == "RUNNING" and state["executor"] == "slurm":
            if not squeue_ok:
                st, error = "UNKNOWN", error or "squeue did not answer; try again"
            else:
                st = "LOST"
            error = error or "the run is RUNNING in MLflow but its job is gone"
        else:
            st = _result_state(Path(job["stdout"]).parent, job["job_id"])
            if st == "FAILED":
                error = error or "the job ended without a result; see its logs"
        if st == "FAILED" and run is not None and not error:
            error = "the run is FAILED in MLflow; see run.log"
        out.append(MemberStatus(i, m["label"], st, run.info.run_id if run else None, progress,
                                job["job_id"] if job else None, logs, error))
    return state, out


def _pid_alive(job_id: str) -> bool:
    try:
        os.kill(int(job_id), 0)
        return True
    except (ValueError, OSError):
        return False


def _result_state(job_folder: Path, job_id: str) -> str:
    result = job_folder / f"{job_id}_0_result.pkl"
    if not result.exists():
        return "FAILED"
    import pickle

    with open(result, "rb") as fh:
        kind, _ = pickle.load(fh)
    return "FINISHED" if kind == "success" else "FAILED"


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
    from mlflow.tracking import MlflowClient

    state, rows = member_status(sweep_dir)
    client = MlflowClient(state["tracking_uri"])
    parent = state["parent_run_id"]
    counts = {s: sum(1 for r in rows if r.state == s) for s in ("FINISHED", "FAILED", "KILLED")}
    ts = int(time.time() * 1000)
    from mlflow.entities import Metric

    client.log_batch(parent, metrics=[Metric(f"sweep/{k.lower()}", float(v), ts, 0)
                                      for k, v in counts.items()]
                     + [Metric("sweep/members", float(len(rows)), ts, 0)])
    _log_seed_aggregates(client, parent, [r.run_id for r in rows if r.state == "FINISHED" and r.run_id])
    run_ids = [r.run_id for r in rows if r.run_id]
    if run_ids:
        from lethe.dashboards.compare import write_compare

        try:
            page = write_compare(state["tracking_uri"], run_ids=run_ids,
                                 out=sweep_dir / "compare.html",
                                 title=f"sweep {state['name']} ({parent[:8]})", log_to=parent)
            state["page"] = str(page.path)
        except ConfigError as exc:  # e.g. no member logged a metric: the page is optional
            state["page_error"] = str(exc)
    all_ok = counts["FINISHED"] == len(rows)
    client.set_terminated(parent, status="FINISHED" if all_ok else "FAILED")
    state["finalized"] = True
    state["result"] = {r.index: r.state for r in rows}
    _write_json(sweep_dir / "sweep.json", state)
    if out is not None:
        print(format_status(state, rows), file=out, flush=True)
    return state


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
    opts = _options(state)
    return run_members(sweep_dir, state, todo, opts.wait if wait is None else wait, out)


def sweep_exit_code(state: dict) -> int:
    if not state.get("finalized"):
        return 0
    bad = {i: s for i, s in (state.get("result") or {}).items() if s != "FINISHED"}
    return 0 if not bad else RunError.exit_code


__all__ = ["SweepOptions", "SlurmOptions", "plan", "launch", "resume", "finalize", "member_status",
           "format_status", "find_sweep", "parse_grid_args", "split_values", "MemberJob"]
