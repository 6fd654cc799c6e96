"""TOFU runs end to end (the real CLI and a real SQLite MLflow store) and the retain-only
reference of forget quality / PrivLeak (lethe/platform/reference.py): trained by the platform,
or loaded from scenario.retain_model_path."""
from __future__ import annotations

import csv
import math

import pytest
import torch
from conftest import ROOT, only_run, run_cli
from tofu_helpers import small, tiny_llama

from lethe.errors import ConfigError

# ============================================================== end to end

@pytest.mark.integration
def test_ga_tofu_synthetic_run_logs_unlearning_metrics(tmp_path, store):
    res = run_cli(["run", "conf/ga_tofu_synthetic.yaml", *store["overrides"], *small(tmp_path),
                   "model.layers=1", "model.d_model=32", "model.heads=2", "scenario.el_n=30",
                   "train.epochs=10", "method.epochs=10"],
                  cwd=ROOT, env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    client, run = only_run(store["uri"])
    assert run.info.status == "FINISHED"
    rid = run.info.run_id
    keys = ("unlearn/forget_prob", "unlearn/model_utility", "unlearn/forget_quality",
            "unlearn/privleak", "unlearn/forget_ma", "unlearn/unseen_ma", "unlearn/kfr",
            "unlearn/forget_ma_no_eos", "unlearn/forget_es", "unlearn/forget_truth_ratio_raw",
            "unlearn/forget_rouge1_recall", "unlearn/forget_rougeL_f1", "unlearn/forget_para_prob",
            "unlearn/forget_pert_prob", "unlearn/mia_auc", "unlearn/zlib_auc", "unlearn/mink_auc_k20",
            "unlearn/minkpp_auc")
    hist = {k: {m.step: m.value for m in client.get_metric_history(rid, k)} for k in keys}
    assert all(set(h) == {0, 1} for h in hist.values()), hist
    steps = {m.step: m.value for m in client.get_metric_history(rid, "unlearn/target_reached")}
    assert steps == {1: 1.0}
    assert hist["unlearn/forget_ma"][1] <= hist["unlearn/unseen_ma"][1]
    assert hist["unlearn/forget_ma"][1] < hist["unlearn/forget_ma"][0]   # it did unlearn
    arts = {}
    todo = [None]
    while todo:
        for f in client.list_artifacts(rid, todo.pop()):
            (todo.append(f.path) if f.is_dir else arts.update({f.path.split("/")[-1]: f.path}))
    assert {"qa_answers.csv", "qa_splits.txt"} <= set(arts), arts
    # the preset's fluency judge: LS of the served model's forget answers (from the artifact)
    # with English word-frequency perplexities
    from lethe.metrics.knowledge import unigram_perplexity
    from lethe.metrics.qa import QAEvaluator

    path = client.download_artifacts(rid, arts["qa_answers.csv"], str(tmp_path))
    rows = [r for r in csv.DictReader(open(path)) if r["split"] == "forget"]
    answers = [r["answer"] for r in rows if not r["eval_point"].startswith("learn")]
    assert answers and len(answers) * 2 == len(rows)
    ls = {m.step: m.value for m in client.get_metric_history(rid, "unlearn/forget_ls")}[1]
    assert ls == pytest.approx(QAEvaluator._ls(answers, [unigram_perplexity(a) for a in answers]), rel=1e-9)
    # `lethe compare` puts the run on TOFU's trade-off plot at its logged values
    from lethe.dashboards import compare

    runs = compare.load_runs(client, compare.select_runs(client, None, [rid]))
    fig = compare.fig_llm_unlearning(compare.group_runs(runs))
    final = [t for t in fig.data if t.mode == "markers"][0]
    assert (final.x[0], final.y[0]) == (hist["unlearn/model_utility"][1], hist["unlearn/forget_quality"][1])
    page = tmp_path / "compare.html"
    res = run_cli(["compare", "--runs", rid, "--out", str(page), f"tracking.uri={store['uri']}"], cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert 'id="llm_unlearning"' in page.read_text() and 'id="curves"' not in page.read_text()


def test_retain_only_reference_leaves_the_run_rng_alone_and_is_trained_once(tmp_path):
    """The platform's retain-only model: trained on the rows outside the request only (its
    weights equal a model trained here on exactly those rows with the same seed and batch
    order), cached per config, and without touching the run's RNG streams."""
    from lethe.methods.base import make_optimizer
    from lethe.platform.config import load_config
    from lethe.platform.reference import train_retain_model
    from lethe.platform.runner import build_components

    cfg = load_config(str(ROOT / "conf" / "ga_tofu_synthetic.yaml"), [
        f"scenario.cache_dir={tmp_path}", "scenario.authors=6", "scenario.forget_percent=17",
        "scenario.forget_split=forget17", "scenario.unseen_authors=2", "model.d_model=16",
        "model.layers=1", "train.epochs=2", "train.batch_size=16"])
    stream, model, _ = build_components(cfg)
    torch.manual_seed(123)
    cache = {}
    ref = train_retain_model(cfg, stream, torch.device("cpu"), cache)
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(3))            # the caller's stream is unchanged
    assert train_retain_model(cfg, stream, torch.device("cpu"), cache) is ref   # cached by the caller
    assert train_retain_model(cfg, stream, torch.device("cpu")) is not ref      # no cache: no sharing
    # the same training by hand: retain rows = every row outside the deletion request
    keep = ~torch.isin(stream.train.ids, stream.experiences[1].request.sample_ids)
    x, y = stream.train.x[keep], stream.train.y[keep]
    assert len(x) == len(stream.train.x) - len(stream.experiences[1].request.sample_ids)
    torch.manual_seed(cfg.seed)
    from lethe import registry
    from lethe.models.vision import ModelInfo

    mine = registry.get("models", "hf_causal_lm").obj(
        cfg.model, ModelInfo(input_shape=stream.input_shape, n_classes=stream.n_classes))
    opt = make_optimizer(mine.parameters(), cfg.train)
    gen = torch.Generator().manual_seed(cfg.seed)
    mine.train()
    for _ in range(cfg.train.epochs):
        for idx in torch.randperm(len(x), generator=gen).split(cfg.train.batch_size):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(mine(x[idx]), y[idx], ignore_index=-100).backward()
            opt.step()
    for (n, a), (_, b) in zip(ref.state_dict().items(), mine.state_dict().items()):
        assert torch.equal(a, b), n


def test_retain_model_path_loads_the_published_reference_instead_of_training(tmp_path):
    """scenario.retain_model_path: the reference of forget quality / PrivLeak is the local
    retain-only checkpoint itself (weights equal to the saved ones), not a model trained from
    the run's checkpoint; a missing folder is a config error naming that key."""
    from lethe.platform.config import load_config
    from lethe.platform.reference import train_retain_model
    from lethe.platform.runner import build_components

    base = [f"scenario.cache_dir={tmp_path}", "scenario.authors=6", "scenario.forget_percent=17",
            "scenario.forget_split=forget17", "scenario.unseen_authors=2", "model.d_model=16",
            "model.layers=1", "model.arch=llama", "train.epochs=1"]
    stream, model, _ = build_components(load_config(str(ROOT / "conf" / "ga_tofu_synthetic.yaml"), base))
    torch.manual_seed(7)
    published = tiny_llama(stream, 7)
    published.lm.save_pretrained(tmp_path / "retain90")
    cfg = load_config(str(ROOT / "conf" / "ga_tofu_synthetic.yaml"),
                      base + [f"scenario.retain_model_path={tmp_path / 'retain90'}"])
    ref = train_retain_model(cfg, stream, torch.device("cpu"))
    assert not ref.training
    mine = published.state_dict()
    for n, w in ref.state_dict().items():
        assert torch.equal(w, mine[n]), n
    cfg = load_config(str(ROOT / "conf" / "ga_tofu_synthetic.yaml"),
                      base + [f"scenario.retain_model_path={tmp_path / 'nowhere'}"])
    with pytest.raises(ConfigError, match="scenario.retain_model_path: model folder not found"):
        train_retain_model(cfg, stream, torch.device("cpu"))


def test_llm_unlearning_benchmark_bad_override_is_one_message_before_any_run(tmp_path):
    """A mistyped override for the benchmark's methods: exit 2, the config error naming the key
    and the fix, no traceback, and no run started (every config is checked first)."""
    import subprocess
    import sys

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "llm_unlearning.py"),
                          "--tracking-uri", uri, "scenario.ppl_modle=self"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "llm_unlearning: unknown key 'scenario.ppl_modle'; did you mean 'ppl_model'?" in res.stderr
    assert "Traceback" not in res.stderr and "done in" not in res.stdout
    assert not (tmp_path / "mlflow.db").exists()


