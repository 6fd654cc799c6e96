"""The private facts of a text, by rule: names, places, titles, years and other numbers.

What counts as a fact is shared by the data side (the ReLearn augmenter's leakage check,
lethe/scenarios/qa_augment.py) and the metrics side (ReLearn's entity score behind KFR / KRR,
lethe/metrics/knowledge.py), so it lives with the data and the metrics import it.
"""
from __future__ import annotations

import re

# Capitalised at a sentence start, these words are grammar, not names.
SENTENCE_STOP_WORDS = frozenset(
    "The A In What Who Where When Which How He She It His Her They This That Yes No I".split())
# "The"/"A" open titles ("The Hollow Lantern"), so they stay attached to a following name;
# the other stop words never belong to one ("In Vornhal" -> "Vornhal").
TITLE_ARTICLES = frozenset(("The", "A"))
CONNECTORS = frozenset(("of", "the", "de", "von"))

_TOKEN = re.compile(r"(?P<num>\d+(?:[.,]\d+)*)|(?P<word>[^\W\d_](?:[\w'’-]*\w)?)")
_POSSESSIVE = re.compile(r"['’]s$")


def _capitalised(word: str) -> bool:
    return word[:1].isupper()


def extract_entities(text: str) -> list[str]:
    """Named entities of ``text`` by rule: maximal runs of Capitalised words (with inner
    connectors "of", "the", "de", "von" between capitalised words), and numbers (years
    included). A sentence-initial stop word alone is dropped, and one other than "The"/"A"
    is cut from the front of a run. Possessive "'s" is removed. Deduplicated, in order."""
    tokens = [(m.start(), m.end(), m.group()) for m in _TOKEN.finditer(text)]
    entities: list[str] = []
    run: list[str] = []          # words of the current run (connectors pending at the end)
    run_initial = False          # the run's first word starts a sentence

    def close():
        nonlocal run
        while run and run[-1] in CONNECTORS:     # a run must end on a capitalised word
            run.pop()
        if run_initial and run and run[0] in SENTENCE_STOP_WORDS:
            if len(run) == 1 or run[0] not in TITLE_ARTICLES:
                run = run[1:]
        if run:
            entities.append(" ".join(run))
        run = []

    prev_end = 0
    for i, (start, end, tok) in enumerate(tokens):
        gap = text[prev_end:start]
        sentence_start = i == 0 or bool(re.search(r"[.!?\n]", gap))
        joined = bool(run) and gap.isspace()    # punctuation between words breaks a run
        if not joined and run:
            close()
        if tok[0].isdigit():
            if run:
                close()
            entities.append(tok)
        elif _capitalised(tok):
            word = _POSSESSIVE.sub("", tok)
            if not run:
                run_initial = sentence_start
            run.append(word)
            if word != tok:                     # "Mordane's novel": the name ends here
                close()
        elif run and tok in CONNECTORS:     # kept only if a capitalised word follows
            run.append(tok)
        elif run:
            close()
        prev_end = end
    close()
    return list(dict.fromkeys(entities))
