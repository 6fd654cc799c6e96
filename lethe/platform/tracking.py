"""MLflow tracking: one lethe run = one MLflow run (params, metrics per experience, artifacts)."""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from lethe import __version__
from lethe.errors import RunError
from lethe.platform.stores import opening, sqlite_path

log = logging.getLogger("lethe")

# MLflow's own HTTP settings, as lethe sets them for its runs unless the user set them. MLflow's
# defaults (7 retries, backoff factor 2, 120 s per try) keep a run silent for ~4 minutes on each
# request to a dead server; these give up within a minute: 4 tries of at most 10 s each (per
# connect or read: a long upload that keeps sending is not cut), 0 + 2 + 4 s of backoff.
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
               "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
# Marking a run KILLED after Ctrl-C: the user is waiting, so one try of 3 s.
HTTP_LAST_WORD = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "3", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}


@contextlib.contextmanager
def http_limits(limits: dict[str, str] = HTTP_LIMITS, override: bool = False):
    """MLflow's HTTP settings for the block (those the user has not set, or all with
    ``override``), restored when it ends. MLflow reads them at every request."""
    saved = {k: os.environ.get(k) for k in limits}
    for key, value in limits.items():
        if override or key not in os.environ:
            os.environ[key] = value
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def git_commit() -> str | None:
    """Commit of the lethe source tree, when it is a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The one place lethe decides which store it tracks to: ``uri``, else MLflow's own choice
    (``mlflow.set_tracking_uri``, then $MLFLOW_TRACKING_URI, then its default). A relative
    SQLite or file path is made absolute, so that processes started elsewhere (sweep jobs on
    a cluster, ``lethe reproduce``, ``mlflow ui``) reach the same store."""
    import mlflow
    from mlflow.utils.file_utils import local_file_uri_to_path
    from mlflow.utils.uri import is_local_uri

    uri = uri or mlflow.get_tracking_uri()
    if uri.startswith("sqlite:"):
        from sqlalchemy.engine import make_url  # MLflow's SQL stores are SQLAlchemy URLs

        url = make_url(uri)
        if not url.database or url.database == ":memory:":
            return uri
        return url.set(database=str(Path(url.database).resolve())).render_as_string(
            hide_password=False)
    if is_local_uri(uri):
        return Path(local_file_uri_to_path(uri)).resolve().as_uri()
    return uri


def artifact_root(uri: str, experiment: str) -> str | None:
    """Artifacts of a SQLite store live next to its database, in ``<db folder>/mlartifacts/
    <experiment>``, rather than in ``./mlruns`` of whatever folder a run was started from; other
    stores keep MLflow's default (None). The folder name keeps letters, digits, ``_``, ``-``
    and inner dots: an experiment named ``..`` or ``a/../b`` stays inside ``mlartifacts``."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///"):])
    folder = re.sub(r"[^\w.-]+", "_", experiment).lstrip(".") or "experiment"
    return (db.parent.resolve() / "mlartifacts" / folder).as_uri()


@contextlib.contextmanager
def deferred_interrupt(enabled: bool = True):
    """Hold Ctrl-C until the block ends, then raise it. An interrupt inside an MLflow write can
    leave a SQLite transaction open: the store stays locked and the run can no longer be
    marked KILLED ("database is locked"). Only with Python's own SIGINT handler, main thread.
    Not for a tracking server (``enabled=False``): the server finishes or drops its own
    transaction, and holding Ctrl-C while a request waits on a dead server ignores it."""
    if (not enabled or threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    pending = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pending:
            raise KeyboardInterrupt


def _whole(method):
    """A tracking write that Ctrl-C cannot cut in half (see :func:`deferred_interrupt`)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with deferred_interrupt(enabled=not self.remote):
            return method(self, *args, **kwargs)
    return wrapper


def _network_failure(exc: BaseException):
    """The requests exception behind an MLflow error when the server could not be reached
    (refused, timed out, kept answering 5xx); None for any other error (a bad request is not
    an unreachable server)."""
    import requests

    kinds = (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
             requests.exceptions.RetryError)
    seen = exc
    while seen is not None:
        if isinstance(seen, kinds):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _reason(failure: BaseException) -> str:
    import requests

    if isinstance(failure, requests.exceptions.Timeout):
        return f"no answer within {os.environ.get('MLFLOW_HTTP_REQUEST_TIMEOUT', '120')} s"
    if isinstance(failure, requests.exceptions.RetryError):
        return "the server kept answering with an error status"
    errno = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(failure))
    return errno.group(1).strip() if errno else "the connection failed"


class _GuardedClient:
    """The MlflowClient of a :class:`Tracker`: every call goes through the tracker's
    :meth:`Tracker._request`, which turns an unreachable server into one RunError."""

    def __init__(self, client, tracker: Tracker):
        self._client, self._tracker = client, tracker

    def __getattr__(self, name):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args, **kwargs):
            return self._tracker._request(name, attr, *args, **kwargs)
        return call


