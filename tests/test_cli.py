"""The `lethe` command: listing, help, and exit code 2 with one line for broken configs."""
from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT, run_cli


def test_list_shows_every_registered_component_with_a_doc():
    from lethe import registry

    res = run_cli(["list"], cwd=ROOT)
    assert res.returncode == 0
    for kind in registry.KINDS:
        for name, entry in registry.entries(kind).items():
            if not entry.obj.__module__.startswith("lethe."):
                continue  # registered by another test module in this process
            assert entry.doc, f"{kind} {name} has no one-line doc"
            assert f"{name}" in res.stdout and entry.doc in res.stdout
    assert "split_digits" in res.stdout.split("presets:")[1]


def test_help_and_list_do_not_import_heavy_libraries():
    code = ("import sys; from lethe.platform.cli import main; main(['list']); "
            "heavy = [m for m in ('torch', 'avalanche', 'mlflow', 'timm', 'transformers') "
            "if m in sys.modules]; print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("args, expected", [
    (["nosuch.yaml"], "config file not found"),
    (["split_digits", "trian.epochs=3"], "did you mean 'train'"),
    (["split_digits", "method.mem_sise=3"], "did you mean 'mem_size'"),
    (["split_digits", "train.epochs=abc"], "bad value for 'train.epochs'"),
    (["split_digits", "method.name=repaly"], "did you mean 'replay'"),
    (["split_digits", "model.name=resnet"], "unknown model 'resnet'"),
    (["split_digits", "scenario.name=image_folder", "scenario.root=/nope"], "not found: '/nope'"),
    (["split_digits", "train.optimizer=adm"], "did you mean 'adam'"),
    (["split_digits", "oops"], "must look like key=value"),
])
def test_broken_configs_exit_2_with_one_line(tmp_path, args, expected):
    res = run_cli(["run", *args, f"tracking.uri=sqlite:///{tmp_path}/m.db"], cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lethe: error:"), res.stderr
    assert expected in lines[0]
    assert not (tmp_path / "m.db").exists(), "no MLflow run is created for a bad config"


@pytest.mark.integration
@pytest.mark.parametrize("args, expected", [
    (["split_digits", "scenario.n_experiences=11"], "scenario.n_experiences=11"),
    (["split_digits", "scenario.name=avalanche", "scenario.benchmark=SplitMNST"], "did you mean 'SplitMNIST'"),
    (["split_digits", "device=cuda:7"], "no CUDA device"),
])
def test_input_errors_found_while_building_exit_2(tmp_path, args, expected):
    import torch

    if "cuda" in " ".join(args) and torch.cuda.is_available():
        pytest.skip("a CUDA device is present, so device=cuda is valid here")
    res = run_cli(["run", *args, f"tracking.uri=sqlite:///{tmp_path}/m.db"], cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], res.stderr


def test_sqlite_store_keeps_artifacts_next_to_its_database(tmp_path, monkeypatch):
    """Artifacts of a SQLite store go to <db folder>/mlartifacts/<experiment>, not ./mlruns of the
    folder a run happens to start in."""
    from lethe.platform.tracking import Tracker

    work = tmp_path / "elsewhere"
    work.mkdir()
    monkeypatch.chdir(work)
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "my exp/1")
    tracker.start("r", {}, {})
    note = tmp_path / "note.txt"
    note.write_text("kept")
    tracker.log_file(note)
    tracker.end("FINISHED")
    saved = tmp_path / "mlartifacts" / "my_exp_1" / tracker.run_id / "artifacts" / "note.txt"
    assert saved.read_text() == "kept"
    assert not (work / "mlruns").exists()
    path = tracker.client.download_artifacts(tracker.run_id, "note.txt", str(tmp_path))
    assert open(path).read() == "kept"


def test_the_command_exits_with_mains_code_after_every_exit_handler_and_flushed_output(tmp_path):
    """`lethe` skips the interpreter's teardown (lethe.platform.cli.console): the exit code is
    main's, output still in Python's buffer arrives in full (stdout to a pipe is block-buffered:
    200 000 characters leave the tail in the buffer), and an exit handler registered during the
    run still runs, after which the process ends."""
    script = (
        "import atexit, sys\n"
        "from lethe.platform import cli\n"
        "def main():\n"
        "    atexit.register(lambda: print('handler of the run', flush=True))\n"
        "    sys.stdout.write('x' * 200000)\n"
        "    return 3\n"
        "cli.main = main\n"
        "cli.console()\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "x" * 200000 + "handler of the run\n"
