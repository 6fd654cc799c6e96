"""text_classification and lm_corpora: sources, seeded splits, tokenisation and packing."""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from lethe.errors import ConfigError
from lethe.models.hf import load_tokenizer, minilm_path
from lethe.scenarios.lm_corpora import (
    LMCorporaConfig,
    WordTokenizer,
    lm_corpora,
    markov_corpora,
    pack,
    split_documents,
)
from lethe.scenarios.text import TextClassificationConfig, text_classification

LABELS = ["bird", "fish", "tree", "rock"]


def text_cfg(**kw):
    return OmegaConf.structured(TextClassificationConfig(**kw))


def lm_cfg(**kw):
    return OmegaConf.structured(LMCorporaConfig(**kw))


def write_csv(path, n_per_class=6):
    rows = [{"text": f"this is {lab} sentence number {i}", "label": lab}
            for lab in LABELS for i in range(n_per_class)]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, ["text", "label"])
        w.writeheader()
        w.writerows(rows)
    return rows


def test_csv_stream_is_class_incremental_with_seeded_order_and_real_tokens(tmp_path):
    rows = write_csv(tmp_path / "d.csv")
    s = text_classification(text_cfg(path=str(tmp_path / "d.csv"), n_experiences=2, max_length=12,
                                     class_seed=3), 0)
    again = text_classification(text_cfg(path=str(tmp_path / "d.csv"), n_experiences=2, max_length=12,
                                         class_seed=3), 0)
    assert s.class_names == sorted(LABELS)                      # strings numbered in sorted order
    assert s.class_order == again.class_order == [int(c) for c in np.random.default_rng(3).permutation(4)]
    assert s.input_shape == (2, 12) and s.test.x.shape[1:] == (2, 12)
    for e, exp in enumerate(s.experiences):                     # 2 classes per experience
        assert set(exp.train.classes_in_this_experience) == set(s.class_order[2 * e:2 * e + 2])
    # ids are CSV rows: the tokens of a test sample are the tokenizer's encoding of that row
    tok = load_tokenizer(minilm_path())
    i = int(s.test.ids[0])
    ref = tok(rows[i]["text"], padding="max_length", truncation=True, max_length=12)["input_ids"]
    assert s.test.x[0, 0].tolist() == ref
    assert int(s.test.y[0]) == sorted(LABELS).index(rows[i]["label"])
    assert torch.equal(s.test.x, again.test.x) and torch.equal(s.train.ids, again.train.ids)
    # stratified split: every class in both parts, no sample in both
    assert set(s.test.y.tolist()) == set(range(4)) == set(s.train.y.tolist())
    assert not set(s.train.ids.tolist()) & set(s.test.ids.tolist())


def test_jsonl_and_saved_hf_dataset_dict_use_their_own_test_split(tmp_path):
    from datasets import Dataset, DatasetDict

    train = [{"sentence": f"{lab} text {i}", "y": k} for k, lab in enumerate(LABELS) for i in range(4)]
    test = [{"sentence": f"{lab} held out", "y": k} for k, lab in enumerate(LABELS)]
    DatasetDict({"train": Dataset.from_list(train), "test": Dataset.from_list(test)}).save_to_disk(
        str(tmp_path / "hf"))
    s = text_classification(text_cfg(path=str(tmp_path / "hf"), text_column="sentence",
                                     label_column="y", n_experiences=4, max_length=8), 0)
    assert len(s.test.y) == 4 and len(s.train.y) == 16      # the dataset's test split, untouched
    assert s.test.ids.min() == 16                           # test rows numbered after train rows
    with open(tmp_path / "train.jsonl", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in train)
    j = text_classification(text_cfg(path=str(tmp_path / "train.jsonl"), text_column="sentence",
                                     label_column="y", n_experiences=2, max_length=8,
                                     max_per_class=2, test_fraction=0.5), 0)
    assert torch.bincount(j.train.y).tolist() == [2, 2, 2, 2]   # max_per_class cap
    with pytest.raises(ConfigError, match="scenario.text_column: column 'text' not in"):
        text_classification(text_cfg(path=str(tmp_path / "train.jsonl")), 0)
    with pytest.raises(ConfigError, match="scenario.path: file or folder not found"):
        text_classification(text_cfg(path=str(tmp_path / "missing.csv")), 0)


def test_generated_topics_need_no_files():
    s = text_classification(text_cfg(generated_classes=4, generated_per_class=10, n_experiences=2,
                                     max_length=16), 0)
    assert s.n_classes == 4 and len(s.experiences) == 2 and len(s.train.y) + len(s.test.y) == 40


