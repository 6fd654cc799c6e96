"""Knowledge and fluency metrics of ReLearn (Xu et al., 2025, "ReLearn: Unlearning via
Learning for Large Language Models"; repo zjunlp/unlearn). See docs/unlearning.md, "ReLearn".

Knowledge, per QA item (prediction = the model's answer, truth = the reference answer), as
ReLearn's evaluation code computes it (evals/evaluate.py of zjunlp/unlearn):

- entities of both answers, without those that share a word with the question (ReLearn's
  ``filter_entities`` on the prediction; its entity-extraction prompt asks the same for the
  truth);
- entity score E = (number of (prediction entity, truth entity) pairs with embedding cosine
  ≥ 0.8) / (number of truth entities) — a count of matched pairs, so it can exceed 1 — and
  E = 0 when either side names nothing; an exact fraction (float64), so 3/10 is 0.3;
- an NLI judgement ``judge(premise, hypothesis)`` ∈ {entailment, neutral, contradiction}, with
  the prediction as premise on the forget set and the truth as premise on the retain set;
- Knowledge Forgetting Rate KFR = mean over forget items of 1[contradiction ∨ E ≤ θ1],
  θ1 = 0.3 (0.5 when the truth has ≤ 3 entities: with few entities one match is already a
  third of the facts, so the bar for "forgotten" is looser);
- Knowledge Retention Rate KRR = mean over retain items of 1[¬contradiction ∧ E ≥ θ2], θ2 = 0.3.

Fluency, over ReLearn's tokens (:func:`ls_tokens`: nltk's ``word_tokenize`` of the lower-cased
answer, punctuation kept, "'s" split): Brunet's index W = N^(V^−0.165) (lower = richer
vocabulary), Honoré's statistic H = 100·ln N / (1 − V1/V + 0.1) (higher = richer), and the
Linguistic Score LS = harmonic mean of 1/(1+PPL), 1/(1+W), H/(1+H).

The paper extracts entities and judges entailment with large models; here every part is
pluggable (:func:`load_plugin`, ``"module:attr"`` specs) and the offline defaults are a
rule-based entity extractor (:func:`extract_entities`), the packaged all-MiniLM-L6-v2
embedder (:class:`MiniLMEmbedder`) and a rule-based NLI judge (:class:`RuleJudge`);
:class:`HFNLIJudge` runs any local Hugging Face NLI classifier.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import math
import re
from typing import Callable, Optional, Protocol, Sequence

import torch

from lethe.metrics.passes import inference
from lethe.scenarios.facts import extract_entities

ENTAILMENT, NEUTRAL, CONTRADICTION = "entailment", "neutral", "contradiction"
JUDGEMENTS = (ENTAILMENT, NEUTRAL, CONTRADICTION)

# ---------------------------------------------------------------------------------------------
# Embedders

class Embedder(Protocol):
    def embed(self, texts: list[str]) -> torch.Tensor:
        """[N, D] L2-normalised embeddings of ``texts``."""


class ExactEmbedder:
    """String identity as an embedding: one-hot over the distinct lower-cased strings of
    the call, so cosine is 1 for equal strings and 0 otherwise (tests, cheap runs)."""

    def embed(self, texts: list[str]) -> torch.Tensor:
        keys = [t.strip().lower() for t in texts]
        index = {k: i for i, k in enumerate(dict.fromkeys(keys))}
        out = torch.zeros(len(keys), max(len(index), 1))
        for row, k in enumerate(keys):
            out[row, index[k]] = 1.0
        return out


@functools.cache
def _load_pretrained(path: str, auto_class: str = "AutoModel"):
    """(tokenizer, model in eval mode) of a local Hugging Face folder, loaded once per process."""
    import transformers

    from lethe.models.hf import quiet_transformers

    with quiet_transformers():
        model = getattr(transformers, auto_class).from_pretrained(path, local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    return tokenizer, model.eval()


def text_perplexities(path: str, queries: list[str], responses: list[str]) -> list[float]:
    """Perplexity of each response given its query under a local causal LM (its own tokenizer;
    query tokens masked), one pair at a time — the fluency judge of ReLearn's evaluation."""
    import os

    import torch

    tokenizer, model = _load_pretrained(os.path.expanduser(path), "AutoModelForCausalLM")
    out = []
    with inference():
        for q, r in zip(queries, responses):
            n_query = len(tokenizer(q)["input_ids"])
            ids = torch.tensor([tokenizer(q + " " + r)["input_ids"]])
            labels = ids.clone()
            labels[:, :n_query] = -100
            if int((labels[:, 1:] != -100).sum()) == 0:   # an empty response: nothing to score
                out.append(float("nan"))                      # (left out of the mean, as ReLearn)
                continue
            out.append(math.exp(min(float(model(input_ids=ids, labels=labels).loss), 700.0)))
    return out


