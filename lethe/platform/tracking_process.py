"""A run's :class:`~lethe.platform.tracking.Tracker` in a child process, for local stores.

Why: importing MLflow and opening (or creating and migrating) a SQLite store take 2-3 s of
CPU, which used to sit on a run's critical path before the first experience. The child starts
as the run starts and does that on another core while the run imports torch and Avalanche and
builds its stream; the run itself never imports MLflow. Every call is synchronous (the child
answers before the run goes on), so the order of writes, the errors raised and the checkpoint
bookkeeping are those of an in-process Tracker.

Only for stores on this machine (``sqlite:``, ``file:``, a folder). A tracking server keeps the
in-process Tracker: there Ctrl-C must cut a request that waits on a dead server (see
``deferred_interrupt``), which would leave a child's answer unread.

The child ignores SIGINT and SIGTERM: the run decides how to end on them (it marks the run
KILLED through the child), and the child leaves when the run closes the connection or dies.
"""
from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection

from lethe.errors import RunError

_REMOTE_SCHEMES = ("http", "https", "databricks")
# Writes whose arguments are values (a file path is not: the file may be gone by the time the
# child reads it, so log_file waits for its answer).
ASYNC_WRITES = frozenset({"log_params", "log_metrics", "log_series", "log_text", "log_dict",
                          "log_figure", "log_table", "log_pip_freeze", "set_tags", "set_tag"})
MAX_PENDING = 64   # writes in flight at most: their answers (~100 bytes each) fit any socket buffer


def is_local_store(uri: str | None) -> bool:
    """Whether ``uri`` (None: MLflow's default, $MLFLOW_TRACKING_URI or ./mlflow.db) names a
    store on this machine; decided without importing MLflow."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    return uri.split(":", 1)[0] not in _REMOTE_SCHEMES


class TrackingProcessDied(RunError):
    """The child stopped answering (killed, out of memory)."""


class TrackerProcess:
    """The Tracker API (start, resume, end, log_*, set_*, metric_history, ...) answered by a
    Tracker in a child process. Construction returns at once; :meth:`ready` waits until the
    child has opened the store and raises what opening it raised (e.g. a ConfigError for a
    bad URI)."""

    def __init__(self, uri: str | None, experiment: str):
        ours, theirs = socket.socketpair()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "lethe.platform.tracking_process", str(theirs.fileno())],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        theirs.close()
        self._conn = Connection(ours.detach())
        self._conn.send(("__init__", (uri, experiment), {}))
        self._state: dict | None = None
        self._pending = 0      # writes sent whose answers are not read yet

    def ready(self) -> TrackerProcess:
        if self._state is None:
            self._state = {"run_id": None}   # a failed open is raised once, then no run exists
            self._answer()
        return self

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        self.ready()
        if name in self._state:
            return self._state[name]

        def call(*args, **kwargs):
            from lethe.platform.tracking import deferred_interrupt

            with deferred_interrupt():   # every answer is read: no call is left half-done
                if name in ASYNC_WRITES:
                    return self._write((name, args, kwargs))
                if name == "end" and args and args[0] != "FINISHED":
                    self._drain_quietly()   # a failing run: its first error is the one reported
                else:
                    self._drain()
                self._send((name, args, kwargs))
                return self._answer()
        return call

    def flush(self) -> None:
        """Wait until the child has done every write sent so far (raising the first error).
        The runner calls it before each checkpoint: a checkpoint's metrics are in the store."""
        from lethe.platform.tracking import deferred_interrupt

        with deferred_interrupt():
            self.ready()._drain()

    def _write(self, message) -> None:
        """A write returns before the child has done it (it runs while the run goes on); its
        error, if any, is raised by a later call, at the latest by ``end``. Answers are read as
        they come, so neither side's socket buffer fills."""
        self._collect(block=False)
        self._send(message)
        self._pending += 1
        if self._pending >= MAX_PENDING:
            self._drain()

    def _drain(self) -> None:
        self._collect(block=True)

    def _collect(self, block: bool) -> None:
        """Read the answers of pending writes (all of them with ``block``, else those already
        here); then raise the first error among them."""
        error = None
        while self._pending and (block or self._conn.poll()):
            self._pending -= 1
            try:
                self._answer()
            except TrackingProcessDied:   # nothing more will come
                self._pending = 0
                raise
            except Exception as exc:  # noqa: BLE001 - the first error is raised once all are read
                error = error or exc
        if error is not None:
            raise error

    def _send(self, message) -> None:
        try:
            self._conn.send(message)
        except OSError as exc:
            raise TrackingProcessDied(self._died(exc)) from None

    def _answer(self):
        try:
            ok, value, state = self._conn.recv()
        except (EOFError, OSError) as exc:
            raise TrackingProcessDied(self._died(exc)) from None
        self._state.update(state)
        if not ok:
            raise value
        return value

    def _drain_quietly(self) -> None:
        """Read every pending answer; an error among them is logged, not raised."""
        try:
            self._drain()
        except Exception as exc:   # noqa: BLE001 - the run's own error is the one to report
            import logging

            logging.getLogger("lethe").warning("a tracking write failed: %s", exc)

    def _died(self, exc: BaseException) -> str:
        code = self._proc.poll()
        return (f"lethe's tracking process (pid {self._proc.pid}) stopped "
                f"({f'exit {code}' if code is not None else type(exc).__name__}); the run's "
                f"checkpoint is kept: continue it with --resume")

    def close(self) -> None:
        """Let the child finish its writes and leave. A write failing now is only logged: the
        run has ended (``end`` read every answer before it, so this happens only when the run
        is failing already)."""
        if self._state is not None:
            self._drain_quietly()
        try:
            self._conn.close()
        finally:
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