# every unlearn/* key issue 19 names (TOFU, MUSE, open-unlearning, ReLearn conventions), on the
# splits a real TOFU folder has: forget / retain / real_authors / world_facts and holdout (unseen)
TOFU_KEYS = [f"unlearn/{k}" for k in (
    "model_utility", "forget_quality", "privleak", "mink_auc", "mink_auc_k20", "minkpp_auc",
    "zlib_auc", "mia_auc", "kfr", "krr", "forget_ls", "retain_ls")] + [
    f"unlearn/{split}_{k}" for split in ("forget", "retain", "real_authors", "world_facts")
    for k in ("prob", "para_prob", "pert_prob", "truth_ratio", "truth_ratio_raw", "rouge",
              "rouge1_recall", "rougeL_f1", "ma", "ma_no_eos", "es")] + [
    f"unlearn/unseen_{k}" for k in ("prob", "ma", "ma_no_eos", "es")]


def _tofu_folder(tmp_path):
    """A folder as TOFU ships it: forget17 / retain83 and their *_perturbed files, the
    real-authors / world-facts files, and holdout17.json (question and answer only) for the
    held-out authors; no lethe extras (unseen_perturbed.json, memorised.json)."""
    import json
    import shutil

    from lethe.scenarios.tofu_synthetic import generate

    gen, folder = generate(tmp_path / "gen", 6, 17, 2, seed=0), tmp_path / "TOFU"
    folder.mkdir()
    for name in ("forget17", "retain83", "forget17_perturbed", "retain_perturbed",
                 "real_authors_perturbed", "world_facts_perturbed"):
        shutil.copy(gen / f"{name}.json", folder / f"{name}.json")
    rows = [json.loads(ln) for ln in (gen / "unseen_perturbed.json").read_text().splitlines()]
    (folder / "holdout17.json").write_text(
        "".join(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n" for r in rows))
    return folder


@pytest.mark.integration
def test_tofu_folder_with_a_local_retain_model_logs_every_metric(tmp_path, store):
    """`lethe run ga_tofu_local` on a TOFU-format folder, an HF tokenizer with a Llama-2 chat
    template, a local causal LM that has seen the forget set and a local retain-only model:
    every metric key lands in the SQLite store after learn (step 0) and forget (step 1). Without
    retain_model_path the same run stops with the config error (exit 2) before it starts."""
    from types import SimpleNamespace

    from tofu_helpers import folder_texts, word_tokenizer_folder
    from transformers import AutoTokenizer

    folder = _tofu_folder(tmp_path)
    tok = word_tokenizer_folder(tmp_path / "tok", folder_texts(folder))
    shape = SimpleNamespace(input_shape=(256,), n_classes=len(AutoTokenizer.from_pretrained(str(tok))))
    for name, seed in (("full", 0), ("retain83", 1)):   # published checkpoints, saved as HF does
        tiny_llama(shape, seed).lm.save_pretrained(tmp_path / name)
    args = ["run", "conf/ga_tofu_local.yaml", *store["overrides"], f"scenario.path={folder}",
            "scenario.forget_split=forget17", f"scenario.tokenizer={tok}", f"model.path={tmp_path / 'full'}",
            "scenario.checkpoint_saw_forget=true", "scenario.embedder=exact", "scenario.ppl_model=wordfreq",
            "device=cpu", "train.epochs=3", "train.batch_size=16", "train.lr=0.003", "method.epochs=1",
            "method.batch_size=8", "method.lr=0.001", "eval.batch_size=64"]
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    res = run_cli(args, cwd=ROOT, env=env)   # no retain model: the reference would have seen forget17
    assert res.returncode == 2, res.stderr[-3000:]
    assert ("scenario.retain_model_path: the run's checkpoint has already seen the forget set"
            in res.stderr and "Traceback" not in res.stderr), res.stderr[-3000:]
    res = run_cli(args + [f"scenario.retain_model_path={tmp_path / 'retain83'}"], cwd=ROOT, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    client, run = only_run(store["uri"])
    assert run.info.status == "FINISHED"
    assert run.data.params["scenario.retain_model_path"] == str(tmp_path / "retain83")
    assert run.data.params["scenario.prompt_format"] == "auto"
    missing = [k for k in TOFU_KEYS if k not in run.data.metrics]
    assert not missing, missing
    for k in TOFU_KEYS:
        steps = {m.step: m.value for m in client.get_metric_history(run.info.run_id, k)}
        assert set(steps) == {0, 1}, (k, steps)
        assert all(math.isfinite(v) for v in steps.values()), (k, steps)
    assert 0.0 <= run.data.metrics["unlearn/forget_quality"] <= 1.0
