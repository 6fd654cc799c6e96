"""LLM unlearning on a generated TOFU-style stream (grad_ascent, grad_diff, loku, relearn):
each mechanism checked against an independent computation — the SGD step against autograd's
gradient of −NLL, the grad_diff objective against a hand-summed NLL, LoKU's merged weights
against residual + s·B·A of the trained adapters, ReLearn's KL against the reference model and
its augmented rows against the generated authors' facts, stop_at_target against memorisation
accuracy computed with this file's own teacher-forced argmax."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from lethe import registry  # noqa: E402
from lethe.errors import RunError  # noqa: E402
from lethe.methods.base import MethodContext  # noqa: E402
from lethe.methods.relearn import RelearnConfig  # noqa: E402
from lethe.platform.config import load_config  # noqa: E402
from lethe.platform.runner import build_components  # noqa: E402

# 6 authors (1 forgotten: 12 QA rows + 1 biography), 2 unseen, a Llama of width 32
TINY = ["scenario.authors=6", "scenario.forget_percent=17", "scenario.forget_split=forget17",
        "scenario.unseen_authors=2", "model.d_model=32", "model.heads=4", "device=cpu",
        "train.epochs=10", "train.lr=0.005", "method.stop_at_target=false"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """The stream and a model fine-tuned on it by the method's own learn (shared, never mutated)."""
    cache = tmp_path_factory.mktemp("tofu")
    cfg = load_config("ga_tofu_synthetic", TINY + [f"scenario.cache_dir={cache}"])
    torch.manual_seed(cfg.seed)
    stream, model, entry = build_components(cfg)
    method = entry.obj(cfg.method, model, MethodContext(train=cfg.train, device=CPU, stream=stream,
                                                       seed=cfg.seed))
    method.learn(stream.experiences[0])
    folder = next(p for p in cache.iterdir() if (p / "authors.json").exists())
    return {"stream": stream, "model": method.model.eval(), "cache": cache, "folder": folder}


def make(learned, preset, overrides=()):
    """A fresh method of ``preset`` on a copy of the fine-tuned model, sharing the stream."""
    cfg = load_config(preset, TINY + [f"scenario.cache_dir={learned['cache']}", *overrides])
    entry = registry.get("methods", cfg.method.name)
    entry.obj.check_stream(cfg.method, learned["stream"], cfg.seed)
    ctx = MethodContext(train=cfg.train, device=CPU, stream=learned["stream"], seed=cfg.seed)
    return entry.obj(cfg.method, copy.deepcopy(learned["model"]), ctx)


def request_of(stream):
    return next(e.request for e in stream.experiences if e.request is not None)


def forget_rows(stream):
    req = request_of(stream)
    gone = torch.isin(stream.train.ids, torch.as_tensor(req.sample_ids))
    return stream.train.x[gone], stream.train.y[gone], gone


def params(module) -> dict:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def my_nll(model, x, y):
    """Mean NLL of the counted tokens, by gather over log-softmax (not cross_entropy)."""
    logp = torch.log_softmax(model.lm(input_ids=x).logits.double(), -1)      # [B, L, V]
    mask = y != -100
    picked = logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(picked * mask).sum() / mask.sum()


def model_at(template, weights):
    m = copy.deepcopy(template)
    m.load_state_dict(weights)
    return m


def spy_steps(method):
    """Record, for every unlearning step, the weights it starts from, its batches and its loss."""
    steps, inner = [], method.unlearn_loss

    def spy(fx, fy, rx, ry):
        loss = inner(fx, fy, rx, ry)
        steps.append({"w": params(method.model), "fx": fx, "fy": fy, "rx": rx, "ry": ry,
                      "loss": float(loss.detach())})
        return loss

    method.unlearn_loss = spy
    return steps


