"""ReLearn — unlearning via learning (Xu et al., "ReLearn: Unlearning via Learning for Large
Language Models", 2025; reference code zjunlp/unlearn).

Instead of pushing the forget answers' probability down (gradient ascent, which leaves
degenerate text behind), ReLearn *learns* replacements: each forget item is augmented into
question variants (paraphrase, more specific, noisy, reversed relation) answered vaguely —
the subject kept, no private fact (a leakage check, ``method.leak_judge``, rejects answers
that still carry one). The augmenter is pluggable (lethe/scenarios/qa_augment.py: a
template/rule-based one offline, an LLM-backed one when ``method.augmenter`` names a local
model folder, e.g. an instruction-tuned LM). A memorised sequence in the request (no question)
is augmented as the answer to "Who is <its first entity>?".

``method.augment_style``:

- ``official`` (default; dataAugument/gather_proc_data.py of the official code): per item the
  original question with its *original* answer plus each question variant paired with an
  answer variant; then every one of these samples gets a "cut" copy (prompt = the first
  ⌊25%⌋ of its answer's words, in the question slot; target = the rest of the same answer);
  then ⌊1.2 × that count⌋ general positive QA pairs (WikiQA's positives there, lethe's
  fact-free bank here, cycled) — about 55% of the final data.
- ``lethe`` (the earlier variant): the variants, the original question with a vague answer, one
  cut sample per item (question + answer prefix → a vague continuation) and 1.2 positives per
  forget item (~17% of the data): no original answer is ever a target.

Loss per step: CE(augmented forget) + CE(retain) + KL(p_ref ‖ p_θ) on retain rows, p_ref = the
model before unlearning; all weights 1. The KL is averaged over every position of the retain
batch (``method.kl_positions: all``, the official ``kl_div(..., 'batchmean')`` over the
flattened sequence) or over its answer tokens only (``answer``). LoRA (official: r = 32,
alpha = 32, dropout 0.05) on every linear layer, merged into the model when the request is
served. With LoRA, p_ref is the wrapped model with its adapters disabled (the frozen base
weights are the model before unlearning), so no second copy of the weights is held; full
fine-tuning (rank 0) keeps a frozen deep copy (under ``distributed.strategy=fsdp`` a frozen
sharded copy rebuilt from the gathered weights, :meth:`LLMUnlearner.frozen_copy`; the LoRA
adapters are added and merged on an unsharded copy, sharded again: ``edit_lm``).
"""
from __future__ import annotations

from dataclasses import dataclass

from lethe.errors import ConfigError
from lethe.methods.llm_unlearn import LLMUnlearner, UnlearnConfig, lm_nll
from lethe.registry import register_method


@dataclass
class RelearnConfig(UnlearnConfig):
    augmenter: str = "template"   # template | local HF causal LM folder (LLM-backed augmentation)
    augment_style: str = "official"  # official | lethe (see the module docstring)
    leak_judge: str = "entity_overlap"  # strict | entity_overlap | none (qa_augment.LEAK_JUDGES)
    kl_positions: str = "all"     # all: KL averaged over every retain position (official) | answer
    variants: int = 4             # question variants per forget item
    positive_ratio: float = 1.2   # positive QA pairs per sample after the cut (lethe: per item)
    cut_fraction: float = 0.25    # share of an answer's words that a cut prompt holds
    rank: int = 32                # LoRA rank (0 = train every weight)
    alpha: float = 32.0           # LoRA alpha (official 32 at r = 32; 0 = 2r)
    lora_dropout: float = 0.05    # LoRA dropout (official 0.05)
    retain_weight: float = 1.0
    kl_weight: float = 1.0


STYLES, KL_POSITIONS = ("official", "lethe"), ("all", "answer")


def kl_ref(logits, ref_logits, targets, positions: str = "all"):
    """KL(p_ref ‖ p_θ) averaged over every position (``all``) or over the counted ones
    (targets ≠ −100, ``answer``); logits [B, V, L]."""
    import torch

    lp = torch.log_softmax(logits.float(), 1)
    lr = torch.log_softmax(ref_logits.float(), 1)
    kl = (lr.exp() * (lr - lp)).sum(1)
    if positions == "all":
        return kl.mean()
    mask = targets != -100
    return (kl * mask).sum() / mask.sum().clamp(min=1)


def official_cut(samples, fraction: float = 0.25) -> list[dict]:
    """The official cut step: each sample, then a copy whose question is the first
    ⌊fraction·n⌋ of its answer's n space-separated words and whose answer is the rest."""
    cuts = []
    for s in samples:
        words = s["answer"].split(" ")
        k = int(len(words) * fraction)
        cuts.append({"question": " ".join(words[:k]), "answer": " ".join(words[k:]), "kind": "cut"})
    return list(samples) + cuts


def cut_pair(qa, sample) -> tuple[list[int], list[int]]:
    """(prompt, target) of a cut sample: the true answer's first words open the answer turn
    (uncounted, the model is conditioned on them) and the vague continuation is the target.
    The answer "prefix continuation" is encoded whole in the stream's prompt format, so the
    row is the same sequence as any QA row; the tokens it shares with the encoding of the
    prefix alone move to the prompt side (at least the final <eos> stays a target)."""
    q = sample["question"][: len(sample["question"]) - len(sample["prefix"])].strip()
    prompt, full = qa.encode(q, sample["prefix"] + " " + sample["answer"])
    _, head = qa.encode(q, sample["prefix"])
    k = 0
    while k < min(len(full) - 1, len(head)) and full[k] == head[k]:
        k += 1
    return prompt + full[:k], full[k:]


