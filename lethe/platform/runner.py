"""The experience loop: build → (resume) → serve each experience → evaluate → log → checkpoint."""
from __future__ import annotations

import contextlib
import logging
import random
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lethe import registry
from lethe.errors import ConfigError, LetheError, RunError
from lethe.platform import checkpoint as ckpt
from lethe.platform.config import flatten, to_yaml

log = logging.getLogger("lethe")


@dataclass
class RunResult:
    run_id: str
    tracking_uri: str
    experiment: str
    status: str
    final: dict = field(default_factory=dict)
    checkpoint_dir: Path | None = None
    summary: str = ""


def pick_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but no CUDA device is available here (use device=cpu or auto)")
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def check_compatible(method_entry, stream, cfg) -> None:
    """Fail at config time when the method cannot serve the stream."""
    kinds = method_entry.extras.get("kinds", ("learn",))
    missing = sorted(stream.kinds - set(kinds))
    if missing:
        raise ConfigError(f"method '{method_entry.name}' cannot serve {'/'.join(missing)} "
                          f"experiences of scenario '{cfg.scenario.name}' (it serves: "
                          f"{', '.join(kinds)}); pick a method that does (see `lethe list methods`)")
    settings = method_entry.extras.get("settings")
    if settings and stream.setting not in settings:
        raise ConfigError(f"method '{method_entry.name}' needs a {' or '.join(settings)} stream but "
                          f"scenario '{cfg.scenario.name}' is {stream.setting}"
                          f"{' (set scenario.task_labels=true)' if 'task_incremental' in settings else ''}")


def check_distributable(cfg: DictConfig, ranks: int) -> None:
    """What training in ``ranks`` processes needs of a config (``--nproc``, multi-task SLURM
    jobs), checked before any process starts."""
    from lethe.engine.distributed import check_launch

    check_launch(cfg, ranks)
    method = registry.get("methods", cfg.method.name).obj
    if ranks > 1 and method.not_distributable:
        raise ConfigError(f"method '{cfg.method.name}' cannot train in several processes: "
                          f"{method.not_distributable}; run it in one process (without --nproc / "
                          f"slurm.tasks_per_node)")
    if ranks > 1 and cfg.distributed.strategy == "fsdp" and not method.fsdp:
        fsdp = sorted(n for n, e in registry.entries("methods").items() if e.obj.fsdp)
        raise ConfigError(f"method '{cfg.method.name}' does not train under distributed.strategy=fsdp "
                          f"yet (it was not tested with sharded weights: it may copy the model, "
                          f"build another or add modules to it after it is sharded); use "
                          f"distributed.strategy=ddp, or one of: {', '.join(fsdp)}")


def build_components(cfg: DictConfig):
    """Scenario stream, model and method entry: everything that can fail on user input."""
    from lethe.models.vision import ModelInfo

    stream = registry.get("scenarios", cfg.scenario.name).obj(cfg.scenario, cfg.seed)
    if cfg.scenario.get("forget_requests"):   # deletion requests, validated here (ConfigError)
        from lethe.scenarios.forget import add_forget_requests

        add_forget_requests(stream, cfg.scenario.forget_requests, cfg.seed)
    method_entry = registry.get("methods", cfg.method.name)
    check_compatible(method_entry, stream, cfg)
    method_entry.obj.check_stream(cfg.method, stream, cfg.seed)   # e.g. a request empties a SISA shard
    info = ModelInfo(input_shape=stream.input_shape, n_classes=stream.n_classes)
    try:
        model = registry.get("models", cfg.model.name).obj(cfg.model, info)
    except (ValueError, TypeError, RuntimeError) as exc:  # e.g. torch: "negative dimension -5"
        settings = ", ".join(f"model.{k}={v}" for k, v in cfg.model.items() if k != "name")
        raise ConfigError(f"model '{cfg.model.name}' cannot be built with {settings or 'its defaults'}: "
                          f"{str(exc).splitlines()[0]} (check the model.* values)") from None
    return stream, model, method_entry