# wordfreq's lists stop at Zipf 1 (10^-8 per word); an unlisted word (an invented name, a
# typo) counts as that rarest listed word, so a text of such words scores PPL 1e8
UNIGRAM_FLOOR = 1e-8


def unigram_perplexity(text: str, lang: str = "en") -> float:
    """Perplexity of a text under a unigram model of real written and spoken English: the word
    frequencies of wordfreq (Speer, 2022; Wikipedia, subtitles, books, news, web, social
    media), PPL = exp(−mean ln f(w)) over wordfreq's own tokens (lower-cased, punctuation
    dropped), unlisted words at :data:`UNIGRAM_FLOOR`. The offline external fluency judge of
    ``scenario.ppl_model: wordfreq`` (no causal LM ships offline): it knows common English
    and nothing of any run. NaN for a text with no words."""
    from wordfreq import tokenize, word_frequency

    tokens = tokenize(text, lang)
    if not tokens:
        return math.nan
    logs = [math.log(max(word_frequency(t, lang), UNIGRAM_FLOOR)) for t in tokens]
    return math.exp(-sum(logs) / len(logs))


def _load_encoder(path: str):
    return _load_pretrained(path, "AutoModel")


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of token states [B, L, D] over the attention mask [B, L] (sentence-transformers)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings (mean-pooled, L2-normalised), from the packaged
    folder (``path=None``) or any local encoder folder."""

    def __init__(self, path: Optional[str] = None, batch_size: int = 64, max_length: int = 128):
        if path is None:
            from lethe.models.hf import minilm_path

            path = minilm_path()
        self.path, self.batch_size, self.max_length = path, batch_size, max_length

    def embed(self, texts: list[str]) -> torch.Tensor:
        tokenizer, model = _load_encoder(self.path)
        if not texts:
            return torch.zeros(0, model.config.hidden_size)
        chunks = []
        with inference():
            for i in range(0, len(texts), self.batch_size):
                batch = tokenizer(list(texts[i:i + self.batch_size]), padding=True,
                                  truncation=True, max_length=self.max_length, return_tensors="pt")
                hidden = model(**batch).last_hidden_state
                chunks.append(mean_pool(hidden, batch["attention_mask"]))
        return torch.nn.functional.normalize(torch.cat(chunks).float(), dim=-1)


# Lower-case function words: ReLearn's LLM extractor returns core nouns, so its word-overlap
# filter never sees them; the rule extractor keeps "The" of a title and "of" inside a name,
# which would otherwise drop "The Hollow Lantern" for any question containing "the".
_FUNCTION_WORDS = frozenset(("the", "a", "an", "of", "de", "von"))


def _content_words(text: str) -> set[str]:
    return {w for w in ls_tokens(text) if any(c.isalnum() for c in w) and w not in _FUNCTION_WORDS}


def question_filter(entities: list[str], question: str | None) -> list[str]:
    """``entities`` without those sharing a (content) word with ``question`` (ReLearn's
    ``filter_entities``: an entity the question gives away says nothing of what the answer
    knows). None: no filtering."""
    if not question:
        return list(entities)
    asked = _content_words(question)
    return [e for e in entities if not _content_words(e) & asked]


def entity_score(prediction: str, truth: str, embedder: Embedder, threshold: float = 0.8,
                 extractor: Callable[[str], list[str]] = extract_entities,
                 question: str | None = None) -> float:
    """ReLearn's E: matched (prediction entity, truth entity) pairs with cosine ≥ ``threshold``
    / number of truth entities, as an exact fraction (it can exceed 1 when one truth entity
    matches several predicted ones); 0.0 when either side has no entities left after
    :func:`question_filter`."""
    truth_ents = question_filter(extractor(truth), question)
    pred_ents = question_filter(extractor(prediction), question)
    if not truth_ents or not pred_ents:
        return 0.0
    # One call: ExactEmbedder's one-hot basis is per call, and it is one batch for MiniLM.
    emb = embedder.embed(truth_ents + pred_ents).to(torch.float64)
    cos = emb[:len(truth_ents)] @ emb[len(truth_ents):].T
    return int((cos >= threshold).sum()) / len(truth_ents)


# ---------------------------------------------------------------------------------------------
# NLI judges

class Judge(Protocol):
    def judge(self, premise: str, hypothesis: str) -> str:
        """"entailment" | "neutral" | "contradiction"."""


def words(text: str) -> list[str]:
    """Lower-case word tokens (letters, digits, apostrophes): the rule judge's words."""
    return re.findall(r"[a-z0-9']+", text.lower())


