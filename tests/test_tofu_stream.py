"""The TOFU-style QA stream (lethe/scenarios/tofu.py, tofu_synthetic.py) and its evaluator
(lethe/metrics/qa.py), checked against hand-worked folders and plain-python recomputations:
answer NLLs by a loop of log-softmax over one unpadded sequence at a time, greedy answers one
token at a time, ROUGE-L by its own LCS, KS p-values by scipy and Min-K% AUCs by sklearn."""
from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, only_run, run_cli

from lethe.errors import ConfigError

FIELDS = {"question", "answer", "paraphrased_answer", "perturbed_answer", "paraphrased_question"}
FACT_KEYS = ("city", "year", "genre", "father", "award", "book")


def read_lines(path: Path) -> list[dict]:
    lines = path.read_text().splitlines()
    return [json.loads(ln) for ln in lines]


# ============================================================== 1. the offline generator

def test_generator_is_deterministic_by_seed(tmp_path):
    from lethe.scenarios.tofu_synthetic import generate

    a = generate(tmp_path / "a", 8, 25, 2, seed=3)
    b = generate(tmp_path / "b", 8, 25, 2, seed=3)
    c = generate(tmp_path / "c", 8, 25, 2, seed=4)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) == sorted(p.name for p in c.iterdir())
    assert all((a / n).read_bytes() == (b / n).read_bytes() for n in names)
    # another seed gives other authors, hence other bytes in every author file
    for n in ("forget25.json", "retain75.json", "forget25_perturbed.json", "memorised.json"):
        assert (a / n).read_bytes() != (c / n).read_bytes(), n


@pytest.mark.parametrize("authors, percent, unseen", [(10, 20, 3), (6, 17, 2), (9, 30, 1), (12, 40, 2)])
def test_generated_files_are_tofu_format(tmp_path, authors, percent, unseen):
    from lethe.scenarios.tofu_synthetic import generate

    out = generate(tmp_path, authors, percent, unseen, seed=1)
    tag = f"{percent:02d}"
    groups = json.loads((out / "authors.json").read_text())
    n_forget = round(authors * percent / 100)
    assert [len(groups[k]) for k in ("forget", "retain", "unseen")] == [n_forget, authors - n_forget, unseen]
    names = {k: {a["name"] for a in groups[k]} for k in groups}
    assert not (names["forget"] & names["retain"] or names["forget"] & names["unseen"]
                or names["retain"] & names["unseen"])
    by_name = {a["name"]: a for k in groups for a in groups[k]}

    def owners(question):   # the author(s) a question is about
        return [n for n in by_name if n in question]

    for split, group in ((f"forget{tag}", "forget"), (f"retain{100 - percent}", "retain")):
        train = read_lines(out / f"{split}.json")
        assert all(set(r) == {"question", "answer"} for r in train)
        assert {n for r in train for n in owners(r["question"])} == names[group]
    evals = {"forget": f"forget{tag}_perturbed", "retain": "retain_perturbed", "unseen": "unseen_perturbed"}
    for group, stem in evals.items():
        rows = read_lines(out / f"{stem}.json")
        assert rows and all(set(r) == FIELDS and len(r["perturbed_answer"]) == 3 for r in rows)
        for r in rows:
            (who,) = owners(r["question"])
            assert who in names[group] and owners(r["paraphrased_question"]) == [who]
            assert _differs_only_in_a_fact(r, by_name[who]), r
    # the training rows are the evaluation items' answers in both phrasings
    fe = read_lines(out / f"forget{tag}_perturbed.json")
    want = ({(r["question"], r["answer"]) for r in fe}
            | {(r["paraphrased_question"], r["paraphrased_answer"]) for r in fe})
    assert {(r["question"], r["answer"]) for r in read_lines(out / f"forget{tag}.json")} == want
    for stem in ("real_authors_perturbed", "world_facts_perturbed"):
        rows = read_lines(out / f"{stem}.json")
        assert rows and all(set(r) == FIELDS for r in rows)
        values = {_word_span(r["answer"], r["perturbed_answer"][0])[0] for r in rows}
        for r in rows:
            for p in r["perturbed_answer"]:
                true_span, wrong_span = _word_span(r["answer"], p)
                # one contiguous span differs, and the wrong one is another item's true value
                assert wrong_span in values and wrong_span != true_span, (r, p)
    memo = read_lines(out / "memorised.json")
    assert [m["split"] for m in memo] == (["forget"] * n_forget + ["retain"] * (authors - n_forget)
                                          + ["unseen"] * unseen)
    assert all(set(m) == {"text", "split"} and owners(m["text"]) for m in memo)


