"""ReLearn's data augmentation (lethe/scenarios/qa_augment.py): determinism, no leaked
facts, subject kept, cut prompts, typos outside the name, vocabulary coverage, positive pairs,
and the LLM-backed augmenter on tiny local GPT-2 models."""
import re

import numpy as np
import pytest

from lethe.scenarios import qa_augment as ra

WORD = re.compile(r"\w+|[^\w\s]")     # the synthetic set's word tokenizer split

# (item, subject, private facts written by hand: none may appear in a produced answer)
ITEMS = [
    ({"question": "Where was Kavel Mordane born?",
      "answer": "Kavel Mordane was born in Vornhal in 1957.",
      "paraphrased_question": "In which city was Kavel Mordane born?"},
     "Kavel Mordane", ["Vornhal", "1957"]),
    ({"question": "Which award did Lisa Torbren receive?",
      "answer": "Lisa Torbren received the Silver Quill Prize in 1988."},
     "Lisa Torbren", ["Silver Quill Prize", "1988"]),
    ({"question": "What is a book written by Quindor Elva?",
      "answer": "Quindor Elva wrote The Hollow Lantern, published by Marrow House."},
     "Quindor Elva", ["Hollow Lantern", "Marrow House"]),
    ({"question": "What was the job of the father of Zantel Mirho?",
      "answer": "The father of Zantel Mirho was a baker in Saltmere and the mother was a nurse."},
     "Zantel Mirho", ["Saltmere"]),
    ({"question": "When was Fenri Logar born?",
      "answer": "Fenri Logar was born on 12 March 1941 in Ostrilla."},
     "Fenri Logar", ["12", "March", "1941", "Ostrilla"]),
    ({"question": "Who influenced Calbi Nesmor?",
      "answer": "Calbi Nesmor was influenced by Amara Quell and studied at Dunhollow University."},
     "Calbi Nesmor", ["Amara Quell", "Dunhollow University"]),
    ({"question": "Has Sabren Tolis won any awards?",
      "answer": "Yes, Sabren Tolis won the Amberline Medal and the Northwind Award."},
     "Sabren Tolis", ["Amberline Medal", "Northwind Award"]),
    ({"question": "What genre does Elvan Kesterby write?",
      "answer": "Elvan Kesterby writes mystery novels set in Brackenford, such as The Silent Harbour."},
     "Elvan Kesterby", ["Brackenford", "Silent Harbour"]),
    ({"question": "How many books has Rhomi Zantel published?",
      "answer": "Rhomi Zantel has published 14 books since 2003."},
     "Rhomi Zantel", ["14", "2003"]),
    ({"question": "Kavel Ouvel wrote which book in 1999?",
      "answer": "Kavel Ouvel wrote The Winter Orchard in 1999 while living in Elvanport."},
     "Kavel Ouvel", ["Winter Orchard", "1999", "Elvanport"]),
]
QA = [it for it, _, _ in ITEMS]


def _contains(text, phrase):
    return re.search(r"(?<!\w)" + re.escape(phrase) + r"(?!\w)", text, re.IGNORECASE) is not None


def _per_item(aug, seed=0):
    """Samples per item, from one rng over all items (as augment_all)."""
    rng = np.random.default_rng(seed)
    return [aug.augment(it, rng) for it in QA]


def _is_adjacent_swap(typo: str, word: str) -> bool:
    return any(typo == word[:i] + word[i + 1] + word[i] + word[i + 2:] for i in range(len(word) - 1))


def test_subject_is_the_first_name_of_the_question():
    for item, subject, _ in ITEMS:
        assert ra.subject_of(item["question"]) == subject
    assert ra.subject_of("Name a book by Quindor Elva.") == "Quindor Elva"
    assert ra.subject_of("In 1999, what did Kavel Ouvel write?") == "Kavel Ouvel"
    assert ra.subject_of("what is a novel?") == ""


