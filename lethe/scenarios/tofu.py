"""TOFU-style unlearning streams for causal LMs: fine-tune on QA, then a deletion request.

``scenario.name: tofu`` reads a local folder in the format of TOFU (Maini et al., "TOFU: A
Task of Fictitious Unlearning for LLMs", 2024): ``forget<XX>.json`` and ``retain<YY>.json``
(training QA), ``forget<XX>_perturbed.json`` / ``retain_perturbed.json`` /
``real_authors_perturbed.json`` / ``world_facts_perturbed.json`` (evaluation items with
paraphrased and perturbed answers) and, when present, ``holdout<XX>.json`` (TOFU's held-out
authors: the "unseen" split unless lethe's ``unseen_perturbed.json`` is there), JSON lines or
one JSON list. ``path: ""`` writes a fictitious-author set with lethe/scenarios/tofu_synthetic.py
first (offline, by seed) into ``cache_dir``, so nothing needs downloading.

The stream has two experiences: learn (fine-tune on forget ∪ retain, plus the TDEC-style
memorised sequences of ``memorised.json`` and, with ``train_general``, the real-authors /
world-facts items — a tiny LM has no pretraining that would know them), then forget (a
deletion request naming every forget item and forget sequence). Each item is a prompt followed
by the answer and <eos> (``scenario.prompt_format``: the tokenizer's chat template when it has
one, else TOFU's Phi format ``Question: <q>\\nAnswer: <a>``; ``tofu_llama2`` is TOFU's own
Llama-2 string ``<s>[INST] <q> [/INST]<a>``); the loss counts answer tokens only (targets −100
elsewhere), a memorised sequence counts every token. ``Stream.task_type ==
"qa"``: the runner evaluates with :class:`lethe.metrics.qa.QAEvaluator` (TOFU, MA / EL_n,
PrivLeak, KFR / KRR / Linguistic Score under ``unlearn/*``).
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

from lethe.errors import ConfigError
from lethe.registry import register_scenario

PROMPT = "Question: {question}\nAnswer:"
# TOFU's Llama-2 fine-tuning string (question_start_tag "[INST] ", question_end_tag " [/INST]",
# answer_tag ""): the answer follows "[/INST]" with no space, unlike Llama-2's chat template
TOFU_LLAMA2 = "[INST] {question} [/INST]"
PROMPT_FORMATS = ("auto", "chat_template", "plain", "tofu_llama2")
EVAL_SPLITS = ("forget", "retain", "real_authors", "world_facts", "unseen")


@dataclass
class TofuConfig:
    path: str = ""                 # TOFU folder; "" = generated fictitious authors (below)
    forget_split: str = "forget10"  # forget01 | forget05 | forget10 (any forget<XX> present)
    retain_split: str = ""         # "" = retain<100-XX>
    train_general: bool = False    # also fine-tune on real_authors / world_facts (tiny LMs)
    tokenizer: str = "words"       # words (built from the data) | local HF tokenizer folder
    max_eval: int = 0              # evaluation items per split (0 = all)
    prompt_format: str = "auto"    # auto (chat_template if the tokenizer has one, else plain) |
                                   # chat_template | plain ("Question: q\nAnswer: a", TOFU's Phi
                                   # format) | tofu_llama2 ("<s>[INST] q [/INST]a", TOFU's Llama-2)
    # generated set (path ""): see lethe/scenarios/tofu_synthetic.py
    authors: int = 20
    forget_percent: int = 10
    unseen_authors: int = 4
    generator_seed: int = 0
    cache_dir: str = "~/.cache/lethe/tofu_synthetic"
    # evaluation (lethe/metrics/qa.py)
    el_n: int = 10                 # n of the extraction likelihood EL_n
    mink_k: float = 0.4            # Min-K% / Min-K%++ share k (PrivLeak; MUSE's and
                                   # open-unlearning's default; k = 0.2 is logged as well)
    embedder: str = "minilm"       # KFR/KRR entity matcher: minilm | exact | module:attr
    judge: str = "rule"            # KFR/KRR NLI judge: rule | local NLI model folder | module:attr
    ppl_model: str = "self"        # Linguistic Score perplexity: self | reference (retain-only
                                   # model) | wordfreq (English word frequencies, offline) |
                                   # local causal LM folder (a fluent judge, as ReLearn)
    max_new_tokens: int = 0        # greedy answers (0 = up to the sequence length)
    retain_model_path: str = ""    # local retain-only model (forget quality, PrivLeak); "" = the
                                   # platform trains one from the run's initial model
    checkpoint_saw_forget: bool = False  # model.path was fine-tuned on all of TOFU (forget set
                                   # included): then retain_model_path is required


# --- reading ------------------------------------------------------------------------------
def read_items(path, key: str) -> list[dict]:
    """Rows of a TOFU file (JSON lines or a JSON list)."""
    import json
    import os

    if not os.path.exists(path):
        raise ConfigError(f"{key}: file not found: '{path}' (a TOFU folder holds forget10.json, "
                          f"retain90.json, forget10_perturbed.json, retain_perturbed.json, ...; "
                          f"set scenario.path: \"\" for a generated fictitious-author set)")
    text = open(path, encoding="utf-8").read().strip()
    try:
        rows = json.loads(text) if text.startswith("[") else [json.loads(ln) for ln in text.splitlines() if ln.strip()]
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{key}: '{path}' is not JSON / JSON lines: {exc}") from None
    for i, r in enumerate(rows):
        if "question" not in r or "answer" not in r:
            if "text" not in r:
                raise ConfigError(f"{key}: row {i} of '{path}' has no question/answer fields")
    return rows


def dataset_folder(cfg) -> str:
    """The TOFU folder: scenario.path, or a generated set (written once, then reused)."""
    import hashlib
    import os
    import shutil

    if cfg.path:
        folder = os.path.expanduser(cfg.path)
        if not os.path.isdir(folder):
            raise ConfigError(f"scenario.path: folder not found: '{cfg.path}' (give a local TOFU "
                              f"folder, or \"\" for a generated fictitious-author set)")
        return folder
    from lethe.scenarios import tofu_synthetic

    spec = f"{cfg.authors}-{cfg.forget_percent}-{cfg.unseen_authors}-{cfg.generator_seed}"
    digest = hashlib.sha1((spec + open(tofu_synthetic.__file__).read()).encode()).hexdigest()[:10]
    folder = os.path.join(os.path.expanduser(cfg.cache_dir), digest)
    if not os.path.exists(os.path.join(folder, "memorised.json")):
        tmp = f"{folder}.tmp{os.getpid()}"   # one per process: ranks may generate at once
        try:
            tofu_synthetic.generate(tmp, cfg.authors, cfg.forget_percent,
                                    cfg.unseen_authors, seed=cfg.generator_seed)
        except ValueError as exc:
            raise ConfigError(f"scenario: {exc}") from None
        if not os.path.exists(folder):   # another process may have written it meanwhile
            os.replace(tmp, folder)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    expected = f"forget{cfg.forget_percent:02d}"
    if cfg.forget_split != expected:
        raise ConfigError(f"scenario.forget_split: the generated set has '{expected}' "
                          f"(scenario.forget_percent={cfg.forget_percent}); set forget_split: {expected}")
    return folder


# --- tokenisation -------------------------------------------------------------------------
WORD = re.compile(r"\w+|[^\w\s]")


class QAWordTokenizer:
    """Words and punctuation → ids, vocabulary from the whole dataset's text (no <unk> on it),
    then <unk>, <eos>, <pad>."""

    def __init__(self, texts):
        vocab = sorted({w for t in texts for w in WORD.findall(t)})
        self.words = vocab
        self.index = {w: i for i, w in enumerate(vocab)}
        self.unk, self.eos, self.pad = len(vocab), len(vocab) + 1, len(vocab) + 2
        self.vocab_size = len(vocab) + 3

    def encode(self, text: str) -> list[int]:
        return [self.index.get(w, self.unk) for w in WORD.findall(text)]

    def decode(self, ids) -> str:
        words = [self.words[i] if i < len(self.words) else "" for i in ids]
        return re.sub(r" ([.,;:?!])", r"\1", " ".join(w for w in words if w))


def make_tokenizer(name: str, texts: list[str]):
    if name == "words":
        return QAWordTokenizer(texts)
    from lethe.scenarios.lm_corpora import HFTokenizer

    tok = HFTokenizer(name)
    tok.pad = tok.eos
    return tok


def chat_template_of(tok) -> str | None:
    """The chat template of an HF tokenizer (lethe's word tokenizer has none)."""
    return getattr(getattr(tok, "tok", None), "chat_template", None) or None


def resolve_prompt_format(fmt: str, tok, name: str) -> str:
    """scenario.prompt_format with ``auto`` decided by the tokenizer ``name``."""
    if fmt not in PROMPT_FORMATS:
        raise ConfigError(f"scenario.prompt_format: '{fmt}' is not one of {', '.join(PROMPT_FORMATS)}")
    has_template = chat_template_of(tok) is not None
    if fmt == "auto":
        return "chat_template" if has_template else "plain"
    if fmt == "chat_template" and not has_template:
        raise ConfigError(f"scenario.prompt_format: chat_template, but tokenizer '{name}' has no chat "
                          f"template (tokenizer_config.json 'chat_template'); use prompt_format: plain, "
                          f"or a tokenizer folder that has one")
    if fmt == "tofu_llama2" and getattr(getattr(tok, "tok", None), "bos_token_id", None) is None:
        raise ConfigError(f"scenario.prompt_format: tofu_llama2 starts with <s>, but tokenizer '{name}' "
                          f"has no BOS token; use prompt_format: plain or a Llama tokenizer folder")
    return fmt


def _answer_after(tok, prompt: list[int], full: list[int]) -> list[int]:
    """The answer tokens of ``full`` (prompt + answer tokenised as one string) + <eos>. The
    prompt must tokenise as a prefix of it, or the targets would count prompt tokens."""
    if full[:len(prompt)] != prompt:
        raise ConfigError("scenario.prompt_format: the tokenizer splits the prompt differently when the "
                          "answer follows it, so the answer tokens cannot be told apart; use "
                          "prompt_format: plain")
    answer = full[len(prompt):]
    # chat templates end the assistant turn with their own <eos>: not twice
    return answer if answer and answer[-1] == tok.eos else answer + [tok.eos]


def encode_qa(tok, question: str, answer: str, fmt: str = "plain") -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids + eos) in prompt format ``fmt`` (resolved, not ``auto``)."""
    if fmt == "plain":   # prompt and answer tokenised apart (lethe's format since the start)
        return tok.encode(PROMPT.format(question=question)), tok.encode(" " + answer) + [tok.eos]
    if fmt == "tofu_llama2":   # TOFU tokenises question + answer as one string, BOS first
        bos = [int(tok.tok.bos_token_id)]
        text = TOFU_LLAMA2.format(question=question)
        prompt = bos + tok.encode(text)
        return prompt, _answer_after(tok, prompt, bos + tok.encode(text + answer))
    if fmt == "chat_template":   # open-unlearning: the rendered turn with and without the answer
        user = {"role": "user", "content": question}
        render = tok.tok.apply_chat_template
        # the template writes its own special tokens (BOS) as text: encode adds none
        prompt = tok.encode(render([user], tokenize=False, add_generation_prompt=True))
        full = tok.encode(render([user, {"role": "assistant", "content": answer}], tokenize=False))
        return prompt, _answer_after(tok, prompt, full)
    raise ValueError(f"unresolved prompt format '{fmt}'")


def to_rows(pairs: list[tuple[list[int], list[int]]], length: int, pad: int):
    """(inputs [N, L], targets [N, L]) of (prompt, answer) token pairs; targets are −100 on the
    prompt and the padding, so only the answer counts."""
    import torch

    x = torch.full((len(pairs), length), pad, dtype=torch.long)
    y = torch.full((len(pairs), length), -100, dtype=torch.long)
    for i, (p, a) in enumerate(pairs):
        seq = (p + a)[:length + 1]
        x[i, :len(seq) - 1] = torch.tensor(seq[:-1])
        y[i, max(len(p) - 1, 0):len(seq) - 1] = torch.tensor(seq[max(len(p), 1):])
    return x, y


@dataclass
class QAData:
    """What the QA evaluator and the unlearning methods need besides the tensors."""

    tokenizer: object
    length: int                                     # model input length L
    splits: dict = field(default_factory=dict)      # eval split → list of items
    memorised: dict = field(default_factory=dict)   # forget | retain | unseen → [token lists]
    forget_ids: object = None                       # training ids of the deletion request
    train_items: list = field(default_factory=list)  # text of each training row (by id)
    prompt_format: str = "plain"                    # resolved scenario.prompt_format

    def rows(self, pairs):
        return to_rows(pairs, self.length, self.tokenizer.pad)

    def encode(self, question: str, answer: str) -> tuple[list[int], list[int]]:
        """(prompt ids, answer ids + eos) in the stream's prompt format."""
        return encode_qa(self.tokenizer, question, answer, self.prompt_format)

    def item_rows(self, items):
        """(inputs, targets) of QA items with their true answers."""
        return self.rows([self.encode(r["question"], r["answer"]) for r in items])