def my_ma(model, items, tok):
    """Memorisation accuracy: per item, the share of answer tokens (and <eos>) that the
    teacher-forced argmax predicts, one unpadded sequence at a time; mean over items."""
    accs = []
    model.eval()
    with torch.no_grad():
        for it in items:
            prompt = tok.encode(f"Question: {it['question']}\nAnswer:")
            answer = tok.encode(" " + it["answer"]) + [tok.eos]
            seq = torch.tensor([prompt + answer])
            pred = model.lm(input_ids=seq[:, :-1]).logits[0].argmax(-1)
            hits = [int(pred[len(prompt) - 1 + j]) == a for j, a in enumerate(answer)]
            accs.append(sum(hits) / len(hits))
    return sum(accs) / len(accs)


# --- grad_ascent ---------------------------------------------------------------------------------

def test_grad_ascent_sgd_steps_are_the_negative_nll_gradient_with_momentum_09(learned):
    stream = learned["stream"]
    eta = 0.05
    m = make(learned, "ga_tofu_synthetic", ["method.optimizer=sgd", f"method.lr={eta}",
                                            "method.epochs=2", "method.batch_size=64"])
    steps = spy_steps(m)
    m.unlearn(request_of(stream))
    final = params(m.model)
    assert len(steps) == 2 and m.unlearn_stats()["unlearn_steps"] == 2
    fx, fy, _ = forget_rows(stream)
    # batch ≥ forget rows: every step sees the whole forget set (in a shuffled order)
    for s in steps:
        assert sorted(map(tuple, s["fx"].tolist())) == sorted(map(tuple, fx.tolist()))

    def grad_of_nll(weights):
        copy_ = model_at(learned["model"], weights)
        names = [n for n, _ in copy_.named_parameters()]
        grads = torch.autograd.grad(my_nll(copy_, fx, fy), list(copy_.parameters()))
        return dict(zip(names, (g.float() for g in grads)))

    g0 = grad_of_nll(steps[0]["w"])
    g1 = grad_of_nll(steps[1]["w"])
    w0, w1 = steps[0]["w"], steps[1]["w"]
    for n in w0:
        # step 1 (momentum buffer = gradient of −NLL = −g0): w1 = w0 + η·g0
        scale = float((eta * g0[n]).abs().max()) + 1e-12
        assert torch.allclose(w1[n], w0[n] + eta * g0[n], atol=1e-4 * scale + 1e-7), n
        # step 2: buffer = 0.9·(−g0) + (−g1), w2 = w1 − η·buffer
        expect = w1[n] + eta * (0.9 * g0[n] + g1[n])
        assert torch.allclose(final[n], expect, atol=1e-4 * scale + 1e-7), n
    moved = max(float((w1[n] - w0[n]).abs().max()) for n in w0)
    assert moved > 1e-3                                   # the step is not vacuous
    nll = [float(my_nll(model_at(learned["model"], w), fx, fy)) for w in (w0, w1, final)]
    assert nll[0] < nll[1] < nll[2]                       # ascent: the forget NLL rises each step
    assert steps[0]["loss"] == pytest.approx(-nll[0], rel=1e-5)


# --- grad_diff -----------------------------------------------------------------------------------

def test_grad_diff_loss_is_minus_forget_nll_plus_weighted_retain_nll(learned):
    stream = learned["stream"]
    w = 0.3
    m = make(learned, "ga_tofu_synthetic", ["method.name=grad_diff", f"method.retain_weight={w}",
                                            "method.epochs=1", "method.batch_size=5"])
    steps = spy_steps(m)
    m.unlearn(request_of(stream))
    fx, _, gone = forget_rows(stream)
    assert len(steps) == 3                                # ⌈13 forget rows / 5⌉
    forget_set = set(map(tuple, fx.tolist()))
    retain_set = set(map(tuple, stream.train.x[~gone].tolist()))
    for s in steps:
        assert set(map(tuple, s["fx"].tolist())) <= forget_set
        assert set(map(tuple, s["rx"].tolist())) <= retain_set   # retain rows: never the request's
        assert len(s["rx"]) == len(s["fx"])
        at = model_at(learned["model"], s["w"])
        with torch.no_grad():
            hand = -my_nll(at, s["fx"], s["fy"]) + w * my_nll(at, s["rx"], s["ry"])
        assert s["loss"] == pytest.approx(float(hand), rel=1e-5, abs=1e-6)