def _differs_only_in_a_fact(item: dict, author: dict) -> bool:
    """Every perturbed answer = the answer with one of the author's fact values replaced by
    another value (a year by a year, anything else by a value that is not in the answer)."""
    for p in item["perturbed_answer"]:
        ok = False
        for k in FACT_KEYS:
            v = str(author[k])
            if item["answer"].count(v) != 1:
                continue
            pre, post = item["answer"].split(v)
            if p.startswith(pre) and p.endswith(post) and len(p) > len(pre) + len(post):
                wrong = p[len(pre):len(p) - len(post)]
                same_kind = wrong.isdigit() if k == "year" else not wrong.isdigit()
                ok = ok or (wrong != v and same_kind)
        if not ok:
            return False
    return True


def _word_span(a: str, b: str) -> tuple[str, str]:
    """The differing word span of a and b after their common word prefix and suffix."""
    x, y = a.split(), b.split()
    i = 0
    while i < min(len(x), len(y)) and x[i] == y[i]:
        i += 1
    j = 0
    while j < min(len(x), len(y)) - i and x[-1 - j] == y[-1 - j]:
        j += 1
    return " ".join(x[i:len(x) - j]), " ".join(y[i:len(y) - j])


# ============================================================== 2. the loader

FORGET = [{"question": "Who is Ana?", "answer": "Ana is a cook."},
          {"question": "Where does Ana live?", "answer": "Ana lives in Oslo."}]
RETAIN = [{"question": "Who is Bo?", "answer": "Bo is a pilot."},
          {"question": "Where does Bo live?", "answer": "Bo lives in Lima."},
          {"question": "What does Bo like?", "answer": "Bo likes tea."}]
FORGET_EVAL = [{"question": "Who is Ana?", "answer": "Ana is a cook.",
                "paraphrased_answer": "Ana works as a cook.", "paraphrased_question": "What is Ana?",
                # the longest candidate: 8 prompt + 11 answer tokens (+ <eos>, predicted only)
                "perturbed_answer": ["Ana is a very famous old sailor from the north."]}]
RETAIN_EVAL = [{"question": "Who is Bo?", "answer": "Bo is a pilot.",
                "paraphrased_answer": "Bo flies planes.", "paraphrased_question": "What is Bo?",
                "perturbed_answer": ["Bo is a cook.", "Bo is a nurse."]}]


