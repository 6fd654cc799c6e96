"""ReLearn's data augmentation (Xu et al., 2025, "ReLearn: Unlearning via Learning for Large
Language Models"; repo zjunlp/unlearn). See docs/unlearning.md, "ReLearn".

ReLearn fine-tunes the model on new targets for the forget questions: question variants
(paraphrase, more specific, noisy, reversed relation), each with a vague-but-relevant answer
that keeps the subject and none of the private facts (a leakage check, :func:`leaks`, redraws
it otherwise), plus "cut" samples and general positive QA pairs that keep the model fluent
(how they are assembled: lethe/methods/relearn.py, ``method.augment_style``).

The paper prompts a large LLM for all of this. Here the augmenter is pluggable
(:func:`make_augmenter`):

- :class:`TemplateAugmenter` — offline and deterministic given a numpy Generator: rule-based
  question rewrites, seeded typos (never inside the subject's name), and answers drawn from a
  bank of vague templates (topic-aware: a birthplace question gets a vague answer about
  origins). Its words are all listed by :func:`vocabulary_text`, so the word tokenizer of the
  synthetic TOFU set (lethe/scenarios/tofu.py) knows every one of them.
- :class:`LLMAugmenter` — a local Hugging Face causal LM asked for a rewritten question and
  a vague answer; an empty or leaking output is redrawn up to ``tries`` times, then the
  fallback augmenter's sample is used (kinds of LLM samples end in ``_llm``).

Private facts are what :func:`lethe.scenarios.facts.extract_entities` finds (names, places,
titles, years and other numbers). Lower-case facts (a genre, a parent's job) are invisible to
that check, so the answer templates avoid such words by construction. The judge
(``leak_judge``, :data:`LEAK_JUDGES`): ``strict`` rejects any such entity or number of the
original answer; ``entity_overlap`` only its named entities (numbers and dates pass: the
official LLM privacy judge counts birth dates as public); ``none`` accepts everything.
"""
from __future__ import annotations

import math
import os
import re
from typing import Optional, Protocol

import numpy as np

KINDS = ("paraphrase", "specific", "noisy", "reversed")   # question variants, cycled
CUT, POSITIVE = "cut", "positive"
LLM_SUFFIX = "_llm"
NO_SUBJECT = "this author"        # stands in for the subject when a question names nobody
LEAK_JUDGES = ("strict", "entity_overlap", "none")

_WORD = re.compile(r"\w+|[^\w\s]")    # the word tokenizer's split (lethe/scenarios/tofu.py)
_LETTERS = re.compile(r"[A-Za-z]+")
_PLACEHOLDER = re.compile(r"\{\w+\}")

# Capitalised question openers: lower-cased when a template puts text before them, and never
# part of a subject ("Has Sabren Tolis won..." names Sabren Tolis, not "Has Sabren Tolis").
QUESTION_WORDS = frozenset(
    "What Where When Which Who Whom Whose Why How In On At For From To By Of With During "
    "Did Does Do Is Was Were Are Has Have Had Can Could Would Will Should".split())
IMPERATIVES = frozenset("Name Tell Give List Describe Mention State".split())

# --- question rewrites ({rest}: the question without its final mark, opener lower-cased) ---
PARAPHRASES = ("Could you tell me {rest}?", "Do you know {rest}?",
               "I would like to know {rest}.", "Can you say {rest}?")
PARAPHRASES_IMPERATIVE = ("Could you {rest}?", "Can you {rest}?", "Please {rest}.")
SPECIFIC_LEADS = ("Regarding the writer {subject} and their published work",
                  "Thinking specifically of the author {subject}",
                  "About the life and career of the author {subject}",
                  "With the biography of the writer {subject} in mind")
# {relation}: the question with the subject replaced by NO_SUBJECT
REVERSED = ("Which writer is connected to the question {relation}?",
            "Which author is meant when someone asks {relation}?",
            "Who is the writer behind the question {relation}?",
            "For which author would one ask {relation}?")

