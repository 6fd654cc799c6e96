"""Cost of serving one deletion: S3T vs SISA vs retraining from scratch (issue 5).

One process, one dataset, one frozen backbone, one request sequence, three methods:

  data      split_digits with one learn experience: 25% test, and of the training split
            30% public (scenario.public_fraction: never deletable) and 70% deletable
  backbone  an MLP (4 hidden layers) pretrained on the public split only
            (method.lora.pretrain_epochs, same seed in every method), then frozen; every
            method trains LoRA adapters (same rank, targets) and the head
  s3t       shards × slices, B = slices cyclic sequences, LoRA groups per slice
  sisa      the same shards × slices, LoRA + head trained per slice stage, majority vote
  retrain   LoRA + head trained from scratch on all live data (the exact oracle)

All three use lethe's deterministic training loop with the same epochs, batch size,
optimizer and lr, on the same device (SISA gets its best reasonable setting: it retrains
only from the checkpoint before the sample's slice, in one shard).

It first checks quality and exactness and fails loudly otherwise: all three reach a usable
accuracy, S3T's served models are their stored prefix checkpoints (= deactivating the later
LoRA groups) and exclude every deleted sample, and SISA's retrained shard is bitwise the
shard trained from scratch without the sample. Then it serves --requests single-sample
deletion requests (drawn like ``scenario.forget_requests: [{n: 1, policy: random}]``),
each by the three methods in turn, after one warm-up request; it prints every side's
median and the accuracy after the requests. Last line:
``s3t_vs_retrain=<median retrain / median s3t> s3t_vs_sisa=<median sisa / median s3t>``.

    .venv/bin/python benchmarks/unlearning_cost.py [--requests 15] [--device cuda]
        [--epochs 15] [--shards 5] [--slices 4] [--threads N]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings

import torch


def build_stream(seed: int, public_fraction: float):
    """split_digits with one learn experience (all classes) and a public split."""
    from lethe.scenarios.split_digits import SplitDigitsConfig, split_digits

    return split_digits(SplitDigitsConfig(n_experiences=1, public_fraction=public_fraction,
                                          class_seed=seed), seed)


def make_method(name: str, stream, args, device):
    from omegaconf import OmegaConf

    from lethe.methods.base import MethodContext
    from lethe.models.vision import MLPConfig, ModelInfo
    from lethe.platform.config import TrainConfig
    from lethe.registry import get

    entry = get("methods", name)
    lora = {"rank": args.rank, "alpha": float(args.rank), "dropout": 0.0,
            "pretrain_epochs": args.pretrain_epochs}
    node = {"lora": lora}
    if name in ("s3t", "sisa"):
        node.update(shards=args.shards, slices=args.slices)
    cfg = OmegaConf.merge(OmegaConf.structured(entry.config), node)
    train = OmegaConf.structured(TrainConfig(epochs=args.epochs, batch_size=args.batch_size,
                                             optimizer="adam", lr=args.lr))
    ctx = MethodContext(train=train, device=device, stream=stream, seed=args.seed)
    torch.manual_seed(args.seed)             # same MLP and LoRA initialisation for every method
    model = get("models", "mlp").obj(OmegaConf.structured(MLPConfig(hidden=args.hidden, layers=4)),
                                     ModelInfo(stream.input_shape, stream.n_classes))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # Avalanche: "No loggers specified"
        return entry.obj(cfg, model, ctx)


def test_accuracy(method, stream, device) -> float:
    from lethe.metrics.unlearning import accuracy, logits_of

    return accuracy(logits_of(method.predict, stream.test.x, stream.test.task, device), stream.test.y)


def forget_quality(method, stream, forgotten, device) -> tuple[float, float]:
    """(forget-set accuracy, loss-threshold MIA AUC forget vs test)."""
    from lethe.metrics.unlearning import accuracy, logits_of, mia_auc, sample_losses

    pool = stream.train
    rows = torch.isin(pool.ids, forgotten)
    fl = logits_of(method.predict, pool.x[rows], pool.task[rows], device)
    tl = logits_of(method.predict, stream.test.x, stream.test.task, device)
    return (accuracy(fl, pool.y[rows]),
            mia_auc(sample_losses(fl, pool.y[rows]), sample_losses(tl, stream.test.y)))


def fail(msg: str) -> None:
    print(f"CHECK FAILED: {msg}", file=sys.stderr)
    sys.exit(1)


def check_s3t(m, deleted) -> None:
    for j in range(m.n_shards):
        served = m.served_sequence(j)
        if served is None:
            continue
        b, p = served
        state, stored = m.served_state(j), m.ckpts[j][b][p]
        if not all(torch.equal(state[k], stored[k]) for k in stored):
            fail(f"S3T shard {j} does not serve its stored prefix checkpoint")
        deact = m.deactivate(j, b, p)
        if not all(torch.equal(deact[k], stored[k]) for k in stored):
            fail(f"S3T shard {j}: deactivating groups {p + 1}.. differs from checkpoint {p}")
        if set(m.training_ids(j).tolist()) & set(deleted):
            fail(f"S3T shard {j} serves a model trained on a deleted sample")


def check_sisa(m, args, stream, device) -> None:
    """The shard touched last equals a fresh SISA's training of that shard from scratch."""
    j = int(m.shard[m.deleted].tolist()[-1])
    fresh = make_method("sisa", stream, args, device)
    fresh.seen, fresh.deleted = m.seen.clone(), m.deleted.clone()
    fresh.refresh_shard(j)
    a, b = m.served_state(j), fresh.served_state(j)
    if not all(torch.equal(a[k], b[k]) for k in a):
        fail(f"SISA shard {j} after deletion differs from training it from scratch without the sample")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=15, help="timed deletion requests (+1 warm-up)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--shards", type=int, default=5)
    p.add_argument("--slices", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--pretrain-epochs", type=int, default=10)
    p.add_argument("--public-fraction", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    import lethe
    from lethe.scenarios.forget import build_forget_experiences

    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}, threads {torch.get_num_threads()}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f", lethe {lethe.__version__}")
    stream = build_stream(args.seed, args.public_fraction)
    print(f"data: sklearn digits, {len(stream.train.y)} deletable training samples, "
          f"{len(stream.public.y)} public (backbone pretraining only), {len(stream.test.y)} test")
    print(f"settings: MLP 64-{args.hidden}x4-10 backbone frozen, LoRA r={args.rank} on its 4 "
          f"hidden layers + head; {args.epochs} epochs per (stage) training, batch "
          f"{args.batch_size}, Adam lr {args.lr}; S3T and SISA: {args.shards} shards x "
          f"{args.slices} slices, S3T B={args.slices} cyclic sequences, SISA majority vote")

    methods = {name: make_method(name, stream, args, device) for name in ("s3t", "sisa", "retrain")}
    # one backbone: each method pretrained its copy on the public split with the same seeds
    frozen = [{k: v for k, v in m.model.state_dict().items() if "base_layer" in k}
              for m in methods.values()]
    if not all(a.keys() == frozen[0].keys() and all(torch.equal(a[k], frozen[0][k]) for k in a)
               for a in frozen):
        fail("the three methods do not share one frozen backbone")
    learn = stream.experiences[0]
    for name, m in methods.items():
        t0 = time.perf_counter()
        m.learn(learn)
        if device.type == "cuda":
            torch.cuda.synchronize()
        print(f"{name:8s} initial training {time.perf_counter() - t0:7.2f} s, "
              f"test accuracy {test_accuracy(m, stream, device):.4f}")

    requests = build_forget_experiences(stream, [{"after": 0, "n": 1}] * (args.requests + 1),
                                        args.seed)[0]
    times: dict[str, list[float]] = {name: [] for name in methods}
    samples: dict[str, list[float]] = {name: [] for name in methods}
    deleted: list[int] = []
    for r, req in enumerate(requests):
        deleted += req.sample_ids.tolist()
        for name, m in methods.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            m.unlearn(req)
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            if r > 0:                         # request 0 is the warm-up
                times[name].append(dt)
                samples[name].append(m.stats["retrain_samples"])
        if r == 0:   # check before timing: exactness after a real deletion
            check_s3t(methods["s3t"], deleted)
            check_sisa(methods["sisa"], args, stream, device)
    check_s3t(methods["s3t"], deleted)

    print(f"after {len(requests)} single-sample deletion requests "
          f"({args.requests} timed, first = warm-up):")
    accs = {}
    for name, m in methods.items():
        accs[name] = test_accuracy(m, stream, device)
        facc, auc = forget_quality(m, stream, torch.tensor(deleted), device)
        med = statistics.median(times[name])
        print(f"  {name:8s} serve median {med * 1e3:10.3f} ms (min {min(times[name]) * 1e3:.3f}, "
              f"max {max(times[name]) * 1e3:.3f}); samples re-processed median "
              f"{statistics.median(samples[name]):8.0f}; test acc {accs[name]:.4f}, forget acc "
              f"{facc:.4f}, MIA AUC {auc:.3f}")
    s3t = methods["s3t"]
    print(f"  s3t: live sequences per shard {[sum(a > 0 for a in al) for al in s3t.alive]}, "
          f"requests served without retraining {s3t.stats['requests_since_retrain']}")
    if min(accs.values()) < 0.8:
        fail(f"accuracy after the requests is too low to compare costs: {accs}")
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"s3t_vs_retrain={med['retrain'] / med['s3t']:.1f} s3t_vs_sisa={med['sisa'] / med['s3t']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
