"""LoKU — Low-rank Knowledge Unlearning (Cha et al., "Towards Robust and Parameter-Efficient
Knowledge Unlearning for LLMs", ICLR 2025; reference code csm9493/efficient-llm-unlearning).

Two pieces, both here:

- **Inverted Hinge Loss** (IHL) on forget-set tokens: mean over counted positions of
  ``1 + p(x_t) − max_{v≠x_t} p(v)``. It pushes the true token's probability down *and* the
  runner-up's up, so probability mass moves to a plausible alternative instead of being
  spread over the vocabulary; unlike gradient ascent (−NLL, unbounded) it lies in [0, 2] and
  its gradient vanishes once the true token is no longer preferred, so text stays fluent.
- **FILA** (Fisher-weighted Initialisation of Low-rank Adapters): LoRA A, B start as a
  row-weighted rank-r approximation of each weight, the rows weighted by how much more they
  matter to the forget set than to the retain set (relative empirical Fisher). The base
  weight keeps the residual, so the model computes exactly the same function at the start,
  but the adapters hold the forget-relevant part of the weights and training them removes it
  fast while little else changes.

Optimisation: the official script (HF Trainer) uses AdamW with weight decay 0.01, 2 rows × 16
accumulated per step, one epoch of linear warm-up then linear decay, bf16; the method.* keys of
the unlearning phase express it (loku_tofu_local sets them). Deviation: lethe also steps the
shorter last accumulation window of each epoch (every row every epoch), so forget10 takes 65
steps where the official max_steps = ⌊5·400 / 32⌋ = 62. On the tiny synthetic stream FILA does
not reach the forget target faster than zero-initialised LoRA (docs/unlearning.md).

Under ``distributed.strategy=fsdp`` (lethe's addition; the official code runs one process)
FILA runs on an unsharded copy of the gathered weights on every rank (``edit_lm``), each rank
differentiating its share (``rank::N``) of the Fisher batches and the squared-gradient sums
added over the ranks, so every rank holds the full-data Fisher and computes the same factors;
the wrapped model is then sharded and trained sharded. The copy and the Fisher are whole on
every rank, as in one process (docs/distributed.md).

A run should show: the forget tokens' probability (memorisation accuracy, extraction
likelihood) falling to the level of unseen data within a few epochs while retain-set NLL
barely moves; FILA reaching that point in fewer steps than a zero-initialised LoRA.

Conventions: lethe's wrapper gives logits ``[B, V, L]``; the inner Hugging Face model
(``wrapper.lm``) gives ``[B, L, V]``. Targets ``[B, L]`` are the next-token ids already
aligned with the logits (no shift here), ``-100`` where a position does not count.
torch and peft are imported inside the functions: ``lethe list`` imports this module.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from lethe.engine import distributed
from lethe.errors import ConfigError
from lethe.methods.llm_unlearn import LLMUnlearner, UnlearnConfig, lm_nll
from lethe.models.lora import is_conv1d
from lethe.models.lora import lm_linear_targets as fila_targets
from lethe.registry import register_method

IGNORE = -100   # target id of positions that do not count (PyTorch's cross_entropy default)
EPS = 1e-5      # the paper's stabiliser in F_rel's denominator and in 1 / (w + eps)


def inverted_hinge_loss(logits, targets):
    """IHL: mean over counted positions of 1 + p(x_t) − max_{v≠x_t} p(v).

    ``logits`` [B, V, L] (lethe layout), ``targets`` [B, L] with -100 ignored. Returns a scalar;
    0 (still attached to the graph) when no position counts, since there is nothing to forget.
    """
    import torch

    per_pos = logits.transpose(1, 2)                       # [B, L, V]
    mask = targets != IGNORE
    if not bool(mask.any()):
        return logits.sum() * 0.0
    scores = per_pos[mask].float()                         # [N, V]
    true = targets[mask].long().unsqueeze(1)               # [N, 1]
    probs = torch.softmax(scores, dim=-1)
    p_true = probs.gather(1, true).squeeze(1)
    # the runner-up: the largest probability once the true token is taken out
    p_other = probs.scatter(1, true, float("-inf")).max(dim=1).values
    return (1.0 + p_true - p_other).mean()


def _weight_out_in(module):
    """The module's weight as [out, in] (Conv1D stores the transpose)."""
    w = module.weight
    return w.t() if is_conv1d(module) else w