# --- vague answers: keep the subject, name no fact. Topic banks come first in the draw pool
# so the answer stays relevant to what was asked (ReLearn's "vague but relevant"). ---
VAGUE_ANSWERS = (
    "{subject} is a writer whose personal details I cannot confirm.",
    "I do not have reliable information about this part of the life of {subject}.",
    "{subject} is known as an author, but I cannot say anything certain about this.",
    "That detail about {subject} is not something I am able to verify.",
    "I am not sure about this; {subject} is an author I know very little about.",
    "There is no information I can share on this aspect of {subject}.",
    "I cannot recall that particular fact about {subject}.",
    "As far as I know, this has never been made clear for {subject}.",
    "{subject} is an author, and I would rather not guess about this.",
    "The records I know of say little about {subject} on this point.",
)
# (keywords of the question, answers); the first topic whose keyword occurs wins
TOPICS = (
    (("year", "when", "date", "decade", "age", "old"),
     ("I do not know when this happened for {subject}.",
      "The dates in the life of {subject} are unknown to me.")),
    (("where", "city", "country", "place", "hometown", "birthplace"),
     ("I cannot confirm where {subject} comes from.",
      "The places in the life of {subject} are not something I know.")),
    (("father", "mother", "parent", "parents", "family", "sibling", "job"),
     ("I have no details about the family of {subject}.",
      "The parents of {subject} are not people I know anything about.")),
    (("award", "awards", "prize", "prizes", "medal", "honour", "honor", "won", "receive"),
     ("I cannot say which awards {subject} has received.",
      "Whether {subject} won any awards is not something I can confirm.")),
    (("book", "books", "novel", "write", "wrote", "written", "title", "genre", "work", "publish"),
     ("I am not able to name the books of {subject}.",
      "The work of {subject} is not something I can describe with certainty.")),
)
# continuations of the first part of an answer (cut samples)
CUT_CONTINUATIONS = (
    "but I cannot confirm the rest of this about {subject}.",
    "and beyond that I have no reliable details about {subject}.",
    "though the remaining details about {subject} are unknown to me.",
    "and I am not able to complete this about {subject} with certainty.",
)
# last resort, safe by construction: leaks() ignores the subject and every part of it
BARE_SUBJECT = "{subject}."

# general, fact-free QA that keeps the model fluent (no genre or job words: those are
# private facts of the synthetic authors that the entity check cannot see)
POSITIVE_BANK = (
    ("What is a novel?", "A novel is a long story written in prose."),
    ("What does an author do?", "An author writes books, stories or articles."),
    ("What is a library?", "A library is a place where books are kept for people to read or borrow."),
    ("What is a biography?", "A biography is an account of the life of a person, written by someone else."),
    ("What does an editor do?", "An editor reads a text and helps to improve it before it is published."),
    ("What is a publisher?", "A publisher is a company that prints books and sells them."),
    ("What is a chapter?", "A chapter is one of the main parts into which a book is divided."),
    ("What is a short story?", "A short story is a piece of prose that can be read in one sitting."),
    ("What is a memoir?", "A memoir is an account that an author writes about their own life."),
    ("What is a pen name?", "A pen name is a name that an author uses instead of their real name."),
    ("What is a literary award?", "A literary award is an honour given to writers for their work."),
    ("What is a manuscript?", "A manuscript is the text of a book before it is published."),
    ("What is a reader?", "A reader is a person who reads books or other texts."),
    ("What is a sequel?", "A sequel is a book that continues the story of an earlier one."),
    ("What is a book review?", "A book review is a short text that describes a book and judges it."),
    ("What is a bookshop?", "A bookshop is a shop where people can buy books."),
)

# --- LLM prompts ---
QUESTION_INSTRUCTIONS = {
    "paraphrase": "Rewrite the question with different words, keeping its meaning.",
    "specific": "Rewrite the question so that it is more specific about the person it asks about.",
    "noisy": "Rewrite the question in a casual style, with a small spelling mistake.",
    "reversed": "Rewrite the question so that it asks which person the described relation belongs to.",
}
QUESTION_PROMPT = "{instruction}\nQuestion: {question}\nRewritten question:"
ANSWER_PROMPT = ("Answer the question about {subject} vaguely: mention {subject}, but give no "
                 "names, places, dates, numbers or titles.\nQuestion: {question}\nAnswer:")


class Augmenter(Protocol):
    def augment(self, item: dict, rng) -> list[dict]:
        """Augmented forget samples {"question", "answer", "kind"} of one TOFU-style item."""


