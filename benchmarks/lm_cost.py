"""LM-side cost of two methods, side by side in one process (issue 8).

(1) HFT vs full fine-tuning: the same tiny Llama (random init), the same token batches, AdamW.
    HFT's frozen half comes from the real method (``HFT.resample``); frozen matrices skip
    their weight gradients and optimizer updates. After warm-up, rounds alternate a few
    full-FT steps and a few HFT steps so load changes on a shared machine hit both alike;
    the speedup is the median over rounds of (full step time / HFT step time).
    Paper (Hui et al., 2024): ~30% less time per step.

(2) ConPET-dynamic training step time at task 8 vs task 2: the real method on a generated
    8-task text stream (random small BERT by default, ``--encoder minilm`` for the pretrained
    MiniLM), trained task after task through lethe's training template. A timing plugin
    records every expert-training iteration (forward with the selector's cached choices and
    cached old-expert logits, backward, optimizer step); the selector's own steps are timed
    per batch. The ratio compares the median iteration at task 8 with task 2 (goal ≤ 1.2:
    the cost per step does not grow with the number of tasks).

The last line is ``hft_step_speedup=<x> conpet_step_ratio_t8_t2=<y>``.

    .venv/bin/python benchmarks/lm_cost.py [--device cpu] [--rounds 8] [--threads N]
        [--d-model 768] [--layers 4] [--block 128] [--batch 8] [--encoder tiny|minilm]

What bounds (1): a frozen matrix still propagates gradients to its input; HFT skips its
weight-gradient product (one of the three matmuls per step) and its optimizer update. The
script prints that FLOP bound for the linear layers (≈ 1.2 with trainable embeddings and
LM head); on a CPU, where matmuls dominate, the measured speedup approaches it.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- (1) HFT vs full fine-tuning -----------------------------------------------------------
def hft_speedup(args, device) -> dict:
    from omegaconf import OmegaConf

    from lethe.methods.base import MethodContext
    from lethe.methods.hft import HFT, HFTConfig
    from lethe.models.hf import HFCausalLMConfig, hf_causal_lm
    from lethe.models.vision import ModelInfo
    from lethe.platform.config import TrainConfig

    torch.manual_seed(0)
    vocab = 512
    mcfg = OmegaConf.structured(HFCausalLMConfig(arch="llama", layers=args.layers, d_model=args.d_model,
                                                 heads=max(1, args.d_model // 64), d_ff=int(2.6875 * args.d_model)))
    info = ModelInfo((args.block,), vocab)
    full = hf_causal_lm(mcfg, info).to(device)
    half = hf_causal_lm(mcfg, info).to(device)
    half.load_state_dict(full.state_dict())
    train = OmegaConf.structured(TrainConfig(optimizer="adamw", lr=1e-3, batch_size=args.batch))
    ctx = MethodContext(train=train, device=device, stream=None, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hft = HFT(OmegaConf.structured(HFTConfig()), half, ctx)
    hft.resample(0)
    frac = hft.log_params()["params/frac_trainable"]
    # linear-layer FLOPs per token ∝ weight size: forward + input grad + weight grad (if trained)
    mats = [m for m in hft.model.modules() if isinstance(m, torch.nn.Linear)]
    total = sum(m.weight.numel() for m in mats)
    frozen = sum(m.weight.numel() for m in mats if not m.weight.requires_grad)
    bound = 3 * total / (3 * total - frozen)
    opt_full = torch.optim.AdamW([p for p in full.parameters() if p.requires_grad], lr=1e-3)
    opt_half = torch.optim.AdamW([p for p in hft.model.parameters() if p.requires_grad], lr=1e-3)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, vocab, (args.batch, args.block + 1), generator=g).to(device)
               for _ in range(4)]

    def step(model, opt, k):
        b = batches[k % len(batches)]
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(b[:, :-1]), b[:, 1:])
        loss.backward()
        opt.step()

    def timed(model, opt, n):
        sync(device)
        t = time.perf_counter()
        for k in range(n):
            step(model, opt, k)
        sync(device)
        return (time.perf_counter() - t) / n

    for _ in range(2):   # warm-up (allocator, kernels, Adam state)
        timed(full, opt_full, 2)
        timed(hft.model, opt_half, 2)
    ratios, t_full, t_half = [], [], []
    for r in range(args.rounds):
        order = [(full, opt_full, t_full), (hft.model, opt_half, t_half)]
        if r % 2:
            order.reverse()
        for model, opt, out in order:
            out.append(timed(model, opt, args.steps))
        ratios.append(t_full[-1] / t_half[-1])
    return {"speedup": statistics.median(ratios), "full_ms": 1e3 * statistics.median(t_full),
            "hft_ms": 1e3 * statistics.median(t_half), "frac_trainable": frac,
            "frozen": hft.log_params()["hft/frac_frozen"], "bound": bound}


# --- (2) ConPET-dynamic step time at task 8 vs task 2 -------------------------------------
class IterTimer:
    """Avalanche-named callbacks: wall time of every training iteration, by task position."""

    def __init__(self, method_ref):
        self.method_ref, self.times, self.t0 = method_ref, {}, 0.0

    def before_training_iteration(self, strategy, **kwargs):
        sync(strategy.device)
        self.t0 = time.perf_counter()

    def after_training_iteration(self, strategy, **kwargs):
        sync(strategy.device)
        self.times.setdefault(self.method_ref().position, []).append(time.perf_counter() - self.t0)


def conpet_ratio(args, device) -> dict:
    from lethe.methods.base import MethodContext
    from lethe.platform.config import load_config
    from lethe.platform.runner import build_components

    over = ["scenario.generated_classes=12", "scenario.n_experiences=8", "scenario.generated_per_class=32",
            "scenario.max_length=32", "method.batch_limit=16", "method.mem_per_class=8",
            "train.epochs=2", "train.batch_size=16", f"device={device.type}"]
    if args.encoder == "tiny":
        over += ["model.path=null", "model.hidden=128", "model.layers=2", "model.heads=4"]
    cfg = load_config("conpet_dynamic_text", over)
    torch.manual_seed(0)
    stream, model, entry = build_components(cfg)
    holder = {}
    timer = IterTimer(lambda: holder["m"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = entry.obj(cfg.method, model, MethodContext(train=cfg.train, device=device, stream=stream,
                                                       seed=0, plugins=[timer]))
    holder["m"] = m
    sel_times = {}
    real = m.train_selector

    def timed_selector(t):
        sync(device)
        t0 = time.perf_counter()
        real(t)
        sync(device)
        n = len(m.stage_loader(seed_tag=1)) * (m.cfg.selector_epochs or m.ctx.train.epochs)
        sel_times[t] = (time.perf_counter() - t0) / n

    m.train_selector = timed_selector
    for exp in stream.experiences:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m.learn(exp)
    t2, t8 = statistics.median(timer.times[1]), statistics.median(timer.times[7])
    return {"ratio": t8 / t2, "t2_ms": 1e3 * t2, "t8_ms": 1e3 * t8, "n_steps": len(timer.times[7]),
            "sel2_ms": 1e3 * sel_times[1], "sel8_ms": 1e3 * sel_times[7],
            "tasks": len(stream.experiences)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3, help="steps per side per round")
    ap.add_argument("--threads", type=int, default=0, help="0 = auto (1 when the machine is loaded)")
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--encoder", choices=("tiny", "minilm"), default="tiny")
    args = ap.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    threads_note = "default"
    if args.threads > 0:
        torch.set_num_threads(args.threads)
        threads_note = "--threads"
    elif hasattr(os, "getloadavg") and os.getloadavg()[0] >= (os.cpu_count() or 1):
        # spinning intra-op threads on an oversubscribed machine time the scheduler; both
        # sides of each comparison get the same setting
        torch.set_num_threads(1)
        threads_note = f"1 (auto: load average {os.getloadavg()[0]:.1f} ≥ {os.cpu_count()} CPUs)"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch.cuda.is_available() is False on this machine")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "-"
    print(f"machine: {platform.node()} {platform.machine()} cpus={os.cpu_count()} torch={torch.__version__} "
          f"threads={torch.get_num_threads()} [{threads_note}] device={device} gpu={gpu}")
    h = hft_speedup(args, device)
    print(f"HFT vs full FT (Llama d={args.d_model} L={args.layers}, batch {args.batch}×{args.block} tokens, "
          f"AdamW): full {h['full_ms']:.1f} ms/step, HFT {h['hft_ms']:.1f} ms/step "
          f"(trainable {h['frac_trainable']:.1%}, frozen units {h['frozen']:.0%}), "
          f"median speedup over {args.rounds} rounds {h['speedup']:.2f}x (linear-layer FLOP bound "
          f"{h['bound']:.2f}x)")
    c = conpet_ratio(args, device)
    print(f"ConPET-dynamic ({args.encoder} encoder, {c['tasks']} tasks, batch 16, k=1): expert step "
          f"{c['t2_ms']:.1f} ms at task 2, {c['t8_ms']:.1f} ms at task 8 (median of {c['n_steps']}); "
          f"selector step {c['sel2_ms']:.1f} / {c['sel8_ms']:.1f} ms")
    print(f"hft_step_speedup={h['speedup']:.2f} conpet_step_ratio_t8_t2={c['ratio']:.2f}")


if __name__ == "__main__":
    main()
