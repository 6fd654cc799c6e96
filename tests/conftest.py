"""Shared fixtures and helpers: real MLflow stores and servers, small fast overrides, registry
isolation, a hand-written reference training loop, and the session-end check that every metric
key the session's runs logged is documented (lethe/metrics/reference.py → docs/metrics.md)."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LETHE = [sys.executable, "-m", "lethe.platform.cli"]

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# The suite's models are tiny: one intra-op thread per process (subprocesses inherit it) is
# faster than several fighting over a small shared machine's cores (measured ~12× per step).
os.environ.setdefault("OMP_NUM_THREADS", "1")


# --- data on disk ------------------------------------------------------------------------
def write_local_mnist(root: Path, n_train: int, n_test: int) -> Path:
    """A small random MNIST in torchvision's on-disk format (idx files and their .gz), so an
    Avalanche benchmark loads it without a download; labels cycle 0..9. Returns ``root``."""
    import gzip
    import struct

    import numpy as np

    def write_idx(path, arr):
        magic = {1: 0x0801, 3: 0x0803}[arr.ndim]
        with open(path, "wb") as fh:
            fh.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in arr.shape))
            fh.write(arr.astype(np.uint8).tobytes())

    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 255, (n, 28, 28)))
        write_idx(raw / f"{split}-labels-idx1-ubyte", np.arange(n) % 10)
        for name in (f"{split}-images-idx3-ubyte", f"{split}-labels-idx1-ubyte"):
            with open(raw / name, "rb") as src, gzip.open(raw / f"{name}.gz", "wb") as dst:
                dst.write(src.read())
    return root


# --- tracking stores ---------------------------------------------------------------------
@pytest.fixture
def store(tmp_path) -> dict:
    """Tracking + checkpoint overrides pointing into tmp_path (a real SQLite MLflow store)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return {"uri": uri, "overrides": [f"tracking.uri={uri}", "tracking.experiment=test",
                                      f"checkpoint.dir={tmp_path / 'runs'}"]}


def run_cli(args: list[str], cwd: Path, timeout: int = 600, env: dict | None = None):
    """Run the real `lethe` CLI in a subprocess; returns CompletedProcess (text)."""
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run(LETHE + args, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def mlflow_client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def only_run(uri: str, experiment: str = "test"):
    client = mlflow_client(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_healthy(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited (code {proc.returncode}) before {url}/health answered")
        try:
            if urllib.request.urlopen(url + "/health", timeout=2).status == 200:
                return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"mlflow server did not answer {url}/health within {timeout:.0f} s")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 for one test module: yields (url, folder); its
    SQLite backend is <folder>/server.db and the artifacts it serves land in <folder>/artifacts."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    url = f"http://127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
         "--port", url.rsplit(":", 1)[1], "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
         "--artifacts-destination", str(folder / "artifacts")],
        cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_until_healthy(url, proc)
        yield url, folder
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)   # the server and its workers: our own session
        proc.wait(timeout=30)


# --- process state -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: intra-op threads only contend on a small shared machine's cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@contextlib.contextmanager
def restored_registry():
    """Components registered inside the block are unregistered when it ends."""
    from lethe import registry

    registry.load_all()   # built-ins first: they are in the snapshot, so they survive
    saved = {kind: dict(entries) for kind, entries in registry._REGISTRIES.items()}
    try:
        yield
    finally:
        for kind, entries in registry._REGISTRIES.items():
            entries.clear()
            entries.update(saved[kind])


@pytest.fixture
def registry_snapshot():
    """For tests that register a component: the global registries are restored after them."""
    with restored_registry():
        yield


# --- an independent reference for the exact-unlearning methods ---------------------------
def train_by_hand(model, names: list[str], x, y, train, seed: int):
    """Train ``names`` of ``model`` on (x, y) as the exact methods document it, written out:
    a fresh optimizer of ``train``'s kind per call; each of train.epochs passes visits the rows
    in the order of a generator seeded ``seed``, in batches of train.batch_size; dropout draws
    from torch.manual_seed(seed). The caller's RNG streams are left as they were."""
    import torch

    params = dict(model.named_parameters())
    for name, p in params.items():
        p.requires_grad_(name in names)
    chosen = [params[n] for n in names]
    optimizers = {"sgd": lambda: torch.optim.SGD(chosen, lr=train.lr, momentum=train.momentum,
                                                 weight_decay=train.weight_decay),
                  "adam": lambda: torch.optim.Adam(chosen, lr=train.lr, weight_decay=train.weight_decay),
                  "adamw": lambda: torch.optim.AdamW(chosen, lr=train.lr, weight_decay=train.weight_decay)}
    opt = optimizers[train.optimizer]()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        order = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(int(train.epochs)):
            for idx in torch.randperm(len(y), generator=order).split(int(train.batch_size)):
                opt.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
    model.eval()
    return model


