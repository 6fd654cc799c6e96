"""Continual pre-training streams: one text corpus per experience, tokenised and packed.

Each corpus (``scenario.paths``: a text / JSONL file or a folder of them) is split into
documents (lines, blank-line paragraphs, Debian ``fortune`` entries separated by ``%``, or
JSONL records), the documents are split seeded into training and held-out documents
(``test_fraction``; splitting documents, not blocks, keeps held-out text unseen), and each
side is tokenised, joined with an end-of-text token and packed into blocks of
``block_size + 1`` tokens with stride ``block_size``, so every token after the first is a
prediction target exactly once. ``paths: []`` generates Markov-chain corpora whose
statistics shift between experiences (``markov_shift``: 0 = one distribution, 1 =
independent transition matrices), for tests and presets that need no files.

Tensors: blocks int64 ``[N, block_size + 1]``. The training datasets yield
``(block[:-1], block[1:], task)``: input tokens and next-token targets, so any method's
cross-entropy against the model's ``[B, V, L]`` logits is the LM loss. The test set and the
training pool (``Stream.train``) keep whole blocks with the corpus index as label;
``Stream.task_type = "lm"`` routes evaluation to :class:`lethe.metrics.lm.LMEvaluator`
(held-out loss / perplexity per corpus). ``n_classes`` is the vocabulary size.

Tokenizers: ``words`` (whitespace vocabulary of the training documents of all corpora,
plus <unk> and <eos>; sorted, so it is the same on every run), ``bytes`` (UTF-8 bytes, 257
symbols), or a local Hugging Face tokenizer folder (the model's own, for real LMs).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

from lethe.errors import ConfigError
from lethe.registry import register_scenario

SPLITS = ("auto", "line", "paragraph", "fortune")


@dataclass
class LMCorporaConfig:
    paths: list = field(default_factory=list)  # one per experience: .txt/.jsonl file or folder;
                                               # [] = generated Markov-chain corpora
    text_field: str = "text"      # JSONL field holding a document
    split: str = "auto"           # documents in text files: auto | line | paragraph | fortune (%)
    tokenizer: str = "words"      # words | bytes | local HF tokenizer folder
    block_size: int = 32          # tokens per training input (blocks hold block_size + 1)
    test_fraction: float = 0.1    # held-out share of each corpus's documents
    split_seed: int = 0           # seed of the train / held-out document split
    max_blocks: int = 0           # > 0: at most this many training blocks per corpus
    # generated Markov corpora (paths: [])
    markov_corpora: int = 3       # corpora (= experiences)
    markov_tokens: int = 20000    # words per corpus
    markov_vocab: int = 48        # distinct words, shared by all corpora
    markov_shift: float = 1.0     # 0 = same transition matrix everywhere; 1 = independent ones
    markov_concentration: float = 0.1  # Dirichlet concentration of transition rows
                                       # (low = peaked, predictable text)
    markov_seed: int = 0


# --- generated corpora ----------------------------------------------------------------------
def markov_words(n: int) -> list[str]:
    """n pronounceable two-syllable words (byte-level tokenizers see real character structure)."""
    cons, vows = "bdfgklmnprstvz", "aeiou"
    syll = [c + v for c in cons for v in vows]
    return [syll[i % len(syll)] + syll[(7 * i + 3) % len(syll)] for i in range(n)]


def markov_corpora(n_corpora: int, n_tokens: int, vocab: int, shift: float,
                   concentration: float = 0.1, seed: int = 0) -> list[list[str]]:
    """Documents of ``n_corpora`` first-order Markov corpora over one vocabulary.

    Corpus c's transition matrix is ``(1 − shift)·T₀ + shift·T_c`` with T₀ shared and T_c its
    own (rows drawn from Dirichlet(concentration)); documents are 10–40 words long.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    words = markov_words(vocab)
    base = rng.dirichlet(np.full(vocab, concentration), size=vocab)
    out = []
    for _ in range(n_corpora):
        own = rng.dirichlet(np.full(vocab, concentration), size=vocab)
        T = (1.0 - shift) * base + shift * own
        T /= T.sum(1, keepdims=True)
        cdf = T.cumsum(1)
        docs, total = [], 0
        while total < n_tokens:
            length = int(rng.integers(10, 41))
            w = int(rng.integers(vocab))
            seq = [w]
            u = rng.random(length - 1)
            for k in range(length - 1):
                w = int(min(np.searchsorted(cdf[w], u[k] * cdf[w, -1]), vocab - 1))
                seq.append(w)
            docs.append(" ".join(words[i] for i in seq))
            total += length
        out.append(docs)
    return out


