"""LoKU mechanics: the inverted hinge loss against a hand computation, FILA's Fisher-weighted
LoRA initialisation against an independent recomputation, on tiny Llama / GPT-2 models."""
from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from lethe.methods.loku import (  # noqa: E402
    fila_init,
    fila_targets,
    fisher_diagonal,
    inverted_hinge_loss,
)

VOCAB, BLOCK, RANK = 50, 16, 4
ARCHS = ("llama", "gpt2")


def tiny_lm(arch: str, seed: int = 0):
    from omegaconf import OmegaConf

    from lethe.models.hf import HFCausalLMConfig, hf_causal_lm
    from lethe.models.vision import ModelInfo

    torch.manual_seed(seed)
    cfg = OmegaConf.structured(HFCausalLMConfig(arch=arch, layers=2, d_model=32, heads=4))
    return hf_causal_lm(cfg, ModelInfo(input_shape=(BLOCK,), n_classes=VOCAB)).lm


def qa_batches(seed: int, n_batches: int = 2, batch: int = 2):
    """(input_ids, next-token targets) with the first 5 positions masked like a prompt."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(0, VOCAB, (batch, BLOCK + 1), generator=g)
        targets = ids[:, 1:].clone()
        targets[:, :5] = -100
        targets[0, -2:] = -100                      # padding on one row: unequal token counts
        out.append((ids[:, :-1], targets))
    return out


# --- inverted hinge loss ------------------------------------------------------------------

def test_ihl_matches_hand_computation_and_ignores_masked_positions():
    import math

    # logits [B=2, V=3, L=2]; column t of sample b is one position's logits.
    # b0 t0: logits = log(0.5, 0.3, 0.2) → softmax (0.5, 0.3, 0.2), target 0:
    #        1 + 0.5 − 0.3 = 1.2
    # b0 t1: logits = log(0.1, 0.6, 0.3) → softmax (0.1, 0.6, 0.3), target 2:
    #        1 + 0.3 − 0.6 = 0.7
    # b1 t0: logits (2, 1, 0) → softmax e^2, e, 1 over 11.107338 = (0.665241, 0.244728, 0.090031),
    #        target 1: 1 + 0.244728 − 0.665241 = 0.579487
    # b1 t1: target -100, not counted (its softmax (0.2, 0.2, 0.6) would give 1.4 with target 2)
    # IHL = (1.2 + 0.7 + 0.579487) / 3 = 0.826496
    cols = [[[math.log(0.5), math.log(0.3), math.log(0.2)], [math.log(0.1), math.log(0.6), math.log(0.3)]],
            [[2.0, 1.0, 0.0], [math.log(0.2), math.log(0.2), math.log(0.6)]]]
    logits = torch.tensor(cols, dtype=torch.float64).transpose(1, 2).requires_grad_(True)  # [2, 3, 2]
    targets = torch.tensor([[0, 2], [1, -100]])
    loss = inverted_hinge_loss(logits, targets)
    assert loss.item() == pytest.approx(0.826496, abs=1e-5)
    loss.backward()
    assert torch.all(logits.grad[1, :, 1] == 0)          # the ignored position gets no gradient
    assert torch.any(logits.grad[1, :, 0] != 0)


def test_ihl_without_counted_positions_is_zero():
    logits = torch.randn(1, 5, 3, requires_grad=True)
    loss = inverted_hinge_loss(logits, torch.full((1, 3), -100))
    assert loss.item() == 0.0
    loss.backward()                                       # still a graph: callers may add it
    assert torch.all(logits.grad == 0)


# --- FILA ---------------------------------------------------------------------------------

def reference_fisher(lm, batches, names):
    """Per-batch loop with .backward() and a hand-written masked NLL (no cross_entropy)."""
    lm = copy.deepcopy(lm)
    params = {n: lm.get_submodule(n).weight for n in names}
    sums = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    total = 0
    for ids, targets in batches:
        logp = torch.log_softmax(lm(input_ids=ids).logits, dim=-1)       # [B, L, V]
        nll, count = 0.0, 0
        for b in range(ids.shape[0]):
            for t in range(ids.shape[1]):
                if int(targets[b, t]) != -100:
                    nll = nll - logp[b, t, int(targets[b, t])]
                    count += 1
        lm.zero_grad(set_to_none=True)
        (nll / count).backward()
        for n, p in params.items():
            sums[n] += count * p.grad.double() ** 2
        total += count
    return sums, total


def expected_targets(arch: str) -> list[str]:
    if arch == "llama":
        return [f"model.layers.{i}.{part}" for i in range(2)
                for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                             "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    return [f"transformer.h.{i}.{part}" for i in range(2)
            for part in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


@pytest.mark.parametrize("arch", ARCHS)
def test_fisher_diagonal_matches_per_batch_loop_and_leaves_model_untouched(arch):
    lm = tiny_lm(arch)
    names = fila_targets(lm)
    assert names == expected_targets(arch)                # every linear map but the LM head
    before = {n: p.detach().clone() for n, p in lm.named_parameters()}
    flags = {n: p.requires_grad for n, p in lm.named_parameters()}
    batches = qa_batches(1)
    got, n_tok = fisher_diagonal(lm, batches, names)
    ref, ref_tok = reference_fisher(lm, batches, names)
    assert n_tok == ref_tok == 2 * (2 * (BLOCK - 5) - 2)
    for n in names:
        assert got[n].shape == lm.get_submodule(n).weight.shape
        assert torch.allclose(got[n].double(), ref[n], rtol=1e-4, atol=1e-12), n
        assert float(ref[n].sum()) > 0
    for n, p in lm.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None and p.requires_grad == flags[n]


@pytest.mark.parametrize("arch", ARCHS)
def test_fila_keeps_the_model_outputs_at_initialisation(arch):
    lm = tiny_lm(arch)
    ids = torch.randint(0, VOCAB, (3, BLOCK), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = lm(input_ids=ids).logits.clone()
    model = fila_init(lm, qa_batches(1), qa_batches(2), rank=RANK)
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert (out - ref).abs().max().item() <= 1e-4
    # not trivially so: the adapters carry a real part of every weight
    inner = model.get_base_model()
    for n in expected_targets(arch):
        assert inner.get_submodule(n).lora_B["default"].weight.abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_fila_row_weights_and_factors_follow_the_formula(arch):
    lm = tiny_lm(arch)
    forget, retain = qa_batches(1), qa_batches(2)
    names = expected_targets(arch)
    f_f, n_f = reference_fisher(lm, forget, names)
    f_r, n_r = reference_fisher(lm, retain, names)
    originals = {n: lm.get_submodule(n).weight.detach().double().clone() for n in names}
    alpha = 3.0 * RANK                                    # s = alpha / r = 3, not the default 2
    model = fila_init(lm, forget, retain, rank=RANK, alpha=alpha)
    s = alpha / RANK
    inner = model.get_base_model()
    for n in names:
        layer = inner.get_submodule(n)
        conv = arch == "gpt2"                             # Conv1D stores W as [in, out]
        W = originals[n].t() if conv else originals[n]
        Ff = f_f[n].t() if conv else f_f[n]
        Fr = f_r[n].t() if conv else f_r[n]
        # w_i = sqrt(sum_j (F_f/N_f)[i, j] / ((F_r/N_r)[i, j] + 1e-5)), row by row
        w = torch.tensor([sum((Ff[i, j] / n_f) / (Fr[i, j] / n_r + 1e-5) for j in range(W.shape[1]))
                          .sqrt().item() for i in range(W.shape[0])], dtype=torch.float64)
        assert torch.allclose(model.fila_row_weights[n].double(), w, rtol=1e-3), n
        A = layer.lora_A["default"].weight.detach().double()
        B = layer.lora_B["default"].weight.detach().double()
        assert A.shape == (RANK, W.shape[1]) and B.shape == (W.shape[0], RANK)
        # numpy's SVD of diag(w)·W: S' = S / s, A = (V sqrt S')ᵀ, B = diag(1/(w+eps)) U sqrt S'
        U, S, Vt = np.linalg.svd((w[:, None] * W).numpy(), full_matrices=False)
        S_prime = S[:RANK] / s
        # sign-free checks: A Aᵀ = diag(S'), (diag(w+eps) B)ᵀ (diag(w+eps) B) = diag(S'),
        # and diag(w+eps)·B·A = U_r S'_r V_rᵀ (the rank-r truncation divided by s)
        wb = (w + 1e-5)[:, None] * B
        assert np.allclose((A @ A.t()).numpy(), np.diag(S_prime), atol=1e-4 * S_prime[0])
        assert np.allclose((wb.t() @ wb).numpy(), np.diag(S_prime), atol=1e-4 * S_prime[0])
        trunc = (U[:, :RANK] * S_prime) @ Vt[:RANK]
        assert np.allclose((wb @ A).numpy(), trunc, atol=1e-4 * np.abs(trunc).max())
        # the base keeps the residual: W_res + s·B·A = W
        base = layer.base_layer.weight.detach().double()
        base = base.t() if conv else base
        assert torch.allclose(base + s * B @ A, W, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_fila_trains_only_the_lora_factors(arch):
    model = fila_init(tiny_lm(arch), qa_batches(1), qa_batches(2), rank=RANK)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"base_model.model.{t}.lora_{ab}.default.weight"
                for t in expected_targets(arch) for ab in "AB"}
    assert trainable == expected


def memorised_lm(ids, targets, steps: int = 40):
    """A tiny Llama fine-tuned until it has memorised one batch (what unlearning starts from)."""
    lm = tiny_lm("llama")
    opt = torch.optim.Adam(lm.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(lm(input_ids=ids).logits.transpose(1, 2), targets,
                                          ignore_index=-100).backward()
        opt.step()
    lm.zero_grad(set_to_none=True)
    return lm


def test_ihl_steps_lower_the_forget_tokens_probability():
    forget = qa_batches(1, n_batches=1)[0]
    ids, targets = forget
    mask = targets != -100
    model = fila_init(memorised_lm(ids, targets), [forget], qa_batches(2), rank=RANK)

    def true_prob():
        with torch.no_grad():
            p = torch.softmax(model(input_ids=ids).logits, dim=-1)          # [B, L, V]
        return p.gather(2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)[mask].mean().item()

    before = true_prob()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        inverted_hinge_loss(model(input_ids=ids).logits.transpose(1, 2), targets).backward()
        opt.step()
    after = true_prob()
    assert before > 0.5                                   # the facts were memorised
    assert after < 0.5 * before, (before, after)


@pytest.mark.parametrize("arch", ARCHS)
def test_fila_holds_at_most_one_float32_fisher_per_target_weight(arch):
    """Counted whenever FILA fetches a batch (between Fisher steps, in either pass): float32
    tensors shaped like a target weight, other than those alive before (the weights)."""
    import gc
    from collections import Counter

    lm = tiny_lm(arch)
    names = fila_targets(lm)
    shapes = Counter(tuple(lm.get_submodule(n).weight.shape) for n in names)

    def matching():
        return [t for t in gc.get_objects() if isinstance(t, torch.Tensor)
                and t.dtype == torch.float32 and tuple(t.shape) in shapes]

    before = matching()                    # kept alive: their ids cannot be reused
    known = {id(t) for t in before}
    most: Counter = Counter()

    def counted(batches):
        for b in batches:
            found = Counter(tuple(t.shape) for t in matching() if id(t) not in known)
            for shape, count in found.items():
                most[shape] = max(most[shape], count)
            yield b

    fila_init(lm, counted(qa_batches(1)), counted(qa_batches(2)), rank=RANK)
    assert sum(most.values()) >= len(names)          # the accumulators are seen
    assert most == shapes, (most, shapes)            # and there is one per target weight