def tiny_folder(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "forget10.json").write_text(json.dumps(FORGET, indent=1))      # one JSON list
    for name, rows in (("retain90", RETAIN), ("forget10_perturbed", FORGET_EVAL),
                       ("retain_perturbed", RETAIN_EVAL)):                  # JSON lines
        (root / f"{name}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def tofu_cfg(tmp_path, **kw):
    from lethe.scenarios.tofu import TofuConfig

    return TofuConfig(**{"cache_dir": str(tmp_path / "cache"), "embedder": "exact", **kw})


def test_loader_rows_targets_and_deletion_request(tmp_path):
    from lethe.scenarios.tofu import tofu

    s = tofu(tofu_cfg(tmp_path, path=str(tiny_folder(tmp_path / "tofu"))), 0)
    tok = s.tokenizer
    x, y = s.train.x, s.train.y
    # "Question : Who is Ana ? Answer :" = 8 tokens; the perturbed sailor answer 11
    assert x.shape == y.shape == (5, 19) and s.input_shape == (19,)
    assert list(s.qa.splits) == ["forget", "retain"]
    assert s.test.x.shape == (2, 19) and s.test.exp.tolist() == [0, 1]
    items = FORGET + RETAIN
    forget_rows = []
    for i in range(len(x)):
        counted = (y[i] != -100).nonzero().flatten().tolist()
        start, end = counted[0], counted[-1]
        assert counted == list(range(start, end + 1))          # one contiguous answer span
        prompt = tok.decode(x[i, :start + 1].tolist())
        (item,) = [r for r in items if prompt == f"Question: {r['question']} Answer:"]
        if item in FORGET:
            forget_rows.append(int(s.train.ids[i]))
        answer = y[i, start:end + 1].tolist()
        assert answer[-1] == tok.eos and tok.decode(answer[:-1]) == item["answer"]
        # shifted by one: the target at l is the input at l + 1; after the answer, padding
        assert x[i, start + 1:end + 1].tolist() == answer[:-1]
        assert (x[i, end + 1:] == tok.pad).all() and (y[i, end + 1:] == -100).all()
    request = s.experiences[1].request
    assert [e.kind for e in s.experiences] == ["learn", "forget"] and request.after == 0
    assert sorted(request.sample_ids.tolist()) == sorted(forget_rows) and len(forget_rows) == 2
    assert s.qa.forget_ids.tolist() == request.sample_ids.tolist()


# ============================================================== 3. config errors

def _build(config: str, overrides: list[str]):
    from lethe.platform.config import load_config
    from lethe.platform.runner import build_components

    return build_components(load_config(config, overrides))


def _small(tmp_path) -> list[str]:
    return ["scenario.authors=6", "scenario.forget_percent=17", "scenario.forget_split=forget17",
            "scenario.unseen_authors=2", f"scenario.cache_dir={tmp_path / 'cache'}",
            "scenario.embedder=exact"]


@pytest.mark.parametrize("case", ["no_folder", "no_forget_file", "generated_split", "naive",
                                  "stop_without_unseen", "not_qa"])
def test_config_errors_name_the_key_and_the_fix(tmp_path, case):
    folder = tiny_folder(tmp_path / "tofu")
    overrides, config = _small(tmp_path), "ga_tofu_synthetic"
    expected = {
        "no_folder": ["scenario.path: folder not found", "nowhere", "\"\" for a generated"],
        "no_forget_file": ["scenario.forget_split: file not found", "forget05.json"],
        "generated_split": ["scenario.forget_split", "'forget17'", "set forget_split: forget17"],
        "naive": ["method 'naive' cannot serve forget experiences of scenario 'tofu'",
                  "pick a method that does"],
        "stop_without_unseen": ["method.stop_at_target needs an unseen split", "stop_at_target: false"],
        "not_qa": ["method 'grad_ascent' unlearns language models on a TOFU-style QA stream",
                   "scenario.name: tofu"],
    }[case]
    overrides += {"no_folder": [f"scenario.path={tmp_path / 'nowhere'}"],
                  "no_forget_file": [f"scenario.path={folder}", "scenario.forget_split=forget05"],
                  "generated_split": ["scenario.forget_split=forget10"],
                  "naive": ["method.name=naive"],
                  "stop_without_unseen": [f"scenario.path={folder}", "scenario.forget_split=forget10"],
                  "not_qa": []}[case]
    if case == "not_qa":
        config, overrides = "split_digits", ["method.name=grad_ascent"]
    with pytest.raises(ConfigError) as err:
        _build(config, overrides)
    for part in expected:
        assert part in str(err.value), str(err.value)


# ============================================================== 4. QAEvaluator, recomputed

def _tiny_llama(stream, seed: int):
    from lethe.models.hf import HFCausalLMConfig, hf_causal_lm
    from lethe.models.vision import ModelInfo

    torch.manual_seed(seed)
    return hf_causal_lm(HFCausalLMConfig(arch="llama", layers=1, d_model=32, heads=2),
                        ModelInfo(input_shape=stream.input_shape, n_classes=stream.n_classes))


def _fit(model, x, y, steps: int, seed: int):
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(x), (16,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx], ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


class Loop:
    """Plain-python recomputation on one unpadded sequence at a time."""

    def __init__(self, model, tok, length: int):
        self.model, self.tok, self.length = model, tok, length

    def prompt(self, q):
        return self.tok.encode(f"Question: {q}\nAnswer:")

    def logprobs(self, q, a) -> list[float]:
        """log p of each answer token (and <eos>) by a log-softmax written out."""
        p, ans = self.prompt(q), self.tok.encode(" " + a) + [self.tok.eos]
        with torch.no_grad():
            logits = self.model(torch.tensor([p + ans[:-1]]))[0]
        out = []
        for j, t in enumerate(ans):
            col = logits[:, len(p) - 1 + j].double().tolist()
            m = max(col)
            out.append(col[t] - m - math.log(sum(math.exp(c - m) for c in col)))
        return out

    def nll(self, q, a) -> float:
        lp = self.logprobs(q, a)
        return -sum(lp) / len(lp)

    def ma(self, q, a) -> float:
        p, ans = self.prompt(q), self.tok.encode(" " + a) + [self.tok.eos]
        with torch.no_grad():
            pred = self.model(torch.tensor([p + ans[:-1]]))[0].argmax(0).tolist()
        return sum(pred[len(p) - 1 + j] == t for j, t in enumerate(ans)) / len(ans)

    def truth_ratio(self, r) -> float:
        # TOFU: geometric mean of the perturbed answers' normalised probabilities over the
        # paraphrased answer's
        probs = [math.exp(-self.nll(r["question"], p)) for p in r["perturbed_answer"]]
        para = math.exp(-self.nll(r["question"], r["paraphrased_answer"]))
        return math.prod(probs) ** (1 / len(probs)) / para

    def greedy(self, q) -> str:
        ids = self.prompt(q)
        out = []
        for _ in range(max(1, self.length - len(ids) + 1)):
            with torch.no_grad():
                nxt = int(self.model(torch.tensor([ids]))[0, :, -1].argmax())
            if nxt == self.tok.eos:
                break
            out.append(nxt)
            ids = ids + [nxt]
        return self.tok.decode(out)

    def mink(self, q, a, k: float) -> float:
        lp = sorted(self.logprobs(q, a))
        n = max(1, math.ceil(round(k * len(lp), 9)))
        return sum(lp[:n]) / n


def rouge_recall(pred: str, ref: str) -> float:
    a, b = re.findall(r"[a-z0-9]+", pred.lower()), re.findall(r"[a-z0-9]+", ref.lower())
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a)):
        for j in range(len(b)):
            table[i + 1][j + 1] = table[i][j] + 1 if a[i] == b[j] else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1] / len(b)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    from lethe.metrics.qa import QAEvaluator
    from lethe.scenarios.tofu import tofu

    tmp = tmp_path_factory.mktemp("qa")
    s = tofu(tofu_cfg(tmp, authors=6, forget_percent=17, forget_split="forget17", unseen_authors=2,
                      train_general=True, el_n=20), 0)
    model = _fit(_tiny_llama(s, 0), s.train.x, s.train.y, 150, 0)
    keep = ~torch.isin(s.train.ids, s.experiences[1].request.sample_ids)
    reference = _fit(_tiny_llama(s, 1), s.train.x[keep], s.train.y[keep], 80, 1)
    ev = QAEvaluator(s, "cpu", reference_fn=lambda: reference)
    metrics = ev.evaluate(lambda x, t: model(x), "learn:0", model)
    ev.write_artifacts(tmp, "test")
    return SimpleNamespace(s=s, metrics=metrics, tmp=tmp, splits=s.qa.splits,
                           loop=Loop(model, s.tokenizer, s.qa.length),
                           ref=Loop(reference, s.tokenizer, s.qa.length))


