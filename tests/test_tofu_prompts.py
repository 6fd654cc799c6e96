"""scenario.prompt_format (lethe/scenarios/tofu.py): QA rows built with the tokenizer's chat
template (TOFU's Llama-2 ``[INST] … [/INST]`` with BOS), TOFU's Llama-2 string, or the plain
``Question: … Answer:`` format of TOFU's Phi — the expected ids come from tokenising the literal
strings here with a tokenizer loaded on its own, and the targets count the answer tokens only."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from tofu_helpers import (
    FORGET,
    RETAIN,
    Loop,
    fit,
    folder_texts,
    rouge,
    tiny_folder,
    tiny_llama,
    tofu_cfg,
    word_tokenizer_folder,
)

from lethe.errors import ConfigError


def _hf(folder):
    """The saved tokenizer, loaded here past lethe's loader: ids(text) of a literal string."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return hf, (lambda text: hf(text, add_special_tokens=False)["input_ids"])


def _stream(tmp_path, template=None, **kw):
    from lethe.scenarios.tofu import tofu

    folder = tiny_folder(tmp_path / "tofu")
    args = {} if template is None else {"chat_template": template}
    tok_dir = word_tokenizer_folder(tmp_path / "tok", folder_texts(folder), **args)
    return tofu(tofu_cfg(tmp_path, path=str(folder), tokenizer=str(tok_dir), **kw), 0), tok_dir


def _assert_row(x, y, prompt: list[int], answer: list[int], pad: int):
    """A row of (prompt, answer): inputs = the sequence shifted by one, then padding; targets
    −100 on the prompt, the answer tokens (with <eos>) after it, −100 on the padding."""
    seq = prompt + answer
    n = len(seq) - 1
    assert x[:n].tolist() == seq[:-1] and (x[n:] == pad).all()
    assert (y[:len(prompt) - 1] == -100).all() and (y[n:] == -100).all()
    assert y[len(prompt) - 1:n].tolist() == answer


def test_chat_template_rows_count_only_the_answer_tokens(tmp_path):
    s, tok_dir = _stream(tmp_path)          # prompt_format: auto, the tokenizer has a template
    hf, ids = _hf(tok_dir)
    assert s.qa.prompt_format == "chat_template"
    # Llama-2's chat turn, written out: "<s>[INST] q [/INST]" then " a </s>"; "Who is Ana?" is
    # <s> [ INST ] Who is Ana ? [/ INST ] = 11 tokens, " Ana is a cook. </s>" 6 more
    first = ids("<s>[INST] Who is Ana? [/INST]")
    assert len(first) == 11 and first[0] == hf.bos_token_id
    assert len(ids("<s>[INST] Who is Ana? [/INST] Ana is a cook. </s>")) == 17
    for i, item in enumerate(FORGET + RETAIN):    # training rows: forget, then retain items
        prompt = ids(f"<s>[INST] {item['question']} [/INST]")
        full = ids(f"<s>[INST] {item['question']} [/INST] {item['answer']} </s>")
        assert full[:len(prompt)] == prompt
        answer = full[len(prompt):]
        assert answer.count(hf.eos_token_id) == 1 and answer[-1] == hf.eos_token_id   # no second </s>
        _assert_row(s.train.x[i], s.train.y[i], prompt, answer, hf.eos_token_id)
        assert hf.decode(answer, skip_special_tokens=True) == item["answer"]
    # the evaluation rows (forget10_perturbed, retain_perturbed) in the same format
    prompt = ids("<s>[INST] Who is Bo? [/INST]")
    _assert_row(s.test.x[1], s.qa.item_rows(s.qa.splits["retain"])[1][0], prompt,
                ids("<s>[INST] Who is Bo? [/INST] Bo is a pilot. </s>")[len(prompt):], hf.eos_token_id)