@contextlib.contextmanager
def store_lock(uri: str):
    """An exclusive lock for opening a SQLite store (other stores: no lock).

    Several processes opening a store that does not exist yet run MLflow's schema migration at
    the same time and can break it ("table _alembic_tmp_tags already exists"), leaving a file
    no later run can use; two may also both create the same experiment. The first process to
    take the lock creates the schema; the others wait, then find it done. The lock is an
    ``flock`` on a hidden file next to the database (``.<name>.lock``), not on the database
    itself: closing another descriptor of the database would drop SQLite's own locks.
    """
    import fcntl

    path = sqlite_path(uri)
    if path is None:
        yield
        return
    with open(path.parent / f".{path.name}.lock", "a") as fh:   # its folder: checked to exist
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class Tracker:
    """A thin layer over the MLflow client for one run; every write finishes before a Ctrl-C
    that arrives during it is raised."""

    def __init__(self, uri: str | None, experiment: str):
        from mlflow.tracking import MlflowClient

        self.experiment = experiment
        self.run_id: str | None = None
        self.unreachable: str | None = None   # the message, once the server could not be reached
        self._stored: dict[str, set[int]] = {}   # resumed run: the steps of each key it holds
        # a URI the user got wrong is a ConfigError (exit 2) before any store is opened or
        # created; schema creation and experiment get-or-create run one process at a time
        self.uri = resolve_tracking_uri(uri)
        with opening(self.uri), store_lock(self.uri):
            self.remote = self.uri.split(":", 1)[0] in ("http", "https", "databricks")
            self.client = _GuardedClient(MlflowClient(tracking_uri=self.uri), self)
            self.experiment_id = self._experiment_id(experiment)

    def _experiment_id(self, name: str) -> str:
        """Get or create the experiment. The store lock spans processes on this machine only:
        runs starting together on a tracking server can both find no experiment and both
        create it; the loser's RESOURCE_ALREADY_EXISTS means it is there now."""
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=artifact_root(self.uri, name))
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        return self.client.get_experiment_by_name(name).experiment_id

    def _request(self, name: str, call, *args, **kwargs):
        """One MLflow client call. A server that cannot be reached (MLflow has retried it within
        :data:`HTTP_LIMITS`) becomes one RunError naming the URI and the failed request; every
        later request fails at once instead of waiting on the dead server again."""
        if self.unreachable is not None:
            raise RunError(self.unreachable)
        start = time.monotonic()
        try:
            return call(*args, **kwargs)
        except Exception as exc:
            failure = _network_failure(exc)
            if failure is None:
                raise
            self.unreachable = self._unreachable_message(name, exc, failure, time.monotonic() - start)
            raise RunError(self.unreachable) from exc

    def _unreachable_message(self, name: str, exc: Exception, failure: Exception, seconds: float) -> str:
        url = re.search(r"API request to (\S+) failed", str(exc))
        tries = 1 + int(os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7"))
        text = (f"the tracking server {self.uri} is unreachable: {name}"
                f"{f' ({url.group(1)})' if url else ''} failed after {tries} tries in {seconds:.0f} s "
                f"({_reason(failure)})")
        if self.run_id is None:
            return text + "; start the server, or point tracking.uri at a running one"
        return text + (f"; MLflow run {self.run_id} stays RUNNING there and its local checkpoint is "
                       f"kept: when the server is back, continue it with "
                       f"`lethe run CONFIG --resume {self.run_id}`")

    @staticmethod
    def default_uri() -> str:
        return resolve_tracking_uri(None)

    # --- run lifecycle ------------------------------------------------------------------
    @_whole
    def start(self, run_name: str | None, params: dict[str, str], tags: dict[str, str]) -> str:
        base_tags = {"lethe.version": __version__, "host": socket.gethostname()}
        commit = git_commit()
        if commit:
            base_tags["git.commit"] = commit
        run = self.client.create_run(self.experiment_id, run_name=run_name,
                                     tags={**base_tags, **tags})
        self.run_id = run.info.run_id
        self.log_params(params)
        return self.run_id

    @_whole
    def resume(self, run_id: str) -> None:
        run = self.client.get_run(run_id)  # raises if the run does not exist
        self.run_id = run.info.run_id
        # What the interrupted process logged after its last checkpoint is in the run already,
        # and this process trains that part again; MLflow cannot delete a metric point, so a
        # point at a step the run already holds for its key is not logged twice.
        self._stored = {key: {m.step for m in self.client.get_metric_history(run_id, key)}
                        for key in run.data.metrics}
        self.client.update_run(self.run_id, status="RUNNING")
        self.client.set_tag(self.run_id, "lethe.resumed", "true")

    @_whole
    def end(self, status: str) -> None:
        """status: FINISHED | FAILED | KILLED. FAILED and KILLED end a run that is failing
        already: a tracking error then is logged, not raised, so that the first error is the
        one reported; KILLED (Ctrl-C, a preempted job) tries once, briefly."""
        if not self.run_id:
            return
        if status == "FINISHED":
            self.client.set_terminated(self.run_id, status=status)
            return
        if self.unreachable is not None:
            log.warning("run %s stays RUNNING in %s (unreachable); --resume continues it",
                        self.run_id, self.uri)
            return
        last_word = status == "KILLED"
        try:
            with http_limits(HTTP_LAST_WORD, override=True) if last_word else contextlib.nullcontext():
                self.client.set_terminated(self.run_id, status=status)
        except Exception as exc:
            log.warning("could not mark run %s %s in %s: %s", self.run_id, status, self.uri, exc)

    # --- logging ------------------------------------------------------------------------
    @_whole
    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k[:250], str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    @_whole
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._log_points([(k, step, v) for k, v in metrics.items()])

    @_whole
    def log_series(self, key: str, points: list[tuple[int, float]]) -> None:
        """One metric at many steps, in batches (e.g. the learning rate of every step)."""
        self._log_points([(key, step, v) for step, v in points])

    def _log_points(self, points: list[tuple[str, int, float]]) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, int(step)) for k, step, v in points
                 if int(step) not in self._stored.get(k, ())]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i:i + 500])

    @_whole
    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    @_whole
    def log_dict(self, data: dict, name: str) -> None:
        """JSON or YAML artifact, by the extension of ``name``."""
        self.client.log_dict(self.run_id, data, name)

    @_whole
    def log_figure(self, figure, name: str, dpi: int = 110) -> None:
        """A matplotlib ``Figure`` as an image artifact (format from the extension of ``name``)."""
        self.client.log_figure(self.run_id, figure, name, save_kwargs={"dpi": dpi})

    @_whole
    def log_table(self, data, name: str) -> None:
        """A table (dict of columns or DataFrame) as MLflow's ``.json`` table artifact, which
        the MLflow UI shows and ``mlflow.load_table`` reads back."""
        self.client.log_table(self.run_id, data, name)

    @_whole
    def log_file(self, path: str | Path, subdir: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), subdir)

    @_whole
    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k[:250], str(v)[:5000]) for k, v in tags.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, tags=items[i:i + 100])

    @_whole
    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def flush(self) -> None:
        """Every write is done when its call returns (cf. tracking_process.TrackerProcess)."""

    @_whole
    def log_pip_freeze(self, name: str = "pip_freeze.txt") -> None:
        """Every installed distribution as ``name==version`` (read here: in a tracking child
        process this is off the run's path; it reads ~200 metadata files)."""
        from lethe.platform.environment import pip_freeze

        self.client.log_text(self.run_id, pip_freeze(), name)

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        """(step, value) of every point of ``key`` in this run, by step (spans resumed segments)."""
        return sorted((m.step, m.value) for m in self.client.get_metric_history(self.run_id, key))

    def metric_keys(self) -> list[str]:
        return list(self.client.get_run(self.run_id).data.metrics)

    def state(self) -> dict:
        """What a caller in another process reads of the tracker (see tracking_process)."""
        return {"uri": self.uri, "experiment": self.experiment, "experiment_id": self.experiment_id,
                "remote": self.remote, "run_id": self.run_id, "unreachable": self.unreachable}

    def run_url(self) -> str:
        return f"{self.uri} · experiment '{self.experiment}' · run {self.run_id}"


