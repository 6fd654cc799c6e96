"""ReLearn — unlearning via learning (Xu et al., "ReLearn: Unlearning via Learning for Large
Language Models", 2025; reference code zjunlp/unlearn).

Instead of pushing the forget answers' probability down (gradient ascent, which leaves
degenerate text behind), ReLearn *learns* replacements: each forget item is augmented into
question variants (paraphrase, more specific, noisy, reversed relation) answered vaguely —
the subject kept, no private fact (a leakage check rejects answers that still carry one) —
plus "cut" samples (the first 25% of the true answer as prompt, a vague continuation as target),
the original question with a vague answer, and general fact-free QA pairs (~1.2× the data) that keep fluency. The augmenter is pluggable
(lethe/scenarios/qa_augment.py: a template/rule-based one offline, an LLM-backed one when
``method.augmenter`` names a local model folder). A memorised sequence in the request (no
question) is augmented as the answer to "Who is <its first entity>?".

Loss per step: CE(augmented forget) + CE(retain) + KL(p_ref ‖ p_θ) on retain answer tokens,
p_ref = the model before unlearning; all weights 1; LoRA (r = 32 in the paper) on every linear
layer, merged into the model when the request is served. With LoRA, p_ref is the wrapped model
with its adapters disabled (the frozen base weights are the model before unlearning), so no
second copy of the weights is held; full fine-tuning (rank 0) keeps a frozen deep copy.
"""
from __future__ import annotations

from dataclasses import dataclass

from lethe.errors import ConfigError
from lethe.methods.llm_unlearn import LLMUnlearner, UnlearnConfig, lm_nll
from lethe.registry import register_method


@dataclass
class RelearnConfig(UnlearnConfig):
    augmenter: str = "template"   # template | local HF causal LM folder (LLM-backed augmentation)
    variants: int = 4             # question variants per forget item
    positive_ratio: float = 1.2   # general positive QA pairs per forget item
    rank: int = 32                # LoRA rank (0 = train every weight)
    alpha: float = 0.0            # LoRA alpha (0 = 2r)
    retain_weight: float = 1.0
    kl_weight: float = 1.0


def kl_ref(logits, ref_logits, targets):
    """KL(p_ref ‖ p_θ) per counted position (targets ≠ −100), averaged; logits [B, V, L]."""
    import torch

    mask = targets != -100
    lp = torch.log_softmax(logits.float(), 1)
    lr = torch.log_softmax(ref_logits.float(), 1)
    kl = (lr.exp() * (lr - lp)).sum(1)
    return (kl * mask).sum() / mask.sum().clamp(min=1)


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

    def prepare_unlearning(self, fx, fy, rx, ry) -> None:
        import copy

        from peft import PeftModel

        # adapters already on the model would be disabled too: its base would not be p_ref
        base_is_ref = self.cfg.rank > 0 and not isinstance(self.model.lm, PeftModel)
        self.reference = None if base_is_ref else copy.deepcopy(self.model).eval().requires_grad_(False)
        if self.cfg.rank > 0:
            self.wrap_lora(self.cfg.rank, self.cfg.alpha)

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
        from lethe.scenarios.qa_augment import make_augmenter, positive_pairs

        qa = self.ctx.stream.qa
        items = []
        for i in torch.as_tensor(request.sample_ids).tolist():
            item = qa.train_items[i]
            if "question" not in item:   # a memorised sequence: about its first entity
                ents = extract_entities(item["text"])
                item = {"question": f"Who is {ents[0] if ents else 'this author'}?", "answer": item["text"]}
            items.append(item)
        try:
            aug = make_augmenter(self.cfg.augmenter or None, self.ctx.seed)
        except ValueError as exc:
            raise ConfigError(f"method.augmenter: {exc}") from None
        if hasattr(aug, "variants"):
            aug.variants = self.cfg.variants
        rng = np.random.default_rng(self.ctx.seed)
        samples = []
        for item in items:   # the variants, and the original question with a vague answer too
            out = aug.augment(item, rng)
            samples += out + [{"question": item["question"], "answer": out[0]["answer"], "kind": "original"}]
        return samples + positive_pairs(items, self.cfg.positive_ratio, rng)

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
                + self.cfg.kl_weight * kl_ref(logits_r, ref, ry))

    def finish_unlearning(self) -> None:
        super().finish_unlearning()
        del self.reference
