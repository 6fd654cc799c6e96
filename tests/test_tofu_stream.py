"""The TOFU-style QA stream (lethe/scenarios/tofu.py, tofu_synthetic.py): the offline
generator's files, the loader's rows and targets on a hand-worked folder, and the config errors.
The evaluator is checked in test_tofu_evaluator.py, whole runs in test_tofu_run.py, prompt
formats in test_tofu_prompts.py."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from tofu_helpers import FORGET, RETAIN, build, small, tiny_folder, tiny_llama, tofu_cfg

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


def test_tofu_holdout_file_is_the_unseen_split(tmp_path):
    """TOFU's own held-out authors (holdout10.json: question and answer only) are read as the
    unseen split — the non-members of the membership attacks; the evaluator logs the MIA AUCs
    on them, and their truth ratio is nan (no perturbed answers)."""
    from lethe.metrics.qa import QAEvaluator
    from lethe.scenarios.tofu import tofu

    folder = tiny_folder(tmp_path / "tofu")
    holdout = [{"question": "Who is Cy?", "answer": "Cy is a baker."},
               {"question": "Where does Cy live?", "answer": "Cy lives in Rome."}]
    (folder / "holdout10.json").write_text("".join(json.dumps(r) + "\n" for r in holdout))
    s = tofu(tofu_cfg(tmp_path, path=str(folder)), 0)
    assert list(s.qa.splits) == ["forget", "retain", "unseen"] and s.qa.splits["unseen"] == holdout
    assert s.test.exp.tolist() == [0, 1, 2, 2]
    model = tiny_llama(s, 0).eval()
    m = QAEvaluator(s, "cpu").evaluate(lambda x, t: model(x), "learn:0", model)
    for key in ("mia_auc", "zlib_auc", "mink_auc", "minkpp_auc"):
        assert 0.0 <= m[f"unlearn/{key}"] <= 1.0, key
    assert math.isnan(m["unlearn/unseen_truth_ratio"]) and m["unlearn/unseen_prob"] > 0


# ============================================================== 3. config errors


@pytest.mark.parametrize("case", ["no_folder", "no_forget_file", "generated_split", "naive",
                                  "stop_without_unseen", "not_qa", "saw_forget"])
def test_config_errors_name_the_key_and_the_fix(tmp_path, case):
    folder = tiny_folder(tmp_path / "tofu")
    overrides, config = small(tmp_path), "ga_tofu_synthetic"
    expected = {
        "no_folder": ["scenario.path: folder not found", "nowhere", "\"\" for a generated"],
        "no_forget_file": ["scenario.forget_split: file not found", "forget05.json"],
        "generated_split": ["scenario.forget_split", "'forget17'", "set forget_split: forget17"],
        "naive": ["method 'naive' cannot serve forget experiences of scenario 'tofu'",
                  "pick a method that does"],
        "stop_without_unseen": ["method.stop_at_target needs an unseen split", "stop_at_target: false"],
        "not_qa": ["method 'grad_ascent' unlearns language models on a TOFU-style QA stream",
                   "scenario.name: tofu"],
        "saw_forget": ["scenario.retain_model_path: the run's checkpoint has already seen the forget set",
                       "forget quality / PrivLeak would be invalid", "as scenario.retain_model_path"],
    }[case]
    overrides += {"no_folder": [f"scenario.path={tmp_path / 'nowhere'}"],
                  "no_forget_file": [f"scenario.path={folder}", "scenario.forget_split=forget05"],
                  "generated_split": ["scenario.forget_split=forget10"],
                  "naive": ["method.name=naive"],
                  "saw_forget": ["scenario.checkpoint_saw_forget=true"],
                  "stop_without_unseen": [f"scenario.path={folder}", "scenario.forget_split=forget10"],
                  "not_qa": []}[case]
    if case == "not_qa":
        config, overrides = "split_digits", ["method.name=grad_ascent"]
    with pytest.raises(ConfigError) as err:
        build(config, overrides)
    for part in expected:
        assert part in str(err.value), str(err.value)


