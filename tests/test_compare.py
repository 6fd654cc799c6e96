"""`lethe compare`: the statistics behind the page, the self-contained HTML, a real headless
Chromium rendering it (no console errors, plots in the DOM, the plotted numbers equal the
MLflow values, a sortable table, a non-blank screenshot), and a real MLflow server."""
from __future__ import annotations

import importlib.util
import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lethe.dashboards import compare
from lethe.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
LETHE = str(Path(sys.executable).parent / "lethe")
N_EXP = 3


def _run(cfg_overrides):
    from lethe.platform.config import load_config
    from lethe.platform.runner import run_experiment

    return run_experiment(load_config("split_digits", cfg_overrides))


# --- pure statistics ---------------------------------------------------------------------------------
def _rd(run_id, params, hist=None, final=None, status="FINISHED"):
    return compare.RunData(run_id, run_id, status, params, {}, final or {}, hist or {})


def test_mean_std_is_the_sample_std_across_seeds():
    vals = [0.5, 0.7, 0.9]
    m, s = compare.mean_std(vals)
    assert m == pytest.approx(np.mean(vals)) and s == pytest.approx(np.std(vals, ddof=1))
    assert compare.mean_std([0.4]) == (0.4, 0.0)


def test_groups_ignore_seed_and_bookkeeping_and_are_labelled_by_what_differs():
    runs = [_rd("a", {"method.name": "naive", "seed": "0", "checkpoint.dir": "/x", "train.lr": "0.1"}),
            _rd("b", {"method.name": "naive", "seed": "1", "checkpoint.dir": "/y", "train.lr": "0.1"}),
            _rd("c", {"method.name": "replay", "seed": "0", "checkpoint.dir": "/x", "train.lr": "0.1",
                      "method.mem_size": "20"}),
            _rd("d", {"method.name": "replay", "seed": "0", "checkpoint.dir": "/x", "train.lr": "0.1",
                      "method.mem_size": "50"})]
    groups = compare.group_runs(runs)
    # method-specific keys label only the groups that shared keys cannot tell apart
    assert {k: [r.run_id for r in v] for k, v in groups.items()} == \
        {"method.name=naive": ["a", "b"], "method.name=replay, method.mem_size=20": ["c"],
         "method.name=replay, method.mem_size=50": ["d"]}


def test_curve_and_matrix_average_over_seeds_step_by_step():
    h1 = {"acc/avg_seen": {0: 1.0, 1: 0.6}, "acc/exp_0": {0: 1.0, 1: 0.4}, "acc/exp_1": {0: 0.0, 1: 0.8}}
    h2 = {"acc/avg_seen": {0: 0.8, 1: 0.4}, "acc/exp_0": {0: 0.8, 1: 0.2}, "acc/exp_1": {0: 0.2, 1: 0.6}}
    runs = [_rd("a", {}, h1), _rd("b", {}, h2)]
    steps, mean, std, count = compare.curve(runs, "acc/avg_seen")
    assert steps == [0, 1] and mean == pytest.approx([0.9, 0.5]) and count == [2, 2]
    assert std == pytest.approx([np.std([1.0, 0.8], ddof=1), np.std([0.6, 0.4], ddof=1)])
    steps, cols, z = compare.accuracy_matrix(runs)
    assert cols == [0, 1] and np.allclose(z, [[0.9, 0.1], [0.3, 0.7]])


def test_unlearning_scatter_plots_forget_quality_against_retain_accuracy():
    runs = [_rd("a", {"method.name": "x"}, final={"unlearn/retain_acc": 0.9, "unlearn/forget_acc": 0.2,
                                                   "unlearn/serve_s": 4.0}),
            _rd("b", {"method.name": "y"}, final={"unlearn/retain_acc": 0.7, "unlearn/forget_acc": 0.6,
                                                   "unlearn/serve_s": 1.0})]
    fig = compare.fig_unlearning(compare.group_runs(runs))
    pts = sorted((t.x[0], t.y[0], t.marker.size[0]) for t in fig.data)
    assert pts == [(0.7, pytest.approx(0.4), pytest.approx(17.5)), (0.9, pytest.approx(0.8), 40.0)]
    assert compare.fig_unlearning(compare.group_runs([_rd("c", {})])) is None


