"""lethe's batched evaluator vs Avalanche's ``strategy.eval`` vs a bare forward pass (issue 11).

One process, one trained model per setting, one 20-experience stream (permuted digits:
experience e applies a fixed pixel permutation to sklearn's 8x8 digits; e = 0 is the
identity). Three ways to get the accuracy of every test experience:

  (a) Avalanche: ``Naive.eval(test_stream)`` with ``accuracy_metrics(experience=True)``,
      ``eval_mb_size`` equal to lethe's batch size, num_workers=0, pin_memory on CUDA only
  (b) lethe: ``Evaluator.evaluate`` (one pass, predictions stored) + the accuracy-matrix row
  (c) floor: ``model(x)`` over the same preloaded tensor, same batch size, inference_mode

It first checks that (a) and (b) agree on every accuracy (|Δ| ≤ 1e-6) and exits non-zero
otherwise. Then, after warm-up, it times ``--repeats`` rounds; each round runs (a) once and
(b) and (c) alternately, pass by pass, so load changes on a shared machine hit both alike.
It prints the median time of each side and the median over rounds of the per-round ratios.
Settings: a small MLP and a small CNN (BatchNorm). The last line is
``speedup_vs_avalanche=<a/b> overhead_vs_forward=<b/c>`` for the MLP setting.

    .venv/bin/python benchmarks/eval_vs_avalanche.py [--device cuda] [--repeats 15]
        [--settings mlp,cnn] [--threads N] [--batch-size N]
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
import warnings

import torch


def permuted_digits(n_experiences: int, seed: int):
    """Avalanche benchmark + lethe TestSet of permuted digits (same samples, same order)."""
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.benchmarks.scenarios.supervised import with_classes_timeline
    from avalanche.benchmarks.scenarios.task_aware import with_task_labels
    from sklearn.datasets import load_digits

    from lethe.scenarios.streams import avalanche_dataset, stratified_split
    from lethe.scenarios.types import TestSet

    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).flatten(1)
    y = torch.tensor(digits.target, dtype=torch.long)
    n = len(y)
    tr, te = (torch.as_tensor(i) for i in stratified_split(digits.target, 0.25, seed))
    g = torch.Generator().manual_seed(seed)
    perms = [torch.arange(64)] + [torch.randperm(64, generator=g) for _ in range(n_experiences - 1)]
    train_sets, test_sets, parts = [], [], []
    for e, perm in enumerate(perms):
        xe = x[:, perm].reshape(-1, 1, 8, 8)
        ids = torch.arange(n) + e * n          # a permuted copy is a different sample
        train_sets.append(avalanche_dataset(xe[tr], y[tr], ids[tr]))
        test_sets.append(avalanche_dataset(xe[te], y[te], ids[te]))
        parts.append((xe[te], y[te], torch.full((len(te),), e), ids[te]))
    bm = with_classes_timeline(with_task_labels(benchmark_from_datasets(train=train_sets,
                                                                        test=test_sets)))
    test = TestSet(x=torch.cat([p[0] for p in parts]), y=torch.cat([p[1] for p in parts]),
                   exp=torch.cat([p[2] for p in parts]).long(),
                   task=torch.zeros(sum(len(p[1]) for p in parts), dtype=torch.long),
                   ids=torch.cat([p[3] for p in parts]))
    return bm, test


def build_model(kind: str):
    from lethe.models.vision import MLPConfig, ModelInfo, SimpleCNNConfig, mlp, simple_cnn

    info = ModelInfo(input_shape=(1, 8, 8), n_classes=10)
    if kind == "mlp":
        return mlp(MLPConfig(hidden=128, layers=2), info)
    return simple_cnn(SimpleCNNConfig(channels=8), info)


def trained_strategy(kind: str, bm, device, n_train: int, seed: int):
    """Avalanche Naive with accuracy metrics, trained on the first n_train experiences."""
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin

    torch.manual_seed(seed)
    model = build_model(kind).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")       # "No loggers specified": we read eval()'s dict
        evaluation = EvaluationPlugin(accuracy_metrics(experience=True), loggers=[])
    strategy = Naive(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=3e-3),
                     criterion=torch.nn.CrossEntropyLoss(), train_mb_size=64, train_epochs=2,
                     eval_mb_size=256, device=device, evaluator=evaluation)
    for exp in bm.train_stream[:n_train]:
        strategy.train(exp, num_workers=0)
    return strategy


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_setting(kind: str, bm, test, device, args) -> dict:
    from lethe.metrics import cl
    from lethe.metrics.evaluator import Evaluator

    t0 = time.perf_counter()
    strategy = trained_strategy(kind, bm, device, args.train_experiences, args.seed)
    t_train = time.perf_counter() - t0
    model = strategy.model
    E = test.n_experiences
    ev = Evaluator(test, device, batch_size=args.batch_size)
    predict = lambda x, t: model(x)  # noqa: E731 - what Method.predict does for a plain model
    ev.evaluate(predict, "warmup", model)          # also sizes the batch when --batch-size 0
    bs = ev.batch_size
    strategy.eval_mb_size = bs                     # fair: the same evaluation batch size
    eval_kwargs = {"num_workers": 0, "pin_memory": device.type == "cuda"}
    print(f"\n[{kind}] params={sum(p.numel() for p in model.parameters())} "
          f"trained on {args.train_experiences} experiences in {t_train:.1f} s; "
          f"test samples={len(test.y)} in {E} experiences")
    print(f"[{kind}] settings: batch size {bs} for all three (Avalanche eval_mb_size={bs}, "
          f"num_workers=0, pin_memory={eval_kwargs['pin_memory']}), device={device}, fp32")

    def avalanche_pass() -> list[float]:
        res = strategy.eval(bm.test_stream, **eval_kwargs)
        return [res[f"Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp{e:03d}"] for e in range(E)]

    def lethe_pass() -> list[float]:
        preds = ev.evaluate(predict, "bench", model)
        return cl.accuracy_matrix(preds, ev.store.targets, ev.store.exp, E)[0].tolist()

    x = ev.x

    def forward_pass() -> None:
        model.eval()     # Avalanche's eval leaves the model in train mode (BatchNorm!)
        with torch.inference_mode():
            for s in range(0, len(x), bs):
                model(x[s:s + bs])
        sync(device)

    # --- check before timing ------------------------------------------------------------
    acc_a, acc_b = avalanche_pass(), lethe_pass()
    diffs = [abs(a - b) for a, b in zip(acc_a, acc_b)]
    if len(acc_a) != E or max(diffs) > 1e-6:
        bad = [(e, a, b) for e, (a, b) in enumerate(zip(acc_a, acc_b)) if abs(a - b) > 1e-6]
        sys.exit(f"[{kind}] MISMATCH between Avalanche and lethe accuracies "
                 f"(experience, avalanche, lethe): {bad}")
    print(f"[{kind}] check: Avalanche and lethe agree on all {E} experience accuracies "
          f"(max |Δ| = {max(diffs):.1e}); accuracy exp 0..{E - 1}: "
          + " ".join(f"{a:.3f}" for a in acc_b))

    # --- timing: warm-up, then interleaved rounds; fast sides loop `inner` passes ---------
    for _ in range(args.warmup):
        avalanche_pass(), lethe_pass(), forward_pass()
    t0 = time.perf_counter()
    for _ in range(3):
        lethe_pass()
    inner = max(3, int(args.target_s / max((time.perf_counter() - t0) / 3, 1e-6)))
    times = {"avalanche": [], "lethe": [], "forward": []}
    ratios = {"speedup": [], "overhead": []}
    fast = {"lethe": lethe_pass, "forward": forward_pass}
    for r in range(args.repeats):
        gc.collect()     # Avalanche leaves garbage; collect it outside anyone's clock
        gc.disable()
        try:
            t = time.perf_counter()
            avalanche_pass()
            t_a = time.perf_counter() - t
            # lethe and the floor alternate pass by pass, so load changes on a shared
            # machine hit both alike
            spent = {"lethe": 0.0, "forward": 0.0}
            for i in range(inner):
                for name in (("lethe", "forward") if (i + r) % 2 == 0 else ("forward", "lethe")):
                    t = time.perf_counter()
                    fast[name]()
                    spent[name] += time.perf_counter() - t
        finally:
            gc.enable()
        t_l, t_f = spent["lethe"] / inner, spent["forward"] / inner
        times["avalanche"].append(t_a), times["lethe"].append(t_l), times["forward"].append(t_f)
        ratios["speedup"].append(t_a / t_l), ratios["overhead"].append(t_l / t_f)
        ev.store.load([], torch.empty(0, len(test.y), dtype=torch.long))   # keep memory flat
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {k: statistics.median(v) for k, v in ratios.items()} | med
    print(f"[{kind}] median of {args.repeats} (lethe/forward: {inner} passes each): "
          f"avalanche {med['avalanche'] * 1e3:.2f} ms | lethe {med['lethe'] * 1e3:.2f} ms | "
          f"forward {med['forward'] * 1e3:.2f} ms (ratios below: median of per-round ratios)")
    print(f"[{kind}] speedup_vs_avalanche={out['speedup']:.2f} "
          f"overhead_vs_forward={out['overhead']:.3f}")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--experiences", type=int, default=20)
    p.add_argument("--train-experiences", type=int, default=3,
                   help="experiences the model is trained on before evaluation")
    p.add_argument("--batch-size", type=int, default=0, help="0: lethe's automatic size")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--target-s", type=float, default=0.05,
                   help="lethe/forward passes per round add up to about this many seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--settings", default="cnn,mlp", help="comma list of mlp, cnn")
    p.add_argument("--threads", type=int, default=-1,
                   help="torch threads for all three sides; 0: torch's default; -1 (default): "
                        "1 when the machine is oversubscribed (load average >= CPU count), "
                        "else torch's default")
    args = p.parse_args(argv)
    threads_note = "torch default"
    if args.threads < 0:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        if load >= (os.cpu_count() or 1):
            # spinning intra-op threads on a shared, oversubscribed machine time the
            # scheduler, not the code (measured here: a 2-thread MLP pass 6x slower than a
            # 1-thread one at load 7 on 2 cores); every side gets the same setting
            torch.set_num_threads(1)
            threads_note = f"1 (auto: load average {load:.1f} >= {os.cpu_count()} CPUs)"
    elif args.threads > 0:
        torch.set_num_threads(args.threads)
        threads_note = "--threads"
    dev = args.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda: torch.cuda.is_available() is False on this machine")
    device = torch.device(dev)

    import avalanche

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "-"
    print(f"machine: {platform.node()} {platform.machine()} cpus={os.cpu_count()} "
          f"torch={torch.__version__} avalanche={avalanche.__version__} "
          f"threads={torch.get_num_threads()} [{threads_note}] device={device} gpu={gpu}")
    bm, test = permuted_digits(args.experiences, args.seed)
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    results = {kind: run_setting(kind, bm, test, device, args) for kind in settings}
    ref = results.get("mlp") or next(iter(results.values()))
    print(f"speedup_vs_avalanche={ref['speedup']:.2f} overhead_vs_forward={ref['overhead']:.3f}")


if __name__ == "__main__":
    main()