@pytest.mark.parametrize("fmt", ["plain", "tofu_llama2"])
def test_plain_and_tofu_llama2_strings(tmp_path, fmt):
    s, tok_dir = _stream(tmp_path, prompt_format=fmt)
    hf, ids = _hf(tok_dir)
    eos = hf.eos_token_id
    for i, item in enumerate(FORGET + RETAIN):
        q, a = item["question"], item["answer"]
        if fmt == "plain":   # TOFU's Phi format "Question: q\nAnswer: a": no BOS, answer after a space
            prompt, answer = ids(f"Question: {q}\nAnswer:"), ids(" " + a) + [eos]
        else:                # TOFU's Llama-2 string: BOS, "[INST] q [/INST]" glued to the answer
            prompt = [hf.bos_token_id] + ids(f"[INST] {q} [/INST]")
            answer = ([hf.bos_token_id] + ids(f"[INST] {q} [/INST]{a}"))[len(prompt):] + [eos]
            # the word tokenizer splits "]" from the answer's first word: the answer's own words
            assert answer == ids(a) + [eos]
        assert s.qa.encode(q, a) == (prompt, answer)
        _assert_row(s.train.x[i], s.train.y[i], prompt, answer, eos)


def test_auto_is_plain_without_a_chat_template(tmp_path):
    from lethe.scenarios.tofu import tofu

    assert _stream(tmp_path / "hf", template="")[0].qa.prompt_format == "plain"
    words = tofu(tofu_cfg(tmp_path, path=str(tiny_folder(tmp_path / "w"))), 0)   # lethe's word tokenizer
    assert words.qa.prompt_format == "plain"


# a template whose generation prompt is not the start of the rendered answer turn
NOT_A_PREFIX = ("{{ bos_token }}{% for m in messages %}{{ m['content'] }} {% endfor %}"
                "{% if add_generation_prompt %}ANSWER{% endif %}")


@pytest.mark.parametrize("case", ["unknown", "no_template", "no_bos", "not_prefix"])
def test_prompt_format_errors_name_the_key_and_the_fix(tmp_path, case):
    from lethe.scenarios.tofu import tofu

    folder = tiny_folder(tmp_path / "tofu")
    texts = folder_texts(folder)
    tok = {"unknown": "words", "no_template": "words",
           "no_bos": str(word_tokenizer_folder(tmp_path / "nobos", texts, bos=False)),
           "not_prefix": str(word_tokenizer_folder(tmp_path / "np", texts, chat_template=NOT_A_PREFIX))}[case]
    fmt = {"unknown": "chatml", "no_template": "chat_template", "no_bos": "tofu_llama2",
           "not_prefix": "auto"}[case]
    expected = {
        "unknown": "scenario.prompt_format: 'chatml' is not one of auto, chat_template, plain, tofu_llama2",
        "no_template": "scenario.prompt_format: chat_template, but tokenizer 'words' has no chat template",
        "no_bos": "has no BOS token; use prompt_format: plain",
        "not_prefix": "the tokenizer splits the prompt differently when the answer follows it",
    }[case]
    with pytest.raises(ConfigError) as err:
        tofu(tofu_cfg(tmp_path, path=str(folder), tokenizer=tok, prompt_format=fmt), 0)
    assert expected in str(err.value), str(err.value)


def test_evaluator_scores_the_chat_template_answers(tmp_path):
    """The QA evaluator's probabilities, truth ratio, MA and ROUGE follow the stream's chat
    format: recomputed by the plain loop on the literal Llama-2 strings."""
    from lethe.metrics.qa import QAEvaluator

    s, tok_dir = _stream(tmp_path)
    hf, ids = _hf(tok_dir)

    def chat_pair(q, a):
        prompt = ids(f"<s>[INST] {q} [/INST]")
        return prompt, ids(f"<s>[INST] {q} [/INST] {a} </s>")[len(prompt):]

    tok = SimpleNamespace(eos=hf.eos_token_id, decode=lambda t: hf.decode(t, skip_special_tokens=True),
                          encode=ids)
    model = fit(tiny_llama(s, 0), s.train.x, s.train.y, 60, 0)
    m = QAEvaluator(s, "cpu").evaluate(lambda x, t: model(x), "learn:0", model)
    loop, plain = Loop(model, tok, s.qa.length, pair=chat_pair), Loop(model, tok, s.qa.length)
    for split in ("forget", "retain"):
        items = s.qa.splits[split]
        prob = sum(math.exp(-loop.nll(r["question"], r["answer"])) for r in items) / len(items)
        assert m[f"unlearn/{split}_prob"] == pytest.approx(prob, rel=1e-4)
        # the same model scored on the plain format gives another number: the format is used
        other = sum(math.exp(-plain.nll(r["question"], r["answer"])) for r in items) / len(items)
        assert m[f"unlearn/{split}_prob"] != pytest.approx(other, rel=1e-3)
        R = [loop.truth_ratio(r) for r in items]
        assert m[f"unlearn/{split}_truth_ratio_raw"] == pytest.approx(sum(R) / len(R), rel=1e-4)
        ma = sum(loop.ma(r["question"], r["answer"]) for r in items) / len(items)
        assert m[f"unlearn/{split}_ma"] == pytest.approx(ma, abs=1e-9)
        answers = [loop.greedy(r["question"]) for r in items]
        want = sum(rouge(a, r["answer"])["rouge"] for a, r in zip(answers, items)) / len(items)
        assert m[f"unlearn/{split}_rouge"] == pytest.approx(want, abs=1e-9)
    assert torch.isfinite(torch.tensor(m["unlearn/model_utility"]))