def make_avalanche_logger(tracker: Tracker, per_iteration: bool):
    """An Avalanche BaseLogger forwarding Avalanche's training metrics into the MLflow run.

    ``Loss_Epoch/...`` (or ``Loss_MB/...`` with per_iteration) becomes ``train/loss`` on the
    iteration axis; other Avalanche metrics keep their name under ``avalanche/``.
    """
    from avalanche.logging import BaseLogger

    class MLflowLogger(BaseLogger):
        def log_single_metric(self, name, value, x_plot):
            try:
                value = float(value)
            except (TypeError, ValueError):
                return  # images, tensors: not scalar metrics
            head = name.split("/")[0]
            if head in ("Loss_Epoch", "Loss_MB"):
                if (head == "Loss_MB") != per_iteration:
                    return
                key = "train/loss"
            else:
                key = "avalanche/" + name.replace("/", "_")
            tracker.log_metrics({key: value}, step=int(x_plot))

    return MLflowLogger()


@functools.cache
def _evaluation_plugin() -> type:
    """Avalanche's EvaluationPlugin, idle when it has nothing to hand on."""
    from avalanche.training.plugins import EvaluationPlugin

    class Evaluation(EvaluationPlugin):
        def _update_metrics_and_loggers(self, strategy, callback):
            # Avalanche copies the experience and calls every logger at each of the template's
            # events; with no metric and nothing published there is nothing to hand on
            # (lethe's logger has no event callbacks): ≈ 0.1 ms per event otherwise
            if not self.metrics and not self._metric_values:
                return []
            return super()._update_metrics_and_loggers(strategy, callback)

    return Evaluation


def make_avalanche_evaluator(tracker: Tracker, per_iteration: bool = False):
    """Avalanche's evaluation plugin with no metric on the training path: train/loss is logged
    by the runner's TrainProgress from losses summed on the device (Avalanche's loss metric read
    every iteration's loss on the host, a sync per step). Metrics a method adds to the plugin
    still reach MLflow through the logger."""
    return _evaluation_plugin()(loggers=[make_avalanche_logger(tracker, per_iteration)])
