"""The `lethe` command. Heavy libraries are imported only by the subcommands that need them."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback
from pathlib import Path

from lethe.errors import ConfigError, LetheError

EXIT_OK, EXIT_RUN, EXIT_INPUT, EXIT_INTERRUPT = 0, 1, 2, 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lethe", description="Continual-learning and unlearning experiments, tracked in MLflow.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    r = sub.add_parser("run", help="run one experiment",
                       description="Run CONFIG (a YAML path or a preset name) with key=value overrides.")
    r.add_argument("config", help="YAML file or preset name (see `lethe list presets`)")
    r.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. method.name=naive train.lr=0.05")
    r.add_argument("--resume", nargs="?", const="latest", default=None, metavar="RUN_ID",
                   help="continue an interrupted run in the same MLflow run "
                        "(default: the newest unfinished run of this config)")
    r.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="train data-parallel in N processes on this machine (torchrun, DDP; "
                        "train.batch_size is the global batch; see docs/distributed.md)")
    r.add_argument("--slurm", action="store_true",
                   help="submit the run as one SLURM job (slurm.nodes=, slurm.tasks_per_node=, "
                        "slurm.gpus_per_node=, slurm.time=, ... as overrides; see docs/distributed.md)")
    r.add_argument("--no-wait", action="store_true",
                   help="--slurm: return once the job is submitted")
    sw = sub.add_parser("sweep", help="run a grid × seeds of experiments (local or SLURM)",
                        description="Expand --grid values × --seeds over CONFIG, validate every member, "
                                    "and run them as child runs of one MLflow parent run. Sweep options: "
                                    "executor=local|slurm, sweep.max_parallel=N, slurm.partition=..., "
                                    "slurm.time=MIN, slurm.cpus=N, slurm.mem=8G, slurm.gpus=N, "
                                    "slurm.array_parallelism=N, slurm.extra.KEY=VALUE (or a sweep: block "
                                    "in the YAML).")
    sw.add_argument("config", nargs="?", help="YAML file or preset name")
    sw.add_argument("overrides", nargs="*", help="dotlist overrides for every member, and sweep options")
    sw.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                    help="a swept key and its values (repeat for a product grid)")
    sw.add_argument("--seeds", type=int, default=None, metavar="N",
                    help="run every grid point with seeds seed..seed+N-1")
    sw.add_argument("--status", metavar="PARENT", help="show the members of sweep PARENT (run id)")
    sw.add_argument("--resume", metavar="PARENT",
                    help="re-submit the members of sweep PARENT that did not finish (each continues "
                         "its run from its checkpoint)")
    sw.add_argument("--no-wait", action="store_true",
                    help="slurm: return after submitting (a dependent job finalizes the parent run)")
    cp = sub.add_parser("compare", help="write an HTML page comparing MLflow runs",
                        description="Query MLflow and write one self-contained HTML page (plotly inlined) "
                                    "comparing runs: accuracy curves (mean ± std over seeds), accuracy "
                                    "matrices, forgetting/BWT/NFR bars, unlearning trade-off, a sortable "
                                    "table.")
    cp.add_argument("overrides", nargs="*", help="tracking.uri=... (default: MLFLOW_TRACKING_URI or ./mlflow.db)")
    cp.add_argument("--experiment", help="compare every run of this MLflow experiment")
    cp.add_argument("--runs", nargs="+", metavar="RUN_ID",
                    help="compare these runs (a sweep parent stands for its members)")
    cp.add_argument("--out", help="output HTML file (default: compare-<experiment>.html)")
    r.add_argument("--seeds", type=int, default=None, metavar="N",
                   help="run seeds seed..seed+N-1 under one MLflow parent run that gets mean, std "
                        "and 95%% CI of every final metric")
    rp = sub.add_parser("reproduce", help="re-run a run from its MLflow record",
                        description="Re-run RUN_ID from its recorded config, seed and data fingerprints "
                                    "into a new run, and print the final metrics side by side.")
    rp.add_argument("run_id", metavar="RUN_ID")
    rp.add_argument("overrides", nargs="*", help="key=value changes (tracking.uri=... to find the run)")
    ls = sub.add_parser("list", help="list scenarios, models, methods or presets")
    ls.add_argument("what", nargs="?", default="all",
                    choices=["all", "scenarios", "models", "methods", "presets", "metrics"])
    return p


def cmd_list(what: str) -> int:
    from lethe import registry
    from lethe.platform.config import presets

    if what == "metrics":
        from lethe.metrics.reference import as_text

        print(as_text())
        return EXIT_OK
    kinds = registry.KINDS if what == "all" else ((what,) if what != "presets" else ())
    for kind in kinds:
        print(f"{kind}:")
        for name, entry in sorted(registry.entries(kind).items()):
            print(f"  {name:<14} {entry.doc}")
    if what in ("all", "presets"):
        print("presets:")
        for name in presets():
            print(f"  {name}")
    return EXIT_OK


def _run_seeds(cfg, n: int) -> int:
    from lethe.platform.seeds import run_seeds, summary_table

    parent, results, agg = run_seeds(cfg, n)
    print(summary_table(agg))
    print(f"\nMLflow parent run {parent} FINISHED with {len(results)} seed runs — experiment "
          f"'{results[0].experiment}' at {results[0].tracking_uri}")
    return EXIT_OK


def cmd_reproduce(args) -> int:
    from lethe.platform.reproduce import reproduce

    result, _, table = reproduce(args.run_id, list(args.overrides))
    print(table)
    print(f"\nreproduced {args.run_id} as MLflow run {result.run_id} (tag lethe.reproduces)")
    return EXIT_OK


def cmd_run(args) -> int:
    from lethe.platform.config import load_config

    overrides = list(args.overrides)
    resume = args.resume
    if resume and "=" in resume:          # `--resume key=value`: an override, not a run id
        overrides.insert(0, resume)
        resume = "latest"
    if args.slurm:
        if args.nproc is not None or args.seeds is not None or resume is not None:
            raise ConfigError("--slurm runs the config as one job: use slurm.nodes / "
                              "slurm.tasks_per_node for several processes (not --nproc), a sweep for "
                              "seeds (lethe sweep --seeds N executor=slurm); a requeued job resumes itself")
        from lethe.platform.sweep.single import submit

        return submit(args.config, overrides, wait=not args.no_wait)
    cfg = load_config(args.config, overrides)
    if args.nproc is not None:
        from lethe.platform.runner import check_distributable

        check_distributable(cfg, args.nproc)
        if args.nproc > 1:
            if args.seeds is not None:
                if resume is not None:
                    raise ConfigError("--seeds and --resume cannot be combined (resume each seed's "
                                      "run by its id)")
                return _run_seeds_distributed(cfg, args.config, overrides, args.nproc, args.seeds)
            return _run_distributed(cfg, args.config, overrides, args.nproc, resume)
    if args.seeds is not None:
        if resume is not None:
            raise ConfigError("--seeds and --resume cannot be combined (resume each seed's run by its id)")
        return _run_seeds(cfg, args.seeds)   # a bad URI: exit 2 from the parent's Tracker
    from lethe.engine.distributed import announce_result, launcher_tags
    from lethe.platform.runner import run_experiment

    result = run_experiment(cfg, resume=resume is not None, tags=launcher_tags(),
                            resume_run_id=None if resume in (None, "latest") else resume)
    announce_result(result)   # a rank of --nproc N: rank 0 tells the launcher
    if result.run_id is None:   # a rank other than 0 of --nproc N: rank 0 reports
        return EXIT_OK
    print(result.summary)
    print(f"\nMLflow run {result.run_id} FINISHED — experiment '{result.experiment}' at {result.tracking_uri}")
    print(f"open it with: mlflow ui --backend-store-uri {result.tracking_uri}")
    print(f"checkpoint and log: {result.checkpoint_dir}")
    return EXIT_OK


def _run_distributed(cfg, config: str, overrides: list[str], nproc: int, resume: str | None) -> int:
    """``--nproc N``: N ranks through torchrun (see :func:`_launch_ranks`)."""
    code, said, _ = _launch_ranks(cfg, ["run", config, *overrides], nproc, resume)
    if said:
        print(said, file=sys.stderr)
    return code


def _launch_ranks(cfg, argv: list[str], nproc: int, resume: str | None = None,
                  tags: dict | None = None) -> tuple[int, str, dict | None]:
    """Run ``lethe argv`` in N ranks; returns (exit code, the failure to say, rank 0's result).

    Rank 0 ends its MLflow run itself; a rank that dies (or is stopped by torchrun after
    another failed) cannot, so the launcher marks the run FAILED when any rank failed, KILLED
    when the launcher was interrupted. ``--resume``: the launcher finds the checkpoint (the
    newest unfinished run of this config, or the given run id) and holds its folder's lock for
    the whole run; every rank is told the run id, so all of them load that same checkpoint.
    ``tags``: extra MLflow tags of the new run (a seed of ``--seeds``)."""
    import contextlib

    from lethe.engine.distributed import launch, read_result

    with tempfile.TemporaryDirectory(prefix="lethe-dist-") as folder, contextlib.ExitStack() as held:
        if resume is not None:
            from lethe.platform.run_lock import run_folder_lock

            run_folder = _resumable(cfg, resume)
            held.enter_context(run_folder_lock(run_folder, resuming=True))
            argv = [*argv, "--resume", run_folder.name]
        try:
            code, failed_rank = launch(nproc, argv, folder, tags)
        except KeyboardInterrupt as exc:
            exc.lethe_run_id = _end_run(cfg, folder, "KILLED")
            raise
        if code == EXIT_OK:
            return EXIT_OK, "", read_result(folder)
        run_id = _end_run(cfg, folder, "FAILED")
        said = Path(folder, f"error.{failed_rank}")
        first = said.read_text() if said.exists() else f"lethe: run failed: exit code {code}"
        return code, (f"{first} [rank {failed_rank} of {nproc}; the other ranks were stopped"
                      + (f"; MLflow run {run_id} is marked FAILED]" if run_id else "]")), None


def _run_seeds_distributed(cfg, config: str, overrides: list[str], nproc: int, n: int) -> int:
    """``--seeds N --nproc P``: the parent run here, each seed a P-rank run as its child."""
    from lethe.platform.runner import RunResult
    from lethe.platform.seeds import run_seeds, summary_table

    def one_seed(child, tags: dict):
        code, said, result = _launch_ranks(child, ["run", config, *overrides, f"seed={child.seed}"],
                                           nproc, tags=tags)
        if code:
            error = LetheError(said.removeprefix("lethe: run failed: ").removeprefix("lethe: error: "))
            error.exit_code = code
            raise error
        return RunResult(status="FINISHED", **result)

    parent, results, agg = run_seeds(cfg, n, run_one=one_seed)
    print(summary_table(agg))
    print(f"\nMLflow parent run {parent} FINISHED with {len(results)} seed runs of {nproc} "
          f"processes — experiment '{results[0].experiment}' at {results[0].tracking_uri}")
    return EXIT_OK


def _resumable(cfg, resume: str):
    from lethe.platform import checkpoint as ckpt
    from lethe.platform.config import to_yaml

    return ckpt.find_resumable(cfg.checkpoint.dir, None if resume == "latest" else resume,
                               ckpt.config_hash(to_yaml(cfg)))


def _end_run(cfg, folder: str, status: str) -> str | None:
    """Mark the run rank 0 announced ``status`` (FAILED whatever rank 0 recorded: a failing rank
    fails the run; KILLED only while it is still RUNNING); returns its id."""
    path = Path(folder, "run_id")
    if not path.exists():
        return None   # no run was started (e.g. a config error raised on every rank)
    from lethe.platform.tracking import Tracker

    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment)
    tracker.run_id = path.read_text()
    if status == "FAILED" or tracker.client.get_run(tracker.run_id).info.status == "RUNNING":
        tracker.end(status)
    return tracker.run_id


def cmd_sweep(args) -> int:
    from lethe.platform import sweep

    overrides = list(args.overrides)
    if (args.status or args.resume) and args.config:
        overrides.insert(0, args.config)  # `--status P key=value`: no CONFIG
    if args.status:
        state, rows = sweep.member_status(sweep.find_sweep(args.status, overrides))
        print(sweep.format_status(state, rows))
        failed = [r for r in rows if r.state in ("FAILED", "KILLED", "LOST")]
        return EXIT_RUN if failed else EXIT_OK
    if args.resume:
        state = sweep.resume(args.resume, overrides, wait=False if args.no_wait else None)
        return sweep.sweep_exit_code(state)
    if not args.config:
        raise ConfigError("lethe sweep needs CONFIG (a YAML path or preset), or --status/--resume PARENT")
    plan = sweep.plan(args.config, overrides, args.grid, args.seeds)
    state = sweep.launch(plan, wait=False if args.no_wait else None)
    code = sweep.sweep_exit_code(state)
    if code:
        bad = [i for i, s in state["result"].items() if s != "FINISHED"]
        print(f"lethe: sweep {state['parent_run_id']}: members {', '.join(map(str, bad))} did not "
              f"finish (their logs are listed above)", file=sys.stderr)
    return code


def cmd_compare(args) -> int:
    from lethe.dashboards.compare import page_summary, write_compare

    uri, experiment = None, args.experiment
    runs = [r for r in args.runs or [] if "=" not in r]  # `--runs A B key=value`: not run ids
    overrides = [r for r in args.runs or [] if "=" in r] + list(args.overrides)
    for item in overrides:
        key, sep, value = item.partition("=")
        if key == "tracking.uri" and sep:
            uri = value
        elif key == "tracking.experiment" and sep:
            experiment = experiment or value
        else:
            raise ConfigError(f"lethe compare: unknown argument '{item}' (accepted: tracking.uri=URI, "
                              f"tracking.experiment=NAME)")
    from lethe.platform.stores import opening
    from lethe.platform.tracking import resolve_tracking_uri

    resolved = resolve_tracking_uri(uri)
    with opening(resolved):
        page = write_compare(resolved, experiment=experiment, run_ids=runs or None, out=args.out)
    print(page_summary(page))
    return EXIT_OK


def _crash_log(exc: BaseException) -> str:
    fd, path = tempfile.mkstemp(prefix="lethe-error-", suffix=".log")
    with os.fdopen(fd, "w") as fh:
        fh.write("".join(traceback.format_exception(exc)))
    return path


def _report(line: str) -> None:
    """A command's error line. In a rank of ``--nproc N`` it goes to the launcher's folder
    instead: several ranks often fail alike, and the launcher says the first one, once."""
    from lethe.engine.distributed import RUN_DIR_ENV, rank, world_size

    folder = os.environ.get(RUN_DIR_ENV)
    if folder and world_size() > 1:
        Path(folder, f"error.{rank()}").write_text(line)
        return
    print(line, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    import logging
    import warnings

    # The entry point owns the process: a run's progress (INFO) reaches its run.log handler.
    # Library callers of run_experiment keep their own logging levels.
    logging.getLogger("lethe").setLevel(logging.INFO)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from lethe.platform.tracking import HTTP_LIMITS

    for key, value in HTTP_LIMITS.items():   # a dead tracking server fails a command in < 1 min
        os.environ.setdefault(key, value)
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value after an option (`run C --seeds 3 a=b`): argparse leaves them over
        if args.command not in ("run", "sweep", "compare") or any(x.startswith("-") for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    # Avalanche 0.6 warns about its own deprecations on every run; they are not the user's.
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="avalanche")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"avalanche\..*")
    if args.command is None:
        _parser().print_help()
        return EXIT_INPUT
    try:
        if args.command == "list":
            return cmd_list(args.what)
        if args.command == "reproduce":
            return cmd_reproduce(args)
        if args.command == "sweep":
            return cmd_sweep(args)
        if args.command == "compare":
            return cmd_compare(args)
        return cmd_run(args)
    except BrokenPipeError:  # `lethe list | head`
        return EXIT_OK
    except KeyboardInterrupt as exc:
        run_id = getattr(exc, "lethe_run_id", None)   # set by the runner when it ended a run
        print(f"\nlethe: interrupted; MLflow run {run_id} is marked KILLED and its last checkpoint is "
              f"kept (continue with --resume {run_id})" if run_id else
              "\nlethe: interrupted before an MLflow run was started; nothing to resume",
              file=sys.stderr)
        return EXIT_INTERRUPT
    except LetheError as exc:
        where = getattr(exc, "log_path", None)
        kind = "error" if exc.exit_code == EXIT_INPUT else "run failed"
        _report(f"lethe: {kind}: {exc}" + (f" (full log: {where})" if where else ""))
        return exc.exit_code
    except Exception as exc:  # a bug or an unexpected library error: message + log, no traceback
        _report(f"lethe: run failed: {type(exc).__name__}: {exc} (full log: {_crash_log(exc)})")
        return EXIT_RUN


def console() -> None:
    """The ``lethe`` command: :func:`main`, then an exit without the interpreter's teardown.

    Once every exit handler has run (logging's flush, multiprocessing's joins, the libraries'
    own clean-ups), what is left of a normal exit is Python destroying the objects of torch,
    Avalanche and all they import: ≈ 1.5 s on a 2-core machine for nothing a user keeps. The
    handler that skips it is registered first, so it runs after every other one; an uncaught
    exception (no exit code) exits the normal way, with its traceback."""
    import atexit

    code: list[int] = []

    def exit_now() -> None:
        if code:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):   # a closed pipe (`lethe list | head`)
                    pass
            os._exit(code[0])

    atexit.register(exit_now)
    code.append(int(main() or 0))
    sys.exit(code[0])


if __name__ == "__main__":  # pragma: no cover
    console()