def test_llm_unlearning_plot_places_each_run_at_its_utility_and_forget_quality():
    steps = lambda u0, q0, u1, q1: {"unlearn/model_utility": {0: u0, 1: u1},  # noqa: E731
                                   "unlearn/forget_quality": {0: q0, 1: q1}}
    runs = [_rd("ga", {"method.name": "grad_ascent"}, final={"unlearn/model_utility": 0.24,
                                                            "unlearn/forget_quality": 0.1, "unlearn/kfr": 1.0},
                hist=steps(0.43, 0.01, 0.24, 0.1)),
            _rd("lk", {"method.name": "loku"}, final={"unlearn/model_utility": 0.46,
                                                     "unlearn/forget_quality": 0.0},
                hist=steps(0.43, 0.01, 0.46, 0.0))]
    fig = compare.fig_llm_unlearning(compare.group_runs(runs))
    finals = sorted((t.x[0], t.y[0]) for t in fig.data if t.mode == "markers")
    assert finals == [(0.24, 0.1), (0.46, 1e-30)]   # forget quality 0 is floored for the log axis
    paths = sorted((tuple(t.x), tuple(t.y)) for t in fig.data if t.mode == "lines+markers")
    assert paths == [((0.43, 0.24), (0.01, 0.1)), ((0.43, 0.46), (0.01, 0.0))]
    assert fig.layout.yaxis.type == "log"
    assert "kfr: 1" in [t for t in fig.data if t.mode == "markers" and t.x[0] == 0.24][0].text[0]
    assert compare.fig_llm_unlearning(compare.group_runs([_rd("c", {})])) is None


def test_table_ranks_privleak_by_its_distance_from_zero():
    """PrivLeak follows MUSE's sign (≈ 0 best, −100 not unlearned, > 0 over-unlearned): sorted
    ascending, as the page's script sorts by data-value, the run closest to 0 comes first, not
    the most negative one; the cell still shows the signed value."""
    vals = {"a": -100.0, "b": 5.0, "c": -2.0, "d": 0.5}
    runs = [_rd(k, {"method.name": k}, final={"unlearn/privleak": v, "unlearn/kfr": v / 100})
            for k, v in vals.items()]
    page = compare.table_html(runs, compare.group_runs(runs))
    head = re.findall(r"<th(?: title='([^']*)')?>([^<]*)</th>", page)
    col = [name for _, name in head].index("unlearn/privleak")
    assert "≈ 0 best" in head[col][0] and "−100 = not unlearned" in head[col][0]
    rows = re.findall(r"<tr><td title='(\w)'>.*?</tr>", page)
    # the metric cells (the only ones with a data-value) follow run, group, seed and status
    cells = [re.findall(r"<td class='num' data-value='([^']*)'>([^<]*)</td>", row)
             for row in re.findall(r"<tr><td title='\w'>(.*?)</tr>", page)]
    col -= 4
    keys = {run: float(c[col][0]) for run, c in zip(rows, cells)}
    assert keys == {"a": 100.0, "b": 5.0, "c": 2.0, "d": 0.5}      # |PrivLeak|
    assert [c[col][1] for c in cells] == ["-100.0000", "5.0000", "-2.0000", "0.5000"]
    assert sorted(keys, key=keys.get) == ["d", "c", "b", "a"]      # best first: 0.5, −2, 5, −100
    # a higher-is-better column keeps the raw value as its sort key
    kfr = [name for _, name in head].index("unlearn/kfr") - 4
    assert [float(c[kfr][0]) for c in cells] == [-1.0, 0.05, -0.02, 0.005]


# --- real runs in a sqlite store ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cl_store(tmp_path_factory):
    """naive and replay × seeds 0, 1 (3 experiences, 1 epoch) plus one run that fails."""
    tmp = tmp_path_factory.mktemp("cmp")
    base = [f"tracking.uri=sqlite:///{tmp}/m.db", "tracking.experiment=cmp", f"checkpoint.dir={tmp}/ck",
            "train.epochs=1", f"scenario.n_experiences={N_EXP}", "eval.save_predictions=false"]
    for method in ("naive", "replay"):
        for seed in (0, 1):
            _run(base + [f"method.name={method}", f"seed={seed}"])
    with pytest.raises(Exception, match="non-finite"):
        _run(base + ["method.name=naive", "train.lr=1e30"])
    page = compare.write_compare(f"sqlite:///{tmp}/m.db", experiment="cmp", out=tmp / "page.html")
    return tmp, page


