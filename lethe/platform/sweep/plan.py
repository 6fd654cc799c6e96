"""Planning a sweep: parse ``--grid``/``sweep.*`` options, expand grid × seeds into members
and validate every member config before anything is submitted (no side effects)."""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf import errors as oc_errors

from lethe.errors import ConfigError
from lethe.platform.tracking import resolve_tracking_uri

# Tracking coordinates are the parent's; sweeping them would scatter members over stores.
UNSWEEPABLE = ("tracking.uri", "tracking.experiment", "checkpoint.dir")


@dataclass
class SlurmOptions:
    partition: str | None = None   # sbatch --partition; None = the cluster's default partition
    time: int = 60                    # minutes per job; members checkpoint and requeue at the limit
    cpus: int = 1                     # --cpus-per-task; the member's torch uses as many threads
    mem: str | None = None         # --mem, e.g. "8G"; None = the partition default
    gpus: int = 0                     # --gpus-per-node (older name of gpus_per_node)
    gpus_per_node: int = 0            # --gpus-per-node (set device=cuda or auto in the config)
    nodes: int = 1                    # --nodes: > 1 (or tasks_per_node > 1) trains data-parallel,
    tasks_per_node: int = 1           # one rank per task (--ntasks-per-node; one per GPU)
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
    folder: str | None = None      # sweep folders go here; None = <checkpoint.dir>/sweeps
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
    opts: SweepOptions = OmegaConf.to_object(_merge_options(block, dotlist))
    if opts.executor not in ("local", "slurm"):
        raise ConfigError(f"bad value for 'sweep.executor': '{opts.executor}' (use local or slurm)")
    for key, value, low in (("seeds", opts.seeds, 1), ("max_parallel", opts.max_parallel, 1),
                            ("retries", opts.retries, 0), ("slurm.time", opts.slurm.time, 1),
                            ("slurm.cpus", opts.slurm.cpus, 1), ("slurm.gpus", opts.slurm.gpus, 0),
                            ("slurm.gpus_per_node", opts.slurm.gpus_per_node, 0),
                            ("slurm.nodes", opts.slurm.nodes, 1),
                            ("slurm.tasks_per_node", opts.slurm.tasks_per_node, 1),
                            ("slurm.array_parallelism", opts.slurm.array_parallelism, 1),
                            ("slurm.max_requeues", opts.slurm.max_requeues, 0)):
        if value < low:
            raise ConfigError(f"bad value for 'sweep.{key}': {value} (must be ≥ {low})")
    if opts.executor == "slurm" and shutil.which("sbatch") is None:
        raise ConfigError("executor=slurm but `sbatch` is not on PATH: run the sweep on a SLURM "
                          "login node (for a one-machine test cluster: scripts/slurm_up.sh), "
                          "or use executor=local")
    return opts


def _merge_options(block: Any, dotlist: list[str]):
    """The sweep block and sweep.* overrides on the schema; unknown keys and bad types named."""
    keys = [f.name for f in dataclasses.fields(SweepOptions)] + ["grid"]
    try:
        return OmegaConf.merge(OmegaConf.structured(SweepOptions), block or {},
                               OmegaConf.from_dotlist(dotlist))
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


def options_of(state: dict) -> SweepOptions:
    """The options recorded in a sweep folder's state."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SweepOptions), state["options"]))


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
    _check_grid(grid, opts)
    with tempfile.TemporaryDirectory() as tmp:
        base_path = Path(tmp) / path.name   # the config without its sweep block
        base_path.write_text(OmegaConf.to_yaml(raw))
        base = C.load_config(str(base_path), cfg_overrides)
        seed_list = [base.seed + i for i in range(opts.seeds)] if "seed" not in grid else []
        members = [_member(i, str(base_path), cfg_overrides, point)
                   for i, point in enumerate(_points(grid, seed_list, opts.seeds > 1))]
    _check_ranks(members, opts)
    if opts.precheck:
        _precheck(members)
    return SweepPlan(source=config, options=opts, grid=grid, seeds=seed_list, members=members,
                     tracking_uri=resolve_tracking_uri(base.tracking.uri),
                     experiment=base.tracking.experiment,
                     checkpoint_dir=str(Path(os.path.expanduser(base.checkpoint.dir)).resolve()),
                     name=base.name)


def ranks_of(opts: SweepOptions) -> int:
    """Processes of one member job: nodes × tasks per node (SLURM executor only)."""
    return opts.slurm.nodes * opts.slurm.tasks_per_node if opts.executor == "slurm" else 1


def _check_ranks(members: list[Member], opts: SweepOptions) -> None:
    """A member of several ranks is checked as ``--nproc`` checks a run, before submitting."""
    if ranks_of(opts) == 1:
        if opts.slurm.nodes * opts.slurm.tasks_per_node > 1:
            raise ConfigError("slurm.nodes / slurm.tasks_per_node need executor=slurm")
        return
    from lethe.platform.runner import check_distributable

    for m in members:
        try:
            check_distributable(m.cfg, ranks_of(opts))
        except ConfigError as exc:
            raise ConfigError(f"sweep member {m.index} ({m.label}), {ranks_of(opts)} ranks "
                              f"(slurm.nodes × slurm.tasks_per_node): {exc}") from None


def _check_grid(grid: dict, opts: SweepOptions) -> None:
    bad = [k for k in grid if k in UNSWEEPABLE or k.startswith("sweep.")]
    if bad:
        raise ConfigError(f"--grid {bad[0]}: cannot be swept (all members share the parent run's "
                          f"tracking store and checkpoint folder); set it as a plain override")
    if not grid and opts.seeds == 1:
        raise ConfigError("nothing to sweep: give --grid key=v1,v2 (or a sweep.grid block) "
                          "and/or --seeds N")
    if "seed" in grid and opts.seeds > 1:
        raise ConfigError("both --grid seed=... and --seeds N given: use one of them")


def _points(grid: dict, seed_list: list, label_seed: bool):
    """(values, overrides, label) of every member in order: grid points outer, seeds inner."""
    keys = list(grid)
    for point in itertools.product(*(grid[k] for k in keys)):
        for seed in seed_list or [None]:
            values = dict(zip(keys, point))
            over = [f"{k}={v}" for k, v in values.items()]
            if seed is not None:
                over.append(f"seed={seed}")
                if label_seed:
                    values["seed"] = str(seed)
            yield values, over, " ".join(f"{k}={v}" for k, v in values.items()) or f"seed={seed}"


def _member(index: int, base_path: str, cfg_overrides: list, point: tuple) -> Member:
    from lethe.platform import config as C

    values, over, label = point
    try:
        cfg = C.load_config(base_path, cfg_overrides + over)
    except ConfigError as exc:
        raise ConfigError(f"sweep member {index} ({label}): {exc}") from None
    return Member(index, label, values, over, cfg)


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


def member_config_text(plan_: SweepPlan, m: Member) -> str:
    """The member's resolved config with the paths every job on every node must share."""
    data = OmegaConf.to_container(m.cfg)
    data["tracking"]["uri"] = plan_.tracking_uri
    data["tracking"]["run_name"] = f"{data['tracking'].get('run_name') or data['name']} [{m.label}]"
    data["checkpoint"]["dir"] = plan_.checkpoint_dir
    return OmegaConf.to_yaml(OmegaConf.create(data))