def open_tracker(uri: str | None, experiment: str):
    """The Tracker a run uses: in a child process for a local store, in process otherwise
    (call ``ready()`` on it where the store must be open; ``close()`` at the end)."""
    if is_local_store(uri):
        return TrackerProcess(uri, experiment)
    from lethe.platform.tracking import Tracker

    return _InProcess(Tracker(uri, experiment))


class _InProcess:
    """An in-process Tracker with the child's ``ready`` / ``close``."""

    def __init__(self, tracker):
        self._tracker = tracker

    def ready(self):
        return self

    def close(self) -> None:
        pass

    def __getattr__(self, name: str):
        return getattr(self._tracker, name)


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if the run can unpickle it, else a RunError with its type and message."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RunError(f"tracking failed: {type(exc).__name__}: {exc}")


def _warm_up() -> None:
    """Import and run once, while the run trains, what its last writes need: the run's final
    figures are rendered here (matplotlib's import and font cache, ~0.4 s), and ``end``
    waits for them; left for then, they were the longest wait of a short run's ending."""
    import io

    from matplotlib.figure import Figure

    figure = Figure(figsize=(1, 1))
    figure.add_subplot().set_title("0")
    figure.savefig(io.BytesIO(), format="png")


def _serve(conn: Connection) -> None:
    from lethe.platform.tracking import Tracker

    tracker = None
    while True:
        try:
            name, args, kwargs = conn.recv()
        except (EOFError, OSError):
            return                     # the run closed the connection, or died
        try:
            if name == "__init__":
                tracker = Tracker(*args)
                value = None
                threading.Thread(target=_warm_up, daemon=True).start()
            else:
                value = getattr(tracker, name)(*args, **kwargs)
            reply = (True, value, tracker.state())
        except BaseException as exc:   # noqa: BLE001 - every error goes back to the run
            reply = (False, _portable(exc), tracker.state() if tracker else {})
        try:
            conn.send(reply)
        except OSError:
            return                     # the run stopped waiting (Ctrl-C while the store opened)


def main(argv: list[str]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    import logging

    logging.basicConfig(level=logging.WARNING, format="lethe: %(message)s")
    # MLflow's INFO lines on creating a store would come before an error the run finds in its
    # config while the store opens (a bad input must read as one line)
    import mlflow  # noqa: F401 - it sets its loggers up on import; then quieten them

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    _serve(Connection(int(argv[0])))
    # every write was committed before it was answered; skipping the interpreter's teardown
    # (MLflow's and SQLAlchemy's modules, ~1 s) lets the run end without waiting for it
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
