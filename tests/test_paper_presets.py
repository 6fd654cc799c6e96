"""Paper presets (lethe/conf/paper/*.yaml): the `paper:` block (validated, stored with the run),
preset lookup by `paper/<name>`, `requires:` failing at config time before any MLflow run,
the LM presets' official hyperparameters and their tiny CPU twins, and `lethe compare`'s
measured-vs-paper table."""
from __future__ import annotations

import html
import re
import statistics
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lethe.errors import ConfigError
from lethe.platform.config import (
    PRESET_DIR,
    flatten,
    load_config,
    presets,
    resolve_path,
    to_yaml,
)

ROOT = Path(__file__).resolve().parents[1]
LETHE = str(Path(sys.executable).parent / "lethe")
LM_PAPER = [f"paper/{m}_tofu_{b}" for m in ("loku", "relearn", "ga", "grad_diff")
            for b in ("phi15", "llama2_7b")]
CONPET_PAPER = ["paper/conpet_static_fewrel", "paper/conpet_dynamic_fewrel"]
TWIN = "paper/tiny/ga_tofu_phi15"
BLOCK = ["paper.citation=Someone et al., 2024", "paper.table=Table 2", "paper.metric=acc/last",
         "paper.value=0.5"]


def error_of(*overrides, config="split_digits") -> str:
    with pytest.raises(ConfigError) as info:
        load_config(config, list(overrides))
    return str(info.value)


def raw(name: str):
    return OmegaConf.load(resolve_path(name))


# --- the paper block ---------------------------------------------------------------------------
def test_paper_block_is_stored_with_the_run_config():
    cfg = load_config("split_digits", BLOCK + ["paper.note=CIFAR-100 in the paper"])
    params = flatten(cfg)
    assert params["paper.value"] == "0.5" and params["paper.metric"] == "acc/last"
    assert params["paper.note"] == "CIFAR-100 in the paper"
    assert OmegaConf.create(to_yaml(cfg)).paper.table == "Table 2"   # the config.yaml artifact


def test_configs_without_a_paper_block_log_no_paper_params():
    assert not [k for k in flatten(load_config("split_digits")) if k.startswith(("paper", "requires"))]


def test_paper_block_unknown_key_names_the_valid_ones():
    msg = error_of(*BLOCK, "paper.valeu=3")
    assert "unknown key 'paper.valeu'" in msg and "did you mean 'value'" in msg
    assert "citation, metric, note, table, value" in msg


def test_paper_block_without_a_value_names_the_fix():
    msg = error_of(*BLOCK[:3])
    assert "missing value for 'paper.value'" in msg and "citation, table, metric and value" in msg


def test_paper_metric_must_be_a_key_lethe_logs():
    msg = error_of(*BLOCK[:2], "paper.metric=acc/avg_incremantal", "paper.value=0.9")
    assert "'acc/avg_incremantal' is not a metric lethe logs" in msg and "lethe list metrics" in msg
    load_config("split_digits", BLOCK[:2] + ["paper.metric=acc/exp_3", "paper.value=0.9"])  # a pattern


def test_paper_value_may_be_null_only_when_marked_unverified():
    msg = error_of(*BLOCK[:3], "paper.value=null")
    assert "paper.value is null" in msg and "unverified" in msg
    cfg = load_config("split_digits", BLOCK[:3] + ["paper.value=null", "paper.note='unverified, no table'"])
    assert cfg.paper.value is None


def test_paper_value_must_be_a_number():
    assert "bad value for 'paper.value'" in error_of(*BLOCK[:3], "paper.value=high")


# --- lookup and requires -------------------------------------------------------------------------
def test_paper_presets_are_found_and_listed_by_their_relative_name(capsys):
    from lethe.platform.cli import cmd_list

    names = presets()
    for name in LM_PAPER + CONPET_PAPER:
        assert name in names and resolve_path(name) == PRESET_DIR / f"{name}.yaml"
        assert f"{name.replace('paper/', 'paper/tiny/')}" in names
    assert "split_digits" in names
    cmd_list("presets")
    assert "  paper/loku_tofu_phi15\n" in capsys.readouterr().out
    assert "did you mean 'paper/loku_tofu_phi15'" in error_of(config="paper/loku_tofu_phi1")


def test_a_preset_name_cannot_climb_out_of_the_preset_folder(tmp_path, monkeypatch):
    import os

    (tmp_path / "outside.yaml").write_text((PRESET_DIR / "split_digits.yaml").read_text())
    name = os.path.relpath(tmp_path / "outside", PRESET_DIR)
    # Run from a folder deeper than the preset folder, so the climbing name cannot also be
    # a valid path relative to the working directory (it was on a checkout 3 levels deep).
    cwd = tmp_path.joinpath(*["d"] * (len(PRESET_DIR.parts) + 2))
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    assert name.startswith("..") and not Path(name + ".yaml").is_file()
    assert "config file not found" in error_of(config=name)