@functools.cache
def _pair_dataset_class():
    from torch.utils.data import Dataset

    class PairDataset(Dataset):
        def __init__(self, x, y):
            self.x, self.y = x, y

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i], self.y[i]

    return PairDataset


def _files(folder: str, cfg) -> dict[str, str]:
    import os

    tag = cfg.forget_split.removeprefix("forget")
    retain = cfg.retain_split or (f"retain{100 - int(tag)}" if tag.isdigit() else "")
    if not tag.isdigit() or not retain:
        raise ConfigError(f"scenario.forget_split: '{cfg.forget_split}' should look like forget10 "
                          f"(or set scenario.retain_split)")
    j = lambda n: os.path.join(folder, n + ".json")  # noqa: E731
    return {"train_forget": j(cfg.forget_split), "train_retain": j(retain),
            "forget": j(cfg.forget_split + "_perturbed"), "retain": j("retain_perturbed"),
            "real_authors": j("real_authors_perturbed"), "world_facts": j("world_facts_perturbed"),
            "unseen": j("unseen_perturbed"), "holdout": j("holdout" + tag), "memorised": j("memorised")}


def _augment_vocabulary() -> str:
    """Words ReLearn's offline augmenter can emit (the word tokenizer must know them)."""
    import numpy as np

    from lethe.scenarios.qa_augment import positive_pairs, vocabulary_text

    extra = positive_pairs([{}] * 20, 1.0, np.random.default_rng(0))
    return vocabulary_text() + " " + " ".join(p["question"] + " " + p["answer"] for p in extra)