def _squared_grad_pass(lm, batches, modules, consume) -> int:
    """For every batch ``(input_ids [B, L], targets [B, L])`` with counted tokens: the
    gradient of the batch-mean NLL w.r.t. the weights of ``modules``, handed to
    ``consume(n_tokens, {name: grad})``. Returns the total counted tokens. Parameters, their
    ``requires_grad`` flags, ``.grad`` fields and the train/eval mode are left as found."""
    import torch
    import torch.nn.functional as F

    weights = [lm.get_submodule(n).weight for n in modules]
    total = 0
    flags = [w.requires_grad for w in weights]
    was_training = lm.training
    device = weights[0].device if weights else torch.device("cpu")
    # eval mode: dropout noise would make the importance estimate depend on the seed
    lm.eval()
    try:
        for w in weights:
            w.requires_grad_(True)
        for input_ids, targets in batches:
            input_ids, targets = input_ids.to(device), targets.to(device)
            n_tok = int((targets != IGNORE).sum())
            if n_tok == 0:
                continue
            logits = lm(input_ids=input_ids, use_cache=False).logits       # [B, L, V]
            loss = F.cross_entropy(logits.transpose(1, 2).float(), targets.long(),
                                   ignore_index=IGNORE)
            # autograd.grad returns the gradients without touching any .grad field
            grads = torch.autograd.grad(loss, weights, allow_unused=True)
            del logits, loss
            consume(n_tok, {n: g.detach() for n, g in zip(modules, grads) if g is not None})
            del grads   # not alive next to the next batch's activations
            total += n_tok
    finally:
        for w, flag in zip(weights, flags):
            w.requires_grad_(flag)
        lm.train(was_training)
    return total


def _split(batches, part):
    """This rank's batches (``rank::world``) when the Fisher is shared between ranks."""
    return list(batches) if part is None else list(batches)[part[0]::part[1]]


def _summed(sums: dict, total: int, part) -> int:
    """With ``part`` (rank, world): every rank's sums added up in place (all_reduce), so each
    holds the full-data sums of its own and the others' batches; returns the total tokens."""
    if part is None or part[1] == 1:
        return total
    import torch
    import torch.distributed as dist

    for tensor in sums.values():
        dist.all_reduce(tensor)
    count = torch.tensor([total], dtype=torch.float64, device=next(iter(sums.values())).device)
    dist.all_reduce(count)
    return int(count.item())


def fisher_diagonal(lm, batches, modules, part=None):
    """Empirical diagonal Fisher of the weights of ``modules`` (names in ``lm``).

    For every batch ``(input_ids [B, L], targets [B, L])`` the batch-mean NLL is
    differentiated and ``n_tokens · grad(W)²`` accumulated, as the reference code does (the
    token count turns a mean gradient back into a per-token weight). Returns
    ``({name: sum, shaped like the weight}, total counted tokens)``. Parameters, their
    ``requires_grad`` flags, ``.grad`` fields and the train/eval mode are left as found.
    ``part`` = (rank, world): this process (one rank of a run whose ranks each hold ``lm``
    whole) takes the batches ``rank::world`` and the ranks' sums are added up (all_reduce):
    every rank gets the full-data Fisher, each having run 1/world of the batches.
    """
    import torch

    sums = {n: torch.zeros_like(lm.get_submodule(n).weight, dtype=torch.float32) for n in modules}

    def add(n_tok, grads):
        for n, g in grads.items():
            g = g.float()
            sums[n].addcmul_(g, g, value=n_tok)

    total = _squared_grad_pass(lm, _split(batches, part), modules, add)
    return sums, _summed(sums, total, part)


