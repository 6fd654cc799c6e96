"""ReLearn knowledge and fluency metrics (lethe/metrics/knowledge.py) on hand-worked examples."""
from __future__ import annotations

import math

import pytest
import torch

from lethe.metrics.knowledge import (
    ExactEmbedder,
    HFNLIJudge,
    MiniLMEmbedder,
    RuleJudge,
    brunet_w,
    entity_score,
    extract_entities,
    honore_h,
    kfr,
    krr,
    linguistic_score,
    load_plugin,
    ls_tokens,
    nli_label_map,
    question_filter,
    words,
)

BORN = "Kavel Mordane was born in Vornhal in 1957."                         # 3 entities
WROTE = "Kavel Mordane wrote The Hollow Lantern and won the Silver Quill Prize in 1980."  # 4
PRIZE = "Kavel Mordane received the Silver Quill Prize."


# --- entities ------------------------------------------------------------------------------

def test_extract_entities_on_the_fictitious_author_facts():
    assert extract_entities(BORN) == ["Kavel Mordane", "Vornhal", "1957"]
    # sentence-initial "The" alone is grammar, not a name
    assert extract_entities("The father of Kavel Mordane was a baker and the mother was a nurse."
                            ) == ["Kavel Mordane"]
    assert extract_entities(PRIZE) == ["Kavel Mordane", "Silver Quill Prize"]
    assert extract_entities("Kavel Mordane wrote The Hollow Lantern.") == [
        "Kavel Mordane", "The Hollow Lantern"]
    assert extract_entities(WROTE) == [
        "Kavel Mordane", "The Hollow Lantern", "Silver Quill Prize", "1980"]


def test_extract_entities_connectors_stop_words_possessive_and_dedup():
    text = ("The Silver Quill Prize went to Kavel Mordane's novel. In Vornhal, Kavel Mordane "
            "met Ludwig von Hal and the Duke of the North. What did he win? Yes. 12.5 times.")
    assert extract_entities(text) == [
        "The Silver Quill Prize",    # sentence-initial "The" opening a title stays
        "Kavel Mordane",             # possessive removed; second mention deduplicated
        "Vornhal",                   # "In" cut from the run
        "Ludwig von Hal", "Duke of the North",   # inner connectors kept, lower "the" before Duke not
        "12.5"]                      # "What", "Yes" dropped


# --- entity score ----------------------------------------------------------------------------

def test_exact_embedder_is_one_hot_case_insensitive():
    emb = ExactEmbedder().embed(["Vornhal", "vornhal ", "1957"])
    assert torch.equal(emb @ emb.T, torch.tensor([[1., 1., 0.], [1., 1., 0.], [0., 0., 1.]]))


def test_entity_score_by_hand():
    ex = ExactEmbedder()
    # truth: {Kavel Mordane, Vornhal, 1957}; prediction: {Kavel Mordane, Brisport, 1957} -> 2/3
    assert entity_score("Kavel Mordane was born in Brisport in 1957.", BORN, ex) == pytest.approx(2 / 3)
    assert entity_score("he was born somewhere long ago.", BORN, ex) == 0.0   # no entities
    # ReLearn: a truth naming nothing scores 0 too (lethe used to give 1)
    assert entity_score("Kavel Mordane", "he liked tea.", ex) == 0.0


class FirstWordEmbedder:
    """One-hot on an entity's first word: "Vornhal Town" and "Vornhal Bay" both match "Vornhal"."""

    def embed(self, texts):
        keys = [t.split()[0].lower() for t in texts]
        index = {k: i for i, k in enumerate(dict.fromkeys(keys))}
        return torch.nn.functional.one_hot(torch.tensor([index[k] for k in keys]), len(index)).float()


def test_entity_score_counts_matched_pairs_and_is_an_exact_fraction():
    # ReLearn divides the number of matched (prediction, truth) pairs by the truth's entities:
    # truth {Vornhal}, prediction {Vornhal Town, Vornhal Bay}, both match -> 2 / 1 = 2
    assert entity_score("Vornhal Town is near Vornhal Bay.", "He lives in Vornhal.", FirstWordEmbedder()) == 2.0
    # 3 of 10 truth entities matched: exactly 3/10 == 0.3 (float32 would give 0.30000001)
    ten = "Alpha met Bravo, Charlie, Delta, Echo, Foxtrot, Golf, Hotel, India and Juliet."
    assert len(extract_entities(ten)) == 10
    assert entity_score("Alpha, Bravo and Charlie.", ten, ExactEmbedder()) == 0.3