@register_scenario("tofu", config=TofuConfig, settings=("domain_incremental",))
def tofu(cfg, seed: int):
    """TOFU-format QA: learn forget ∪ retain, then a deletion request for the forget split."""
    import os

    import torch

    from lethe.scenarios.lm_corpora import sequence_dataset
    from lethe.scenarios.types import FORGET, LEARN, Experience, ForgetRequest, Stream, TestSet

    if cfg.checkpoint_saw_forget and not cfg.retain_model_path:
        raise ConfigError("scenario.retain_model_path: the run's checkpoint has already seen the forget "
                          "set (scenario.checkpoint_saw_forget: true, e.g. a model fine-tuned on all of "
                          "TOFU), so a retain-only model trained from it would have seen it too and forget "
                          "quality / PrivLeak would be invalid; give a published retain-only model "
                          "(e.g. TOFU's retain90 fine-tune) as scenario.retain_model_path")
    folder = dataset_folder(cfg)
    files = _files(folder, cfg)
    train_f = read_items(files["train_forget"], "scenario.forget_split")
    train_r = read_items(files["train_retain"], "scenario.retain_split")
    splits = {k: read_items(files[k], f"scenario ({k} split)")
              for k in EVAL_SPLITS if k in ("forget", "retain") or os.path.exists(files[k])}
    if "unseen" not in splits and os.path.exists(files["holdout"]):
        # TOFU's own held-out authors (holdout<XX>.json, question and answer only): the
        # non-members of the membership attacks, as open-unlearning uses them
        splits["unseen"] = read_items(files["holdout"], "scenario (holdout split)")
    if cfg.max_eval > 0:
        splits = {k: v[:cfg.max_eval] for k, v in splits.items()}
    memo = read_items(files["memorised"], "scenario (memorised.json)") if os.path.exists(files["memorised"]) else []
    general = [i for k in ("real_authors", "world_facts") for i in splits.get(k, [])] if cfg.train_general else []
    texts = [PROMPT] + [r.get("text", "") for r in memo]
    for rows in [train_f, train_r, general, *splits.values()]:
        for r in rows:
            texts += [r["question"], r["answer"], r.get("paraphrased_answer", ""),
                      r.get("paraphrased_question", ""), *r.get("perturbed_answer", [])]
    if cfg.tokenizer == "words":
        texts.append(_augment_vocabulary())
    tok = make_tokenizer(cfg.tokenizer, texts)
    fmt = resolve_prompt_format(cfg.prompt_format, tok, cfg.tokenizer)

    def seq_pair(text):   # a memorised sequence: every token counts
        ids = [tok.eos] + tok.encode(text) + [tok.eos]
        return ids[:1], ids[1:]

    qa = lambda rows: [encode_qa(tok, r["question"], r["answer"], fmt) for r in rows]  # noqa: E731
    memo_by = {k: [seq_pair(r["text"]) for r in memo if r.get("split") == k] for k in ("forget", "retain", "unseen")}
    train_pairs = qa(train_f) + memo_by["forget"] + qa(train_r) + memo_by["retain"] + qa(general)
    memo_rows = {k: [r for r in memo if r.get("split") == k] for k in ("forget", "retain")}
    train_items = train_f + memo_rows["forget"] + train_r + memo_rows["retain"] + general
    n_forget = len(train_f) + len(memo_by["forget"])
    lengths = [len(p) + len(a) - 1 for p, a in train_pairs]
    for rows in splits.values():
        for r in rows:
            for ans in [r["answer"], r.get("paraphrased_answer", r["answer"]), *r.get("perturbed_answer", [])]:
                p, a = encode_qa(tok, r["question"], ans, fmt)
                lengths.append(len(p) + len(a) - 1)
    lengths += [len(p) + len(a) - 1 for p, a in memo_by["unseen"]]
    length = max(lengths)
    if not train_f or not train_r:
        raise ConfigError("scenario: the forget and retain splits must both hold items")
    x, y = to_rows(train_pairs, length, tok.pad)
    ids = torch.arange(len(x))
    zeros = torch.zeros(len(x), dtype=torch.long)
    pool = TestSet(x=x, y=y, exp=zeros, task=zeros.clone(), ids=ids)
    eval_pairs, eval_split = [], []
    for s, name in enumerate(splits):
        eval_pairs += qa(splits[name])
        eval_split += [s] * len(splits[name])
    ex, _ = to_rows(eval_pairs, length, tok.pad)
    es = torch.tensor(eval_split, dtype=torch.long)
    test = TestSet(x=ex, y=es.clone(), exp=es, task=torch.zeros_like(es),
                   ids=torch.arange(len(x), len(x) + len(ex)))
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.benchmarks.scenarios.supervised import with_classes_timeline
    from avalanche.benchmarks.scenarios.task_aware import with_task_labels

    data = sequence_dataset(_pair_dataset_class()(x, y), ids.tolist(), 0)
    bm = with_classes_timeline(with_task_labels(benchmark_from_datasets(train=[data], test=[data])))
    forget_ids = ids[:n_forget].clone()
    experiences = [Experience(index=0, kind=LEARN, train=bm.train_stream[0]),
                   Experience(index=1, kind=FORGET, request=ForgetRequest(sample_ids=forget_ids, after=0))]
    stream = Stream(experiences=experiences, benchmark=bm, test=test, input_shape=(int(length),),
                    n_classes=int(tok.vocab_size), setting="domain_incremental", class_order=[0],
                    train=pool, task_type="qa")
    stream.tokenizer = tok
    stream.qa = QAData(tokenizer=tok, length=int(length), splits=splits,
                       memorised={k: [p + a for p, a in v] for k, v in memo_by.items()},
                       forget_ids=forget_ids, train_items=train_items, prompt_format=fmt)
    stream.qa_config = cfg
    return stream


__all__ = ["TofuConfig", "QAData", "QAWordTokenizer", "encode_qa", "resolve_prompt_format", "to_rows",
           "read_items", "tofu"]