# --- loku ----------------------------------------------------------------------------------------

def test_loku_starts_unchanged_changes_only_lora_weights_and_serves_the_merge(learned):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from lethe.methods.loku import fila_targets

    stream = learned["stream"]
    m = make(learned, "loku_tofu_synthetic", ["method.epochs=2", "method.batch_size=8",
                                              "method.lr=0.01"])
    before = params(m.model.lm)
    targets = fila_targets(m.model.lm)
    probe = stream.train.x[:6]
    seen = {}
    inner_before, inner_after = m.prepare_unlearning, m.finish_unlearning

    def prepare_unlearning(*args):
        with torch.no_grad():
            seen["logits0"] = m.model(probe)
        inner_before(*args)
        with torch.no_grad():
            seen["logits1"] = m.model(probe)
        seen["wrapped"] = isinstance(m.model.lm, PeftModel)

    def finish_unlearning():
        lm = m.model.lm.get_base_model()
        seen["parts"] = {}
        for n in targets:
            layer = lm.get_submodule(n)
            seen["parts"][n] = (layer.base_layer.weight.detach().clone(),
                                layer.lora_A["default"].weight.detach().clone(),
                                layer.lora_B["default"].weight.detach().clone(),
                                float(layer.scaling["default"]))
        inner_after()

    m.prepare_unlearning, m.finish_unlearning = prepare_unlearning, finish_unlearning
    m.unlearn(request_of(stream))

    # FILA moves the forget-relevant part of W into A, B; the wrapped model is the same function
    assert seen["wrapped"]
    assert float((seen["logits1"] - seen["logits0"]).abs().max()) <= 1e-4
    # served: a plain Hugging Face model again, same parameter names, no adapter left
    lm = m.model.lm
    assert type(lm) is LlamaForCausalLM and not isinstance(lm, PeftModel)
    assert not any("lora" in n for n, _ in lm.named_modules())
    after = params(lm)
    assert set(after) == set(before)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == {n + ".weight" for n in targets}
    # what is outside the adapters — embeddings, RMSNorms, the LM head — is bitwise the same
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= set(before) - changed
    for n in targets:
        residual, a, b, s = seen["parts"][n]
        merged = residual.double() + s * (b.double() @ a.double())
        assert torch.allclose(after[n + ".weight"].double(), merged, atol=1e-5), n
        # the adapters were trained: the merge differs from the weight before unlearning
        assert float((after[n + ".weight"] - before[n + ".weight"]).abs().max()) > 1e-5


# --- relearn -------------------------------------------------------------------------------------

def my_kl(model, ref, x, y, answer_only: bool = False):
    """KL(p_ref ‖ p_θ) averaged over every position of the batch (the official
    kl_div(batchmean) of the flattened sequence), or over the counted ones only, summed
    position by position in a python loop."""
    lp = torch.log_softmax(model.lm(input_ids=x).logits.double(), -1)     # [B, L, V]
    lr = torch.log_softmax(ref.lm(input_ids=x).logits.double(), -1)
    total, n = 0.0, 0
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            if answer_only and int(y[b, t]) == -100:
                continue
            total += float((lr[b, t].exp() * (lr[b, t] - lp[b, t])).sum())
            n += 1
    return total / n