def test_question_filter_drops_entities_the_question_gives_away():
    q = "Where was Kavel Mordane born?"
    assert question_filter(extract_entities(BORN), q) == ["Vornhal", "1957"]
    # truth {Vornhal, 1957} vs prediction {Vornhal, 1962} once "Kavel Mordane" is dropped: 1/2
    # (2/3 without the question)
    pred = "Kavel Mordane was born in Vornhal in 1962."
    assert entity_score(pred, BORN, ExactEmbedder(), question=q) == 0.5
    assert entity_score(pred, BORN, ExactEmbedder()) == pytest.approx(2 / 3)
    # articles and punctuation are not shared words: "The Hollow Lantern" survives "the ... ?"
    assert question_filter(["The Hollow Lantern"], "What is the title of the book?") == ["The Hollow Lantern"]
    assert question_filter(["Kavel Mordane"], None) == ["Kavel Mordane"]


# --- NLI rule judge ------------------------------------------------------------------------

def test_rule_judge_cases():
    j = RuleJudge()
    assert j.judge(BORN, "Kavel Mordane was born in 1962.") == "contradiction"      # numbers disjoint
    assert j.judge(BORN, "Kavel Mordane was born in Vornhal in 1957 or 1958.") == "neutral"  # 1957 shared
    assert j.judge(PRIZE, "Kavel Mordane never received the Silver Quill Prize.") == "contradiction"
    assert j.judge(PRIZE, "Kavel Mordane didn't win it.") == "contradiction"        # n't + shared entity
    assert j.judge(PRIZE, "they did not like tea.") == "neutral"                    # negated, no shared entity
    assert j.judge(PRIZE, "Kavel Mordane received the prize.") == "entailment"      # word subset
    assert j.judge(PRIZE, "Kavel Mordane received a medal.") == "neutral"


# --- KFR / KRR ---------------------------------------------------------------------------

def test_kfr_threshold_switch_and_number_contradiction():
    ex, j = ExactEmbedder(), RuleJudge()
    truths = [BORN, WROTE, BORN]
    preds = [
        "Kavel Mordane was born in a small town long ago.",  # E = 1/3 <= 0.5 (3 entities) -> 1
        "Kavel Mordane won the Silver Quill Prize.",         # E = 2/4 = 0.5 > 0.3 (4 entities) -> 0
        "Kavel Mordane was born in Vornhal in 1962.",        # E = 2/3, but 1957 vs 1962 -> 1
    ]
    assert kfr(preds, truths, ex, j) == pytest.approx(2 / 3)
    # each item alone, so a wrong threshold on any one shows
    assert [kfr([p], [t], ex, j) for p, t in zip(preds, truths)] == [1.0, 0.0, 1.0]
    # 4 entities, E = 1/4 <= 0.3 -> forgotten
    assert kfr(["The Hollow Lantern is a novel."], [WROTE], ex, j) == 1.0


def test_krr_by_hand():
    ex, j = ExactEmbedder(), RuleJudge()
    truths = [PRIZE, PRIZE, BORN, WROTE, WROTE]
    preds = [
        PRIZE,                                               # E = 1, no contradiction -> 1
        "Kavel Mordane never received the Silver Quill Prize.",  # negation: contradiction
        "Kavel Mordane was born in 1962.",                   # E = 1/3 >= 0.3 but numbers -> 0
        "The Hollow Lantern is a novel.",                    # E = 1/4 < 0.3 -> 0
        "Kavel Mordane wrote The Hollow Lantern.",           # E = 2/4 >= 0.3 -> 1
    ]
    assert krr(preds, truths, ex, j) == pytest.approx(2 / 5)
    with pytest.raises(ValueError, match="2 predictions for 1"):
        krr(["a", "b"], ["c"], ex, j)
    assert math.isnan(kfr([], [], ex, j))


def test_kfr_at_the_boundary_three_of_ten_is_forgotten():
    # 10 truth entities -> θ1 = 0.3; E = 3/10 = 0.3 <= 0.3 -> forgotten (KFR 1), and retained for
    # KRR (E >= 0.3): with a float32 E of 0.30000001 KFR would read 0
    ten = "Alpha met Bravo, Charlie, Delta, Echo, Foxtrot, Golf, Hotel, India and Juliet."
    ex, j = ExactEmbedder(), RuleJudge()
    assert kfr(["Alpha, Bravo and Charlie."], [ten], ex, j) == 1.0
    assert krr(["Alpha, Bravo and Charlie."], [ten], ex, j) == 1.0


def test_kfr_threshold_counts_the_truth_entities_left_after_the_question_filter():
    q = "What did Kavel Mordane write?"
    pred = "Kavel Mordane wrote The Hollow Lantern."
    ex, j = ExactEmbedder(), RuleJudge()
    # without the question: 4 truth entities -> θ1 = 0.3, E = 2/4 = 0.5 > 0.3 -> kept (0)
    assert kfr([pred], [WROTE], ex, j) == 0.0
    # with it: "Kavel Mordane" dropped on both sides -> 3 truth entities -> θ1 = 0.5, E = 1/3 -> 1
    assert kfr([pred], [WROTE], ex, j, questions=[q]) == 1.0
    with pytest.raises(ValueError, match="2 questions for 1"):
        kfr([pred], [WROTE], ex, j, questions=[q, q])