def relative_fisher_rows(lm, forget_batches, modules, retain_fisher, n_retain, part=None):
    """Row sums of the relative Fisher without a second full Fisher: for each weight
    W [out, in], ``Σ_j F_f[i, j] / (F_r[i, j] / N_r + eps)`` per output row i (float64 [out]),
    with F_f the forget-set Fisher (:func:`fisher_diagonal`'s sums) and F_r = ``retain_fisher``.

    F_f is linear in the per-batch squared gradients, so each batch's ``n_tok · g²`` is divided
    by the denominator and summed over the row right away. ``retain_fisher`` is turned into the
    denominator in place (it is consumed). Returns ``({name: row sums}, forget tokens N_f)``.
    ``part``: the batches shared between ranks, as in :func:`fisher_diagonal`.
    """
    import torch

    denom = {}
    row_dim = {}
    for n in modules:
        denom[n] = retain_fisher[n].div_(max(n_retain, 1)).add_(EPS)
        row_dim[n] = 0 if is_conv1d(lm.get_submodule(n)) else 1   # Conv1D stores W as [in, out]
    rows = {n: torch.zeros(_weight_out_in(lm.get_submodule(n)).shape[0], dtype=torch.float64,
                           device=denom[n].device) for n in modules}

    def add(n_tok, grads):
        for n, g in grads.items():
            ratio = g.float().pow(2).div_(denom[n])
            rows[n].add_(ratio.sum(row_dim[n], dtype=torch.float64), alpha=n_tok)

    total = _squared_grad_pass(lm, _split(forget_batches, part), modules, add)
    return rows, _summed(rows, total, part)


SVDS = ("lowrank", "exact")


def top_singular(matrix, rank: int, svd: str = "exact", seed: int = 0):
    """(U [out, r], S [r], V [in, r]) of ``matrix``: ``exact`` = the full SVD truncated;
    ``lowrank`` = torch.svd_lowrank(q=r), the official code's randomised SVD, its random
    projection seeded by ``seed`` (the caller's RNG streams are untouched)."""
    import torch

    if svd == "lowrank":
        devices = [matrix.device] if matrix.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(int(seed))
            return torch.svd_lowrank(matrix, q=rank)
    u, s_vals, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank], s_vals[:rank], vh[:rank].t()


def fila_factors(weight, row_w, rank: int, scale: float, svd: str = "exact", seed: int = 0):
    """Weighted rank-r SVD of diag(w)·W (W [out, in], float64): returns (A [r, in], B [out, r])
    with s·B·A the row-weighted rank-r approximation of W (s = alpha / r); ``svd`` as in
    :func:`top_singular`."""
    u, s_vals, v = top_singular(row_w[:, None] * weight, rank, svd, seed)
    root = (s_vals / scale).sqrt()                    # sqrt(S'), S' = S / s
    a = (v * root).t()                                # [r, in]
    b = (1.0 / (row_w + EPS))[:, None] * (u * root)   # [out, r]
    return a, b