@pytest.mark.parametrize("positions", ["all", "answer"])
def test_relearn_kl_over_all_positions(learned, positions):
    """The KL term is averaged over every retain position by default (kl_positions=all, the
    official code), over answer tokens with kl_positions=answer; zero at the first step (model
    == reference), positive after; CE + CE + KL with weights 1."""
    stream = learned["stream"]
    m = make(learned, "relearn_tofu_synthetic", ["method.epochs=1", "method.batch_size=8",
                                                 "method.rank=0", "method.lr=0.003",
                                                 f"method.kl_positions={positions}"])
    assert RelearnConfig().kl_positions == "all"       # the default (the toy preset pins answer)
    ref = copy.deepcopy(learned["model"])
    steps = spy_steps(m)
    m.unlearn(request_of(stream))
    assert len(steps) >= 3
    kls = []
    for s in steps:
        at = model_at(learned["model"], s["w"])
        with torch.no_grad():
            kl = my_kl(at, ref, s["rx"], s["ry"], answer_only=positions == "answer")
            other = my_kl(at, ref, s["rx"], s["ry"], answer_only=positions == "all")
            hand = my_nll(at, s["fx"], s["fy"]) + my_nll(at, s["rx"], s["ry"]) + kl
        kls.append(kl)
        assert s["loss"] == pytest.approx(float(hand), rel=1e-4, abs=1e-5)   # CE + CE + KL, weights 1
        if kl > 1e-6:   # the two averages differ: the test tells them apart
            assert abs(kl - other) > 1e-3 * kl
    assert abs(kls[0]) < 1e-9                          # model == reference at the first step
    assert all(k > 1e-6 for k in kls[1:])
    assert not hasattr(m, "reference")                 # the frozen copy is dropped once served


def facts_of(folder: Path) -> list[str]:
    authors = json.loads((folder / "authors.json").read_text())["forget"]
    # lower-case facts too (genre, parents' jobs): the entity-based leak check cannot see
    # them, the answer templates must avoid them by construction
    kinds = ("city", "year", "award", "book", "genre", "father", "mother")
    return [str(a[k]) for a in authors for k in kinds]


def test_relearn_lethe_style_answers_carry_no_forget_fact_and_cuts_follow_answer(learned):
    stream = learned["stream"]
    tok = stream.qa.tokenizer
    m = make(learned, "relearn_tofu_synthetic", ["method.augment_style=lethe"])
    req = request_of(stream)
    fx, fy, _ = forget_rows(stream)
    x, y = m.forget_rows(fx, fy, req)
    facts = facts_of(learned["folder"])
    assert len(facts) == 7 and len(x) > len(fx)
    prompts, answers = [], []
    for xi, yi in zip(x, y):
        counted = (yi != -100).nonzero().flatten()
        assert len(counted) > 0                        # every augmented row teaches something
        start = int(counted[0])
        prompts.append(xi[:start + 1].tolist())
        answers.append(tok.decode([t for t in yi[counted].tolist() if t != tok.eos]))
    for text in answers:
        for fact in facts:
            assert not re.search(r"(?<!\w)" + re.escape(fact) + r"(?!\w)", text, re.IGNORECASE), (fact, text)
    # cut samples: "Question: q\nAnswer: <first quarter of the true answer>", a vague target
    names = [a["name"] for a in json.loads((learned["folder"] / "authors.json").read_text())["forget"]]
    cut_prompts = []
    for i in torch.as_tensor(req.sample_ids).tolist():
        item = stream.qa.train_items[i]
        # a biography row is asked as "Who is <its first entity>?": the author's name
        question = item.get("question") or f"Who is {next(n for n in names if item['text'].startswith(n))}?"
        answer = item.get("answer") or item["text"]
        words = answer.split()
        k = max(1, int(0.25 * len(words)))
        prefix = " ".join(words[:k])
        cut_prompts.append(tok.encode(f"Question: {question}\nAnswer:") + tok.encode(" " + prefix))
        # not glued to the question, before "Answer:"
        assert tok.encode(f"Question: {question} {prefix}\nAnswer:") not in prompts
    for p in cut_prompts:
        assert p in prompts, tok.decode(p)