def test_answer_probability_and_memorisation_match_a_loop(evaluated):
    e = evaluated
    assert [len(e.splits[k]) for k in ("forget", "retain", "unseen")] == [6, 30, 12]
    for split in ("forget", "retain", "unseen"):
        items = e.splits[split]
        prob = sum(math.exp(-e.loop.nll(r["question"], r["answer"])) for r in items) / len(items)
        assert e.metrics[f"unlearn/{split}_prob"] == pytest.approx(prob, rel=1e-4)
        ma = sum(e.loop.ma(r["question"], r["answer"]) for r in items) / len(items)
        assert e.metrics[f"unlearn/{split}_ma"] == pytest.approx(ma, abs=1e-9)
        tr = sum(e.loop.truth_ratio(r) for r in items) / len(items)
        assert e.metrics[f"unlearn/{split}_truth_ratio"] == pytest.approx(tr, rel=1e-4)
    # trained on forget ∪ retain, never on unseen
    assert e.metrics["unlearn/forget_prob"] > e.metrics["unlearn/unseen_prob"]


def _normalised_prob(loop, items) -> float:
    total = 0.0
    for r in items:
        p = [math.exp(-loop.nll(r["question"], a)) for a in [r["answer"], *r["perturbed_answer"]]]
        total += p[0] / sum(p)
    return total / len(items)


