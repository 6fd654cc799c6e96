"""The `lethe` command. Heavy libraries are imported only by the subcommands that need them."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback

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
    ls = sub.add_parser("list", help="list scenarios, models, methods or presets")
    ls.add_argument("what", nargs="?", default="all",
                    choices=["all", "scenarios", "models", "methods", "presets"])
    return p


def cmd_list(what: str) -> int:
    from lethe import registry
    from lethe.platform.config import presets

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


def cmd_run(args) -> int:
    from lethe.platform.config import load_config

    overrides = list(args.overrides)
    resume = args.resume
    if resume and "=" in resume:          # `--resume key=value`: an override, not a run id
        overrides.insert(0, resume)
        resume = "latest"
    cfg = load_config(args.config, overrides)
    from lethe.platform.runner import run_experiment

    result = run_experiment(cfg, resume=resume is not None,
                            resume_run_id=None if resume in (None, "latest") else resume)
    print(result.summary)
    print(f"\nMLflow run {result.run_id} FINISHED — experiment '{result.experiment}' at {result.tracking_uri}")
    print(f"open it with: mlflow ui --backend-store-uri {result.tracking_uri}")
    print(f"checkpoint and log: {result.checkpoint_dir}")
    return EXIT_OK


def _crash_log(exc: BaseException) -> str:
    fd, path = tempfile.mkstemp(prefix="lethe-error-", suffix=".log")
    with os.fdopen(fd, "w") as fh:
        fh.write("".join(traceback.format_exception(exc)))
    return path


def main(argv: list[str] | None = None) -> int:
    from lethe.platform.errors import LetheError

    import warnings

    args = _parser().parse_args(argv)
    # Avalanche 0.6 warns about its own deprecations on every run; they are not the user's.
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="avalanche")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"avalanche\..*")
    if args.command is None:
        _parser().print_help()
        return EXIT_INPUT
    try:
        if args.command == "list":
            return cmd_list(args.what)
        return cmd_run(args)
    except KeyboardInterrupt:
        print("\nlethe: interrupted; the MLflow run is marked KILLED and the last checkpoint is kept "
              "(continue with --resume)", file=sys.stderr)
        return EXIT_INTERRUPT
    except LetheError as exc:
        where = getattr(exc, "log_path", None)
        kind = "error" if exc.exit_code == EXIT_INPUT else "run failed"
        print(f"lethe: {kind}: {exc}" + (f" (full log: {where})" if where else ""), file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # a bug or an unexpected library error: message + log, no traceback
        print(f"lethe: run failed: {type(exc).__name__}: {exc} (full log: {_crash_log(exc)})",
              file=sys.stderr)
        return EXIT_RUN


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