@functools.cache
def _nltk_tokenizers():
    from nltk.tokenize import NLTKWordTokenizer
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    # nltk's trained English Punkt model is a separate download; the untrained one splits
    # sentences the same way except after abbreviations ("Dr. Who" becomes two sentences)
    return PunktSentenceTokenizer(), NLTKWordTokenizer()


def ls_tokens(text: str) -> list[str]:
    """ReLearn's fluency tokens: nltk's ``word_tokenize`` of the lower-cased text (sentence
    split, then Treebank rules: punctuation kept as tokens, "'s" and "n't" split off)."""
    sentences, tokenizer = _nltk_tokenizers()
    return [t for sent in sentences.tokenize(text.lower()) for t in tokenizer.tokenize(sent)]


_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
NEGATIONS = frozenset(("not", "never", "no", "cannot"))


def _numbers(text: str) -> set[str]:
    return {n.replace(",", "") for n in _NUMBER.findall(text)}


def _negated(text: str) -> bool:
    return any(w in NEGATIONS or w.endswith("n't") for w in words(text.replace("’", "'")))


class RuleJudge:
    """Offline NLI by rule. Contradiction: both texts give numbers and none agree, or exactly
    one of them is negated ("not", "never", "no", "cannot", "…n't") while both name a common
    entity. Entailment: every word of the hypothesis occurs in the premise. Else neutral."""

    def judge(self, premise: str, hypothesis: str) -> str:
        p_nums, h_nums = _numbers(premise), _numbers(hypothesis)
        if p_nums and h_nums and not p_nums & h_nums:
            return CONTRADICTION
        if _negated(premise) != _negated(hypothesis):
            shared = ({e.lower() for e in extract_entities(premise)}
                      & {e.lower() for e in extract_entities(hypothesis)})
            if shared:
                return CONTRADICTION
        if set(words(hypothesis)) <= set(words(premise)):
            return ENTAILMENT
        return NEUTRAL


def nli_label_map(id2label: dict) -> dict[int, str]:
    """Class index -> judgement from an NLI model's ``config.id2label``: each of the three
    judgements must be named by exactly one label (case-insensitive "entail", "neutral",
    "contradict"); ValueError naming the labels otherwise (e.g. binary "not_entailment")."""
    stems = {"entail": ENTAILMENT, "neutral": NEUTRAL, "contradict": CONTRADICTION}
    mapping: dict[int, str] = {}
    for idx, name in id2label.items():
        low = str(name).lower()
        hits = [j for stem, j in stems.items() if stem in low]
        if len(hits) == 1 and not re.search(r"\bnot?[_\- ]|\bnon", low):
            mapping[int(idx)] = hits[0]
    if sorted(mapping.values()) != sorted(JUDGEMENTS):
        labels = ", ".join(f"{k}: '{v}'" for k, v in sorted(id2label.items(), key=lambda kv: int(kv[0])))
        raise ValueError(f"cannot map the NLI model's labels {{{labels}}} to entailment / neutral / "
                         f"contradiction: give a 3-way NLI model whose config.id2label names "
                         f"entail*, neutral, contradict*")
    return mapping


def _load_nli(path: str):
    return _load_pretrained(path, "AutoModelForSequenceClassification")


class HFNLIJudge:
    """A local Hugging Face NLI classifier (premise, hypothesis) -> argmax judgement."""

    def __init__(self, path: str, max_length: int = 512):
        self.path, self.max_length = path, max_length
        _, model = _load_nli(path)
        self.labels = nli_label_map(model.config.id2label)   # fail at construction, not mid-eval

    def judge(self, premise: str, hypothesis: str) -> str:
        tokenizer, model = _load_nli(self.path)
        batch = tokenizer(premise, hypothesis, truncation=True, max_length=self.max_length,
                          return_tensors="pt")
        with inference():
            logits = model(**batch).logits[0]
        return self.labels[int(logits.argmax())]


# ---------------------------------------------------------------------------------------------
# KFR / KRR

def _check_pairs(predictions: Sequence[str], truths: Sequence[str]) -> None:
    if len(predictions) != len(truths):
        raise ValueError(f"{len(predictions)} predictions for {len(truths)} reference answers")


def _questions(questions: Optional[Sequence[str]], n: int) -> Sequence[Optional[str]]:
    if questions is None:
        return [None] * n
    if len(questions) != n:
        raise ValueError(f"{len(questions)} questions for {n} reference answers")
    return questions