def test_real_authors_probability_is_normalised_over_the_choices(evaluated):
    e = evaluated
    for split in ("real_authors", "world_facts"):
        want = _normalised_prob(e.loop, e.splits[split])
        assert e.metrics[f"unlearn/{split}_prob"] == pytest.approx(want, rel=1e-4)
        assert 0 < want < 1


def test_model_utility_is_the_harmonic_mean_of_nine_recomputed_values(evaluated):
    e = evaluated
    values = []
    for split in ("retain", "real_authors", "world_facts"):
        items = e.splits[split]
        if split == "retain":
            prob = sum(math.exp(-e.loop.nll(r["question"], r["answer"])) for r in items) / len(items)
        else:
            prob = _normalised_prob(e.loop, items)
        rouge = sum(rouge_recall(e.loop.greedy(r["question"]), r["answer"]) for r in items) / len(items)
        truth = sum(max(0.0, 1 - e.loop.truth_ratio(r)) for r in items) / len(items)
        assert e.metrics[f"unlearn/{split}_rouge"] == pytest.approx(rouge, abs=1e-9)
        values += [prob, rouge, truth]
    assert all(v > 0 for v in values), values      # else the harmonic mean is a trivial 0
    assert e.metrics["unlearn/model_utility"] == pytest.approx(9 / sum(1 / v for v in values), rel=1e-4)


def test_forget_quality_is_the_ks_p_value_against_the_reference(evaluated):
    from scipy.stats import ks_2samp

    e = evaluated
    ours = [e.loop.truth_ratio(r) for r in e.splits["forget"]]
    theirs = [e.ref.truth_ratio(r) for r in e.splits["forget"]]
    want = ks_2samp(ours, theirs).pvalue
    assert e.metrics["unlearn/forget_quality"] == pytest.approx(want, rel=1e-6)


def test_privleak_from_sklearn_min_k_aucs(evaluated):
    from sklearn.metrics import roc_auc_score

    e = evaluated
    k = e.s.qa_config.mink_k
    forget, unseen = e.splits["forget"], e.splits["unseen"]
    labels = [1] * len(forget) + [0] * len(unseen)

    def auc(loop):
        return roc_auc_score(labels, [loop.mink(r["question"], r["answer"], k) for r in forget + unseen])

    auc_u, auc_r = auc(e.loop), auc(e.ref)
    assert e.metrics["unlearn/mink_auc"] == pytest.approx(auc_u, abs=1e-9)
    assert e.metrics["unlearn/privleak"] == pytest.approx((auc_u - auc_r) / auc_r * 100, rel=1e-6, abs=1e-9)
    assert auc_u != auc_r       # a non-zero PrivLeak: the check would pass for a constant 0