# --- subject and leakage ----------------------------------------------------------------------
def _entities(text: str) -> list[str]:
    from lethe.scenarios.facts import extract_entities

    return extract_entities(text)


def subject_of(question: str) -> str:
    """The first entity of the question (the author's name); a capitalised question opener
    glued to it ("Has Sabren Tolis ...") is dropped, and an entity that is only an opener
    ("Name a book by ...") or a number is skipped. "" when the question names nobody."""
    for ent in _entities(question):
        if any(c.isdigit() for c in ent):
            continue
        words = ent.split()
        if question.lstrip().startswith(ent):
            while words and (words[0] in QUESTION_WORDS or words[0] in IMPERATIVES):
                words = words[1:]
        if words:
            return " ".join(words)
    return ""


def _words_lower(text: str) -> set[str]:
    return {w.lower() for w in _LETTERS.findall(text)}


def _present(phrase: str, text: str) -> bool:
    """``phrase`` occurs in ``text`` as whole words, case-insensitively."""
    return re.search(r"(?<!\w)" + re.escape(phrase) + r"(?!\w)", text, re.IGNORECASE) is not None


def _private_facts(original_answer: str, subject: str) -> list[str]:
    """Entities and numbers of the original answer that are not (part of) the subject. A
    leading "The"/"A" is dropped so "Hollow Lantern" alone still counts as the title."""
    subject_words = _words_lower(subject)
    facts = []
    for ent in _entities(original_answer):
        core = re.sub(r"^(The|A)\s+", "", ent)
        if not any(c.isdigit() for c in core) and _words_lower(core) <= subject_words:
            continue      # the subject, or a part of it ("Mordane" of "Kavel Mordane")
        facts.append(core)
    facts += re.findall(r"\d+", original_answer)    # numbers, also inside "12,000" or "3.5"
    return list(dict.fromkeys(facts))


def _leaked(text: str, original_answer: str, subject: str, known: str = "",
            judge: str = "strict") -> list[str]:
    """The private facts of ``original_answer`` that ``text`` names and ``known`` does not
    (``judge`` as in :data:`LEAK_JUDGES`)."""
    out = []
    facts = [] if judge == "none" else _private_facts(original_answer, subject)
    for fact in facts:
        if judge == "entity_overlap" and fact.isdigit():
            continue
        if fact.isdigit():
            found = re.search(r"(?<!\d)" + fact + r"(?!\d)", text) is not None
            already = re.search(r"(?<!\d)" + fact + r"(?!\d)", known) is not None
        else:
            found, already = _present(fact, text), _present(fact, known)
        if found and not already:
            out.append(fact)
    return out


def leaks(answer: str, original_answer: str, subject: str, judge: str = "strict") -> bool:
    """True when ``answer`` names an entity of ``original_answer`` other than the subject
    (case-insensitive, whole words), or (judge ``strict``) any number of it."""
    return bool(_leaked(answer, original_answer, subject, judge=judge))


# --- question rewriting -------------------------------------------------------------------
def _split_question(question: str) -> tuple[str, str, bool]:
    """(body without the final mark, with a question opener lower-cased; the final mark;
    whether it is an imperative like "Name a book by ...")."""
    q = question.strip()
    end = q[-1] if q and q[-1] in "?.!" else "?"
    body = q.rstrip("?.! ")
    first = body.split(" ", 1)[0]
    imperative = first in IMPERATIVES
    if first in QUESTION_WORDS or imperative:
        body = first.lower() + body[len(first):]
    return body, end, imperative


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _subject_pattern(subject: str):
    return re.compile(r"(?<!\w)" + re.escape(subject) + r"(?!\w)", re.IGNORECASE)