# --- reading corpora ------------------------------------------------------------------------
def split_documents(text: str, how: str) -> list[str]:
    import re

    if how == "auto":
        lines = text.splitlines()
        how = ("fortune" if any(ln.strip() == "%" for ln in lines)
               else "paragraph" if re.search(r"\n\s*\n", text) else "line")
    if how == "fortune":
        parts = re.split(r"^%\s*$", text, flags=re.M)
    elif how == "paragraph":
        parts = re.split(r"\n\s*\n", text)
    else:
        parts = text.splitlines()
    return [p.strip() for p in parts if p.strip()]


def read_corpus(path: str, cfg, key: str) -> list[str]:
    """Documents of one corpus: a file, or every regular file in a folder (sorted names)."""
    import json
    import os

    path = os.path.expanduser(str(path))
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path)
                       if os.path.isfile(os.path.join(path, f)) and not f.startswith(".")
                       and not f.endswith((".dat", ".u8")))   # fortune index files
    elif os.path.isfile(path):
        files = [path]
    else:
        raise ConfigError(f"{key}: file or folder not found: '{path}'")
    docs = []
    for f in files:
        if f.endswith((".jsonl", ".json")):
            with open(f, encoding="utf-8") as fh:
                for n, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ConfigError(f"{key}: {f}, line {n}: not JSON ({exc.msg})") from None
                    if cfg.text_field not in rec:
                        raise ConfigError(f"scenario.text_field: '{cfg.text_field}' missing in {f}, "
                                          f"line {n} (fields: {', '.join(rec)})")
                    docs.append(str(rec[cfg.text_field]))
        else:
            with open(f, encoding="utf-8", errors="replace") as fh:
                docs += split_documents(fh.read(), cfg.split)
    if len(docs) < 2:
        raise ConfigError(f"{key}: '{path}' holds {len(docs)} document(s); a corpus needs ≥ 2 "
                          f"(one for training, one held out)")
    return docs


# --- tokenizers -----------------------------------------------------------------------------
class WordTokenizer:
    """Whitespace words → ids; vocabulary sorted, then <unk>, <eos>."""

    def __init__(self, docs):
        vocab = sorted({w for d in docs for w in d.split()})
        self.index = {w: i for i, w in enumerate(vocab)}
        self.unk, self.eos = len(vocab), len(vocab) + 1
        self.vocab_size = len(vocab) + 2

    def encode(self, doc: str) -> list[int]:
        return [self.index.get(w, self.unk) for w in doc.split()]


class ByteTokenizer:
    vocab_size, eos = 257, 256

    @staticmethod
    def encode(doc: str) -> list[int]:
        return list(doc.encode("utf-8"))