def fila_init(lm, forget_batches, retain_batches, rank: int = 4, alpha=None, target_modules=None,
              svd: str = "exact", seed: int = 0, part=None):
    """Wrap the Hugging Face causal LM ``lm`` with peft LoRA adapters initialised by FILA.

    ``forget_batches`` / ``retain_batches``: iterables of ``(input_ids, targets)``; the
    Fisher of each is measured once on the unmodified model. Per target weight W [out, in]:
    row weights w from the relative Fisher, A, B from the weighted rank-r SVD, and
    W ← W − s·B·A so the wrapped model computes the same function as ``lm``. Returns the peft
    model with only LoRA A/B trainable; ``model.fila_row_weights`` maps each target name to w.
    ``svd``/``seed``: the SVD of :func:`top_singular` (lowrank seeded per weight from ``seed``).
    ``part`` = (rank, world): the Fisher passes shared between ranks (:func:`fisher_diagonal`);
    every rank then computes the same factors from the same reduced Fisher.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    rank = int(rank)
    alpha = float(alpha) if alpha else 2.0 * rank     # the paper's alpha = 2r
    names = fila_targets(lm, target_modules)
    for n in names:
        out_f, in_f = _weight_out_in(lm.get_submodule(n)).shape
        if rank > min(out_f, in_f):
            raise ValueError(f"LoKU rank={rank} exceeds the smaller side of '{n}' "
                             f"({out_f}x{in_f}); choose rank <= {min(out_f, in_f)}")
    # one float32 accumulator per target weight at a time: the retain Fisher, which becomes the
    # denominator of the forget pass (a 7B model's Fisher is 28 GB)
    f_r, n_r = fisher_diagonal(lm, retain_batches, names, part)
    rel_rows, n_f = relative_fisher_rows(lm, forget_batches, names, f_r, n_r, part)
    del f_r
    if n_f == 0 or n_r == 0:
        raise ValueError(f"LoKU FILA needs counted tokens on both sets (forget: {n_f}, "
                         f"retain: {n_r}); check that the targets are not all -100")

    # peft corrects fan_in_fan_out per layer type; state it up front for all-Conv1D GPT-2
    conv = all(is_conv1d(lm.get_submodule(n)) for n in names)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(names), lora_dropout=0.0,
                        bias="none", fan_in_fan_out=conv, task_type="CAUSAL_LM")
    model = get_peft_model(lm, config)
    inner = model.get_base_model()
    row_weights = {}
    with torch.no_grad():
        for k, n in enumerate(names):
            layer = inner.get_submodule(n)
            base = layer.base_layer
            is_conv = is_conv1d(base)
            scale = float(layer.scaling["default"])
            w64 = _weight_out_in(base).double()
            # w_i = sqrt(Σ_j F_rel[i, j]), F_rel = (F_f/N_f) / (F_r/N_r + eps)
            row_w = (rel_rows.pop(n) / n_f).sqrt().to(w64.device)
            a, b = fila_factors(w64, row_w, rank, scale, svd, seed + k)
            residual = w64 - scale * (b @ a)
            dtype = base.weight.dtype
            layer.lora_A["default"].weight.copy_(a.to(dtype))
            layer.lora_B["default"].weight.copy_(b.to(dtype))
            base.weight.copy_((residual.t() if is_conv else residual).to(dtype))
            row_weights[n] = row_w.float()
    model.fila_row_weights = row_weights
    return model


# --- the lethe method ---


@dataclass
class LokuConfig(UnlearnConfig):
    rank: int = 4                  # LoRA rank r (paper: 4..32)
    alpha: float = 0.0             # LoRA alpha (0 = 2r, the paper's setting)
    target_modules: list = field(default_factory=list)  # [] = every linear layer but the LM head
    retain_weight: float = 1.0     # L_IHL(forget) + retain_weight · NLL(retain) (paper: 1)
    fila: bool = True              # False: plain LoRA init (B = 0), the paper's ablation
    fila_svd: str = "lowrank"      # lowrank: torch.svd_lowrank(q=r), seeded (the official code);
                                   # exact: the full SVD truncated to rank r


@register_method("loku", config=LokuConfig, kinds=("learn", "forget"))
class Loku(LLMUnlearner):
    """LoKU: IHL on the forget set + NLL on the retain set, through FILA-initialised LoRA."""

    name = "loku"
    fsdp = True   # adapters added and merged through edit_lm (a rebuilt sharded model)

    @classmethod
    def check_stream(cls, cfg, stream, seed: int) -> None:
        from lethe.registry import check_choice

        check_choice("method.fila_svd", cfg.fila_svd, SVDS)
        super().check_stream(cfg, stream, seed)

    def prepare_unlearning(self, fx, fy, rx, ry) -> None:
        import torch

        cfg, dev = self.cfg, self.ctx.device
        if not cfg.fila:
            self.wrap_lora(cfg.rank, cfg.alpha, list(cfg.target_modules))
            return
        # paired batches for the two Fisher estimates (retain drawn to match, seeded)
        gen = torch.Generator().manual_seed(self.ctx.seed + 104729)
        bs = cfg.batch_size
        forget = [(fx[i:i + bs].to(dev), fy[i:i + bs].to(dev)) for i in range(0, len(fx), bs)]
        ridx = torch.randperm(len(rx), generator=gen)[:len(fx)]
        retain = [(rx[ridx[i:i + bs]].to(dev), ry[ridx[i:i + bs]].to(dev)) for i in range(0, len(ridx), bs)]
        # sharded (FSDP): FILA runs on an unsharded copy on every rank (edit_lm), each rank
        # differentiating its share of the Fisher batches, the sums reduced over the ranks
        part = (distributed.rank(), distributed.world_size()) if self.sharded else None
        try:   # targets are aligned with the inputs already (no shift inside)
            self.edit_lm(lambda lm: fila_init(lm, forget, retain, cfg.rank, cfg.alpha or None,
                                              list(cfg.target_modules) or None, cfg.fila_svd,
                                              self.ctx.seed + 15485863, part))
        except ValueError as exc:
            raise ConfigError(f"method (loku): {exc}") from None

    def unlearn_loss(self, fx, fy, rx, ry):
        return inverted_hinge_loss(self.model(fx), fy) + self.cfg.retain_weight * lm_nll(self.model(rx), ry)
