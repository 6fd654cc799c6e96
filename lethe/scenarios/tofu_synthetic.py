"""Offline generator of fictitious-author QA sets in the TOFU format.

TOFU (Maini et al., "TOFU: A Task of Fictitious Unlearning for LLMs", 2024) fine-tunes a model
on QA pairs about 200 authors who do not exist, then asks it to forget 1/5/10% of them. This
module writes a set with the same files and fields, deterministic by seed, so every test and
the LLM-unlearning benchmark run offline with a tiny LM:

- ``forget<XX>.json`` / ``retain<YY>.json``: the training QA (``question``, ``answer``), each
  fact in two phrasings (the question/answer and its paraphrase);
- ``forget<XX>_perturbed.json``, ``retain_perturbed.json``: evaluation items with
  ``paraphrased_answer``, ``perturbed_answer`` (the fact replaced by a wrong one of the same
  kind, so the truth ratio is defined) and ``paraphrased_question``;
- ``real_authors_perturbed.json`` / ``world_facts_perturbed.json``: general knowledge, same
  fields (real facts; a tiny LM has no pretraining, so the loader can train on them);
- lethe's extensions: ``unseen_perturbed.json`` (authors never trained on: the "unseen data"
  reference of MA / EL_n and the non-members of PrivLeak) and ``memorised.json``, TDEC-style
  sequences (a biography per author, ``split`` = forget | retain | unseen) for extraction
  metrics (Jang et al., 2023, measured on the Training Data Extraction Challenge set).

Files are JSON lines, as the TOFU release on the Hugging Face hub.
``python -m lethe.scenarios.tofu_synthetic OUT_DIR [--authors N] [--forget-percent P]`` writes one.
"""
from __future__ import annotations

import json
from pathlib import Path

SYLLABLES = ("ka", "vel", "mor", "dane", "lis", "tor", "bren", "sa", "quin", "dor", "el", "va",
             "rho", "mi", "zan", "tel", "ou", "gar", "fen", "ri", "lo", "nes", "cal", "bi")
CITIES = ("Vornhal", "Ostrilla", "Pemberdon", "Quarrowick", "Saltmere", "Dunhollow", "Lirravel",
          "Brackenford", "Tessaline", "Morrowgate", "Elvanport", "Kesterby")
GENRES = ("mystery", "poetry", "science fiction", "historical fiction", "fantasy", "horror",
          "romance", "travel writing")
JOBS = ("baker", "nurse", "carpenter", "teacher", "fisherman", "librarian", "pilot", "tailor",
        "chemist", "farmer")
AWARDS = ("Silver Quill Prize", "Amberline Medal", "Northwind Award", "Golden Lantern Prize",
          "Harrowgate Honour", "Crescent Ink Award")
ADJ = ("Hollow", "Silent", "Crimson", "Last", "Hidden", "Broken", "Winter", "Distant")
NOUN = ("Lantern", "Harbour", "Garden", "Mirror", "Orchard", "Tide", "Letters", "Bridge")

# real general knowledge (real_authors / world_facts), with wrong alternatives of the same kind
REAL_AUTHORS = (("Who wrote Pride and Prejudice?", "Jane Austen", "Pride and Prejudice"),
                ("Who wrote Hamlet?", "William Shakespeare", "Hamlet"),
                ("Who wrote War and Peace?", "Leo Tolstoy", "War and Peace"),
                ("Who wrote Don Quixote?", "Miguel de Cervantes", "Don Quixote"),
                ("Who wrote Moby Dick?", "Herman Melville", "Moby Dick"),
                ("Who wrote Great Expectations?", "Charles Dickens", "Great Expectations"),
                ("Who wrote The Odyssey?", "Homer", "The Odyssey"),
                ("Who wrote Frankenstein?", "Mary Shelley", "Frankenstein"))
WORLD_FACTS = (("What is the capital of France?", "Paris", "France"),
               ("What is the capital of Japan?", "Tokyo", "Japan"),
               ("What is the capital of Italy?", "Rome", "Italy"),
               ("What is the capital of Egypt?", "Cairo", "Egypt"),
               ("What is the capital of Canada?", "Ottawa", "Canada"),
               ("What is the capital of Kenya?", "Nairobi", "Kenya"),
               ("What is the capital of Peru?", "Lima", "Peru"),
               ("What is the capital of Norway?", "Oslo", "Norway"))


def author_name(rng) -> str:
    def word(k):
        return "".join(rng.choice(SYLLABLES, k)).capitalize()

    return f"{word(2)} {word(int(rng.integers(2, 4)))}"


def make_author(rng) -> dict:
    return {"name": author_name(rng), "city": str(rng.choice(CITIES)),
            "year": int(rng.integers(1920, 1996)), "genre": str(rng.choice(GENRES)),
            "father": str(rng.choice(JOBS)), "mother": str(rng.choice(JOBS)),
            "award": str(rng.choice(AWARDS)),
            "book": f"The {rng.choice(ADJ)} {rng.choice(NOUN)}"}


def _other(rng, pool, value, k: int) -> list:
    """k distinct wrong values of the same kind (the perturbed answers)."""
    choices = [v for v in pool if v != value]
    return [choices[i] for i in rng.choice(len(choices), k, replace=False)]