# --- session end: every metric key the session's runs logged is documented ----------------
# The rule, explicitly. Input: the MLflow SQLite stores (*.db) under pytest's temp root, read
# after every test (before a tmp_path retention policy can delete its folder) and at session
# end; under xdist every worker reads its own and the controller decides. A session ran tests
# that log metrics when it started a lethe run under that root: the runner creates
# <checkpoint.dir>/<run id>/run.log as a run starts. Every such run must be found in one of the
# stores (else what it logged went unchecked: the input is missing, and the session fails), and
# every metric key in the stores must be documented. A session that started no run (`-k` on a
# unit test) has nothing to check, so it passes unless a store it left holds an undocumented key.
RUN_FOLDER = re.compile(r"[0-9a-f]{32}\Z")   # MLflow run ids name the runner's run folders
_FOUND = pytest.StashKey[dict]()
_TEMP_ROOT = pytest.StashKey[Path]()
_WORKER_KEY = "lethe_tracking_found"


def empty_found() -> dict:
    return {"keys": set(), "runs": set(), "started": {}}


def read_store(db: Path) -> tuple[set[str], set[str]]:
    """(run ids, metric keys) of an MLflow SQLite store, deleted runs included; nothing for
    other SQLite files."""
    try:
        con = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
        try:
            runs = {r for (r,) in con.execute("SELECT run_uuid FROM runs")}
            keys = {k for (k,) in con.execute("SELECT DISTINCT key FROM metrics")}
        finally:
            con.close()
    except sqlite3.Error:
        return set(), set()
    return runs, keys


def scan_tracking(root: Path) -> dict:
    """Stores and started lethe runs under ``root``: {"keys", "runs", "started": {id: folder}}."""
    found = empty_found()
    for path in root.rglob("*"):
        if path.suffix == ".db" and path.is_file():
            runs, keys = read_store(path)
            found["runs"] |= runs
            found["keys"] |= keys
        elif path.name == "run.log" and RUN_FOLDER.match(path.parent.name):
            found["started"][path.parent.name] = str(path.parent)
    return found


def merge_found(into: dict, found: dict) -> None:
    into["keys"] |= set(found["keys"])
    into["runs"] |= set(found["runs"])
    into["started"].update(found["started"])


def metric_key_problems(found: dict) -> list[str]:
    """What the session-end check reports for ``found`` (empty: the session passes it)."""
    from lethe.metrics import reference

    problems = []
    unchecked = sorted(set(found["started"]) - found["runs"])
    if unchecked:
        problems.append(
            f"{len(unchecked)} lethe run(s) started by this session are in no MLflow SQLite store "
            f"under pytest's temp root, so the metric keys they logged went unchecked (run folder "
            f"{found['started'][unchecked[0]]}): track test runs into tmp_path, e.g. with the "
            f"`store` fixture")
    undocumented = reference.undocumented(found["keys"])
    if undocumented:
        problems.append(
            f"metric keys logged by this session's runs are not documented: "
            f"{', '.join(undocumented)}; add them to lethe/metrics/reference.py and regenerate "
            f"docs/metrics.md (python -m lethe.metrics.reference > docs/metrics.md)")
    return problems


def pytest_configure(config):
    config.stash[_FOUND] = empty_found()


@pytest.fixture(scope="session", autouse=True)
def _session_temp_root(request, tmp_path_factory):
    request.config.stash[_TEMP_ROOT] = tmp_path_factory.getbasetemp()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item):
    tmp = getattr(item, "funcargs", {}).get("tmp_path")
    if tmp is not None and tmp.exists():
        merge_found(item.config.stash[_FOUND], scan_tracking(tmp))


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """xdist controller: what a worker found."""
    found = getattr(node, "workeroutput", {}).get(_WORKER_KEY)
    if found:
        merge_found(node.config.stash[_FOUND], found)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session):
    config = session.config
    found = config.stash[_FOUND]
    root = config.stash.get(_TEMP_ROOT, None)
    if root is not None and root.exists():
        merge_found(found, scan_tracking(root))
    if hasattr(config, "workerinput"):   # an xdist worker: the controller decides
        config.workeroutput[_WORKER_KEY] = {k: sorted(v) if isinstance(v, set) else v
                                            for k, v in found.items()}
        return
    if session.exitstatus not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED):
        return   # interrupted or not run: no verdict on a partial session
    problems = metric_key_problems(found)
    if problems:
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        for line in problems:
            text = f"metric-key check FAILED: {line}"
            if reporter is not None:
                reporter.write_line(text, red=True, bold=True)
            else:
                print(text, file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
