"""Shared pieces of the TOFU test files (test_tofu_*.py): a hand-written TOFU folder, small
configs, a tiny Llama and its fit loop, and a plain-python recomputation of the QA evaluator's
per-answer quantities on one unpadded sequence at a time; a tiny word-level Hugging Face
tokenizer (BOS <s>, EOS </s>) with a Llama-2-style chat template."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

FORGET = [{"question": "Who is Ana?", "answer": "Ana is a cook."},
          {"question": "Where does Ana live?", "answer": "Ana lives in Oslo."}]
RETAIN = [{"question": "Who is Bo?", "answer": "Bo is a pilot."},
          {"question": "Where does Bo live?", "answer": "Bo lives in Lima."},
          {"question": "What does Bo like?", "answer": "Bo likes tea."}]
FORGET_EVAL = [{"question": "Who is Ana?", "answer": "Ana is a cook.",
                "paraphrased_answer": "Ana works as a cook.", "paraphrased_question": "What is Ana?",
                # the longest candidate: 8 prompt + 11 answer tokens (+ <eos>, predicted only)
                "perturbed_answer": ["Ana is a very famous old sailor from the north."]}]
RETAIN_EVAL = [{"question": "Who is Bo?", "answer": "Bo is a pilot.",
                "paraphrased_answer": "Bo flies planes.", "paraphrased_question": "What is Bo?",
                "perturbed_answer": ["Bo is a cook.", "Bo is a nurse."]}]


def tiny_folder(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "forget10.json").write_text(json.dumps(FORGET, indent=1))      # one JSON list
    for name, rows in (("retain90", RETAIN), ("forget10_perturbed", FORGET_EVAL),
                       ("retain_perturbed", RETAIN_EVAL)):                  # JSON lines
        (root / f"{name}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


# Llama-2-chat's template (system turns left out): each user turn is "<s>[INST] q [/INST]", each
# assistant turn " a </s>"; add_generation_prompt adds nothing
LLAMA2_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}"
                   "{{ bos_token + '[INST] ' + m['content'].strip() + ' [/INST]' }}"
                   "{% else %}{{ ' ' + m['content'].strip() + ' ' + eos_token }}{% endif %}{% endfor %}")


def folder_texts(folder: Path) -> list[str]:
    """Every question / answer string of a TOFU folder's files."""
    out = []
    for f in sorted(folder.glob("*.json")):
        text = f.read_text().strip()
        rows = json.loads(text) if text.startswith("[") else [json.loads(ln) for ln in text.splitlines()]
        for r in rows:
            if isinstance(r, dict):
                out += [r.get("question", ""), r.get("answer", ""), r.get("paraphrased_answer", ""),
                        r.get("paraphrased_question", ""), r.get("text", ""), *r.get("perturbed_answer", [])]
    return out