@register_method("relearn", config=RelearnConfig, kinds=("learn", "forget"))
class Relearn(LLMUnlearner):
    """Unlearning by learning vague, leak-free answers to augmented forget questions (+ retain CE, KL)."""

    name = "relearn"
    fsdp = True   # adapters added and merged through edit_lm (a rebuilt sharded model)

    @classmethod
    def check_stream(cls, cfg, stream, seed: int) -> None:
        from lethe.registry import check_choice
        from lethe.scenarios.qa_augment import LEAK_JUDGES

        check_choice("method.augment_style", cfg.augment_style, STYLES)
        check_choice("method.leak_judge", cfg.leak_judge, LEAK_JUDGES)
        check_choice("method.kl_positions", cfg.kl_positions, KL_POSITIONS)
        if not 0.0 < cfg.cut_fraction < 1.0 or not 0.0 <= cfg.lora_dropout < 1.0:
            raise ConfigError(f"bad value for method.cut_fraction ({cfg.cut_fraction}) or "
                              f"method.lora_dropout ({cfg.lora_dropout}): both must lie in [0, 1), "
                              f"cut_fraction above 0")
        super().check_stream(cfg, stream, seed)

    def prepare_unlearning(self, fx, fy, rx, ry) -> None:
        from peft import PeftModel

        # adapters already on the model would be disabled too: its base would not be p_ref
        base_is_ref = self.cfg.rank > 0 and not isinstance(self.model.lm, PeftModel)
        self.reference = None if base_is_ref else self.frozen_copy()
        if self.cfg.rank > 0:
            self.wrap_lora(self.cfg.rank, self.cfg.alpha, dropout=self.cfg.lora_dropout)

    def reference_logits(self, x):
        """p_ref's logits [B, V, L]: the frozen copy, or the LoRA model's base (eval mode, as
        the copy is, so dropout cannot make p_ref noisy)."""
        import torch

        with torch.no_grad():
            if self.reference is not None:
                return self.reference(x)
            was_training = self.model.training
            self.model.eval()
            try:
                with self.model.lm.disable_adapter():
                    return self.model(x)
            finally:
                self.model.train(was_training)

    def augmented(self, request) -> list[dict]:
        """The augmented forget samples and positive pairs of a request (deterministic by seed)."""
        import numpy as np
        import torch

        from lethe.metrics.knowledge import extract_entities
        from lethe.scenarios.qa_augment import CUT, make_augmenter, positive_pairs

        qa = self.ctx.stream.qa
        items = []
        for i in torch.as_tensor(request.sample_ids).tolist():
            item = qa.train_items[i]
            if "question" not in item:   # a memorised sequence: about its first entity
                ents = extract_entities(item["text"])
                item = {"question": f"Who is {ents[0] if ents else 'this author'}?", "answer": item["text"]}
            items.append(item)
        try:
            aug = make_augmenter(self.cfg.augmenter or None, self.ctx.seed, self.cfg.leak_judge)
        except ValueError as exc:
            raise ConfigError(f"method.augmenter: {exc}") from None
        for a in (aug, getattr(aug, "fallback", None)):
            if hasattr(a, "variants"):
                a.variants, a.cut_fraction = self.cfg.variants, self.cfg.cut_fraction
        rng = np.random.default_rng(self.ctx.seed)
        if self.cfg.augment_style == "lethe":
            samples = []
            for item in items:   # the variants, and the original question with a vague answer too
                out = aug.augment(item, rng)
                samples += out + [{"question": item["question"], "answer": out[0]["answer"], "kind": "original"}]
            return samples + positive_pairs(items, self.cfg.positive_ratio, rng)
        gathered = []
        for item in items:   # the original pair, then each question variant with its answer variant
            variants = [s for s in aug.augment(item, rng) if s["kind"] != CUT]
            gathered += [{"question": item["question"], "answer": item["answer"], "kind": "original"},
                         *variants]
        samples = official_cut(gathered, self.cfg.cut_fraction)
        n_pos = int(len(samples) * self.cfg.positive_ratio)   # the official int(), not rounding
        return samples + positive_pairs(samples, self.cfg.positive_ratio, rng)[:n_pos]

    def forget_rows(self, fx, fy, request):
        """The augmented samples as QA rows, encoded like every other QA row of the stream
        (``scenario.prompt_format``: chat template, TOFU's Llama-2 string or the plain format);
        the targets count the vague answer only."""
        qa = self.ctx.stream.qa
        pairs = [cut_pair(qa, s) if s.get("prefix") else qa.encode(s["question"], s["answer"])
                 for s in self.augmented(request)]
        self.n_augmented = len(pairs)
        return qa.rows(pairs)

    def unlearn_loss(self, fx, fy, rx, ry):
        logits_r = self.model(rx)
        ref = self.reference_logits(rx)
        return (lm_nll(self.model(fx), fy) + self.cfg.retain_weight * lm_nll(logits_r, ry)
                + self.cfg.kl_weight * kl_ref(logits_r, ref, ry, self.cfg.kl_positions))

    def finish_unlearning(self) -> None:
        super().finish_unlearning()
        del self.reference