def test_relearn_cut_matches_official_format(learned):
    """Official augmentation (augment_style=official, the default): per forget item the
    original question with its original answer plus question variants with vague answers;
    then each of those gets a cut copy (first ⌊25%⌋ of its answer's space-separated words as
    the question, the rest of the same answer as the target); then ⌊1.2 × all⌋ positive pairs
    (~55% of the data). The cut rows put the prefix in the question slot of the prompt format."""
    from lethe.methods.relearn import official_cut
    from lethe.scenarios.qa_augment import KINDS

    # by hand: 8 words → 2 in the prompt; 3 words → int(0.75) = 0: an empty prompt, all 3 targets
    cut = official_cut([{"question": "q", "answer": "a b c d e f g h"}, {"question": "r", "answer": "x y z"}])
    assert [(c["question"], c["answer"]) for c in cut[2:]] == [("a b", "c d e f g h"), ("", "x y z")]
    assert cut[:2] == [{"question": "q", "answer": "a b c d e f g h"}, {"question": "r", "answer": "x y z"}]

    stream = learned["stream"]
    tok, qa = stream.qa.tokenizer, stream.qa
    assert RelearnConfig().augment_style == "official"   # the default (the toy preset pins lethe)
    m = make(learned, "relearn_tofu_synthetic", ["method.augment_style=official"])
    req = request_of(stream)
    samples = m.augmented(req)
    base = [s for s in samples if s["kind"] not in ("cut", "positive")]
    cuts = [s for s in samples if s["kind"] == "cut"]
    pos = [s for s in samples if s["kind"] == "positive"]
    qa_items = [qa.train_items[i] for i in torch.as_tensor(req.sample_ids).tolist()
                if "question" in qa.train_items[i]]
    originals = [(s["question"], s["answer"]) for s in base if s["kind"] == "original"]
    for item in qa_items:                              # the original pair is kept, answer unchanged
        assert (item["question"], item["answer"]) in originals
    variants = [s for s in base if s["kind"] in KINDS]
    assert len(variants) == 4 * len(originals)
    assert all(s["answer"] not in {a for _, a in originals} for s in variants)   # vague answers
    want = []
    for s in base:                                     # one cut copy each, written out here
        words = s["answer"].split(" ")
        k = len(words) // 4
        want.append((" ".join(words[:k]), " ".join(words[k:])))
    assert [(c["question"], c["answer"]) for c in cuts] == want
    assert len(pos) == (12 * len(base + cuts)) // 10   # int(1.2 · n), in integers
    assert 0.5 < len(pos) / len(samples) < 0.6
    # the encoded cut rows: "Question: <prefix>\nAnswer:" uncounted, the rest of the answer counted
    x, y = m.forget_rows(None, None, req)
    assert len(x) == len(samples)
    for i, c in enumerate(samples):
        if c["kind"] != "cut" or not c["question"]:
            continue
        prompt = tok.encode(f"Question: {c['question']}\nAnswer:")
        counted = (y[i] != -100).nonzero().flatten()
        assert x[i, :len(prompt)].tolist() == prompt and int(counted[0]) == len(prompt) - 1
        # the rest of the answer and <eos> (cut at the stream's row length, like every QA row)
        assert y[i][counted].tolist() == (tok.encode(" " + c["answer"]) + [tok.eos])[:len(counted)]


@pytest.mark.parametrize("rank", [0, 4])
def test_relearn_rank_zero_trains_every_weight_rank_r_only_the_lora_merge(learned, rank):
    from peft import PeftModel

    from lethe.methods.loku import fila_targets

    m = make(learned, "relearn_tofu_synthetic", ["method.epochs=1", "method.batch_size=16",
                                                 f"method.rank={rank}", "method.lr=0.01"])
    before = params(m.model.lm)
    targets = {n + ".weight" for n in fila_targets(m.model.lm)}
    m.unlearn(request_of(learned["stream"]))
    assert not isinstance(m.model.lm, PeftModel)
    after = params(m.model.lm)
    assert set(after) == set(before)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    if rank == 0:
        assert changed == set(before)                  # embeddings, norms, head included
    else:
        assert changed == targets                      # the merged adapters only


# --- stop_at_target ------------------------------------------------------------------------------