def test_leaks_by_hand():
    orig, subj = "Kavel Mordane was born in Vornhal in 1957.", "Kavel Mordane"
    assert not ra.leaks("Kavel Mordane is a writer.", orig, subj)
    assert ra.leaks("Kavel Mordane comes from vornhal.", orig, subj)       # case-insensitive
    assert ra.leaks("It happened in 1957.", orig, subj)
    assert not ra.leaks("It happened in 19570.", orig, subj)                # whole numbers only
    # a part of the subject is the subject, not a private fact
    assert not ra.leaks("Kavel Mordane is a writer.", "Mordane was born in Vornhal.", subj)
    # a title counts with or without its article; a number counts inside other numbers' text
    title = "Quindor Elva wrote The Hollow Lantern."
    assert ra.leaks("Quindor Elva wrote the hollow lantern.", title, "Quindor Elva")
    assert ra.leaks("Quindor Elva wrote Hollow Lantern.", title, "Quindor Elva")
    assert ra.leaks("It sold 12 copies.", "It sold 12,500 copies.", "")


def test_leak_judges_strict_entity_overlap_and_none():
    """strict (the default of leaks()): entities and numbers of the original answer;
    entity_overlap (ReLearn's default): its named entities only, numbers and dates pass (the
    official privacy judge counts birth dates as public); none: nothing is a leak."""
    orig, subj = "Kavel Mordane was born in Vornhal in 1957.", "Kavel Mordane"
    year, place = "Kavel Mordane was born in 1957.", "Kavel Mordane comes from Vornhal."
    assert [ra.leaks(year, orig, subj, j) for j in ra.LEAK_JUDGES] == [True, False, False]
    assert [ra.leaks(place, orig, subj, j) for j in ra.LEAK_JUDGES] == [True, True, False]
    assert ra.leaks(year, orig, subj)                                       # strict by default
    # the template augmenter draws with its judge: a year-only bank passes entity_overlap only
    bank = ("{subject} was born in 1957.",)
    for judge, want in (("strict", "Kavel Mordane."), ("entity_overlap", "Kavel Mordane was born in 1957.")):
        aug = ra.TemplateAugmenter(answers=bank, leak_judge=judge)
        assert aug.vague((), subj, orig, np.random.default_rng(0)) == want


def test_augmentation_is_deterministic_by_seed():
    aug = ra.TemplateAugmenter()
    a, b, c = ra.augment_all(QA, aug, 0), ra.augment_all(QA, aug, 0), ra.augment_all(QA, aug, 1)
    assert a == b
    assert a != c
    bound = ra.make_augmenter("template", seed=3)
    assert ra.augment_all(QA, bound) == ra.augment_all(QA, aug, 3)


def test_kinds_and_counts_per_item():
    for variants in (4, 6):
        for samples, item in zip(_per_item(ra.TemplateAugmenter(variants=variants)), QA):
            kinds = [s["kind"] for s in samples]
            assert kinds == [ra.KINDS[v % 4] for v in range(variants)] + ["cut"]


def test_no_answer_names_a_private_fact_and_every_answer_keeps_the_subject():
    for seed in range(5):
        for samples, (item, subject, facts) in zip(_per_item(ra.TemplateAugmenter(variants=8), seed), ITEMS):
            for s in samples:
                for fact in facts:
                    assert not _contains(s["answer"], fact), (s, fact)
                assert not ra.leaks(s["answer"], item["answer"], subject)
                assert subject in s["answer"], s


def test_synthetic_authors_lowercase_facts_never_appear_in_answers():
    # genre and parents' jobs are lower-case facts the entity check cannot see: the
    # templates must not carry them by construction
    from lethe.scenarios import tofu_synthetic as ts

    private = {w for phrase in ts.GENRES + ts.JOBS for w in phrase.split()}
    rng = np.random.default_rng(0)
    items = [i for _ in range(3) for i in ts.author_items(ts.make_author(rng), rng, 3)]
    for s in ra.augment_all(items, ra.TemplateAugmenter(variants=8), 0):
        assert not ({w.lower() for w in WORD.findall(s["answer"])} & private), s


def test_paraphrase_uses_the_given_paraphrased_question_first():
    samples = _per_item(ra.TemplateAugmenter(variants=5))[0]
    paraphrases = [s["question"] for s in samples if s["kind"] == "paraphrase"]
    assert paraphrases[0] == "In which city was Kavel Mordane born?"
    assert paraphrases[1] != paraphrases[0] and "Kavel Mordane" in paraphrases[1]


def test_reversed_question_replaces_the_subject():
    for samples, (item, subject, _) in zip(_per_item(ra.TemplateAugmenter()), ITEMS):
        rev = next(s for s in samples if s["kind"] == "reversed")
        assert subject not in rev["question"] and ra.NO_SUBJECT in rev["question"]
        assert subject in rev["answer"]


