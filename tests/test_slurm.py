"""`lethe sweep executor=slurm` on a real single-node SLURM cluster started by
scripts/slurm_up.sh (installs slurm-wlm + munge when absent; skipped only where that is
impossible): a 2 × 2 grid as one array job, and `scontrol requeue` of a running member that
then continues the same MLflow run from its checkpoint."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LETHE = str(Path(sys.executable).parent / "lethe")
CONF = str(ROOT / "conf" / "split_digits.yaml")
SMALL = ["train.epochs=1", "scenario.n_experiences=2"]

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory):
    """A private cluster (own state folder and ports) for this module; stopped by PID after."""
    state = tmp_path_factory.mktemp("slurm")
    env = dict(os.environ, LETHE_SLURM_DIR=str(state), LETHE_SLURMCTLD_PORT=str(_free_port()),
               LETHE_SLURMD_PORT=str(_free_port()))
    up = subprocess.run([str(ROOT / "scripts" / "slurm_up.sh")], env=env, capture_output=True,
                        text=True, timeout=1800)
    if up.returncode == 3:
        pytest.skip(f"SLURM cannot be installed on this machine: {up.stderr.strip()}")
    env["SLURM_CONF"] = str(state / "slurm.conf")
    try:
        assert up.returncode == 0, f"scripts/slurm_up.sh failed:\n{up.stderr}\n{_daemon_logs(state)}"
        yield env
    finally:
        subprocess.run([str(ROOT / "scripts" / "slurm_down.sh")], env=env, timeout=120)


def _daemon_logs(state: Path) -> str:
    out = []
    for name in ("slurmctld.log", "slurmd.log"):
        path = state / "log" / name
        if path.exists():
            out.append(f"--- {name}\n" + "\n".join(path.read_text().splitlines()[-30:]))
    return "\n".join(out)


def lethe(*args, cwd, env, timeout=900):
    return subprocess.run([LETHE, *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def store(tmp: Path, experiment: str) -> list[str]:
    return [f"tracking.uri=sqlite:///{tmp}/m.db", f"checkpoint.dir={tmp}/ck",
            f"tracking.experiment={experiment}"]


def _client(tmp: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{tmp}/m.db")


def _job_logs(tmp: Path) -> str:
    out = []
    for path in sorted((tmp / "ck" / "sweeps").glob("*/jobs/*/*_log.*")):
        out.append(f"--- {path}\n" + "\n".join(path.read_text().splitlines()[-15:]))
    return "\n".join(out)


def test_slurm_sweep_runs_a_2x2_grid_as_one_array_job(slurm_env, tmp_path):
    res = lethe("sweep", CONF, "--grid", "method.mem_size=20,50", "--grid", "train.lr=0.05,0.1",
                "executor=slurm", "--no-wait", *store(tmp_path, "grid"), *SMALL,
                cwd=tmp_path, env=slurm_env)
    assert res.returncode == 0, res.stdout + res.stderr
    parent = re.search(r"^sweep (\w+): 4 members \(slurm\)", res.stdout, re.M).group(1)
    client = _client(tmp_path)
    deadline = time.time() + 900
    while client.get_run(parent).info.status == "RUNNING":  # the finalizer job ends it
        assert time.time() < deadline, "sweep did not finish:\n" + _job_logs(tmp_path)
        time.sleep(3)
    run = client.get_run(parent)
    assert run.info.status == "FINISHED", _job_logs(tmp_path)
    assert run.data.metrics["sweep/finished"] == 4.0
    assert "compare.html" in [a.path for a in client.list_artifacts(parent)]

    children = client.search_runs([run.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    assert len(children) == 4
    assert all(c.info.status == "FINISHED" for c in children)
    assert all(c.data.tags["lethe.role"] == "child" for c in children)
    combos = sorted((c.data.params["method.mem_size"], c.data.params["train.lr"]) for c in children)
    assert combos == [("20", "0.05"), ("20", "0.1"), ("50", "0.05"), ("50", "0.1")]
    for c in children:
        hist = client.get_metric_history(c.info.run_id, "acc/avg_seen")
        assert sorted(m.step for m in hist) == [0, 1]
        assert all(0.0 <= m.value <= 1.0 for m in hist)
    # one SLURM array job: tasks <array id>_0 .. _3
    job_ids = sorted(c.data.tags["lethe.sweep.job_id"] for c in children)
    arrays = {j.split("_")[0] for j in job_ids}
    assert len(arrays) == 1 and sorted(j.split("_")[1] for j in job_ids) == ["0", "1", "2", "3"]

    st = lethe("sweep", "--status", parent, f"checkpoint.dir={tmp_path}/ck", cwd=tmp_path, env=slurm_env)
    assert st.returncode == 0 and "4 FINISHED" in st.stdout, st.stdout + st.stderr


def test_scontrol_requeue_resumes_the_same_run_from_its_checkpoint(slurm_env, tmp_path):
    n = 5
    # enough epochs that a member is still training when the requeue's SIGKILL arrives (KillWait
    # is 5 s; 400 epochs make an experience last several seconds)
    proc = subprocess.Popen([LETHE, "sweep", CONF, "--grid", "method.mem_size=20", "executor=slurm",
                             "train.epochs=400", f"scenario.n_experiences={n}",
                             *store(tmp_path, "requeue")],
                            cwd=tmp_path, env=slurm_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 600
        meta = None
        while meta is None:
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "no checkpoint appeared:\n" + _job_logs(tmp_path)
            for path in (tmp_path / "ck").glob("*/meta.json"):
                meta = json.loads(path.read_text())
            time.sleep(0.2)
        run_id = meta["run_id"]
        assert 1 <= meta["next_experience"] < n
        state = json.loads(next((tmp_path / "ck" / "sweeps").glob("*/sweep.json")).read_text())
        job_id = state["members"][0]["jobs"][-1]["job_id"]
        subprocess.run(["scontrol", "requeue", job_id], env=slurm_env, check=True,
                       capture_output=True, timeout=60)
        out, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out + _job_logs(tmp_path)

    show = subprocess.run(["scontrol", "show", "job", job_id], env=slurm_env, capture_output=True,
                          text=True).stdout
    assert "Restarts=1" in show, show
    client = _client(tmp_path)
    parent = state["parent_run_id"]
    exp = client.get_experiment_by_name("requeue")
    members = client.search_runs([exp.experiment_id],
                                 filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    assert [m.info.run_id for m in members] == [run_id]  # the same run, no second one
    run = members[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags.get("lethe.resumed") == "true"
    log = (tmp_path / "ck" / run_id / "run.log").read_text()
    k = int(re.search(rf"resumed run {run_id} at experience (\d+)/{n}", log).group(1))
    assert 1 <= k < n  # continued from a checkpoint, not from scratch
    steps = {m.step for m in client.get_metric_history(run_id, "acc/avg_seen")}
    assert steps == set(range(n))
    job_out = Path(state["members"][0]["jobs"][-1]["stdout"]).read_text()
    assert f"resuming MLflow run {run_id}" in job_out
    assert client.get_run(parent).info.status == "FINISHED"


def test_a_two_task_slurm_job_trains_one_distributed_run(slurm_env, tmp_path):
    """slurm.tasks_per_node=2: one member job of two tasks; submitit's distributed environment
    makes them ranks 0 and 1 of one data-parallel run, which must end exactly where the same
    config ends under `lethe run --nproc 2` (the same arithmetic in the same order: bitwise)."""
    res = lethe("sweep", CONF, "--grid", "method.mem_size=20", "executor=slurm",
                "slurm.tasks_per_node=2", *store(tmp_path, "ranks"), *SMALL,
                cwd=tmp_path, env=slurm_env)
    assert res.returncode == 0, res.stdout + res.stderr + _job_logs(tmp_path)
    client = _client(tmp_path)
    exp = client.get_experiment_by_name("ranks")
    runs = client.search_runs([exp.experiment_id])
    children = [r for r in runs if r.data.tags.get("lethe.role") == "child"]
    assert len(runs) == 2 and len(children) == 1          # the parent and one run, not two
    run = children[0]
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "acc/avg_seen")) == [0, 1]
    job = json.loads(next((tmp_path / "ck" / "sweeps").glob("*/sweep.json")).read_text())
    show = subprocess.run(["scontrol", "show", "job", job["members"][0]["jobs"][-1]["job_id"]],
                          env=slurm_env, capture_output=True, text=True).stdout
    assert re.search(r"NumTasks=2\b", show), show                # one job of two tasks

    local = lethe("run", CONF, "method.mem_size=20", "--nproc", "2",
                  f"tracking.uri=sqlite:///{tmp_path}/local.db", f"checkpoint.dir={tmp_path}/ck_local",
                  "tracking.experiment=local",
                  *SMALL, cwd=tmp_path, env=slurm_env)
    assert local.returncode == 0, local.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    mine = MlflowClient(f"sqlite:///{tmp_path}/local.db")
    (other,) = mine.search_runs([mine.get_experiment_by_name("local").experiment_id])
    for key in ("acc/avg_seen", "acc/avg_all", "forgetting/avg", "bwt"):
        assert run.data.metrics[key] == other.data.metrics[key], key


def test_lethe_run_slurm_submits_one_run_of_two_ranks(slurm_env, tmp_path):
    """`lethe run --slurm slurm.tasks_per_node=2`: one job, one MLflow run (no sweep parent),
    tagged with its submission; the command waits for it and reports the run."""
    res = lethe("run", CONF, "--slurm", "slurm.tasks_per_node=2", *store(tmp_path, "single"), *SMALL,
                cwd=tmp_path, env=slurm_env)
    logs = "\n".join(p.read_text() for p in (tmp_path / "ck" / "slurm").glob("*/jobs/*/*_log.*"))
    assert res.returncode == 0, res.stdout + res.stderr + logs
    assert re.search(r"^submitted SLURM job \d+ \(submission (\w+)\)", res.stdout, re.M)
    client = _client(tmp_path)
    (run,) = client.search_runs([client.get_experiment_by_name("single").experiment_id])
    assert run.info.status == "FINISHED" and f"MLflow run {run.info.run_id} FINISHED" in res.stdout
    assert run.data.tags["lethe.slurm.submission"] in res.stdout
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "acc/avg_seen")) == [0, 1]
    assert "global_rank=1(2)" in logs                         # a second rank did take part