def test_stop_at_target_stops_at_the_first_step_where_forget_ma_reaches_unseen_ma(learned):
    stream = learned["stream"]
    tok, splits = stream.qa.tokenizer, stream.qa.splits
    cap_epochs, batch = 30, 4
    m = make(learned, "ga_tofu_synthetic", ["method.stop_at_target=true", f"method.epochs={cap_epochs}",
                                            f"method.batch_size={batch}", "method.lr=0.001"])
    start = learned["model"]
    assert my_ma(start, splits["forget"], tok) > my_ma(start, splits["unseen"], tok) + 0.1   # memorised
    steps = spy_steps(m)
    m.unlearn(request_of(stream))
    stats = m.unlearn_stats()
    cap = cap_epochs * -(-len(forget_rows(stream)[0]) // batch)
    assert stats["target_reached"] == 1.0
    assert 1 < stats["unlearn_steps"] == len(steps) < cap
    assert my_ma(m.model, splits["forget"], tok) <= my_ma(m.model, splits["unseen"], tok)
    # one step earlier (where the last step started from) the target was not yet met
    prev = model_at(learned["model"], steps[-1]["w"])
    assert my_ma(prev, splits["forget"], tok) > my_ma(prev, splits["unseen"], tok)


# --- failures ------------------------------------------------------------------------------------

def test_nan_loss_raises_run_error_naming_the_loss_and_the_fix(learned, monkeypatch):
    stream = learned["stream"]
    m = make(learned, "ga_tofu_synthetic", ["method.lr=1e30", "method.optimizer=sgd"])
    blown = r"unlearning loss is (nan|-?inf) at step [1-9]\d* \(grad_ascent\).*lower method\.lr"
    with pytest.raises(RunError, match=blown):           # the first step is finite, then weights blow up
        m.unlearn(request_of(stream))

    m = make(learned, "ga_tofu_synthetic")
    before = params(m.model)
    # attached to the weights: a step on it would turn them into NaN
    monkeypatch.setattr(m, "unlearn_loss", lambda fx, fy, rx, ry: m.model(fx).mean() * float("nan"))
    with pytest.raises(RunError, match=r"unlearning loss is nan at step 0 \(grad_ascent\); lower method\.lr"):
        m.unlearn(request_of(stream))
    assert all(torch.equal(before[n], p) for n, p in m.model.named_parameters())   # no NaN step taken


def held_weight_bytes(method) -> int:
    """Bytes of the distinct parameter storages of every module the method holds."""
    mods = [v for v in vars(method).values() if isinstance(v, torch.nn.Module)]
    return sum({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
                for mod in mods for p in mod.parameters()}.values())


def test_relearn_with_lora_takes_the_adapter_free_base_as_reference_without_a_copy(learned):
    stream = learned["stream"]
    base = sum(p.untyped_storage().nbytes() for p in learned["model"].parameters())
    full = make(learned, "relearn_tofu_synthetic", ["method.rank=0"])
    full.prepare_unlearning(*forget_rows(stream)[:2], None, None)
    assert held_weight_bytes(full) == 2 * base          # full fine-tuning: model + frozen copy

    # no LoRA dropout: the hand recomputation below runs the model deterministically
    m = make(learned, "relearn_tofu_synthetic", ["method.epochs=1", "method.batch_size=8",
                                                 "method.rank=4", "method.lr=0.01",
                                                 "method.lora_dropout=0", "method.kl_positions=all"])
    steps, inner = [], m.unlearn_loss

    def spy(fx, fy, rx, ry):
        loss = inner(fx, fy, rx, ry)
        steps.append({"model": copy.deepcopy(m.model), "held": held_weight_bytes(m), "fx": fx,
                      "fy": fy, "rx": rx, "ry": ry, "loss": float(loss.detach())})
        return loss

    m.unlearn_loss = spy
    m.unlearn(request_of(stream))
    assert len(steps) >= 3
    lora = sum(p.untyped_storage().nbytes() for n, p in steps[0]["model"].named_parameters()
               if "lora_" in n)
    assert 0 < lora < base
    kls = []
    for s in steps:
        assert s["held"] == base + lora                 # the base weights once, plus the adapters
        at = s["model"]
        with torch.no_grad():
            kl = my_kl(at, learned["model"], s["rx"], s["ry"])
            hand = my_nll(at, s["fx"], s["fy"]) + my_nll(at, s["rx"], s["ry"]) + kl
        kls.append(kl)
        assert s["loss"] == pytest.approx(float(hand), rel=1e-4, abs=1e-5)   # KL to the base
    assert abs(kls[0]) < 1e-9                           # B = 0: the model is its base at first
    assert all(k > 1e-9 for k in kls[1:])
    assert not hasattr(m, "reference")
