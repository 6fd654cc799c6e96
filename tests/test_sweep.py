"""`lethe sweep` with the local executor: grid × seeds expansion, validation before submission,
parent/child MLflow runs, --status, failures reported, the comparison page on the parent."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lethe.errors import ConfigError
from lethe.platform import sweep

ROOT = Path(__file__).resolve().parents[1]
LETHE = str(Path(sys.executable).parent / "lethe")
SMALL = ["train.epochs=1", "scenario.n_experiences=2"]


def lethe(*args, cwd, timeout=900):
    return subprocess.run([LETHE, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def store(tmp: Path) -> list[str]:
    return [f"tracking.uri=sqlite:///{tmp}/m.db", f"checkpoint.dir={tmp}/ck"]


# --- expansion and validation (no jobs) ----------------------------------------------------------
def test_grid_values_split_only_on_top_level_commas():
    assert sweep.split_values("20,50") == ["20", "50"]
    assert sweep.split_values("[1,2],3,'a,b',{x: 1, y: 2}") == ["[1,2]", "3", "'a,b'", "{x: 1, y: 2}"]


def test_grid_times_seeds_expands_to_every_member(tmp_path):
    p = sweep.plan("split_digits", store(tmp_path) + ["sweep.precheck=false", "seed=7"],
                   ["method.mem_size=20,50", "train.lr=0.05,0.1"], seeds=2)
    got = sorted((m.cfg.method.mem_size, m.cfg.train.lr, m.cfg.seed) for m in p.members)
    want = sorted((mem, lr, seed) for mem in (20, 50) for lr in (0.05, 0.1) for seed in (7, 8))
    assert got == want
    assert [m.index for m in p.members] == list(range(8))
    assert p.members[1].label == "method.mem_size=20 train.lr=0.05 seed=8"
    assert p.tracking_uri == f"sqlite:///{tmp_path}/m.db"
    assert p.checkpoint_dir == str(tmp_path / "ck")


def test_yaml_sweep_block_merges_with_command_line(tmp_path):
    yaml = tmp_path / "s.yaml"
    yaml.write_text((ROOT / "conf" / "split_digits.yaml").read_text() + """
sweep:
  grid:
    method.mem_size: [10, 30]
    train.optimizer: [sgd, adam]
  seeds: 2
  max_parallel: 3
  slurm: {partition: gpu, time: 120, extra: {account: ml}}