# --- lm_corpora -----------------------------------------------------------------------------
def test_packing_predicts_every_token_exactly_once():
    tok = WordTokenizer(["a b c", "d e"])
    blocks = pack(["a b c", "d e", "c a"], tok, 3)
    stream = [tok.index[w] for w in "a b c".split()] + [tok.eos] + [tok.index[w] for w in "d e".split()] \
        + [tok.eos] + [tok.index[w] for w in "c a".split()] + [tok.eos]
    assert blocks.shape == (3, 4)                            # (11 - 1) // 3 blocks of 4 tokens
    assert torch.equal(blocks[:, 1:].reshape(-1), torch.tensor(stream[1:10]))   # targets: once each
    assert torch.equal(blocks[1:, 0], blocks[:-1, -1])       # stride block_size: one shared token


def test_markov_shift_controls_how_different_the_corpora_are():
    def transitions(docs, vocab):
        idx = {w: i for i, w in enumerate(sorted({w for d in docs for w in d.split()}))}
        T = np.full((vocab, vocab), 1e-3)
        for d in docs:
            ws = [idx[w] for w in d.split()]
            for a, b in zip(ws[:-1], ws[1:]):
                T[a, b] += 1
        return T / T.sum(1, keepdims=True)

    def tv(shift):
        a, b = markov_corpora(2, 6000, 12, shift, seed=0)
        return 0.5 * np.abs(transitions(a, 12) - transitions(b, 12)).sum(1).mean()

    same, strong = tv(0.0), tv(1.0)
    assert same < 0.15 and strong > 0.6                      # total-variation distance per row


def test_lm_stream_holds_shifted_blocks_disjoint_documents_and_vocabulary():
    s = lm_corpora(lm_cfg(markov_corpora=2, markov_tokens=3000, block_size=16), 0)
    assert s.task_type == "lm" and s.n_classes == 48 + 2 and s.input_shape == (16,)
    assert s.test.x.shape[1] == 17 and set(s.test.exp.tolist()) == {0, 1}
    data = s.experiences[1].train.dataset
    inp, tgt, task = data[0]
    assert torch.equal(inp[1:], tgt[:-1]) and task == 0      # next-token targets
    assert set(data.targets) == {1} and list(data.sample_id)[0] == int(s.train.ids[s.train.exp == 1][0])
    # held-out documents are not in the training text (document-level split)
    tok = s.tokenizer
    train_text = {tuple(b.tolist()) for b in s.train.x}
    assert not any(tuple(b.tolist()) in train_text for b in s.test.x)
    assert tok.vocab_size == s.n_classes


def test_corpora_from_files_folders_fortunes_and_jsonl(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.txt").write_text("first paragraph here\nstill first\n\nsecond paragraph\n")
    (tmp_path / "a" / "two.txt").write_text("third one\n\nfourth one\n")
    (tmp_path / "fort").write_text("A fortune.\n%\nAnother fortune,\non two lines.\n%\nThird.\n")
    with open(tmp_path / "c.jsonl", "w") as fh:
        fh.writelines(json.dumps({"body": f"doc {i} " * 5}) + "\n" for i in range(6))
    assert split_documents((tmp_path / "fort").read_text(), "auto") == [
        "A fortune.", "Another fortune,\non two lines.", "Third."]
    s = lm_corpora(lm_cfg(paths=[str(tmp_path / "a"), str(tmp_path / "fort"), str(tmp_path / "c.jsonl")],
                          text_field="body", tokenizer="bytes", block_size=4, test_fraction=0.3), 0)
    assert len(s.experiences) == 3 and s.n_classes == 257
    assert bytes(s.train.x[s.train.exp == 2][0].tolist()).decode().startswith("doc ")
    with pytest.raises(ConfigError, match=r"scenario.paths\[1\]: file or folder not found"):
        lm_corpora(lm_cfg(paths=[str(tmp_path / "a"), str(tmp_path / "nope")]), 0)
    with pytest.raises(ConfigError, match="did you mean 'line'"):
        lm_corpora(lm_cfg(split="lines"), 0)


def test_hf_tokenizer_folder_tokenises_corpora():
    s = lm_corpora(lm_cfg(markov_corpora=1, markov_tokens=2000, tokenizer="minilm", block_size=16), 0)
    tok = load_tokenizer(minilm_path())
    assert s.n_classes == len(tok)
    assert tok.sep_token_id in s.train.x.reshape(-1).tolist()   # documents end with [SEP]


FORTUNES = "/usr/share/games/fortunes"


@pytest.mark.skipif(not os.path.isdir(FORTUNES), reason="Debian's fortunes package is not installed "
                    "(apt-get install fortunes)")
def test_real_debian_fortune_categories_as_corpora():
    cats = [c for c in ("computers", "science", "love") if os.path.isfile(os.path.join(FORTUNES, c))]
    assert len(cats) >= 2
    s = lm_corpora(lm_cfg(paths=[os.path.join(FORTUNES, c) for c in cats], tokenizer="bytes",
                          block_size=64), 0)
    assert len(s.experiences) == len(cats) and all(len(e.train.dataset) > 20 for e in s.experiences)
    text = bytes(v for v in s.test.x[0].tolist() if v < 256).decode("utf-8", errors="replace")
    assert "%" not in text.split("\n")                       # entries split on the % lines