def test_relearn_rows_use_the_streams_chat_template(tmp_path):
    """ReLearn's augmented forget rows (lethe/methods/relearn.py) are encoded like every QA row:
    with the tokenizer's Llama-2 chat template, each row is the literal turn
    "<s>[INST] q [/INST] a </s>" with only " a </s>" counted; a cut sample's first answer words
    open the answer turn uncounted, its vague continuation is the target."""
    from lethe.methods.base import MethodContext
    from lethe.methods.relearn import Relearn, RelearnConfig
    from lethe.platform.config import TrainConfig
    from lethe.scenarios.tofu import _augment_vocabulary, tofu

    folder = tiny_folder(tmp_path / "tofu")
    # the augmenter's words in the vocabulary, so the vague answers are not <unk>
    texts = folder_texts(folder) + [_augment_vocabulary()]
    tok_dir = word_tokenizer_folder(tmp_path / "tok", texts)
    s = tofu(tofu_cfg(tmp_path, path=str(folder), tokenizer=str(tok_dir)), 0)
    assert s.qa.prompt_format == "chat_template"
    hf, ids = _hf(tok_dir)
    m = Relearn(RelearnConfig(rank=0, augment_style="lethe"), tiny_llama(s, 0),
                MethodContext(train=TrainConfig(), device=torch.device("cpu"), stream=s, seed=0))
    req = next(e.request for e in s.experiences if e.request is not None)
    samples = m.augmented(req)
    x, y = m.forget_rows(None, None, req)
    assert len(x) == len(samples) and any(smp.get("prefix") for smp in samples)
    for i, smp in enumerate(samples):
        q, a = smp["question"], smp["answer"]
        if smp.get("prefix"):   # the question without the cut prefix, the prefix after [/INST]
            q = q[: len(q) - len(smp["prefix"])].strip()
            prompt = ids(f"<s>[INST] {q} [/INST] {smp['prefix']}")
            full = ids(f"<s>[INST] {q} [/INST] {smp['prefix']} {a} </s>")
        else:
            prompt = ids(f"<s>[INST] {q} [/INST]")
            full = ids(f"<s>[INST] {q} [/INST] {a} </s>")
            assert s.qa.encode(q, a)[0] == prompt     # the same prompt as the evaluator's rows
        assert full[:len(prompt)] == prompt and full[-1] == hf.eos_token_id
        assert full[len(prompt):] == ids(a) + [hf.eos_token_id]    # the word tokenizer: a's own words
        # rows hold the stream's length L: a vague answer longer than every QA row is cut
        # there (to_rows keeps the first L + 1 tokens of the sequence)
        seq = full[:s.qa.length + 1]
        n = len(seq) - 1
        assert x[i, :n].tolist() == seq[:-1] and (x[i, n:] == hf.eos_token_id).all()
        assert (y[i, :len(prompt) - 1] == -100).all() and (y[i, n:] == -100).all()
        assert y[i, len(prompt) - 1:n].tolist() == seq[len(prompt):]