class HFTokenizer:
    def __init__(self, path: str):
        from lethe.models.hf import load_tokenizer, resolve_pretrained

        self.tok = load_tokenizer(resolve_pretrained(path, "scenario.tokenizer"))
        eos = self.tok.eos_token_id if self.tok.eos_token_id is not None else self.tok.sep_token_id
        self.eos = int(eos if eos is not None else 0)
        self.vocab_size = len(self.tok)

    def encode(self, doc: str) -> list[int]:
        return self.tok(doc, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


def make_tokenizer(name: str, train_docs: list[str]):
    if name == "words":
        return WordTokenizer(train_docs)
    if name == "bytes":
        return ByteTokenizer()
    return HFTokenizer(name)


def pack(docs: list[str], tok, block_size: int):
    """int64 [n_blocks, block_size + 1]: documents joined by <eos>, stride block_size."""
    import torch

    ids = []
    for d in docs:
        ids += tok.encode(d)
        ids.append(tok.eos)
    t = torch.tensor(ids, dtype=torch.long)
    n = (len(t) - 1) // block_size
    if n <= 0:
        return torch.zeros(0, block_size + 1, dtype=torch.long)
    return t[:n * block_size + 1].unfold(0, block_size + 1, block_size).contiguous()


@functools.cache
def _block_dataset_class():
    from torch.utils.data import Dataset

    class BlockDataset(Dataset):
        """(inputs, next-token targets) of packed blocks (Avalanche's tensor dataset would
        turn the second tensor into a scalar class label)."""

        def __init__(self, blocks):
            self.blocks = blocks

        def __len__(self):
            return len(self.blocks)

        def __getitem__(self, i):
            b = self.blocks[i]
            return b[:-1], b[1:]

    return BlockDataset


def lm_dataset(blocks, ids, corpus: int):
    """Avalanche dataset yielding (inputs, next-token targets, task 0); ``targets`` = the corpus
    index (what class timelines and data fingerprints read), plus the ``sample_id`` attribute
    every lethe stream carries."""
    return sequence_dataset(_block_dataset_class()(blocks), ids, corpus)


def sequence_dataset(data, ids, corpus: int):
    """Wrap a torch dataset of (inputs, token targets) pairs as an Avalanche dataset (see
    :func:`lm_dataset`); also used by the QA streams of lethe/scenarios/tofu.py."""
    from avalanche.benchmarks.utils import DataAttribute, TaskAwareSupervisedClassificationDataset
    from avalanche.benchmarks.utils.flat_data import ConstantSequence

    n = len(data)
    return TaskAwareSupervisedClassificationDataset(
        [data],
        data_attributes=[DataAttribute(ConstantSequence(int(corpus), n), "targets"),
                         DataAttribute(ConstantSequence(0, n), "targets_task_labels", use_in_getitem=True),
                         DataAttribute([int(i) for i in ids], "sample_id")])


def lm_stream(train_blocks: list, test_blocks: list, vocab_size: int, block_size: int):
    """A lethe Stream from per-corpus training / held-out blocks."""
    import torch
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.benchmarks.scenarios.supervised import with_classes_timeline
    from avalanche.benchmarks.scenarios.task_aware import with_task_labels

    from lethe.scenarios.types import LEARN, Experience, Stream, TestSet

    def table(parts, first_id):
        sizes = [len(p) for p in parts]
        exp = torch.cat([torch.full((n,), e, dtype=torch.long) for e, n in enumerate(sizes)])
        x = torch.cat(parts)
        return TestSet(x=x, y=exp.clone(), exp=exp, task=torch.zeros_like(exp),
                       ids=torch.arange(first_id, first_id + len(x)))

    pool = table(train_blocks, 0)
    test = table(test_blocks, len(pool.x))
    train_sets = [lm_dataset(pool.x[pool.exp == e], pool.ids[pool.exp == e], e)
                  for e in range(len(train_blocks))]
    test_sets = [lm_dataset(test.x[test.exp == e], test.ids[test.exp == e], e)
                 for e in range(len(test_blocks))]
    bm = with_classes_timeline(with_task_labels(benchmark_from_datasets(train=train_sets,
                                                                        test=test_sets)))
    experiences = [Experience(index=i, kind=LEARN, train=exp) for i, exp in enumerate(bm.train_stream)]
    return Stream(experiences=experiences, benchmark=bm, test=test, input_shape=(int(block_size),),
                  n_classes=int(vocab_size), setting="domain_incremental",
                  class_order=list(range(len(train_blocks))), train=pool, task_type="lm")


@register_scenario("lm_corpora", config=LMCorporaConfig, settings=("domain_incremental",))
def lm_corpora(cfg, seed: int):
    """Continual pre-training: one local text/JSONL corpus per experience, packed into token blocks."""
    import numpy as np

    from lethe.registry import suggest

    if cfg.split not in SPLITS:
        raise ConfigError(f"scenario.split: '{cfg.split}'{suggest(cfg.split, SPLITS)} (choose one of "
                          f"{', '.join(SPLITS)})")
    if cfg.block_size < 2:
        raise ConfigError("scenario.block_size must be ≥ 2")
    if not 0 < cfg.test_fraction < 1:
        raise ConfigError(f"scenario.test_fraction: {cfg.test_fraction} must be in (0, 1)")
    if cfg.paths:
        corpora = [read_corpus(p, cfg, f"scenario.paths[{i}]") for i, p in enumerate(cfg.paths)]
    else:
        if cfg.markov_corpora < 1 or cfg.markov_vocab < 2 or cfg.markov_tokens < 10 * cfg.block_size:
            raise ConfigError("scenario.markov_*: need ≥ 1 corpus, ≥ 2 words and markov_tokens ≥ "
                              "10·block_size")
        if not 0 <= cfg.markov_shift <= 1:
            raise ConfigError(f"scenario.markov_shift: {cfg.markov_shift} must be in [0, 1]")
        corpora = markov_corpora(cfg.markov_corpora, cfg.markov_tokens, cfg.markov_vocab,
                                 cfg.markov_shift, cfg.markov_concentration, cfg.markov_seed)
    rng = np.random.default_rng(cfg.split_seed)
    splits = []
    for docs in corpora:
        perm = rng.permutation(len(docs))
        n_test = min(max(1, int(round(cfg.test_fraction * len(docs)))), len(docs) - 1)
        test_idx, train_idx = np.sort(perm[:n_test]), np.sort(perm[n_test:])
        splits.append(([docs[i] for i in train_idx], [docs[i] for i in test_idx]))
    tok = make_tokenizer(cfg.tokenizer, [d for tr, _ in splits for d in tr])
    train_blocks, test_blocks = [], []
    for i, (tr, te) in enumerate(splits):
        a, b = pack(tr, tok, cfg.block_size), pack(te, tok, cfg.block_size)
        if cfg.max_blocks > 0:
            a = a[:cfg.max_blocks]
        if len(a) == 0 or len(b) == 0:
            raise ConfigError(f"scenario: corpus {i} has too little text for one block of "
                              f"{cfg.block_size + 1} tokens in its {'training' if len(a) == 0 else 'held-out'} "
                              f"part; lower scenario.block_size or add text")
        train_blocks.append(a)
        test_blocks.append(b)
    stream = lm_stream(train_blocks, test_blocks, tok.vocab_size, cfg.block_size)
    stream.tokenizer = tok
    return stream