def _reference_means(tmp):
    """Mean acc/avg_seen per method and step, straight from MLflow with numpy."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp}/m.db")
    exp = client.get_experiment_by_name("cmp")
    out = {}
    for method in ("naive", "replay"):
        runs = client.search_runs([exp.experiment_id], filter_string=
                                  f"params.`method.name` = '{method}' and attributes.status = 'FINISHED'")
        assert len(runs) == 2
        hist = [{m.step: m.value for m in client.get_metric_history(r.info.run_id, "acc/avg_seen")}
                for r in runs]
        out[method] = [float(np.mean([h[s] for h in hist])) for s in range(N_EXP)]
    return out


@pytest.mark.integration
def test_page_is_self_contained_and_lists_every_run(cl_store):
    tmp, page = cl_store
    text = page.path.read_text()
    assert page.n_runs == 5 and page.logged_to is None
    # nothing loaded from elsewhere: no external script, stylesheet or image
    assert not re.search(r"<script[^>]*\ssrc=", text) and not re.search(r"<link[^>]*\shref=", text)
    assert not re.search(r"<img[^>]*\ssrc=[\"']?http", text)
    assert len(text) > 1_000_000  # plotly.js itself is inside
    for div in ("curves", "heatmaps", "bars"):
        assert f'id="{div}"' in text
    assert 'id="unlearning"' not in text  # no unlearning metrics in these runs
    assert text.count("<tr>") == 1 + 5 and "FAILED" in text


@pytest.mark.integration
def test_compare_cli_names_an_unknown_experiment(cl_store):
    tmp, _ = cl_store
    res = subprocess.run([LETHE, "compare", "--experiment", "cpm", f"tracking.uri=sqlite:///{tmp}/m.db"],
                         capture_output=True, text=True, cwd=tmp, timeout=300)
    assert res.returncode == 2
    assert "no MLflow experiment 'cpm'" in res.stderr and "did you mean 'cmp'" in res.stderr
    with pytest.raises(ConfigError, match="no MLflow run 'nope'"):
        compare.write_compare(f"sqlite:///{tmp}/m.db", run_ids=["nope"], out=tmp / "x.html")


def test_parents_logged_with_the_old_tags_still_stand_for_their_members(tmp_path):
    """Runs of `--seeds` and of sweeps from before the shared tag scheme (lethe.tags)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/old.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("old")

    def child(parent, extra, seed):
        run_id = client.create_run(exp, tags={"mlflow.parentRunId": parent, **extra}).info.run_id
        client.log_param(run_id, "seed", str(seed))
        for step in range(2):
            client.log_metric(run_id, "acc/avg_seen", 0.5 + 0.1 * seed - 0.1 * step, step=step)
        client.set_terminated(run_id)
        return run_id

    sweep = client.create_run(exp, tags={"lethe.sweep.role": "parent"}).info.run_id
    seeds = client.create_run(exp, tags={"lethe.role": "seed-parent", "lethe.seeds": "2"}).info.run_id
    sweep_members = [child(sweep, {"lethe.sweep.parent": sweep, "lethe.sweep.member": str(i)}, i)
                     for i in range(2)]
    seed_members = [child(seeds, {"lethe.seed_index": str(k)}, k) for k in range(2)]

    def ids(**kw):
        return sorted(r.info.run_id for r in compare.select_runs(client, **kw))

    assert ids(experiment="old") == sorted(sweep_members + seed_members)
    assert ids(run_ids=[seeds]) == sorted(seed_members)
    assert ids(run_ids=[sweep]) == sorted(sweep_members)
    page = compare.write_compare(uri, run_ids=[sweep], out=tmp_path / "p.html")
    assert (page.n_runs, page.n_groups, page.logged_to) == (2, 1, sweep)
    assert "compare.html" in [a.path for a in client.list_artifacts(sweep)]