def check_fingerprints(stream, expected: dict[str, str]) -> None:
    """Refuse to run when the data differs from what a recorded run saw."""
    from lethe.platform.environment import data_fingerprints

    now = data_fingerprints(stream)
    changed = sorted(k for k in set(expected) | set(now) if expected.get(k) != now.get(k))
    if changed:
        raise ConfigError(f"the data no longer matches the recorded run: fingerprint of "
                          f"{', '.join(changed)} differs (recorded "
                          f"{', '.join(str(expected.get(k)) for k in changed)}, now "
                          f"{', '.join(str(now.get(k)) for k in changed)}); restore the original "
                          f"data or run the config as a new experiment with `lethe run`")


class Runner:
    """Runs one experiment config into one MLflow run."""

    def __init__(self, cfg: DictConfig, resume: bool = False, resume_run_id: str | None = None,
                 tags: dict[str, str] | None = None, expect_fingerprints: dict | None = None,
                 reference_cache: dict | None = None):
        self.cfg = cfg
        # retain-only reference models of QA streams, by config: a caller running several
        # methods on one config (benchmarks) passes one dict so the reference trains once
        self.reference_cache = {} if reference_cache is None else reference_cache
        self.tags = dict(tags or {})  # extra MLflow tags of a new run (sweeps: parent run link)
        self.expect_fingerprints = expect_fingerprints  # `lethe reproduce`: the recorded data
        self.config_yaml = to_yaml(cfg)
        self.cfg_hash = ckpt.config_hash(self.config_yaml)
        self.resume_folder = None
        if resume or resume_run_id:
            self.resume_folder = ckpt.find_resumable(cfg.checkpoint.dir, resume_run_id, self.cfg_hash)

    # --- the whole run ------------------------------------------------------------------
    def run(self) -> RunResult:
        """The run, under MLflow HTTP limits (a dead server fails it within a minute) and a
        lock on its run folder (two processes cannot continue one run)."""
        from lethe.engine.distributed import world_size
        from lethe.platform.run_lock import run_folder_lock
        from lethe.platform.tracking import http_limits

        with http_limits(), contextlib.ExitStack() as self._held:
            # before anything touches the run; with --nproc N the launcher holds the lock for
            # all ranks (a second rank's flock would be refused)
            if self.resume_folder is not None and world_size() == 1:
                self._held.enter_context(run_folder_lock(self.resume_folder, resuming=True))
            return self._run()

    def _run(self) -> RunResult:
        from lethe.engine import distributed
        from lethe.platform.tracking_process import open_tracker

        cfg = self.cfg
        self.checkpointer = None if self.resume_folder is None else ckpt.Checkpointer(
            self.resume_folder.parent, self.resume_folder.name)
        meta = self.checkpointer.meta() if self.checkpointer else {}
        distributed.configure(cfg.distributed, cfg.seed)   # one rank of `--nproc N`, or nothing
        from lethe.metrics.passes import shard_evaluation

        shard_evaluation(cfg.distributed.strategy != "fsdp")
        # a local store opens in a child process while torch, Avalanche and the stream load;
        # with --nproc N only rank 0 tracks (one run whatever the process count)
        self.lead = distributed.is_lead()
        self.tracker = (open_tracker if self.lead else distributed.NullTracker)(
            meta.get("tracking_uri") or cfg.tracking.uri, meta.get("experiment") or cfg.tracking.experiment)
        try:
            return self._tracked(meta)
        finally:
            self.tracker.close()

    def _tracked(self, meta: dict) -> RunResult:
        from lethe.engine import distributed
        from lethe.engine.distributed import announce_run, rank_device
        from lethe.platform.run_lock import run_folder_lock

        cfg = self.cfg
        seed_everything(cfg.seed, cfg.deterministic)   # every rank alike: the shuffles must agree
        device = rank_device(pick_device(cfg.device))
        stream, model, method_entry = build_components(cfg)
        if self.expect_fingerprints is not None:
            check_fingerprints(stream, self.expect_fingerprints)
        # a damaged checkpoint: refused before the run is touched; the Checkpointer knows
        # which of its state files are good
        state = self.checkpointer.load() if self.checkpointer else None
        ckpt.check_root(cfg.checkpoint.dir)
        tracker = self.tracker.ready()
        # the method is built before its MLflow run exists: a setting it refuses (ConfigError,
        # exit 2) leaves no run behind, as the README promises
        plugins = self._plugins(lambda x, t: method.predict(x, t))
        method = self._method(method_entry, model, stream, device, plugins)
        evaluator = self._evaluator(stream, device)
        handler = None
        try:   # from here on every failure ends the run (FAILED or KILLED), none leaves it RUNNING
            self._begin(tracker, meta, stream)
            announce_run(tracker.run_id)
            if self.checkpointer is None and self.lead:   # rank 0 alone writes files
                self.checkpointer = ckpt.Checkpointer(cfg.checkpoint.dir, tracker.run_id)
            if self.resume_folder is None and self.lead:
                self._held.enter_context(run_folder_lock(self.checkpointer.dir, resuming=False))
            if self.lead:
                self.checkpointer.write_config(self.config_yaml)
                handler = self._file_log()
                log.info("distributed: %s", distributed.describe())
            else:   # no run.log here: without a handler Python would print every record to stderr
                handler = logging.NullHandler()
                logging.getLogger("lethe").addHandler(handler)
            result = self._loop(stream, method, evaluator, plugins, state)
            tracker.end("FINISHED")
            return result
        except (KeyboardInterrupt, SystemExit) as exc:  # SystemExit: a scheduler preempted the job
            if tracker.run_id:
                log.warning("interrupted; checkpoint kept in %s", self.checkpointer and self.checkpointer.dir)
                tracker.end("KILLED")
                exc.lethe_run_id = tracker.run_id   # the CLI says which run it marked KILLED
            raise
        except BaseException as exc:
            log.error("run failed: %s\n%s", exc, traceback.format_exc())
            tracker.end("FAILED")
            if isinstance(exc, LetheError) and self.checkpointer is not None:
                exc.log_path = str(self.checkpointer.log_path)
            raise
        finally:
            if handler is not None:
                logging.getLogger("lethe").removeHandler(handler)
                handler.close()
            if self.checkpointer is not None and self.checkpointer.log_path.exists() and tracker.run_id:
                try:
                    tracker.log_file(self.checkpointer.log_path)
                except Exception:  # a failing store must not hide the original error
                    pass

    def _begin(self, tracker, meta: dict, stream) -> None:
        """Continue the recorded MLflow run, or create a new one with params and environment."""
        cfg = self.cfg
        if meta:
            tracker.resume(meta["run_id"])
            return
        tracker.start(cfg.tracking.run_name or cfg.name, flatten(cfg),
                      {"lethe.config_hash": self.cfg_hash, "lethe.method": cfg.method.name,
                       "lethe.scenario": cfg.scenario.name, "lethe.model": cfg.model.name,
                       **self.tags})
        tracker.log_text(self.config_yaml, "config.yaml")
        self._log_environment(tracker, stream)

    @staticmethod
    def _log_environment(tracker, stream) -> None:
        """Versions, hardware, git state and data fingerprints, for `lethe reproduce`."""
        from lethe.platform import environment

        record = environment.capture(stream)
        tracker.set_tags(environment.tags_of(record))
        tracker.log_dict(record, "environment.json")
        tracker.log_pip_freeze("pip_freeze.txt")
        diff = environment.git_state().get("diff")
        if diff:
            tracker.log_text(diff, "git_diff.patch")

    def _file_log(self):
        handler = logging.FileHandler(self.checkpointer.log_path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handler.setLevel(logging.INFO)   # the logger's level stays the process owner's (the CLI)
        logging.getLogger("lethe").addHandler(handler)
        return handler

    def _loop(self, stream, method, evaluator, plugins, state) -> RunResult:
        from tqdm.auto import tqdm

        n = len(stream.experiences)
        if state is not None:
            start = self._restore(method, evaluator, plugins, n, state)
        else:
            start = 0
            if self.cfg.eval.initial:
                evaluator.evaluate(method.predict, "init", method.model, method.plain_predict)
        final = {}
        for exp in tqdm(stream.experiences[start:], desc=self.cfg.name, unit="exp", initial=start,
                        total=n, disable=None):
            final = self._serve(exp, n, method, evaluator, plugins)
            if self.cfg.checkpoint.enabled and (self.lead or self._gathers()):
                self._save(method, evaluator, plugins, exp.index + 1, n, finished=False)
        return self._finish(method, evaluator, plugins, final, n)

    # --- the pieces of the loop ---------------------------------------------------------
    def _plugins(self, predict) -> list:
        """The runner's training plugins: progress, NaN check, lr schedule, validation."""
        from lethe.engine.plugins import FiniteLossCheck, TrainProgress

        cfg, tracker = self.cfg, self.tracker
        self.current = "setup"
        describe = lambda: self.current  # noqa: E731 - read by plugins at call time
        scheduled = cfg.train.lr_schedule.name != "none"
        plugins = [TrainProgress(tracker, describe, cfg.train.epochs, log_lr=not scheduled,
                                 per_iteration=cfg.train.log_every_iter),
                   FiniteLossCheck(describe)]
        if scheduled:   # sets the lr before every iteration and logs train/lr per step
            from lethe.engine.schedules import LRSchedulePlugin

            plugins.append(LRSchedulePlugin(cfg.train.lr_schedule, cfg.train.lr, tracker))
        if cfg.eval.every_epochs or cfg.eval.every_steps:   # val split + best-model selection
            from lethe.engine.validation import ValidationPlugin

            plugins.append(ValidationPlugin(cfg, predict, tracker, cfg.seed))
        return plugins

    def _method(self, method_entry, model, stream, device, plugins):
        from lethe.methods.base import MethodContext
        from lethe.platform.tracking import make_avalanche_evaluator

        cfg = self.cfg
        ctx = MethodContext(train=cfg.train, device=device, stream=stream, seed=cfg.seed,
                            plugins=plugins,
                            evaluator=make_avalanche_evaluator(self.tracker))
        return method_entry.obj(cfg.method, model, ctx)

    def _evaluator(self, stream, device):
        """The stream's evaluator; QA streams get the retain-only reference, trained on demand."""
        from lethe.metrics.evaluators import for_stream
        from lethe.platform.reference import train_retain_model

        cfg, cache = self.cfg, self.reference_cache
        return for_stream(stream, device, cfg.eval, cfg.seed,
                          reference=lambda: train_retain_model(cfg, stream, device, cache))

    def _restore(self, method, evaluator, plugins, n: int, state: dict) -> int:
        """Restore the checkpoint of the run being resumed; returns the next experience index."""
        method.load_state_dict(state["method"])
        evaluator.load_state_dict(state["evaluator"] if "evaluator" in state else {
            # checkpoints written before the evaluator protocol
            "store_labels": state["store_labels"], "store_preds": state["store_preds"],
            "extra": state.get("eval_extra", {})})
        for plugin, plugin_state in zip(plugins, state.get("plugins", [])):
            plugin.load_state_dict(plugin_state)
        ckpt.set_rng_state(state["rng"])
        start = int(state["next"])
        log.info("resumed run %s at experience %d/%d", self.tracker.run_id, start, n)
        if self.lead:
            print(f"resuming run {self.tracker.run_id} at experience {start}/{n}")
        return start

    def _serve(self, exp, n: int, method, evaluator, plugins) -> dict:
        """Serve one experience, evaluate, log; returns the metrics logged for it."""
        from lethe.metrics.protocol import Served

        self.current = f"experience {exp.index + 1}/{n} ({exp.kind})"
        t0 = time.perf_counter()
        method.serve(exp)
        t1 = time.perf_counter()
        evaluator.evaluate(method.predict, f"{exp.kind}:{exp.index}", method.model, method.plain_predict)
        served = Served(exp, method.predict, method.model, serve_s=t1 - t0,
                        stats=method.unlearn_stats() if exp.kind == "forget" else {})
        metrics = evaluator.experience_metrics(served)
        metrics["time/train_s"] = t1 - t0
        metrics["time/eval_s"] = time.perf_counter() - t1
        metrics.update(method.log_params())   # e.g. params/trainable (CLR), from step 0 on
        for plugin in plugins:
            metrics.update(plugin.experience_metrics(exp))
        self.tracker.log_metrics(metrics, step=exp.index)
        log.info("%s: %s", self.current, {k: round(v, 4) for k, v in metrics.items()})
        return metrics

    def _log_lr_schedule(self) -> None:
        """Plot train/lr as logged (the MLflow history spans resumed segments too)."""
        from lethe.platform.report import DPI, schedule_figure

        history = self.tracker.metric_history("train/lr")
        if history:
            self.tracker.log_figure(schedule_figure(
                [h[0] for h in history], [h[1] for h in history],
                f"{self.cfg.name}: {self.cfg.train.lr_schedule.name} lr schedule"), "lr_schedule.png", DPI)

    def _unlearning_csv(self, folder: Path) -> list[str]:
        """unlearn/* metrics, one row per forget step (from MLflow: spans resumed segments)."""
        from lethe.metrics.unlearning import write_csv

        keys = [k for k in self.tracker.metric_keys() if k.startswith("unlearn/")]
        if not keys:
            return []
        write_csv({k: self.tracker.metric_history(k) for k in keys}, folder / "unlearning.csv")
        return ["unlearning.csv"]

    def _state(self, method, evaluator, plugins, next_index: int) -> dict:
        return {"method": method.state_dict(), "evaluator": evaluator.state_dict(),
                "plugins": [p.state_dict() for p in plugins], "rng": ckpt.rng_state(),
                "next": next_index}

    def _gathers(self) -> bool:
        """Whether a checkpoint's state is gathered from every rank (FSDP: each holds a shard
        of the weights, so every rank takes part and rank 0 alone writes)."""
        from lethe.engine.distributed import world_size

        return self.cfg.distributed.strategy == "fsdp" and world_size() > 1

    def _save(self, method, evaluator, plugins, next_index: int, n: int, finished: bool) -> None:
        state = self._state(method, evaluator, plugins, next_index)   # FSDP: a collective
        if not self.lead:
            return
        meta = {"run_id": self.tracker.run_id, "tracking_uri": self.tracker.uri,
                "experiment": self.tracker.experiment, "config_hash": self.cfg_hash,
                "next_experience": next_index, "n_experiences": n, "finished": finished,
                "config": self.cfg.name}
        self.tracker.flush()   # what a checkpoint covers is stored before it is written
        self.checkpointer.save(state, meta)

    def _finish(self, method, evaluator, plugins, final: dict, n: int) -> RunResult:
        import tempfile

        import torch

        from lethe.platform import report

        tracker, store = self.tracker, evaluator.store
        if not self.lead:   # --nproc N: rank 0 writes the artifacts and the checkpoint
            if self.cfg.checkpoint.enabled and self._gathers():   # its share of the state
                self._save(method, evaluator, plugins, n, n, finished=True)
            return RunResult(run_id=None, tracking_uri=tracker.uri, experiment=tracker.experiment,
                             status="FINISHED", final=final)
        title = f"{self.cfg.name}: {self.cfg.method.name}"
        tracker.log_text(report.accuracy_csv(store), "accuracy_matrix.csv")
        tracker.log_figure(report.accuracy_figure(store, title), "accuracy_matrix.png", report.DPI)
        tracker.log_text(report.flip_csv(store), "flip_matrix.csv")
        if self.cfg.train.lr_schedule.name != "none":
            self._log_lr_schedule()
        with tempfile.TemporaryDirectory() as tmp:   # files written by other modules
            tmp = Path(tmp)
            files = self._unlearning_csv(tmp)
            files += evaluator.write_artifacts(tmp, title)
            if self.cfg.eval.save_predictions:
                torch.save(store.to_dict() | {"labels_index": torch.arange(len(store))},
                           tmp / "predictions.pt")
                (tmp / "predictions_labels.txt").write_text("\n".join(store.labels))
                files += ["predictions.pt", "predictions_labels.txt"]
            for name in files:
                tracker.log_file(tmp / name)
        if self.cfg.checkpoint.enabled:
            self._save(method, evaluator, plugins, n, n, finished=True)
            tracker.log_file(self.checkpointer.state_path, "checkpoints")
        summary = report.summary_text(store, final)
        log.info("\n%s", summary)
        return RunResult(run_id=tracker.run_id, tracking_uri=tracker.uri,
                         experiment=tracker.experiment, status="FINISHED", final=final,
                         checkpoint_dir=self.checkpointer.dir, summary=summary)


def run_experiment(cfg: DictConfig, resume: bool = False, resume_run_id: str | None = None,
                   tags: dict[str, str] | None = None, expect_fingerprints: dict | None = None,
                   reference_cache: dict | None = None) -> RunResult:
    """Library entry point: run a validated config (see :func:`lethe.platform.config.load_config`)."""
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(cfg)
    return Runner(cfg, resume=resume, resume_run_id=resume_run_id, tags=tags,
                  expect_fingerprints=expect_fingerprints, reference_cache=reference_cache).run()


__all__ = ["RunResult", "Runner", "run_experiment", "RunError"]