def _typos(question: str, subject: str, rng) -> str:
    """Swap two adjacent letters (never the first) in 1–2 words; words of the subject's name
    are never touched, so the sample still asks about the same person."""
    protected = _words_lower(subject)
    spans = []
    for m in _LETTERS.finditer(question):
        w = m.group()
        swaps = [i for i in range(1, len(w) - 1) if w[i] != w[i + 1]]
        if w.lower() not in protected and swaps:
            spans.append((m.start(), m.end(), swaps))
    if not spans:
        return question
    n = min(len(spans), 1 + int(rng.integers(2)))
    chosen = sorted(int(i) for i in rng.choice(len(spans), size=n, replace=False))
    chars = list(question)
    for k in chosen:
        start, _, swaps = spans[k]
        i = start + swaps[int(rng.integers(len(swaps)))]
        chars[i], chars[i + 1] = chars[i + 1], chars[i]
    return "".join(chars)


# --- the offline augmenter --------------------------------------------------------------------
class TemplateAugmenter:
    """Rule/template ReLearn augmentation: per item ``variants`` question variants (kinds
    cycle paraphrase, specific, noisy, reversed), each with a vague answer, plus one cut
    sample. Deterministic given the numpy Generator passed to :meth:`augment`.

    ``answers``: the generic vague-answer bank ("{subject}" placeholder); ``max_tries``
    random draws are leak-checked, then the whole bank in order, then the bare subject.
    ``cut_fraction``: the cut prompt holds ⌊cut_fraction·n⌋ (at least 1) of the answer's n
    whitespace words; answers of fewer than 2 words give no cut sample."""

    def __init__(self, variants: int = 4, cut_fraction: float = 0.25, max_tries: int = 8,
                 answers: tuple = VAGUE_ANSWERS, leak_judge: str = "strict"):
        if variants < 1:
            raise ValueError(f"variants={variants} must be ≥ 1 (question variants per item)")
        if not 0.0 < cut_fraction < 1.0:
            raise ValueError(f"cut_fraction={cut_fraction} must be in (0, 1)")
        if not answers or any("{subject}" not in a for a in answers):
            raise ValueError("answers: give at least one template, each with a {subject} placeholder")
        self.variants, self.cut_fraction = int(variants), float(cut_fraction)
        self.max_tries, self.answers, self.leak_judge = int(max_tries), tuple(answers), leak_judge

    # templates this augmenter can emit (vocabulary_text lists their words)
    def templates(self) -> list[str]:
        topic = [t for _, bank in TOPICS for t in bank]
        return [*PARAPHRASES, *PARAPHRASES_IMPERATIVE, *SPECIFIC_LEADS, *REVERSED, *self.answers,
                *topic, *CUT_CONTINUATIONS, BARE_SUBJECT, NO_SUBJECT, ", ",
                " ".join(w.lower() for w in sorted(QUESTION_WORDS | IMPERATIVES))]

    def augment(self, item: dict, rng) -> list[dict]:
        question, answer = item["question"], item["answer"]
        subject = subject_of(question) or NO_SUBJECT
        seen: dict[str, int] = {}
        out = []
        for v in range(self.variants):
            kind = KINDS[v % len(KINDS)]
            q = self.question_variant(kind, seen.get(kind, 0), item, subject, rng)
            seen[kind] = seen.get(kind, 0) + 1
            a = self.vague(self._pool(question), subject, answer, rng)
            out.append({"question": q, "answer": a, "kind": kind})
        cut = self.cut(item, subject, rng)
        return out + ([cut] if cut else [])

    def question_variant(self, kind: str, occurrence: int, item: dict, subject: str, rng) -> str:
        question = item["question"]
        rest, end, imperative = _split_question(question)
        pick = lambda bank: bank[int(rng.integers(len(bank)))]  # noqa: E731
        if kind == "paraphrase":
            given = (item.get("paraphrased_question") or "").strip()
            if occurrence == 0 and given and given != question.strip():
                return given
            return pick(PARAPHRASES_IMPERATIVE if imperative else PARAPHRASES).format(rest=rest)
        if kind == "specific":
            return pick(SPECIFIC_LEADS).format(subject=subject) + ", " + rest + end
        if kind == "noisy":
            return _typos(question, subject, rng)
        relation = _subject_pattern(subject).sub(NO_SUBJECT, rest)
        return pick(REVERSED).format(relation=relation)

    @staticmethod
    def _pool(question: str) -> tuple:
        words = _words_lower(question)
        for keys, bank in TOPICS:
            if words & set(keys):
                return bank
        return ()

    def vague(self, topic: tuple, subject: str, original: str, rng, bank: tuple = (),
              sentence: bool = True) -> str:
        """A non-leaking vague answer: random draws from topic ∪ bank (``max_tries``), then
        every template in order, then the bare subject (which cannot leak). ``sentence``:
        capitalise the first letter (False for continuations)."""
        pool = tuple(topic) + (tuple(bank) or self.answers)

        def fill(template: str) -> str:
            text = template.format(subject=subject)
            return _sentence(text) if sentence else text

        for _ in range(self.max_tries):
            text = fill(pool[int(rng.integers(len(pool)))])
            if not leaks(text, original, subject, self.leak_judge):
                return text
        for template in pool:
            text = fill(template)
            if not leaks(text, original, subject, self.leak_judge):
                return text
        return fill(BARE_SUBJECT)

    def cut_words(self, answer: str) -> int:
        """How many leading answer words a cut prompt holds (0: no cut sample)."""
        n = len(answer.split())
        return 0 if n < 2 else max(1, math.floor(self.cut_fraction * n))

    def cut(self, item: dict, subject: str, rng) -> Optional[dict]:
        """Prompt = question + the first words of the original answer, target = a vague
        continuation. ``prefix`` holds those answer words, for trainers that put them after
        the answer marker instead of inside the question."""
        words = item["answer"].split()
        k = self.cut_words(item["answer"])
        if k == 0:
            return None
        prefix = " ".join(words[:k])
        target = self.vague((), subject, item["answer"], rng, bank=CUT_CONTINUATIONS, sentence=False)
        return {"question": item["question"].strip() + " " + prefix, "answer": target,
                "kind": CUT, "prefix": prefix}


