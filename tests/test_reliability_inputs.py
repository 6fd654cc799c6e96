"""Hostile names and configs, and user mistakes: each is one `lethe: error:` line, exit 2, and
leaves no MLflow run behind (the README's promise for exit 2); compare pages never leave the
output folder; interpolations cannot read the environment unless the user allows it."""
from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest
from conftest import mlflow_client

SMALL = ["train.epochs=1", "scenario.n_experiences=2", "eval.save_predictions=false"]


def cli(args: list[str], capsys) -> tuple[int, str]:
    """The real `lethe` entry point in this process: (exit code, stderr)."""
    from lethe.platform.cli import main

    code = main(args)
    return code, capsys.readouterr().err


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("lethe:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def n_runs(db: Path) -> int:
    """Runs in an MLflow SQLite store, deleted ones included (0 when there is no store)."""
    if not db.exists():
        return 0
    con = sqlite3.connect(db)
    try:
        tables = {t for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        return con.execute("SELECT COUNT(*) FROM runs").fetchone()[0] if "runs" in tables else 0
    finally:
        con.close()


# --- item 6: user mistakes exit 2, and no run is created ---------------------------------------
@pytest.mark.parametrize("override, expected", [
    ("model.hidden=-5", "model 'mlp' cannot be built with model.hidden=-5"),
    ("seed=${nosuch.key}", "cannot resolve the value of 'seed': Interpolation key 'nosuch.key' not found"),
    ("method.mem_size=-1", "method.mem_size must be ≥ 1"),
])
def test_bad_values_exit_2_without_a_run(tmp_path, store, capsys, override, expected):
    code, err = cli(["run", "split_digits", *store["overrides"], *SMALL, override], capsys)
    assert code == 2, err
    line = error_line(err)
    assert line.startswith("lethe: error:") and expected in line
    assert n_runs(tmp_path / "mlflow.db") == 0   # method.mem_size used to leave a FAILED run


def test_a_tracking_uri_of_no_known_kind_exits_2(tmp_path, capsys):
    code, err = cli(["run", "split_digits", *SMALL, "tracking.uri=garbage://x",
                     f"checkpoint.dir={tmp_path / 'runs'}"], capsys)
    assert code == 2
    line = error_line(err)
    assert "tracking.uri=garbage://x: MLflow has no store for this kind of URI" in line
    assert "sqlite://" in line and "Model registry" not in line


def test_a_store_file_that_is_not_a_database_exits_2_and_is_left_alone(tmp_path, capsys):
    notes = tmp_path / "notes.db"
    notes.write_text("my notes, not a database\n")
    code, err = cli(["run", "split_digits", *SMALL, f"tracking.uri=sqlite:///{notes}",
                     f"checkpoint.dir={tmp_path / 'runs'}"], capsys)
    assert code == 2
    assert f"{notes} is not an SQLite database" in error_line(err)
    assert notes.read_text() == "my notes, not a database\n"


def test_a_sqlite_store_in_a_missing_folder_exits_2_and_creates_nothing(tmp_path, capsys):
    missing = tmp_path / "typo" / "mlflow.db"
    code, err = cli(["run", "split_digits", *SMALL, f"tracking.uri=sqlite:///{missing}",
                     f"checkpoint.dir={tmp_path / 'runs'}"], capsys)
    assert code == 2
    assert f"the folder {missing.parent} does not exist" in error_line(err)
    assert not missing.parent.exists()


def test_every_tracker_checks_its_store_first(tmp_path):
    """`lethe sweep` and `--seeds` open their parent run's store through the same Tracker: the
    same refusals, before anything is created."""
    from lethe.errors import ConfigError
    from lethe.platform.tracking import Tracker

    missing = tmp_path / "typo" / "mlflow.db"
    with pytest.raises(ConfigError, match=f"the folder {missing.parent} does not exist"):
        Tracker(f"sqlite:///{missing}", "test")
    assert not missing.parent.exists()
    with pytest.raises(ConfigError, match="tracking.uri=garbage://x: MLflow has no store"):
        Tracker("garbage://x", "test")


def test_the_default_store_in_the_current_folder_needs_no_folder_check(tmp_path, monkeypatch):
    from lethe.platform.stores import check_sqlite_store
    from lethe.platform.tracking import resolve_tracking_uri

    monkeypatch.chdir(tmp_path)
    check_sqlite_store(resolve_tracking_uri("sqlite:///mlflow.db"))   # ./mlflow.db: no error


def test_checkpoint_dir_under_a_regular_file_exits_2_without_a_run(tmp_path, store, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    over = [o for o in store["overrides"] if not o.startswith("checkpoint.dir=")]
    code, err = cli(["run", "split_digits", *over, *SMALL, f"checkpoint.dir={blocker}/runs"], capsys)
    assert code == 2
    assert f"{blocker} is a file, not a folder" in error_line(err)
    assert n_runs(tmp_path / "mlflow.db") == 0   # it used to stay RUNNING forever


# --- item 8: overrides after options, Ctrl-C during start-up -----------------------------------
@pytest.mark.parametrize("option", [["--seeds", "2"], ["--resume", "0123abcd"]])
def test_overrides_after_seeds_or_resume_are_applied(store, capsys, option):
    # train.epochs=0 reaching the config is what proves the override was read (argparse used
    # to stop at it: "unrecognized arguments")
    code, err = cli(["run", "split_digits", *option, *store["overrides"], "train.epochs=0"], capsys)
    assert code == 2
    assert "bad value for 'train.epochs': must be ≥ 1" in error_line(err)


def test_ctrl_c_during_start_up_does_not_claim_a_killed_run(tmp_path, store, capsys, monkeypatch):
    from lethe.platform import runner

    def interrupted(cfg):   # Ctrl-C while the data loads, before any MLflow run exists
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "build_components", interrupted)
    code, err = cli(["run", "split_digits", *store["overrides"], *SMALL], capsys)
    assert code == 130
    assert "before an MLflow run was started" in err and "KILLED" not in err
    assert n_runs(tmp_path / "mlflow.db") == 0


def test_ctrl_c_after_the_run_started_names_the_killed_run(tmp_path, store, capsys, monkeypatch):
    from lethe.platform.runner import Runner

    def interrupted(self, *args):   # Ctrl-C right after the run and its folder exist
        raise KeyboardInterrupt

    monkeypatch.setattr(Runner, "_loop", interrupted)
    code, err = cli(["run", "split_digits", *store["overrides"], *SMALL], capsys)
    assert code == 130
    client = mlflow_client(store["uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert run.info.status == "KILLED"
    assert f"MLflow run {run.info.run_id} is marked KILLED" in err


# --- item 5: interpolations that read outside the config ---------------------------------------
SECRET = "tok-5f1c9e2a"


def test_an_environment_interpolation_is_refused_and_the_secret_stays_out(tmp_path, store, capsys,
                                                                          monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", SECRET)
    monkeypatch.delenv("LETHE_ALLOW_ENV_INTERPOLATION", raising=False)
    code, err = cli(["run", "split_digits", *store["overrides"], *SMALL,
                     "tracking.run_name=${oc.env:SECRET_TOKEN}"], capsys)
    assert code == 2
    line = error_line(err)
    assert "uses the resolver 'oc.env', which is refused" in line
    assert "LETHE_ALLOW_ENV_INTERPOLATION=1" in line and SECRET not in line
    assert n_runs(tmp_path / "mlflow.db") == 0
    for path in tmp_path.rglob("*"):   # the secret reached no file at all
        assert not path.is_file() or SECRET.encode() not in path.read_bytes(), path


@pytest.mark.parametrize("value, resolver", [
    ("${oc.decode:${name}}", "oc.decode"),          # decodes a string into new interpolations
    ("${oc.create:${name}}", "oc.create"),
    ("${oc.coerce:int,1}", "oc.coerce"),            # imports a module named in the value
    ("a-${ oc.env:SECRET_TOKEN }", "oc.env"),       # spacing does not hide it
    ("${oc.select:'${oc.env:SECRET_TOKEN}'}", "oc.env"),   # nor nesting inside an allowed one
    ("${${name}:x}", "${name}"),                    # nor a resolver name built at resolve time
])
def test_resolvers_that_reach_outside_the_config_are_refused(value, resolver, monkeypatch):
    from lethe.errors import ConfigError
    from lethe.platform.config import load_config

    monkeypatch.setenv("SECRET_TOKEN", SECRET)
    with pytest.raises(ConfigError, match=f"uses the resolver '{re.escape(resolver)}'"):
        load_config("split_digits", [f"tracking.run_name={value}"])


def test_a_yaml_file_with_oc_env_is_refused_naming_the_file_and_key(tmp_path, monkeypatch):
    from lethe.errors import ConfigError
    from lethe.platform.config import PRESET_DIR, load_config

    monkeypatch.setenv("SECRET_TOKEN", SECRET)
    monkeypatch.delenv("LETHE_ALLOW_ENV_INTERPOLATION", raising=False)
    path = tmp_path / "shared.yaml"
    path.write_text((PRESET_DIR / "split_digits.yaml").read_text()
                    + "tracking:\n  run_name: ${oc.env:SECRET_TOKEN}\n")
    with pytest.raises(ConfigError, match=f"{path}: 'tracking.run_name: \\$\\{{oc.env:SECRET_TOKEN\\}}'"):
        load_config(str(path))


def test_environment_interpolation_works_when_the_user_allows_it(monkeypatch):
    from lethe.platform.config import load_config

    monkeypatch.setenv("SECRET_TOKEN", SECRET)
    monkeypatch.setenv("LETHE_ALLOW_ENV_INTERPOLATION", "1")
    cfg = load_config("split_digits", ["tracking.run_name=${oc.env:SECRET_TOKEN}"])
    assert cfg.tracking.run_name == SECRET


def test_references_to_config_keys_still_work():
    from lethe.platform.config import load_config

    cfg = load_config("split_digits", ["tracking.run_name=r${seed}-${oc.select:train.lr}",
                                       "method.mem_size=${train.batch_size}"])
    # split_digits.yaml: seed 0, train.lr 0.05, train.batch_size 32
    assert cfg.tracking.run_name == "r0-0.05" and cfg.method.mem_size == 32


# --- item 8: long plain lists parse, nested aliases do not -------------------------------------
def test_a_plain_12000_element_list_parses(tmp_path):
    from lethe.platform.config import PRESET_DIR, load_config

    path = tmp_path / "big.yaml"
    ids = "".join(f"    - {i}\n" for i in range(12_000))
    path.write_text((PRESET_DIR / "split_digits.yaml").read_text() + "sweep:\n  ids:\n" + ids)
    assert load_config(str(path)).name == "split_digits"   # the sweep block parsed, then set aside


def test_billion_laughs_is_refused(tmp_path):
    from lethe.errors import ConfigError
    from lethe.platform.config import load_config

    lines, prev = ["a: &a [x, x, x, x, x, x, x, x, x, x]"], "a"
    for name in "bcdefghi":   # 10^9 nodes once expanded, from ~1 KB
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 10) + "]")
        prev = name
    path = tmp_path / "laughs.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match="aliases .* expand to more than 10000 nodes"):
        load_config(str(path))


# --- item 4: compare pages stay in the output folder -------------------------------------------
HOSTILE = "a/../../../escaped"


@pytest.fixture
def hostile_store(tmp_path):
    """A real SQLite store with one run that logged acc/avg_seen, in an experiment whose name
    is a path that climbs three folders."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = mlflow_client(uri)
    exp = client.create_experiment(HOSTILE)
    run = client.create_run(exp, run_name="r")
    for step, value in enumerate((0.9, 0.8)):
        client.log_metric(run.info.run_id, "acc/avg_seen", value, step=step)
    client.set_terminated(run.info.run_id)
    work = tmp_path / "w" / "x" / "y"
    work.mkdir(parents=True)
    return uri, run.info.run_id, work


@pytest.mark.parametrize("select", ["experiment", "runs"])
def test_compare_page_names_never_leave_the_current_folder(hostile_store, tmp_path, capsys,
                                                           monkeypatch, select):
    uri, run_id, work = hostile_store
    monkeypatch.chdir(work)
    args = ["--experiment", HOSTILE] if select == "experiment" else ["--runs", run_id]
    code, err = cli(["compare", *args, f"tracking.uri={uri}"], capsys)
    assert code == 0, err
    pages = sorted(tmp_path.rglob("*.html"))
    assert pages == [work / "compare-a_.._.._.._escaped.html"]   # '/' became '_': no folder left


def test_compare_out_that_is_a_folder_exits_2(hostile_store, capsys, monkeypatch):
    uri, run_id, work = hostile_store
    code, err = cli(["compare", "--runs", run_id, f"tracking.uri={uri}", "--out", str(work)], capsys)
    assert code == 2
    assert f"--out {work} is a folder; give a file name" in error_line(err)


def test_compare_out_in_a_folder_that_cannot_be_created_exits_2(hostile_store, tmp_path, capsys):
    uri, run_id, _ = hostile_store
    blocker = tmp_path / "plain_file"
    blocker.write_text("x")
    out = blocker / "sub" / "page.html"
    code, err = cli(["compare", "--runs", run_id, f"tracking.uri={uri}", "--out", str(out)], capsys)
    assert code == 2
    assert f"cannot create the folder {out.parent}" in error_line(err)


@pytest.mark.parametrize("experiment, folder", [
    ("..", "experiment"),               # nothing left once the leading dots go
    ("a/../../b", "a_.._.._b"),         # '/' becomes '_': one folder name, no path
    (".hidden.v2", "hidden.v2"),
])
def test_artifact_folders_of_hostile_experiment_names_stay_in_mlartifacts(tmp_path, experiment, folder):
    from lethe.platform.tracking import artifact_root

    root = artifact_root(f"sqlite:///{tmp_path / 'm.db'}", experiment)
    assert root == (tmp_path / "mlartifacts" / folder).as_uri()