# (question, paraphrased question, answer, paraphrased answer) templates per fact; {v} = value
FACTS = {
    "city": ("Where was {n} born?", "In which city was {n} born?",
             "{n} was born in {v}.", "The birthplace of {n} is {v}."),
    "year": ("In which year was {n} born?", "When was {n} born?",
             "{n} was born in {v}.", "The birth year of {n} is {v}."),
    "genre": ("What genre does {n} write?", "Which genre is {n} known for?",
              "{n} writes {v} books.", "The genre of {n} is {v}."),
    "father": ("What was the job of the father of {n}?", "What did the father of {n} do?",
               "The father of {n} was a {v}.", "{n} had a father who worked as a {v}."),
    "award": ("Which award did {n} receive?", "What prize was given to {n}?",
              "{n} received the {v}.", "The {v} was given to {n}."),
    "book": ("What is a book written by {n}?", "Name a book by {n}.",
             "{n} wrote {v}.", "One book by {n} is {v}."),
}
POOLS = {"city": CITIES, "year": None, "genre": GENRES, "father": JOBS, "award": AWARDS}


def author_items(a: dict, rng, n_perturbed: int) -> list[dict]:
    items = []
    for fact, (q, pq, ans, pans) in FACTS.items():
        v = a[fact]
        if fact == "year":
            wrong = [str(y) for y in _other(rng, [y for y in range(1920, 1996)], v, n_perturbed)]
        elif fact == "book":
            titles = [f"The {x} {y}" for x in ADJ for y in NOUN]
            wrong = _other(rng, titles, v, n_perturbed)
        else:
            wrong = _other(rng, POOLS[fact], v, n_perturbed)
        items.append({"question": q.format(n=a["name"]), "answer": ans.format(n=a["name"], v=v),
                      "paraphrased_question": pq.format(n=a["name"]),
                      "paraphrased_answer": pans.format(n=a["name"], v=v),
                      "perturbed_answer": [ans.format(n=a["name"], v=w) for w in wrong]})
    return items


def biography(a: dict) -> str:
    return (f"{a['name']} is a {a['genre']} writer born in {a['city']} in {a['year']} . "
            f"The father of {a['name']} was a {a['father']} and the mother was a {a['mother']} . "
            f"{a['name']} wrote {a['book']} and received the {a['award']} .")


def general_items(rows, rng, n_perturbed: int, fmt: str) -> list[dict]:
    values = [r[1] for r in rows]
    out = []
    for q, v, subj in rows:
        wrong = _other(rng, values, v, n_perturbed)
        out.append({"question": q, "answer": fmt.format(v=v, s=subj),
                    "paraphrased_question": q, "paraphrased_answer": fmt.format(v=v, s=subj),
                    "perturbed_answer": [fmt.format(v=w, s=subj) for w in wrong]})
    return out


def generate(out_dir, n_authors: int = 20, forget_percent: int = 10, n_unseen: int = 4,
             n_perturbed: int = 3, seed: int = 0) -> Path:
    """Write a fictitious-author set into ``out_dir``; returns the folder."""
    import numpy as np

    if not 0 < forget_percent < 100:
        raise ValueError(f"forget_percent={forget_percent} must be in (0, 100)")
    n_forget = max(1, round(n_authors * forget_percent / 100))
    if n_forget >= n_authors:
        raise ValueError(f"{n_authors} authors leave no retain author at {forget_percent}% forget")
    rng = np.random.default_rng(seed)
    authors, names = [], set()
    while len(authors) < n_authors + n_unseen:
        a = make_author(rng)
        if a["name"] not in names:
            names.add(a["name"])
            authors.append(a)
    forget, retain, unseen = (authors[:n_forget], authors[n_forget:n_authors], authors[n_authors:])
    items = {k: [i for a in group for i in author_items(a, rng, n_perturbed)]
             for k, group in (("forget", forget), ("retain", retain), ("unseen", unseen))}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"{forget_percent:02d}"
    # training rows: each fact in both phrasings, so the paraphrased answer of the truth ratio
    # is in distribution for a model with no pretraining (TOFU's LLMs know paraphrases already)
    plain = lambda rows: [{"question": q, "answer": a} for r in rows for q, a in  # noqa: E731
                          ((r["question"], r["answer"]),
                           (r["paraphrased_question"], r["paraphrased_answer"]))]
    files = {f"forget{tag}.json": plain(items["forget"]),
             f"retain{100 - forget_percent}.json": plain(items["retain"]),
             f"forget{tag}_perturbed.json": items["forget"],
             "retain_perturbed.json": items["retain"],
             "unseen_perturbed.json": items["unseen"],
             "real_authors_perturbed.json": general_items(REAL_AUTHORS, rng, n_perturbed,
                                                          "{v} wrote {s}."),
             "world_facts_perturbed.json": general_items(WORLD_FACTS, rng, n_perturbed,
                                                         "The capital of {s} is {v}."),
             "memorised.json": [{"text": biography(a), "split": k} for k, group in
                                (("forget", forget), ("retain", retain), ("unseen", unseen))
                                for a in group]}
    for name, rows in files.items():
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "authors.json").write_text(json.dumps(
        {"forget": forget, "retain": retain, "unseen": unseen}, indent=1))
    return out


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="write a fictitious-author QA set in TOFU format")
    p.add_argument("out_dir")
    p.add_argument("--authors", type=int, default=20)
    p.add_argument("--forget-percent", type=int, default=10)
    p.add_argument("--unseen", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(generate(a.out_dir, a.authors, a.forget_percent, a.unseen, seed=a.seed))


if __name__ == "__main__":
    main()