def test_missing_download_fails_before_any_mlflow_run(tmp_path):
    from conftest import run_cli

    db = tmp_path / "m.db"
    res = run_cli(["run", "paper/loku_tofu_phi15", f"tracking.uri=sqlite:///{db}",
                   "scenario.path=/no/such/TOFU"], cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "scenario.path: not found: '/no/such/TOFU'" in res.stderr
    assert "https://huggingface.co/datasets/locuslab/TOFU" in res.stderr
    assert "Traceback" not in res.stderr
    assert not db.exists()   # no store opened, so no run either


def test_requires_names_the_first_missing_folder_and_where_to_get_it(tmp_path):
    (tmp_path / "TOFU").mkdir()
    msg = error_of(f"scenario.path={tmp_path / 'TOFU'}", config="paper/loku_tofu_llama2_7b")
    assert "model.path: not found: '/models/tofu_Llama-2-7b-chat-hf_full'" in msg
    assert "https://huggingface.co/open-unlearning/tofu_Llama-2-7b-chat-hf_full" in msg


def test_requires_passes_when_every_folder_exists(tmp_path):
    paths = {k: tmp_path / k.replace(".", "_") for k in
             ("scenario.path", "model.path", "scenario.tokenizer", "scenario.retain_model_path")}
    for p in paths.values():
        p.mkdir()
    cfg = load_config("paper/loku_tofu_llama2_7b", [f"{k}={v}" for k, v in paths.items()])
    assert cfg.model.path == str(paths["model.path"]) and cfg.paper.metric == "unlearn/forget_quality"


def test_requires_entries_are_validated(tmp_path):
    assert "unknown key 'requires[0].wat'" in error_of("requires=[{key: scenario.name, wat: x}]")
    assert "missing value for 'requires[0].what'" in error_of("requires=[{key: scenario.name}]")
    msg = error_of("requires=[{key: scenario.rooot, what: x}]")
    assert "'scenario.rooot' is not set in this config" in msg


# --- the LM presets and their twins ---------------------------------------------------------------
@pytest.mark.parametrize("name", LM_PAPER + CONPET_PAPER)
def test_each_paper_preset_has_a_paper_block_and_requires_its_downloads(name):
    cfg = raw(name)
    assert set(cfg.paper) >= {"citation", "table", "metric", "value", "note"}
    # no number without a check: every null value says why
    assert cfg.paper.value is not None or cfg.paper.note.startswith("unverified")
    keys = {r.key for r in cfg.requires}
    assert {"scenario.path", "model.path", "scenario.tokenizer"} <= keys
    assert all(r.source.startswith("https://") for r in cfg.requires)


@pytest.mark.parametrize("name", LM_PAPER + CONPET_PAPER)
def test_each_twin_keeps_the_paper_presets_method_and_paper_block(name):
    paper, twin = raw(name), raw(name.replace("paper/", "paper/tiny/"))
    method, twin_method = OmegaConf.to_container(paper.method), OmegaConf.to_container(twin.method)
    if name.startswith("paper/conpet"):   # the one documented difference (CPU time)
        assert paper.method.batch_limit == 800 and twin_method.pop("batch_limit") == 8
        method.pop("batch_limit")
    assert method == twin_method
    assert paper.paper == twin.paper
    scale = {"epochs", "lr", "batch_size", "precision", "gradient_checkpointing"}
    drop = lambda t: {k: v for k, v in OmegaConf.to_container(t).items() if k not in scale}
    assert drop(paper.train) == drop(twin.train)


def test_lm_presets_carry_the_official_schedules():
    loku_phi, loku_llama = raw("paper/loku_tofu_phi15").method, raw("paper/loku_tofu_llama2_7b").method
    assert (loku_phi.lr, loku_llama.lr) == (2e-4, 1e-4)            # LoKU: 2e-4 Phi-1.5, 1e-4 Llama-2
    for name in ("loku", "ga", "grad_diff"):
        m = raw(f"paper/{name}_tofu_phi15").method
        assert m.batch_size * m.grad_accum_steps == 32                 # effective batch 2 x 16
        assert (m.lr_schedule, m.warmup_epochs, m.weight_decay) == ("warmup_linear", 1, 0.01)
    r = raw("paper/relearn_tofu_llama2_7b").method
    assert (r.rank, r.alpha, r.lora_dropout, r.kl_positions) == (32, 32, 0.05, "all")
    llama = raw("paper/ga_tofu_llama2_7b")
    assert llama.train.epochs == 0 and llama.scenario.checkpoint_saw_forget
    assert llama.scenario.prompt_format == "tofu_llama2"
    assert raw("paper/ga_tofu_phi15").scenario.prompt_format == "plain"
    assert raw("paper/grad_diff_tofu_phi15").method.name == "grad_diff"
    c = raw("paper/conpet_dynamic_fewrel")
    assert (c.method.lora_rank, c.method.topk, c.train.grad_clip_norm) == (4, 1, 1.0)
    for name in LM_PAPER:   # the learn phase: TOFU's fine-tune, one warm-up epoch of 5
        t = raw(name).train
        assert (t.batch_size * t.get("grad_accum_steps", 1), t.optimizer, t.weight_decay) == (32, "adamw", 0.01)
        assert (t.lr_schedule.name, t.lr_schedule.warmup_frac) == ("warmup_linear", 0.2), name
        assert t.lr == (2e-5 if name.endswith("phi15") else 1e-5), name   # Phi-1.5 2e-5, Llama-2 1e-5
    for b in ("phi15", "llama2_7b"):   # ReLearn: 2 x 4 accumulated, warm-up epoch, wd 0.01
        m = raw(f"paper/relearn_tofu_{b}").method
        assert (m.batch_size, m.grad_accum_steps, m.lr_schedule, m.warmup_epochs, m.weight_decay) == \
            (2, 4, "warmup_linear", 1, 0.01)


def _twin_overrides(tmp, name: str) -> list[str]:
    out = [f"tracking.uri=sqlite:///{tmp}/m.db", "tracking.experiment=twins", f"checkpoint.dir={tmp}/ck",
           "eval.save_predictions=false"]
    return out + ([f"scenario.cache_dir={tmp}/cache"] if "_tofu_" in name else [])


@pytest.mark.integration
@pytest.mark.parametrize("name", LM_PAPER + CONPET_PAPER)
def test_each_tiny_twin_runs_on_cpu_and_logs_the_paper_metric(tmp_path, name):
    from lethe.platform.runner import run_experiment

    twin = name.replace("paper/", "paper/tiny/")
    res = run_experiment(load_config(twin, _twin_overrides(tmp_path, twin)))
    from mlflow.tracking import MlflowClient

    run = MlflowClient(f"sqlite:///{tmp_path}/m.db").get_run(res.run_id)
    assert run.info.status == "FINISHED"
    metric = run.data.params["paper.metric"]
    assert metric in run.data.metrics and run.data.metrics[metric] == run.data.metrics[metric]  # not NaN


# --- lethe compare ----------------------------------------------------------------------------------
def _paper_table(text: str) -> list[list[str]]:
    body = re.search(r"<table class='sortable' id='paper'>(.*?)</table>", text, re.DOTALL).group(1)
    rows = re.findall(r"<tr>(.*?)</tr>", body, re.DOTALL)[1:]   # the first is the header
    return [[html.unescape(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", r, re.DOTALL)] for r in rows]


@pytest.mark.integration
def test_compare_shows_the_paper_value_beside_the_measured_mean_and_std(tmp_path):
    from mlflow.tracking import MlflowClient

    from lethe.dashboards import compare
    from lethe.platform.runner import run_experiment

    base = _twin_overrides(tmp_path, TWIN) + ["paper.value=0.25"]
    for seed in (0, 1):
        run_experiment(load_config(TWIN, base + [f"seed={seed}"]))
    page = compare.write_compare(f"sqlite:///{tmp_path}/m.db", experiment="twins", out=tmp_path / "p.html")
    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    runs = client.search_runs([client.get_experiment_by_name("twins").experiment_id])
    values = [r.data.metrics["unlearn/forget_quality"] for r in runs]
    assert len(values) == 2 and page.n_groups == 1
    want = f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"   # sample std, n - 1
    rows = _paper_table(page.path.read_text())
    assert len(rows) == 1
    _group, metric, measured, seeds, paper, source, note = rows[0]
    assert (metric, measured, seeds, paper) == ("unlearn/forget_quality", want, "2", "0.2500")
    assert "LoKU" in source and note.startswith("unverified")


def test_compare_says_unverified_and_keeps_paper_params_out_of_the_grouping():
    from lethe.dashboards import compare

    block = {"paper.metric": "acc/last", "paper.value": "None", "paper.citation": "X",
             "paper.table": "T", "paper.note": "unverified: not checked"}
    runs = [compare.RunData("a", "a", "FINISHED", {"method.name": "naive", "seed": "0", **block}, {},
                            {"acc/last": 0.5}),
            compare.RunData("b", "b", "FINISHED", {"method.name": "naive", "seed": "1"}, {},
                            {"acc/last": 0.7})]
    groups = compare.group_runs(runs)
    assert list(groups) == ["naive"]          # a paper block does not make another config
    row = compare.paper_rows(groups)[0]
    assert row["paper"] is None and row["n"] == 2
    assert abs(row["mean"] - 0.6) < 1e-12 and abs(row["std"] - 0.1414213562) < 1e-9  # sqrt(0.02)
    assert "<td class='num paper'>unverified</td>" in compare.paper_html(groups)
    assert compare.paper_html({"naive": [runs[1]]}) == ""


def test_docs_list_every_language_model_paper_preset():
    text = (ROOT / "docs" / "paper-presets.md").read_text()
    assert not [n for n in LM_PAPER + CONPET_PAPER if f"`{n}`" not in text]
    assert "docs/paper-presets.md" in (ROOT / "README.md").read_text()