# --- a real browser ---------------------------------------------------------------------------------
def _load_helpers():
    spec = importlib.util.spec_from_file_location("screenshot_page", ROOT / "scripts" / "screenshot_page.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def browser():
    res = subprocess.run([str(ROOT / "scripts" / "install_chromium.sh")], capture_output=True,
                         text=True, timeout=1800)
    if res.returncode == 3:
        pytest.skip(f"Chromium cannot be installed on this machine: {res.stderr.strip()}")
    assert res.returncode == 0, res.stderr
    helpers = _load_helpers()
    driver = helpers.chromium_driver(1400, 1000)
    try:
        yield driver, helpers
    finally:
        driver.quit()


def _console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


@pytest.mark.integration
def test_console_check_catches_a_broken_page(browser, tmp_path):
    driver, _ = browser
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>notDefinedAnywhere();</script></body></html>")
    driver.get(bad.as_uri())
    errors = _console_errors(driver)
    assert any("notDefinedAnywhere" in e for e in errors), errors


@pytest.mark.integration
def test_browser_renders_the_page_without_errors(browser, cl_store):
    driver, helpers = browser
    tmp, page = cl_store
    driver.get(page.path.as_uri())
    helpers.wait_for_plots(driver, 3)
    assert _console_errors(driver) == []
    n_plots = driver.execute_script("return document.querySelectorAll('.js-plotly-plot').length")
    assert n_plots == 3  # curves, heatmaps, bars
    # the mean curves drawn in the browser are the seed means of the MLflow metrics
    drawn = driver.execute_script("""
        return document.getElementById('curves').data
          .filter(t => t.mode === 'lines+markers' && t.xaxis === 'x')
          .map(t => [t.name, Array.from(t.y)]);""")
    ref = _reference_means(tmp)
    # labels name what differs between configs (the failed run's lr too); the failed run
    # logged no metric and draws no curve
    assert {name: y for name, y in drawn} == {f"method.name={m}, train.lr=0.05":
                                              pytest.approx(v, abs=1e-12) for m, v in ref.items()}
    n_cells = driver.execute_script(
        "return document.querySelectorAll('#heatmaps .heatmaplayer image, #heatmaps .heatmaplayer .hm').length")
    assert n_cells >= 2  # one heatmap image per config group
    png = driver.get_screenshot_as_png()
    from PIL import Image

    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    non_white = (img.sum(axis=2) < 720).mean()
    colors = len({tuple(p) for p in img.reshape(-1, 3)[::7]})
    assert non_white > 0.05 and colors > 50, (non_white, colors)


@pytest.mark.integration
def test_browser_table_sorts_by_the_clicked_column(browser, cl_store):
    from selenium.webdriver.common.by import By

    driver, helpers = browser
    _, page = cl_store
    driver.get(page.path.as_uri())
    helpers.wait_for_plots(driver, 3)
    headers = driver.find_elements(By.CSS_SELECTOR, "#runs th")
    col = [h.text for h in headers].index("acc/avg_seen")

    def column():
        return driver.execute_script(
            f"return Array.from(document.querySelectorAll('#runs tbody tr'))"
            f".map(r => r.cells[{col}].getAttribute('data-value'));")

    headers[col].click()
    values = column()
    nums = [float(v) for v in values if v]
    assert nums == sorted(nums) and len(nums) == 4 and values[-1] == ""  # the failed run last
    headers[col].click()
    nums = [float(v) for v in column() if v]
    assert nums == sorted(nums, reverse=True)
    assert headers[col].get_attribute("aria-sort") == "descending"
    assert _console_errors(driver) == []


# --- a real MLflow server -----------------------------------------------------------------------------
@pytest.mark.integration
def test_sweep_and_compare_against_an_mlflow_server(mlflow_server):
    url, tmp = mlflow_server
    res = subprocess.run([LETHE, "sweep", "split_digits", "--seeds", "2", f"tracking.uri={url}",
                          "tracking.experiment=srv", f"checkpoint.dir={tmp}/ck", "train.epochs=1",
                          "scenario.n_experiences=2", "sweep.precheck=false"],
                         capture_output=True, text=True, cwd=tmp, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    from mlflow.tracking import MlflowClient

    client = MlflowClient(url)
    exp = client.get_experiment_by_name("srv")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.data.tags.get("lethe.role") == "parent"][0]
    assert "compare.html" in [a.path for a in client.list_artifacts(parent.info.run_id)]
    out = subprocess.run([LETHE, "compare", "--runs", parent.info.run_id, f"tracking.uri={url}",
                          "--out", str(tmp / "p.html")], capture_output=True, text=True, cwd=tmp,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    text = (tmp / "p.html").read_text()
    seeds = sorted(r.data.params["seed"] for r in runs if r.info.run_id != parent.info.run_id)
    assert seeds == ["0", "1"] and text.count("<tr>") == 3
    assert text.count("<td>replay</td>") == 2  # one config group: the band is over both seeds