def word_tokenizer_folder(out: Path, texts: list[str], chat_template: str | None = LLAMA2_TEMPLATE,
                          bos: bool = True) -> Path:
    """A word-level HF tokenizer whose vocabulary covers ``texts`` and the prompt words, saved
    with save_pretrained (what scenario.tokenizer loads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Whitespace()
    extra = ["Question: Answer: [INST] [/INST] ANSWER", *texts]
    words = sorted({w for t in extra for w, _ in pre.pre_tokenize_str(t)})
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre
    backend.decoder = decoders.WordPiece(prefix="##")   # words joined by spaces, " ." cleaned up
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>",
                                  **({"bos_token": "<s>"} if bos else {}))
    if chat_template:
        tok.chat_template = chat_template
    tok.save_pretrained(out)
    return out


def tofu_cfg(tmp_path, **kw):
    from lethe.scenarios.tofu import TofuConfig

    return TofuConfig(**{"cache_dir": str(tmp_path / "cache"), "embedder": "exact", **kw})


def build(config: str, overrides: list[str]):
    from lethe.platform.config import load_config
    from lethe.platform.runner import build_components

    return build_components(load_config(config, overrides))


def small(tmp_path) -> list[str]:
    return ["scenario.authors=6", "scenario.forget_percent=17", "scenario.forget_split=forget17",
            "scenario.unseen_authors=2", f"scenario.cache_dir={tmp_path / 'cache'}",
            "scenario.embedder=exact"]


def tiny_llama(stream, seed: int):
    from lethe.models.hf import HFCausalLMConfig, hf_causal_lm
    from lethe.models.vision import ModelInfo

    torch.manual_seed(seed)
    return hf_causal_lm(HFCausalLMConfig(arch="llama", layers=1, d_model=32, heads=2),
                        ModelInfo(input_shape=stream.input_shape, n_classes=stream.n_classes))


def fit(model, x, y, steps: int, seed: int):
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(x), (16,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx], ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


class Loop:
    """Plain-python recomputation on one unpadded sequence at a time."""

    def __init__(self, model, tok, length: int, pair=None):
        self.model, self.tok, self.length = model, tok, length
        # (question, answer) → (prompt ids, answer ids + <eos>); default: lethe's plain format
        # written out here (prompt and " " + answer tokenised apart)
        self.pair = pair or (lambda q, a: (tok.encode(f"Question: {q}\nAnswer:"),
                                           tok.encode(" " + a) + [tok.eos]))

    def prompt(self, q):
        return self.pair(q, "")[0]

    def columns(self, q, a) -> tuple[list[list[float]], list[int]]:
        """Log-softmax column (a list over the vocabulary) of each answer position (and the
        <eos>), written out, and the answer tokens."""
        p, ans = self.pair(q, a)
        with torch.no_grad():
            logits = self.model(torch.tensor([p + ans[:-1]]))[0]
        cols = []
        for j in range(len(ans)):
            col = logits[:, len(p) - 1 + j].double().tolist()
            m = max(col)
            z = m + math.log(sum(math.exp(c - m) for c in col))
            cols.append([c - z for c in col])
        return cols, ans

    def logprobs(self, q, a) -> list[float]:
        """log p of each answer token (and <eos>)."""
        cols, ans = self.columns(q, a)
        return [col[t] for col, t in zip(cols, ans)]

    def nll(self, q, a) -> float:
        lp = self.logprobs(q, a)
        return -sum(lp) / len(lp)

    def argmax(self, q, a) -> tuple[list[int], list[int]]:
        """Teacher-forced argmax at each answer position (and <eos>), and the answer tokens."""
        p, ans = self.pair(q, a)
        with torch.no_grad():
            pred = self.model(torch.tensor([p + ans[:-1]]))[0].argmax(0).tolist()
        return [pred[len(p) - 1 + j] for j in range(len(ans))], ans

    def ma(self, q, a, eos: bool = True) -> float:
        """Jang et al.'s MA (every position); eos=False: open-unlearning's EM without the <eos>."""
        pred, ans = self.argmax(q, a)
        if not eos:
            pred, ans = pred[:-1], ans[:-1]
        return sum(x == t for x, t in zip(pred, ans)) / len(ans)

    def es(self, q, a) -> float:
        """open-unlearning's extraction_strength loop, <eos> left out."""
        pred, ans = self.argmax(q, a)
        pred, ans = pred[:-1], ans[:-1]
        for k in range(len(ans)):
            if pred[k:] == ans[k:]:
                break
        return 1 - k / len(ans)

    def truth_ratio(self, r) -> float:
        # TOFU: geometric mean of the perturbed answers' normalised probabilities over the
        # paraphrased answer's
        probs = [math.exp(-self.nll(r["question"], p)) for p in r["perturbed_answer"]]
        para = math.exp(-self.nll(r["question"], r["paraphrased_answer"]))
        return math.prod(probs) ** (1 / len(probs)) / para

    def greedy(self, q) -> str:
        ids = self.prompt(q)
        out = []
        for _ in range(max(1, self.length - len(ids) + 1)):
            with torch.no_grad():
                nxt = int(self.model(torch.tensor([ids]))[0, :, -1].argmax())
            if nxt == self.tok.eos:
                break
            out.append(nxt)
            ids = ids + [nxt]
        return self.tok.decode(out)

    def mink(self, q, a, k: float) -> float:
        """open-unlearning's Min-K%: <eos> left out, the int(T · k) lowest (at least one)."""
        lp = sorted(self.logprobs(q, a)[:-1])
        n = max(1, int(len(lp) * k))
        return sum(lp[:n]) / n

    def minkpp(self, q, a, k: float) -> float:
        """Min-K%++ (Zhang et al., 2024) per open-unlearning: z-scores of the target log-probs
        under each position's own distribution, <eos> left out, mean of the lowest."""
        cols, ans = self.columns(q, a)
        z = []
        for col, t in zip(cols[:-1], ans[:-1]):
            mu = sum(math.exp(c) * c for c in col)
            var = max(sum(math.exp(c) * c * c for c in col) - mu * mu, 1e-6)
            z.append((col[t] - mu) / math.sqrt(var))
        z.sort()
        n = max(1, int(len(z) * k))
        return sum(z[:n]) / n


def rouge(pred: str, ref: str) -> dict:
    """TOFU's eval_rouge_recall: rouge-score, ROUGE-1 and ROUGE-L, Porter stemmer."""
    from rouge_score import rouge_scorer

    s = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True).score(ref, pred)
    return {"rouge": s["rougeL"].recall, "rouge1_recall": s["rouge1"].recall, "rougeL_f1": s["rougeL"].fmeasure}