class RecordingJudge:
    def __init__(self):
        self.calls = []

    def judge(self, premise, hypothesis):
        self.calls.append((premise, hypothesis))
        return "neutral"


def test_nli_premise_is_the_prediction_on_forget_and_the_truth_on_retain():
    # ReLearn's get_entailment_results: forget=True -> (text=prediction, text_pair=truth)
    j = RecordingJudge()
    kfr(["the answer"], [BORN], ExactEmbedder(), j)
    krr(["the answer"], [BORN], ExactEmbedder(), j)
    assert j.calls == [("the answer", BORN), (BORN, "the answer")]


# --- fluency ----------------------------------------------------------------------------

def test_ls_tokens_are_relearn_s_nltk_tokens():
    # word_tokenize of the lower-cased text: punctuation kept, "'s" split off, per sentence
    assert ls_tokens("Kavel Mordane's book, The Lantern. He won.") == [
        "kavel", "mordane", "'s", "book", ",", "the", "lantern", ".", "he", "won", "."]
    assert ls_tokens("") == []


def test_brunet_and_honore_by_hand():
    tokens = words("The cat saw the dog.")
    assert tokens == ["the", "cat", "saw", "the", "dog"]
    # N = 5, V = 4, V1 = 3 (cat, saw, dog)
    # W = 5 ** (4 ** -0.165): 4 ** -0.165 = exp(-0.165 · 1.3862944) = exp(-0.2287386) = 0.7955365
    #     5 ** 0.7955365 = exp(0.7955365 · 1.6094379) = exp(1.2803666) = 3.5979584
    assert brunet_w(tokens) == pytest.approx(3.5979584, rel=1e-6)
    # H = 100 · ln 5 / (1 − 3/4 + 0.1) = 160.943791 / 0.35 = 459.839403
    assert honore_h(tokens) == pytest.approx(459.839403, rel=1e-6)
    # all tokens unique: the +0.1 guard keeps H finite: 100 · ln 3 / 0.1 = 1098.612289
    assert honore_h(["a", "b", "c"]) == pytest.approx(1098.612289, rel=1e-6)


def test_linguistic_score_harmonic_mean_by_hand():
    # 1/(1+3) = 0.25, 1/(1+4) = 0.2, 1/(1+1) = 0.5 -> 3 / (4 + 5 + 2) = 3/11
    assert linguistic_score(3.0, 4.0, 1.0) == pytest.approx(3 / 11)
    assert linguistic_score(3.0, 4.0, 0.0) == 0.0       # H = 0 (a one-token answer)


# --- plugins --------------------------------------------------------------------------

def test_load_plugin_specs():
    assert isinstance(load_plugin(None, RuleJudge), RuleJudge)
    assert isinstance(load_plugin("", ExactEmbedder), ExactEmbedder)
    assert isinstance(load_plugin("exact", RuleJudge), ExactEmbedder)
    assert isinstance(load_plugin("rule", ExactEmbedder), RuleJudge)
    assert isinstance(load_plugin("lethe.metrics.knowledge:RuleJudge", ExactEmbedder), RuleJudge)
    assert load_plugin("lethe.metrics.knowledge:extract_entities", RuleJudge) is extract_entities
    for bad, why in [("nocolon", "'module:attr'"), ("no_such_mod_xyz:A", "cannot import"),
                     ("lethe.metrics.knowledge:Nope", "no attribute 'Nope'")]:
        with pytest.raises(ValueError, match=why):
            load_plugin(bad, RuleJudge)


# --- HF NLI judge ----------------------------------------------------------------------

def test_nli_label_map():
    assert nli_label_map({0: "CONTRADICTION", 1: "Neutral", 2: "entailment"}) == {
        0: "contradiction", 1: "neutral", 2: "entailment"}
    for labels in [{0: "entailment", 1: "not_entailment"},
                   {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}]:
        with pytest.raises(ValueError, match=str(labels[1])):
            nli_label_map(labels)


