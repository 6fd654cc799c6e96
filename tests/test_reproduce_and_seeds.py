"""`lethe reproduce`, captured environments and multi-seed aggregates."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import ROOT, mlflow_client, run_cli
from scipy import stats

pytestmark = pytest.mark.integration

FAST = ["scenario.n_experiences=3", "train.epochs=2"]


def runs_of(uri, experiment="test"):
    client = mlflow_client(uri)
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id])


def test_run_captures_environment_and_reproduce_gives_identical_metrics(tmp_path, store):
    res = run_cli(["run", "split_digits", *store["overrides"], *FAST], cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    client, (run,) = runs_of(store["uri"])
    tags = run.data.tags
    assert tags["env.pkg.torch"] and tags["env.pkg.avalanche-lib"] == "0.6.0"
    assert tags["env.hw.cpu_count"] and "data.fp.test" in tags and "data.fp.train_exp_2" in tags
    env = json.load(open(client.download_artifacts(run.info.run_id, "environment.json", str(tmp_path))))
    assert env["data"]["train_exp_0"] == tags["data.fp.train_exp_0"]
    freeze = open(client.download_artifacts(run.info.run_id, "pip_freeze.txt", str(tmp_path))).read()
    assert "avalanche-lib==0.6.0" in freeze and "mlflow==" in freeze

    res = run_cli(["reproduce", run.info.run_id, f"tracking.uri={store['uri']}"], cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "≠" not in res.stdout and "acc/avg_seen" in res.stdout
    client, runs = runs_of(store["uri"])
    new = [r for r in runs if r.data.tags.get("lethe.reproduces") == run.info.run_id]
    assert len(new) == 1 and new[0].info.status == "FINISHED"
    for key in ("acc/avg_seen", "forgetting/avg", "bwt", "acc/exp_0", "nfr/prev"):
        assert new[0].data.metrics[key] == run.data.metrics[key], key

    # a changed override shows up as a difference in the side-by-side
    res = run_cli(["reproduce", run.info.run_id, f"tracking.uri={store['uri']}", "train.lr=0.2"], cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "≠" in res.stdout


def test_reproduce_refuses_when_the_data_changed(tmp_path, store):
    """An image moved to another class folder after the run: reproduce must refuse."""
    from PIL import Image

    from lethe.errors import ConfigError
    from lethe.platform.config import load_config
    from lethe.platform.reproduce import reproduce
    from lethe.platform.runner import run_experiment

    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for c, name in enumerate(["a", "b", "c", "d"]):
        (root / name).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3)).astype(np.uint8)).save(root / name / f"{i}.png")
    cfg = load_config("split_digits", [*store["overrides"], "scenario.name=image_folder",
                                       f"scenario.root={root}", "scenario.image_size=8",
                                       "train.epochs=1", "method.mem_size=10"])
    original = run_experiment(cfg)
    (root / "a" / "3.png").rename(root / "b" / "3x.png")
    with pytest.raises(ConfigError, match="data no longer matches the recorded run"):
        reproduce(original.run_id, [f"tracking.uri={store['uri']}"])


def test_fingerprint_changes_when_one_label_changes():
    from lethe.platform.config import validate
    from lethe.platform.environment import data_fingerprints
    from lethe.scenarios.split_digits import split_digits

    cfg = validate({"scenario": {"name": "split_digits", "n_experiences": 3}, "model": "mlp",
                    "method": "naive"})
    a = split_digits(cfg.scenario, 0)
    before = data_fingerprints(a)
    assert data_fingerprints(split_digits(cfg.scenario, 0)) == before
    ds = a.experiences[1].train.dataset
    labels = list(ds.targets)
    labels[0] = (labels[0] + 1) % 10
    a.experiences[1].train = SimpleNamespace(dataset=ds.update_data_attribute("targets", labels))
    after = data_fingerprints(a)
    assert after["train_exp_1"] != before["train_exp_1"]
    assert after["train_exp_0"] == before["train_exp_0"] and after["test"] == before["test"]


def test_seeds_parent_aggregates_match_numpy(tmp_path, store):
    res = run_cli(["run", "split_digits", *store["overrides"], *FAST, "--seeds", "3"], cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    client, runs = runs_of(store["uri"])
    parent = [r for r in runs if r.data.tags.get("lethe.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert len(parent) == 1 and len(children) == 3
    assert parent[0].data.tags["lethe.group"] == "seeds"
    assert sorted(c.data.tags["lethe.member"] for c in children) == ["0", "1", "2"]
    assert all(c.data.tags["lethe.role"] == "child" for c in children)
    assert sorted(int(c.data.params["seed"]) for c in children) == [0, 1, 2]
    for key in ("acc/avg_seen", "forgetting/avg", "bwt"):
        values = np.array([c.data.metrics[key] for c in children])
        m = parent[0].data.metrics
        assert m[f"{key}/mean"] == pytest.approx(values.mean(), abs=1e-12)
        assert m[f"{key}/std"] == pytest.approx(values.std(ddof=1), abs=1e-12)
        half = stats.t.ppf(0.975, 2) * values.std(ddof=1) / np.sqrt(3)
        assert m[f"{key}/ci95"] == pytest.approx(half, abs=1e-12)
    assert len({c.data.metrics["acc/avg_seen"] for c in children}) > 1   # seeds really differ


def test_compare_shows_a_seeds_parent_as_one_group_of_its_seeds(tmp_path, store):
    import re

    from lethe.dashboards import compare

    res = run_cli(["run", "split_digits", *store["overrides"], "train.epochs=1", "--seeds", "3"],
                  cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    client, runs = runs_of(store["uri"])
    (parent,) = [r.info.run_id for r in runs if r.data.tags.get("lethe.seeds") == "3"]
    seeds = {r.info.run_id: r.data.params["seed"] for r in runs if r.info.run_id != parent}
    assert sorted(seeds.values()) == ["0", "1", "2"]

    # the library data behind the page: one config group of the three seeds, no parent row
    groups = compare.group_runs(compare.load_runs(client, compare.select_runs(client, "test")))
    assert [sorted(r.run_id for r in g) for g in groups.values()] == [sorted(seeds)]

    # the page itself, through the CLI, both from the experiment and from the parent's id
    for args, name in ((["--experiment", "test"], "all.html"), (["--runs", parent], "parent.html")):
        out = run_cli(["compare", *args, f"tracking.uri={store['uri']}", "--out", str(tmp_path / name)],
                      cwd=ROOT)
        assert out.returncode == 0, out.stderr[-2000:]
        page = (tmp_path / name).read_text()
        assert "3 runs (3 FINISHED) in 1 config groups" in page
        table = page.split("<table", 1)[1]
        rows = re.findall(r"<tr><td title='(\w+)'>", table)
        assert sorted(rows) == sorted(seeds) and parent not in table
        assert f"logged as artifact compare.html of parent run {parent}" in out.stdout
    assert "compare.html" in [a.path for a in client.list_artifacts(parent)]