def kfr(predictions: Sequence[str], truths: Sequence[str], embedder: Embedder, judge: Judge,
        extractor: Callable[[str], list[str]] = extract_entities,
        questions: Optional[Sequence[str]] = None) -> float:
    """Knowledge Forgetting Rate over forget items: mean 1[contradiction ∨ E ≤ θ1], θ1 = 0.5
    when the truth has ≤ 3 entities (after the question filter), else 0.3; the NLI premise is
    the prediction, as ReLearn's forget-side call. NaN for no items."""
    _check_pairs(predictions, truths)
    if not truths:
        return math.nan
    hits = 0
    for pred, truth, q in zip(predictions, truths, _questions(questions, len(truths))):
        theta = 0.5 if len(question_filter(extractor(truth), q)) <= 3 else 0.3
        contradicted = judge.judge(pred, truth) == CONTRADICTION
        hits += contradicted or entity_score(pred, truth, embedder, extractor=extractor, question=q) <= theta
    return hits / len(truths)


def krr(predictions: Sequence[str], truths: Sequence[str], embedder: Embedder, judge: Judge,
        extractor: Callable[[str], list[str]] = extract_entities,
        questions: Optional[Sequence[str]] = None) -> float:
    """Knowledge Retention Rate over retain items: mean 1[¬contradiction ∧ E ≥ 0.3]; the NLI
    premise is the truth, as ReLearn's retain-side call. NaN for no items."""
    _check_pairs(predictions, truths)
    if not truths:
        return math.nan
    hits = 0
    for pred, truth, q in zip(predictions, truths, _questions(questions, len(truths))):
        contradicted = judge.judge(truth, pred) == CONTRADICTION
        hits += not contradicted and entity_score(pred, truth, embedder, extractor=extractor, question=q) >= 0.3
    return hits / len(truths)


# ---------------------------------------------------------------------------------------------
# Fluency

def brunet_w(tokens: Sequence[str]) -> float:
    """Brunet's index W = N^(V^−0.165) (N tokens, V distinct). NaN for no tokens."""
    n, v = len(tokens), len(set(tokens))
    return math.nan if n == 0 else n ** (v ** -0.165)


def honore_h(tokens: Sequence[str]) -> float:
    """Honoré's statistic H = 100·ln N / (1 − V1/V + 0.1) (V1 = distinct tokens occurring
    once). The original has no +0.1: it is infinite when every token is unique (V1 = V),
    which short answers often are; ReLearn's form (Xu et al., 2025) adds the guard. NaN for none."""
    n = len(tokens)
    if n == 0:
        return math.nan
    counts: dict[str, int] = {}
    for t in tokens:
        counts[t] = counts.get(t, 0) + 1
    v1 = sum(1 for c in counts.values() if c == 1)
    return 100.0 * math.log(n) / (1.0 - v1 / len(counts) + 0.1)


def linguistic_score(ppl: float, w: float, h: float) -> float:
    """Harmonic mean of 1/(1+PPL), 1/(1+W), H/(1+H); 0 when any part is 0 (e.g. H = 0)."""
    parts = (1.0 / (1.0 + ppl), 1.0 / (1.0 + w), h / (1.0 + h))
    if any(math.isnan(p) for p in parts):
        return math.nan
    if min(parts) <= 0.0:
        return 0.0
    return len(parts) / sum(1.0 / p for p in parts)


# ---------------------------------------------------------------------------------------------
# Plugins

BUILTINS: dict[str, Callable[[], object]] = {
    "minilm": MiniLMEmbedder, "exact": ExactEmbedder, "rule": RuleJudge}


def load_plugin(spec: Optional[str], default: Callable[[], object]):
    """An embedder / judge / extractor from a spec: None or "" -> ``default()``; a built-in
    name ("minilm", "exact", "rule"); or "module:attr" -> the attribute, instantiated with
    no arguments when it is a class, else returned as is (e.g. an extractor function)."""
    if not spec:
        return default()
    if spec in BUILTINS:
        return BUILTINS[spec]()
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"plugin '{spec}': expected 'module:attr' (e.g. "
                         f"'lethe.metrics.knowledge:RuleJudge') or one of {', '.join(BUILTINS)}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"plugin '{spec}': cannot import module '{module_name}' of "
                         f"'module:attr' ({exc})") from None
    if not hasattr(module, attr):
        raise ValueError(f"plugin '{spec}': module '{module_name}' has no attribute '{attr}' "
                         f"(the attr of 'module:attr')")
    obj = getattr(module, attr)
    return obj() if inspect.isclass(obj) else obj


__all__ = ["extract_entities", "Embedder", "ExactEmbedder", "MiniLMEmbedder", "mean_pool",
           "entity_score", "Judge", "RuleJudge", "HFNLIJudge", "nli_label_map", "kfr", "krr",
           "brunet_w", "honore_h", "unigram_perplexity", "UNIGRAM_FLOOR", "linguistic_score", "words",
           "ls_tokens", "question_filter",
           "load_plugin", "ENTAILMENT", "NEUTRAL", "CONTRADICTION"]