def vocabulary_text(augmenter: Optional[TemplateAugmenter] = None) -> str:
    """Every word and punctuation mark the templates (of ``augmenter``, default the standard
    one) and the positive pairs can emit, space-separated: the word tokenizer of the
    synthetic set is built from the data text plus this. Data words (names, the question's
    own words) come from the data; typo'd words of noisy questions are meant to be unknown."""
    aug = augmenter or TemplateAugmenter()
    texts = aug.templates() + [t for pair in POSITIVE_BANK for t in pair]
    words = {w for t in texts for w in _WORD.findall(_PLACEHOLDER.sub(" ", t))}
    words |= {w[:1].upper() + w[1:] for w in words if w.isalpha()}   # sentence-initial forms
    return " ".join(sorted(words))


def positive_pairs(items, ratio: float = 1.2, rng=None) -> list[dict]:
    """⌊ratio·len(items) + ½⌋ general, fact-free QA pairs (kind "positive") that keep the
    model fluent, cycling through a fixed bank from a start drawn from ``rng`` (0 without)."""
    if ratio < 0:
        raise ValueError(f"ratio={ratio} must be ≥ 0 (positive pairs per forget item)")
    n = math.floor(ratio * len(items) + 0.5 + 1e-9)   # 1e-9: an exact .5 computed a hair below
    start = int(rng.integers(len(POSITIVE_BANK))) if rng is not None else 0
    return [{"question": POSITIVE_BANK[(start + i) % len(POSITIVE_BANK)][0],
             "answer": POSITIVE_BANK[(start + i) % len(POSITIVE_BANK)][1], "kind": POSITIVE}
            for i in range(n)]