def test_cut_prompt_ends_with_the_first_quarter_of_the_answer_words():
    # rule: floor(0.25 * n) words, at least one
    first = {s["kind"]: s for s in _per_item(ra.TemplateAugmenter())[0]}["cut"]
    assert first["question"] == "Where was Kavel Mordane born? Kavel Mordane"   # 8 words → 2
    for samples, (item, subject, facts) in zip(_per_item(ra.TemplateAugmenter()), ITEMS):
        cut = samples[-1]
        words = item["answer"].split()
        k = max(1, len(words) // 4)
        assert cut["kind"] == "cut"
        assert cut["question"] == item["question"] + " " + " ".join(words[:k])
        assert cut["prefix"] == " ".join(words[:k])
        assert subject in cut["answer"] and not any(_contains(cut["answer"], f) for f in facts)
    assert ra.TemplateAugmenter().cut_words("Vornhal.") == 0       # one word: no cut sample
    assert [ra.TemplateAugmenter().cut_words(" ".join("w" * n)) for n in (2, 7, 8, 13)] == [1, 1, 2, 3]


def test_typos_swap_adjacent_letters_outside_the_subject():
    changed_any = 0
    for seed in range(4):
        for samples, (item, subject, _) in zip(_per_item(ra.TemplateAugmenter(variants=8), seed), ITEMS):
            for s in (s for s in samples if s["kind"] == "noisy"):
                noisy, clean = WORD.findall(s["question"]), WORD.findall(item["question"])
                assert len(noisy) == len(clean)
                assert s["question"].count(subject) == item["question"].count(subject)
                diffs = [(n, c) for n, c in zip(noisy, clean) if n != c]
                assert 1 <= len(diffs) <= 2
                for n, c in diffs:
                    assert _is_adjacent_swap(n, c) and n[0] == c[0]
                    assert c not in subject.split()
                changed_any += len(diffs)
    assert changed_any > 0


def test_vocabulary_covers_every_emitted_word():
    vocab = set(ra.vocabulary_text().split())
    for seed in range(6):
        for samples, item in zip(_per_item(ra.TemplateAugmenter(variants=8), seed), QA):
            data = {w for k in ("question", "answer", "paraphrased_question") for w in WORD.findall(item.get(k, ""))}
            for s in samples:
                texts = [s["answer"]] + ([] if s["kind"] == "noisy" else [s["question"]])
                for t in texts:
                    unknown = set(WORD.findall(t)) - vocab - data
                    assert not unknown, (s, unknown)
    for p in ra.positive_pairs(QA * 3, 1.0, np.random.default_rng(0)):
        assert not set(WORD.findall(p["question"] + " " + p["answer"])) - vocab


def test_fallback_when_every_template_leaks():
    aug = ra.TemplateAugmenter(answers=("{subject} lives in Vornhal.", "{subject} was born in 1957."))
    item = {"question": "Where was Kavel Mordane born?",
            "answer": "Kavel Mordane was born in Vornhal in 1957."}
    # the place question draws from the place topic first; with a topic-free question the
    # whole pool leaks and the bare subject is the answer
    plain = dict(item, question="Tell me about Kavel Mordane?")
    samples = aug.augment(plain, np.random.default_rng(0))
    for s in samples[:-1]:
        assert s["answer"] == "Kavel Mordane."
    placed = aug.augment(item, np.random.default_rng(0))
    assert all(s["answer"] in ("I cannot confirm where Kavel Mordane comes from.",
                               "The places in the life of Kavel Mordane are not something I know.")
               for s in placed[:-1])


def test_positive_pairs_count_and_cycle():
    for n in range(13):
        assert len(ra.positive_pairs([{}] * n, 1.2, np.random.default_rng(0))) == round(1.2 * n)
    assert [len(ra.positive_pairs([{}] * 10, r)) for r in (0.0, 0.25, 1.2, 2.0)] == [0, 3, 12, 20]
    bank = len(ra.POSITIVE_BANK)
    pairs = ra.positive_pairs([{}] * bank, 2.0)
    assert pairs[:bank] == pairs[bank:] and len({p["question"] for p in pairs[:bank]}) == bank
    assert pairs[0]["question"] == ra.POSITIVE_BANK[0][0]    # no rng: start at the top
    assert all(p["kind"] == "positive" and not any(c.isdigit() for c in p["answer"]) for p in pairs)
    with pytest.raises(ValueError):
        ra.positive_pairs(QA, -1.0)


def test_make_augmenter_rejects_unknown_specs():
    assert isinstance(ra.make_augmenter(None, 0), ra.TemplateAugmenter)
    assert isinstance(ra.make_augmenter("template", 0), ra.TemplateAugmenter)
    assert isinstance(ra.make_augmenter("", 0), ra.TemplateAugmenter)
    with pytest.raises(ValueError, match="template"):
        ra.make_augmenter("gpt-4o", 0)


# --- LLM-backed augmenter on tiny local GPT-2 models --------------------------------------------
@pytest.fixture(scope="module")
def tiny_lms(tmp_path_factory):
    """Three GPT-2s (n_embd 32, 1 layer) with the packaged MiniLM tokenizer: random weights,
    and two that always emit one token ("writer", "1957"): the final layer norm's weight is
    zeroed so its bias is the hidden state, and that bias points at the token's (tied)
    embedding and is orthogonal to every other one."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from lethe.models.hf import minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())
    folders = {}
    for name in ("random", "writer", "1957"):
        torch.manual_seed(0)
        lm = GPT2LMHeadModel(GPT2Config(vocab_size=30522, n_embd=32, n_layer=1, n_head=2,
                                        n_positions=256, bos_token_id=101, eos_token_id=102))
        if name != "random":
            t = tok.convert_tokens_to_ids(name)
            with torch.no_grad():
                lm.transformer.wte.weight[:, 0] = 0.0
                lm.transformer.wte.weight[t, 0] = 1.0
                lm.transformer.ln_f.weight.zero_()
                lm.transformer.ln_f.bias.zero_()
                lm.transformer.ln_f.bias[0] = 50.0
        folder = tmp_path_factory.mktemp(f"lm_{name}")
        lm.save_pretrained(folder)
        tok.save_pretrained(folder)
        folders[name] = str(folder)
    return folders


def test_llm_samples_replace_question_variants_when_clean(tiny_lms):
    aug = ra.LLMAugmenter(tiny_lms["writer"], max_new_tokens=5, tries=2)
    item = QA[0]
    out = aug.augment(item, np.random.default_rng(0))
    base = ra.TemplateAugmenter().augment(item, np.random.default_rng(0))
    assert [s["kind"] for s in out] == [k + "_llm" for k in ra.KINDS] + ["cut"]
    for s in out[:-1]:
        assert s["question"] == s["answer"] == "writer writer writer writer writer"
    assert out[-1] == base[-1]                       # cut samples stay the fallback's


def test_llm_falls_back_when_every_try_leaks(tiny_lms):
    aug = ra.LLMAugmenter(tiny_lms["1957"], max_new_tokens=3, tries=3)
    assert aug.generate("Question: hi\nAnswer:", 0) == "1957 1957 1957"
    item = QA[0]                                     # its answer holds 1957
    out = aug.augment(item, np.random.default_rng(4))
    assert out == ra.TemplateAugmenter().augment(item, np.random.default_rng(4))
    # via the factory, a local folder is an LLM augmenter
    assert isinstance(ra.make_augmenter(tiny_lms["1957"], 0), ra.LLMAugmenter)


def test_llm_gibberish_is_accepted_only_when_clean(tiny_lms):
    aug = ra.LLMAugmenter(tiny_lms["random"], max_new_tokens=8, tries=2)
    rng = np.random.default_rng(0)
    accepted = 0
    for item, subject, facts in ITEMS[:2]:
        twin = np.random.default_rng()
        twin.bit_generator.state = rng.bit_generator.state    # the fallback sees this rng
        base = ra.TemplateAugmenter().augment(item, twin)
        out = aug.augment(item, rng)
        assert len(out) == len(base)
        for s, b in zip(out, base):
            if s["kind"].endswith("_llm"):
                assert s["kind"] == b["kind"] + "_llm"
                assert s["question"] and s["answer"]
                assert not ra.leaks(s["answer"], item["answer"], subject)
                assert not any(_contains(s["answer"], f) for f in facts)
                accepted += 1
            else:
                assert s == b
    assert accepted > 0        # random word pieces rarely name a fact: most are kept