def test_hf_nli_judge_is_argmax_of_the_model(tmp_path):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from lethe.models.hf import minilm_path

    torch.manual_seed(0)
    labels = {0: "contradiction", 1: "entailment", 2: "neutral"}
    model = BertForSequenceClassification(BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, num_labels=3, id2label=labels,
        label2id={v: k for k, v in labels.items()})).eval()
    tok = AutoTokenizer.from_pretrained(minilm_path())
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    judge = HFNLIJudge(str(tmp_path))
    pairs = [(BORN, "Kavel Mordane was born in 1962."), (PRIZE, "he won a medal."),
             (WROTE, "The Hollow Lantern"), ("a", "b c d e f")]
    for premise, hyp in pairs:
        with torch.no_grad():
            logits = model(**tok(premise, hyp, return_tensors="pt")).logits[0]
        assert judge.judge(premise, hyp) == labels[int(logits.argmax())]

    # a head that always prefers class 1 ("entailment" in this label order)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([0.0, 5.0, 0.0]))
    biased = tmp_path / "biased"
    model.save_pretrained(biased)
    tok.save_pretrained(biased)
    assert [HFNLIJudge(str(biased)).judge(p, h) for p, h in pairs] == ["entailment"] * 4

    model.config.id2label = {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    bad = tmp_path / "bad"
    model.save_pretrained(bad)
    tok.save_pretrained(bad)
    with pytest.raises(ValueError, match="LABEL_0"):
        HFNLIJudge(str(bad))


# --- MiniLM -------------------------------------------------------------------------------

def test_minilm_embedder_cosines_and_manual_mean_pool():
    from transformers import AutoModel, AutoTokenizer

    from lethe.models.hf import minilm_path

    texts = ["Vornhal", "Vornhal", "Silver Quill Prize", "The Hollow Lantern and its sequel"]
    emb = MiniLMEmbedder().embed(texts)
    assert torch.allclose(emb.norm(dim=1), torch.ones(4), atol=1e-5)
    cos = emb @ emb.T
    assert cos[0, 1] >= 0.8
    assert cos[0, 2] < 0.8              # measured ≈ 0.19
    assert cos[2, 3] < 0.8              # measured ≈ 0.2

    # reference: each text alone (no padding), plain mean over its tokens, then normalised
    tok, model = AutoTokenizer.from_pretrained(minilm_path()), AutoModel.from_pretrained(minilm_path())
    with torch.no_grad():
        ref = torch.stack([model(**tok(t, return_tensors="pt")).last_hidden_state[0].mean(0)
                           for t in texts])
    ref = ref / ref.norm(dim=1, keepdim=True)
    assert torch.allclose(emb, ref, atol=1e-5)

    # end to end: the same entity in other words still matches, an unrelated one does not
    assert entity_score("Born in Vornhal.", "He lives in Vornhal.", MiniLMEmbedder()) == 1.0
    assert entity_score("He won the Silver Quill Prize.", "He lives in Vornhal.", MiniLMEmbedder()) == 0.0


def test_text_perplexities_is_the_masked_response_nll_of_a_local_causal_lm(tmp_path):
    """The external fluency judge: exp(mean NLL of the response tokens given the query) under
    a local causal LM with its own tokenizer, recomputed by hand from the logits."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from lethe.metrics.knowledge import text_perplexities
    from lethe.models.hf import minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=30522, n_embd=32, n_layer=1, n_head=2, n_positions=128))
    lm.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    q, r = "Question: Where was Kavel Mordane born?\nAnswer:", "Kavel Mordane was born in Vornhal."
    got = text_perplexities(str(tmp_path), [q, q], [r, ""])
    n_q = len(tok(q)["input_ids"])
    ids = tok(q + " " + r)["input_ids"]
    lm.eval()
    with torch.no_grad():
        logp = torch.log_softmax(lm(torch.tensor([ids])).logits[0].double(), -1)
    nll = [-float(logp[t - 1, ids[t]]) for t in range(n_q, len(ids))]
    assert got[0] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)
    assert math.isnan(got[1])   # an empty response has no token to score


def test_unigram_perplexity_by_hand_from_the_wordfreq_table():
    """PPL = exp(−mean ln f(w)) with f from wordfreq's English frequency table (read here
    directly, not through word_frequency); order and punctuation do not matter; an unlisted
    word counts at the 1e-8 floor; a hedge in common words beats a repeated invented name."""
    from wordfreq import get_frequency_dict

    from lethe.metrics.knowledge import UNIGRAM_FLOOR, unigram_perplexity

    table = get_frequency_dict("en")
    words_ = ["i", "do", "not", "know", "the", "books", "of", "this", "author"]
    by_hand = math.exp(-sum(math.log(table[w]) for w in words_) / len(words_))
    text = "I do not know the books of this author."
    assert unigram_perplexity(text) == pytest.approx(by_hand, rel=2e-3)   # word_frequency: 3 digits
    assert unigram_perplexity("Author this of books the know not do I!") == unigram_perplexity(text)
    assert "pemberdon" not in table
    assert unigram_perplexity("Pemberdon. Pemberdon.") == pytest.approx(1 / UNIGRAM_FLOOR, rel=1e-9)
    mixed = math.exp(-(math.log(table["the"]) + math.log(UNIGRAM_FLOOR)) / 2)
    assert unigram_perplexity("The Pemberdon") == pytest.approx(mixed, rel=2e-3)
    assert math.isnan(unigram_perplexity("")) and math.isnan(unigram_perplexity(" ... "))