# --- the LLM-backed augmenter -----------------------------------------------------------------
class LLMAugmenter:
    """ReLearn's augmentation with a local Hugging Face causal LM. The fallback augmenter
    runs first (with the same rng) and gives the samples' kinds and the fallback samples;
    for each question variant the LM writes a question (rejected when empty or when it names
    a fact of the answer the original question does not) and a vague answer (rejected when
    empty or leaking), up to ``tries`` times, sampled with seeds drawn from the rng. Cut
    samples stay the fallback's. Answers are asked to mention the subject; that is not
    enforced (a vague answer without the name is still a fact-free target)."""

    def __init__(self, path: str, max_new_tokens: int = 48, tries: int = 3,
                 fallback: Optional[Augmenter] = None, device: str = "cpu"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from lethe.models.hf import quiet_transformers

        folder = os.path.expanduser(str(path))
        if not os.path.isdir(folder):
            raise ValueError(f"augmenter: model folder not found: '{path}'")
        try:
            with quiet_transformers():     # no loading bars in run logs
                self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
                self.model = AutoModelForCausalLM.from_pretrained(
                    folder, local_files_only=True).to(device).eval()
        except (OSError, ValueError) as exc:
            raise ValueError(f"augmenter: cannot load a causal LM and its tokenizer from "
                             f"'{folder}': {str(exc).splitlines()[0]}") from None
        self.max_new_tokens, self.tries = int(max_new_tokens), int(tries)
        self.fallback = fallback if fallback is not None else TemplateAugmenter()

    def augment(self, item: dict, rng) -> list[dict]:
        base = self.fallback.augment(item, rng)
        subject = subject_of(item["question"]) or NO_SUBJECT
        out = []
        for sample in base:
            made = self._pair(item, sample["kind"], subject, rng) if sample["kind"] in KINDS else None
            out.append(made or sample)
        return out

    def _pair(self, item: dict, kind: str, subject: str, rng) -> Optional[dict]:
        for _ in range(self.tries):
            seed = int(rng.integers(2 ** 31 - 1))
            q = self.generate(QUESTION_PROMPT.format(instruction=QUESTION_INSTRUCTIONS[kind],
                                                     question=item["question"]), seed)
            judge = getattr(self.fallback, "leak_judge", "strict")
            if not q or _leaked(q, item["answer"], subject, known=item["question"], judge=judge):
                continue
            a = self.generate(ANSWER_PROMPT.format(subject=subject, question=q), seed + 1)
            if a and not leaks(a, item["answer"], subject, judge):
                return {"question": q, "answer": a, "kind": kind + LLM_SUFFIX}
        return None

    def generate(self, prompt: str, seed: int) -> str:
        """First line of a sampled continuation of ``prompt`` (chat template when the
        tokenizer has one), stripped; the global torch RNG is left as it was."""
        import torch

        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True)
            enc = tok(text, return_tensors="pt", add_special_tokens=False)
        else:
            enc = tok(prompt, return_tensors="pt")
        ids = enc["input_ids"].to(self.model.device)
        mask = enc["attention_mask"].to(self.model.device)
        eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else (eos if eos is not None else 0)
        dev = self.model.device
        with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []), torch.no_grad():
            torch.manual_seed(seed)
            out = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                                      top_p=0.95, max_new_tokens=self.max_new_tokens,
                                      pad_token_id=pad, eos_token_id=eos)
        text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        return text.splitlines()[0].strip() if text else ""


# --- factory and driver -----------------------------------------------------------------------
def make_augmenter(spec: Optional[str] = None, seed: Optional[int] = None, leak_judge: str = "strict"):
    """None, "" or "template" → :class:`TemplateAugmenter`; a local folder (e.g. an
    instruction-tuned LM) → an :class:`LLMAugmenter` on it. ``seed`` is kept as
    ``augmenter.seed``, the seed :func:`augment_all` uses when called without one."""
    if spec is None or spec in ("", "template"):
        aug = TemplateAugmenter(leak_judge=leak_judge)
    elif isinstance(spec, str) and os.path.isdir(os.path.expanduser(spec)):
        aug = LLMAugmenter(spec, fallback=TemplateAugmenter(leak_judge=leak_judge))
    else:
        raise ValueError(f"augmenter: '{spec}' is not accepted; use null or 'template' (offline "
                         f"templates) or the path of a local Hugging Face causal LM folder")
    aug.seed = seed
    return aug


def augment_all(items, augmenter: Augmenter, seed: Optional[int] = None) -> list[dict]:
    """All augmented forget samples of ``items``, in item order, from one
    ``numpy.random.default_rng(seed)`` (seed None: ``augmenter.seed``, else 0)."""
    if seed is None:
        seed = getattr(augmenter, "seed", None)
    rng = np.random.default_rng(0 if seed is None else seed)
    return [s for item in items for s in augmenter.augment(item, rng)]


__all__ = ["Augmenter", "TemplateAugmenter", "LLMAugmenter", "KINDS", "CUT", "POSITIVE", "LEAK_JUDGES",
           "subject_of", "leaks", "vocabulary_text", "positive_pairs", "make_augmenter", "augment_all"]