""")
    p = sweep.plan(str(yaml), store(tmp_path) + ["sweep.precheck=false"],
                   ["train.optimizer=adamw"])  # replaces the YAML's values for that key
    assert p.options.max_parallel == 3 and p.options.seeds == 2
    assert p.options.slurm.partition == "gpu" and p.options.slurm.extra == {"account": "ml"}
    got = sorted((m.cfg.method.mem_size, m.cfg.train.optimizer, m.cfg.seed) for m in p.members)
    assert got == [(10, "adamw", 0), (10, "adamw", 1), (30, "adamw", 0), (30, "adamw", 1)]


@pytest.mark.parametrize("grid, extra, message", [
    (["method.mem_size"], [], "must look like key=v1,v2"),
    (["method.mem_size=20,"], [], "must look like key=v1,v2"),
    (["tracking.experiment=a,b"], [], "cannot be swept"),
    ([], [], "nothing to sweep"),
    (["seed=1,2"], ["sweep.seeds=2"], "use one of them"),
    (["method.mem_size=1,2"], ["sweep.max_paralel=2"], "did you mean 'max_parallel'"),
    (["method.mem_size=1,2"], ["executor=cluster"], "use local or slurm"),
    (["method.mem_size=1,2"], ["slurm.cpus=0"], "sweep.slurm.cpus"),
])
def test_bad_sweep_arguments_name_the_problem(tmp_path, grid, extra, message):
    with pytest.raises(ConfigError, match=message):
        sweep.plan("split_digits", store(tmp_path) + extra, grid)


def test_bad_member_stops_the_sweep_before_anything_is_submitted(tmp_path):
    res = lethe("sweep", "split_digits", "--grid", "train.lr=0.05,-1", *store(tmp_path), cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert "sweep member 1 (train.lr=-1)" in res.stderr and "train.lr" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "m.db").exists() and not (tmp_path / "ck").exists()


def test_precheck_rejects_an_incompatible_method_before_submission(tmp_path):
    # clr needs task labels; split_digits is class-incremental by default
    with pytest.raises(ConfigError, match=r"sweep member 1 \(method.name=clr\).*task_incremental"):
        sweep.plan("split_digits", store(tmp_path), ["method.name=replay,clr"])
    assert not (tmp_path / "ck").exists()


# --- job outcomes, read back through submitit's job API ------------------------------------------
def _ended_local_job(tmp: Path, fn, *args, **kwargs) -> dict:
    """A real submitit local job that ran to its end, recorded as the sweep records it."""
    import submitit

    ex = submitit.LocalExecutor(folder=tmp / "jobs" / "%j")
    ex.update_parameters(timeout_min=5)
    job = ex.submit(fn, *args, **kwargs)
    job.wait()
    return {"job_id": str(job.job_id), "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr)}


def test_a_recorded_job_is_rebuilt_and_read_through_submitit(tmp_path):
    from lethe.platform.sweep.jobs import ended_outcome, rebuild_job

    done = _ended_local_job(tmp_path, dict, status="FINISHED", run_id="r1")
    assert ended_outcome(rebuild_job("local", done)) == \
        {"state": "FINISHED", "run_id": "r1", "resumed": False}
    raised = _ended_local_job(tmp_path, int, "seven")
    outcome = ended_outcome(rebuild_job("local", raised))
    assert outcome["state"] == "FAILED"
    assert outcome["error"] == "ValueError: invalid literal for int() with base 10: 'seven'"
    # a SLURM task that was cancelled before it wrote anything
    folder = tmp_path / "jobs" / "4242_1"
    lost = ended_outcome(rebuild_job("slurm", {"job_id": "4242_1", "stdout": str(folder / "x.out")}))
    assert lost["state"] == "FAILED"
    assert lost["error"].startswith("job 4242_1 ended without a result (cancelled, killed or lost)")
    assert str(folder / "4242_1_0_log.err") in lost["error"]


# --- a real local sweep -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    res = lethe("sweep", ROOT / "conf" / "split_digits.yaml", "--grid", "method.mem_size=20,50",
                f"tracking.uri=sqlite:///{tmp}/m.db", "tracking.experiment=s",
                f"checkpoint.dir={tmp}/ck", *SMALL, cwd=tmp)
    return tmp, res


def _client(tmp):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{tmp}/m.db")


def _runs(tmp, experiment="s"):
    client = _client(tmp)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("lethe.role") == "parent"]
    children = [r for r in runs if r not in parents]
    return client, parents, children


@pytest.mark.integration
def test_local_sweep_makes_a_parent_and_finished_children(local_sweep):
    tmp, res = local_sweep
    assert res.returncode == 0, res.stdout + res.stderr
    client, parents, children = _runs(tmp)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.tags["lethe.group"] == "sweep"
    parent = parents[0].info.run_id
    assert parents[0].data.params["sweep.grid.method.mem_size"] == "20,50"
    assert parents[0].data.metrics["sweep/finished"] == 2.0
    assert len(children) == 2
    assert sorted(c.data.params["method.mem_size"] for c in children) == ["20", "50"]
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parent
        assert child.data.tags["lethe.role"] == "child" and child.data.tags["lethe.group"] == "sweep"
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "acc/avg_seen")]
        assert sorted(steps) == [0, 1]
        # the member ran its own config: the logged config.yaml artifact has its grid value
        (tmp / child.info.run_id).mkdir(exist_ok=True)
        text = client.download_artifacts(child.info.run_id, "config.yaml", str(tmp / child.info.run_id))
        assert f"mem_size: {child.data.params['method.mem_size']}" in Path(text).read_text()
    assert {c.data.tags["lethe.member"] for c in children} == {"0", "1"}


@pytest.mark.integration
def test_sweep_status_lists_members_and_their_logs(local_sweep):
    tmp, res = local_sweep
    _, parents, children = _runs(tmp)
    parent = parents[0].info.run_id
    st = lethe("sweep", "--status", parent, f"checkpoint.dir={tmp}/ck", cwd=tmp)
    assert st.returncode == 0, st.stderr
    assert "2 FINISHED" in st.stdout
    for child in children:
        assert child.info.run_id in st.stdout
    logs = [line.split("log: ", 1)[1] for line in st.stdout.splitlines() if "log: " in line]
    assert len(logs) == 6 and all(Path(p).exists() for p in logs)
    # found through MLflow too, from another folder, given the tracking URI
    other = tmp / "elsewhere"
    other.mkdir()
    st2 = lethe("sweep", "--status", parent, f"tracking.uri=sqlite:///{tmp}/m.db", cwd=other)
    assert st2.returncode == 0 and "2 FINISHED" in st2.stdout


@pytest.mark.integration
def test_compare_page_of_the_sweep_is_written_and_logged_on_the_parent(local_sweep):
    tmp, _ = local_sweep
    client, parents, children = _runs(tmp)
    parent = parents[0].info.run_id
    assert "compare.html" in [a.path for a in client.list_artifacts(parent)]
    res = lethe("compare", "--experiment", "s", "--out", tmp / "p.html",
                f"tracking.uri=sqlite:///{tmp}/m.db", cwd=tmp)
    assert res.returncode == 0, res.stderr
    page = (tmp / "p.html").read_text()
    assert "logged as artifact compare.html of parent run " + parent in res.stdout
    for child in children:
        assert child.info.run_id in page  # one table row per member
    assert parent not in page.split("<table", 1)[1]  # the parent holds no metrics: not a row


@pytest.mark.integration
def test_a_failing_member_is_reported_never_missing(tmp_path):
    res = lethe("sweep", "split_digits", "--grid", "train.lr=1e30", "sweep.precheck=false",
                "tracking.experiment=f", *store(tmp_path), *SMALL, cwd=tmp_path)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "members 0 did not finish" in res.stderr
    _, parents, children = _runs(tmp_path, "f")
    assert parents[0].info.status == "FAILED"
    assert [c.info.status for c in children] == ["FAILED"]
    st = lethe("sweep", "--status", parents[0].info.run_id, f"checkpoint.dir={tmp_path}/ck",
               cwd=tmp_path)
    assert st.returncode == 1
    assert "FAILED" in st.stdout and "non-finite training loss" in st.stdout
    logs = [line.split("log: ", 1)[1] for line in st.stdout.splitlines() if "log: " in line]
    assert any(p.endswith("run.log") for p in logs) and all(Path(p).exists() for p in logs)
    state = json.loads((Path(logs[-1]).parents[1] / "sweeps" / parents[0].info.run_id
                        / "sweep.json").read_text())
    assert state["members"][0]["outcome"]["state"] == "FAILED"


@pytest.mark.integration
def test_an_interrupted_local_sweep_resumes_its_members_from_their_checkpoints(tmp_path):
    import signal
    import time

    proc = subprocess.Popen([LETHE, "sweep", "split_digits", "--grid", "method.mem_size=20",
                             "sweep.precheck=false", "tracking.experiment=i", "train.epochs=40",
                             "scenario.n_experiences=3", *store(tmp_path)],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 600
        while not list((tmp_path / "ck").glob("*/meta.json")):
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)  # Ctrl-C: members stop, checkpoints stay
        proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    client, parents, children = _runs(tmp_path, "i")
    parent = parents[0].info.run_id
    assert parents[0].info.status == "KILLED"
    assert [c.info.status for c in children] == ["KILLED"]
    run_id = children[0].info.run_id
    done = json.loads((tmp_path / "ck" / run_id / "meta.json").read_text())["next_experience"]
    assert 1 <= done < 3

    res = lethe("sweep", "--resume", parent, f"checkpoint.dir={tmp_path}/ck", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    _, parents, children = _runs(tmp_path, "i")
    assert [c.info.run_id for c in children] == [run_id]  # the same run continued
    assert children[0].info.status == "FINISHED" and parents[0].info.status == "FINISHED"
    log = (tmp_path / "ck" / run_id / "run.log").read_text()
    assert f"resumed run {run_id} at experience {done}/3" in log
    steps = {m.step for m in client.get_metric_history(run_id, "acc/avg_seen")}
    assert steps == {0, 1, 2}


@pytest.mark.integration
def test_sweep_seeds_log_mean_std_ci_on_the_parent(tmp_path):
    import numpy as np
    from scipy import stats

    res = lethe("sweep", ROOT / "conf" / "split_digits.yaml", "--seeds", "2",
                "--grid", "method.mem_size=20,50", "tracking.experiment=s", *store(tmp_path), *SMALL,
                cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    client, parents, children = _runs(tmp_path)
    metrics = parents[0].data.metrics
    assert len(children) == 4
    groups = {}
    for child in children:
        groups.setdefault(child.data.params["method.mem_size"], []).append(child.data.metrics)
    text = open(client.download_artifacts(parents[0].info.run_id, "seed_groups.txt", str(tmp_path))).read()
    for line in text.strip().splitlines():        # "g0: 2 seeds, {'method.mem_size': '20'}"
        prefix = line.split(":", 1)[0]
        mem = line.split("'method.mem_size': '")[1].split("'")[0]
        values = np.array([m["acc/avg_seen"] for m in groups[mem]])
        assert metrics[f"{prefix}/acc/avg_seen/mean"] == pytest.approx(values.mean(), abs=1e-12)
        assert metrics[f"{prefix}/acc/avg_seen/std"] == pytest.approx(values.std(ddof=1), abs=1e-12)
        half = stats.t.ppf(0.975, 1) * values.std(ddof=1) / np.sqrt(2)
        assert metrics[f"{prefix}/acc/avg_seen/ci95"] == pytest.approx(half, abs=1e-12)
    assert len(text.strip().splitlines()) == 2