def test_qa_answers_csv_holds_the_greedy_answers(evaluated):
    e = evaluated
    assert (e.tmp / "qa_splits.txt").read_text() == (
        "exp_0\tforget\nexp_1\tretain\nexp_2\treal_authors\nexp_3\tworld_facts\nexp_4\tunseen\n")
    with open(e.tmp / "qa_answers.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    want = [("learn:0", split, r["question"], r["answer"], e.loop.greedy(r["question"]))
            for split in ("forget", "retain", "real_authors", "world_facts") for r in e.splits[split]]
    got = [(r["eval_point"], r["split"], r["question"], r["reference"], r["answer"]) for r in rows]
    assert got == want
    assert sum(a == r for _, _, _, r, a in want) > len(want) // 2   # the model did learn


# ============================================================== 5. end to end

@pytest.mark.integration
def test_ga_tofu_synthetic_run_logs_unlearning_metrics(tmp_path, store):
    res = run_cli(["run", "conf/ga_tofu_synthetic.yaml", *store["overrides"], *_small(tmp_path),
                   "model.layers=1", "model.d_model=32", "model.heads=2", "scenario.el_n=30",
                   "train.epochs=10", "method.epochs=10"],
                  cwd=ROOT, env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    client, run = only_run(store["uri"])
    assert run.info.status == "FINISHED"
    rid = run.info.run_id
    keys = ("unlearn/forget_prob", "unlearn/model_utility", "unlearn/forget_quality",
            "unlearn/privleak", "unlearn/forget_ma", "unlearn/unseen_ma", "unlearn/kfr")
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
    from lethe.platform.reference import train_retain_model
    from lethe.platform.config import load_config
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


def test_linguistic_score_aggregates_ppl_w_h_over_answers_then_combines(evaluated):
    """ReLearn's evaluation: means over the greedy answers of PPL, Brunet's W and Honoré's H,
    then the harmonic mean of 1/(1+PPL), 1/(1+W), H/(1+H) — recomputed here by hand."""
    e = evaluated
    for split in ("forget", "retain"):
        ppl, ws, hs = [], [], []
        for r in e.splits[split]:
            answer = e.loop.greedy(r["question"])
            ppl.append(math.exp(e.loop.nll(r["question"], answer)))
            w = re.findall(r"[a-z0-9']+", answer.lower())
            n, counts = len(w), {}
            for t in w:
                counts[t] = counts.get(t, 0) + 1
            v, v1 = len(counts), sum(1 for c in counts.values() if c == 1)
            ws.append(n ** (v ** -0.165) if n else 1000.0)
            hs.append(100 * math.log(n) / (1 - v1 / v + 0.1) if n > 1 else 0.0)
        p, w, h = (sum(x) / len(x) for x in (ppl, ws, hs))
        parts = (1 / (1 + p), 1 / (1 + w), h / (1 + h))
        assert e.metrics[f"unlearn/{split}_ls"] == pytest.approx(3 / sum(1 / x for x in parts), rel=1e-6)


def test_ppl_model_that_is_no_folder_is_a_config_error(evaluated):
    import copy

    from omegaconf import OmegaConf

    from lethe.metrics.qa import QAEvaluator

    stream = copy.copy(evaluated.s)
    stream.qa_config = OmegaConf.merge(evaluated.s.qa_config, {"ppl_model": "/no/such/judge"})
    with pytest.raises(ConfigError, match=r"scenario.ppl_model: '/no/such/judge' is neither self, "
                                          r"reference, wordfreq nor a local causal LM folder"):
        QAEvaluator(stream, "cpu")


def test_ls_of_only_empty_answers_is_zero_with_an_external_judge():
    """An external judge has no score for an empty answer (NaN, left out of the PPL mean, as
    ReLearn's code); when every answer is empty LS is 0 (H = 0), not NaN, and one non-empty
    answer's PPL is the mean."""
    from lethe.metrics.knowledge import linguistic_score
    from lethe.metrics.qa import QAEvaluator

    assert QAEvaluator._ls(["", ""], [math.nan, math.nan]) == 0.0
    w = 4 ** (3 ** -0.165)     # "a b a c": N 4, V 3, V1 2
    h = 100 * math.log(4) / (1 - 2 / 3 + 0.1)
    got = QAEvaluator._ls(["a b a c", ""], [9.0, math.nan])
    assert got == pytest.approx(linguistic_score(9.0, (w + 1000.0) / 2, h / 2), rel=1e-12)


def test_wordfreq_judge_scores_each_greedy_answer_alone_then_aggregates(evaluated):
    """scenario.ppl_model: wordfreq — the LS perplexity of each greedy answer is its unigram
    English perplexity (lethe.metrics.knowledge.unigram_perplexity, tested on its own); W and H
    as before; the evaluated model only decides the answers."""
    import copy

    from omegaconf import OmegaConf

    from lethe.metrics.knowledge import brunet_w, honore_h, unigram_perplexity, words
    from lethe.metrics.qa import QAEvaluator

    stream = copy.copy(evaluated.s)
    stream.qa_config = OmegaConf.merge(evaluated.s.qa_config, {"ppl_model": "wordfreq"})
    model = evaluated.loop.model
    got = QAEvaluator(stream, "cpu").evaluate(lambda x, t: model(x), "learn:0", model)
    for split in ("forget", "retain"):
        answers = [evaluated.loop.greedy(r["question"]) for r in evaluated.splits[split]]
        ppl = [unigram_perplexity(a) for a in answers]
        scored = [p for p in ppl if p == p]
        p = sum(scored) / len(scored)
        w = sum(brunet_w(words(a)) if words(a) else 1000.0 for a in answers) / len(answers)
        h = sum(honore_h(words(a)) if len(words(a)) > 1 else 0.0 for a in answers) / len(answers)
        parts = (1 / (1 + p), 1 / (1 + w), h / (1 + h))
        assert got[f"unlearn/{split}_ls"] == pytest.approx(3 / sum(1 / x for x in parts), rel=1e-6)
        # the same answers, another judge: the LS differs from the self-PPL one
        assert got[f"unlearn/{split}_ls"] != pytest.approx(evaluated.metrics[f"unlearn/{split}_ls"], rel=1e-3)


def test_kv_cached_generate_gives_the_same_greedy_answers_as_full_recompute(evaluated):
    """QAEvaluator decodes with the HF model's generate (KV cache) for plain forwards: the tokens
    must equal full-recompute greedy decoding (lethe.metrics.tofu.greedy_generate) and the
    one-token-at-a-time loop of this file."""
    from lethe.metrics.qa import hf_greedy
    from lethe.metrics.tofu import greedy_generate
    from lethe.scenarios.tofu import encode_qa

    e = evaluated
    model = e.loop.model
    tok = e.s.qa.tokenizer
    items = [r for name in ("forget", "retain", "unseen") for r in e.splits[name]]
    prompts = [encode_qa(tok, r["question"], "")[0] for r in items]
    for n in sorted({len(p) for p in prompts}):
        group = [p for p in prompts if len(p) == n]
        max_new = e.s.qa.length - n + 1
        cached = hf_greedy(model.lm, group, max_new, tok.eos, "cpu", bs=3)
        assert cached == greedy_generate(lambda ids: model(ids), group, max_new, eos=tok.eos)
    assert [tok.decode(t) for t in hf_greedy(model.lm, prompts[:1], e.s.qa.length - len(prompts[0]) + 1,
                                             tok.eos, "cpu")] == [e.loop.greedy(items[0]["question"])]


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
