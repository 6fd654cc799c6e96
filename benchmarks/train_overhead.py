"""lethe's training vs a plain PyTorch loop vs Avalanche's ``Naive``: overhead, start-up, quality.

One process, three sides, the same data, the same initial weights (one state_dict loaded into
each side's model), the same sample order and the same number of Adam steps:

  (a) plain: ``x[idx]`` batches of tensors preloaded on the device, ``cross_entropy``,
      ``zero_grad``/``backward``/``step``: the floor
  (b) lethe: the method built the way ``lethe run`` builds it (the registered ``naive``
      Method, its context with the runner's training plugins ``TrainProgress(tracker=None)``
      and ``FiniteLossCheck`` and the runner's Avalanche loss-metric evaluator; its logger
      writes to no store), trained by ``method.serve(experience)`` as the runner does
  (c) Avalanche: ``Naive`` with ``EvaluationPlugin()`` (no metrics, ``loggers=[]``)

Settings shared by all three: batch size, num_workers=0, ``torch.set_num_threads(--threads)``,
device, no evaluation inside the timed region, progress bars off (``TQDM_DISABLE=1``; the
runner's bars also switch off when stderr is not a terminal). Avalanche's template shuffles
each experience's data with a DataLoader drawn from torch's global RNG; every side starts from
``torch.manual_seed(--seed)`` and the plain loop replays that draw (computed before timing).

Check before timing: one untimed run per side; every tensor of the final state_dict must agree
with the plain loop's (|Δ| ≤ 1e-5) and every side must have taken the same number of optimizer
steps, else the script exits non-zero. Then ``--warmup`` untimed rounds and ``--repeats``
timed rounds, the sides in a rotating order per round; medians per side and medians of the
per-round ratios are printed.

Cases: ``mlp`` (64-256-10 on 5-experience split digits, Adam 1e-3, batch 32, epochs chosen
for ~200 steps) and ``cnn`` (lethe's ``simple_cnn`` on random 3x32x32 images, 5 experiences,
batch 64, 50 steps). ``startup``: wall time of a ``lethe run split_digits train.epochs=1``
subprocess (temporary SQLite store and checkpoint dir) minus its logged ``time/train_s`` +
``time/eval_s``, next to ``python -c "import torch, avalanche"`` in a fresh subprocess, and
the same ending by ``os._exit`` as ``lethe`` ends, skipping the interpreter's teardown (median
of 3 each). ``quality``: final average accuracy (acc/avg_seen) of naive / replay / EWC / LwF on
5-experience split digits (the preset's 8 epochs), lethe's ``run_experiment`` on the
``split_digits`` preset vs Avalanche's own strategies with the same hyperparameters and the
same initial model.

The last line is ``lethe_vs_plain=<x> lethe_vs_avalanche=<y> startup_over_imports_s=<z>``
(x, y: MLP case, lethe time / plain time and lethe time / Avalanche time).

    .venv/bin/python benchmarks/train_overhead.py [--repeats 5] [--threads 1] [--device cpu]
        [--parts mlp,cnn,startup,quality] [--quality-epochs 8]
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")   # before tqdm is imported anywhere

import torch  # noqa: E402 - after the environment it reads

TOL = 1e-5
SIDES = ("plain", "lethe", "avalanche")


# --- the two cases --------------------------------------------------------------------------
class Case:
    """A stream, a model builder, the config nodes lethe's method reads, and the weights."""

    def __init__(self, name, cfg, stream, build_model):
        self.name, self.cfg, self.stream, self.build_model = name, cfg, stream, build_model
        self.init_state = {k: v.clone() for k, v in build_model().state_dict().items()}
        pool, bs = stream.train, int(cfg.train.batch_size)
        self.parts = [(pool.x[pool.exp == e], pool.y[pool.exp == e])
                      for e in range(len(stream.experiences))]
        per_pass = sum(math.ceil(len(y) / bs) for _, y in self.parts)
        self.steps = per_pass * int(cfg.train.epochs)

    def fresh_model(self, device):
        model = self.build_model()
        model.load_state_dict(self.init_state)
        return model.to(device)


def mlp_case(device, target_steps: int) -> Case:
    from lethe import registry
    from lethe.models.vision import ModelInfo
    from lethe.platform.config import load_config

    base = ["method.name=naive", "model.hidden=256", "model.layers=1", "train.optimizer=adam",
            "train.lr=0.001", "train.batch_size=32", f"device={device}"]
    cfg = load_config("split_digits", base)
    stream = registry.get("scenarios", "split_digits").obj(cfg.scenario, cfg.seed)
    per_pass = sum(math.ceil(len(e.train.dataset) / 32) for e in stream.experiences)
    epochs = max(1, round(target_steps / per_pass))
    cfg = load_config("split_digits", base + [f"train.epochs={epochs}"])
    info = ModelInfo(input_shape=stream.input_shape, n_classes=stream.n_classes)
    return Case("mlp", cfg, stream,
                lambda: registry.get("models", "mlp").obj(cfg.model, info))


def cnn_case(device, steps: int, seed: int) -> Case:
    from lethe import registry
    from lethe.models.vision import ModelInfo
    from lethe.platform.config import load_config
    from lethe.scenarios.streams import class_incremental_stream

    bs, n_exp = 64, 5
    n = steps * bs                   # every experience a whole number of batches
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n + 500, 3, 32, 32, generator=g)   # random images: the cost is the point
    y = torch.arange(n + 500) % 10
    ids = torch.arange(n + 500)
    groups = [[2 * e, 2 * e + 1] for e in range(n_exp)]
    stream = class_incremental_stream((x[:n], y[:n], ids[:n]), (x[n:], y[n:], ids[n:]), groups,
                                      task_labels=False, input_shape=(3, 32, 32), n_classes=10)
    cfg = load_config("split_digits", [
        "method.name=naive", "model.name=simple_cnn", "train.optimizer=adam", "train.lr=0.001",
        f"train.batch_size={bs}", "train.epochs=1", f"device={device}"])
    info = ModelInfo(input_shape=(3, 32, 32), n_classes=10)
    return Case("cnn", cfg, stream,
                lambda: registry.get("models", "simple_cnn").obj(cfg.model, info))


# --- the three sides: each returns (model, optimizer-step counter, train callable) -----------
def template_orders(case: Case, seed: int) -> list[list[torch.Tensor]]:
    """The sample order Avalanche's template draws after ``torch.manual_seed(seed)``: one
    shuffling DataLoader per experience, iterated once per epoch (checked, not assumed: the
    final-parameter check fails if this order is not the template's)."""
    from torch.utils.data import DataLoader

    torch.manual_seed(seed)
    bs, epochs = int(case.cfg.train.batch_size), int(case.cfg.train.epochs)
    out = []
    for _, y in case.parts:
        loader = DataLoader(range(len(y)), batch_size=bs, shuffle=True)
        out.append([torch.cat(list(loader)) for _ in range(epochs)])
    return out


def plain_side(case: Case, device, orders):
    import torch.nn.functional as F

    model = case.fresh_model(device)
    opt = torch.optim.Adam(model.parameters(), lr=float(case.cfg.train.lr))
    bs = int(case.cfg.train.batch_size)
    data = [(x.to(device), y.to(device), [o.to(device).split(bs) for o in epochs])
            for (x, y), epochs in zip(case.parts, orders)]
    count = [0]

    def train():
        model.train()
        for x, y, epochs in data:
            for batches in epochs:
                for idx in batches:
                    opt.zero_grad(set_to_none=True)
                    loss = F.cross_entropy(model(x[idx]), y[idx])
                    loss.backward()
                    opt.step()
                    count[0] += 1

    return model, lambda: count[0], train


class _NoStore:
    """Stands in for the MLflow tracker behind the runner's Avalanche logger: the loss metric
    is computed and handed over as in a run, but the store write (one per epoch) stays out of
    the timed region, as TrainProgress(tracker=None) keeps out its train/lr write."""

    def log_metrics(self, metrics, step):
        pass


def lethe_side(case: Case, device):
    from lethe import registry
    from lethe.engine.plugins import FiniteLossCheck, TrainProgress
    from lethe.methods.base import MethodContext
    from lethe.platform.tracking import make_avalanche_evaluator

    cfg = case.cfg
    describe = lambda: "benchmark"  # noqa: E731 - what the runner's plugins call for a label
    plugins = [TrainProgress(None, describe, cfg.train.epochs), FiniteLossCheck(describe)]
    ctx = MethodContext(train=cfg.train, device=device, stream=case.stream, seed=cfg.seed,
                        plugins=plugins,
                        evaluator=make_avalanche_evaluator(_NoStore(), cfg.train.log_every_iter))
    method = registry.get("methods", cfg.method.name).obj(cfg.method, case.fresh_model(device), ctx)

    def train():
        for exp in case.stream.experiences:
            method.serve(exp)

    return method.model, lambda: method.strategy.clock.train_iterations, train


def avalanche_side(case: Case, device):
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin

    model = case.fresh_model(device)
    train_cfg = case.cfg.train
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # "No loggers specified": on purpose
        evaluator = EvaluationPlugin(loggers=[])
    optimizer = torch.optim.Adam(model.parameters(), lr=float(train_cfg.lr))
    strategy = Naive(model=model, optimizer=optimizer,
                     criterion=torch.nn.CrossEntropyLoss(), train_mb_size=int(train_cfg.batch_size),
                     train_epochs=int(train_cfg.epochs), eval_mb_size=256, device=device,
                     evaluator=evaluator)

    def train():
        for exp in case.stream.experiences:
            strategy.train(exp.train, num_workers=0)

    return model, lambda: strategy.clock.train_iterations, train


def build_side(name: str, case: Case, device, orders):
    if name == "plain":
        return plain_side(case, device, orders)
    return lethe_side(case, device) if name == "lethe" else avalanche_side(case, device)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_run(name: str, case: Case, device, orders, seed: int):
    """(seconds, final state_dict, optimizer steps) of one fresh side; only training is timed."""
    model, steps, train = build_side(name, case, device, orders)
    gc.collect()     # Avalanche leaves garbage; collect it outside anyone's clock
    gc.disable()
    try:
        torch.manual_seed(seed)   # the shuffling order of (b) and (c); (a) replays it
        sync(device)
        t0 = time.perf_counter()
        train()
        sync(device)
        seconds = time.perf_counter() - t0
    finally:
        gc.enable()
    return seconds, {k: v.detach().cpu() for k, v in model.state_dict().items()}, steps()


# --- one case: check, warm up, time ---------------------------------------------------------
def check_case(case: Case, device, orders, seed: int) -> None:
    runs = {name: timed_run(name, case, device, orders, seed) for name in SIDES}
    ref = runs["plain"][1]
    for name in ("lethe", "avalanche"):
        _, state, steps = runs[name]
        if steps != case.steps or runs["plain"][2] != case.steps:
            sys.exit(f"[{case.name}] MISMATCH: {name} took {steps} optimizer steps, plain "
                     f"{runs['plain'][2]}, expected {case.steps}")
        diff = max(float((state[k].double() - ref[k].double()).abs().max()) for k in ref)
        if not diff <= TOL:
            sys.exit(f"[{case.name}] MISMATCH: {name}'s final parameters differ from the plain "
                     f"loop's by up to {diff:.2e} (> {TOL:g}) after {case.steps} steps")
        print(f"[{case.name}] check: {name} vs plain after {steps} steps: max |Δ| over the "
              f"final state_dict = {diff:.1e} (≤ {TOL:g})")


def run_case(case: Case, device, args) -> dict:
    n_params = sum(v.numel() for v in case.fresh_model(device).parameters())
    bs, epochs = int(case.cfg.train.batch_size), int(case.cfg.train.epochs)
    print(f"\n[{case.name}] params={n_params:,} {len(case.parts)} experiences × {epochs} "
          f"epoch(s), batch {bs}: {case.steps} Adam steps (lr {case.cfg.train.lr}) per side")
    orders = template_orders(case, args.seed)
    check_case(case, device, orders, args.seed)
    for _ in range(args.warmup):
        for name in SIDES:
            timed_run(name, case, device, orders, args.seed)
    times = {name: [] for name in SIDES}
    ratios = {"lethe_vs_plain": [], "lethe_vs_avalanche": []}
    for r in range(args.repeats):
        # a rotating order: a load change on a shared machine does not always hit one side
        order = SIDES[r % 3:] + SIDES[:r % 3]
        got = {name: timed_run(name, case, device, orders, args.seed)[0] for name in order}
        for name in SIDES:
            times[name].append(got[name])
        ratios["lethe_vs_plain"].append(got["lethe"] / got["plain"])
        ratios["lethe_vs_avalanche"].append(got["lethe"] / got["avalanche"])
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {k: statistics.median(v) for k, v in ratios.items()} | med
    per_step = {k: v / case.steps * 1e3 for k, v in med.items()}
    print(f"[{case.name}] median of {args.repeats}: "
          + " | ".join(f"{k} {med[k] * 1e3:.1f} ms ({per_step[k]:.3f} ms/step)" for k in SIDES))
    print(f"[{case.name}] spread (min–max ms): "
          + " | ".join(f"{k} {min(v) * 1e3:.1f}–{max(v) * 1e3:.1f}" for k, v in times.items()))
    print(f"[{case.name}] lethe_vs_plain={out['lethe_vs_plain']:.2f} "
          f"lethe_vs_avalanche={out['lethe_vs_avalanche']:.2f} (medians of per-round ratios)")
    return out


# --- start-up of a whole `lethe run` --------------------------------------------------------
def _child_env(threads: int) -> dict:
    return os.environ | {"OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}


def lethe_run_startup(args, device) -> tuple[float, float]:
    """(wall s, wall − Σ time/train_s − Σ time/eval_s) of one `lethe run` subprocess."""
    from mlflow.tracking import MlflowClient

    lethe = Path(sys.executable).with_name("lethe")
    if not lethe.exists():
        sys.exit(f"no `lethe` command next to {sys.executable}: install lethe into this "
                 f"environment (pip install -e .) or leave out --parts startup")
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        cmd = [str(lethe), "run", "split_digits", "train.epochs=1", f"tracking.uri={uri}",
               f"checkpoint.dir={tmp}/ckpt", f"device={device}"]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, env=_child_env(args.threads), capture_output=True, text=True,
                              cwd=tmp)
        wall = time.perf_counter() - t0
        if done.returncode != 0:
            sys.exit(f"`{' '.join(cmd)}` failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name("lethe")
        (run,) = client.search_runs([exp.experiment_id])
        inside = sum(m.value for key in ("time/train_s", "time/eval_s")
                     for m in client.get_metric_history(run.info.run_id, key))
    return wall, wall - inside


def import_time(threads: int, teardown: bool = True) -> float:
    """``python -c "import torch, avalanche"``; without ``teardown``, ending by ``os._exit``."""
    code = "import torch, avalanche" + ("" if teardown else "; import os; os._exit(0)")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=_child_env(threads), check=True,
                   capture_output=True)
    return time.perf_counter() - t0


def startup(args, device) -> float:
    walls, starts, imports, bare = [], [], [], []
    for _ in range(3):       # interleaved: the same load for all
        wall, start = lethe_run_startup(args, device)
        walls.append(wall), starts.append(start), imports.append(import_time(args.threads))
        bare.append(import_time(args.threads, teardown=False))
    s, i, b = statistics.median(starts), statistics.median(imports), statistics.median(bare)
    runs = lambda vs: ", ".join(f"{v:.2f}" for v in vs)  # noqa: E731
    print(f"\n[startup] `lethe run split_digits train.epochs=1`: wall {statistics.median(walls):.2f} "
          f"s, of which outside time/train_s + time/eval_s: {s:.2f} s (runs: {runs(starts)})")
    print(f"[startup] `python -c \"import torch, avalanche\"`: {i:.2f} s (runs: {runs(imports)}); "
          f"start-up over imports: {s - i:.2f} s")
    print(f"[startup] the same ending by os._exit (no teardown, as `lethe` ends): {b:.2f} s "
          f"(runs: {runs(bare)}); start-up over them: {s - b:.2f} s")
    return s - i


# --- quality next to cost -------------------------------------------------------------------
QUALITY = ("naive", "replay", "ewc", "lwf")


def quality_config(method: str, args, tmp: str):
    from lethe.platform.config import load_config

    over = [f"train.epochs={args.quality_epochs}", f"device={args.device}", f"seed={args.seed}",
            f"tracking.uri=sqlite:///{tmp}/mlflow.db", f"checkpoint.dir={tmp}/ckpt",
            "eval.save_predictions=false"]
    if method != "replay":        # replay is the preset's own method node
        over.insert(0, f"method.name={method}")
    return load_config("split_digits", over)


def avalanche_strategy(method: str, cfg, model, device):
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training import EWC, LwF, Naive, Replay
    from avalanche.training.plugins import EvaluationPlugin

    t, m = cfg.train, cfg.method
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluator = EvaluationPlugin(accuracy_metrics(experience=True), loggers=[])
    if t.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum,
                              weight_decay=t.weight_decay)
    else:
        opt_class = torch.optim.Adam if t.optimizer == "adam" else torch.optim.AdamW
        opt = opt_class(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    common = dict(model=model, criterion=torch.nn.CrossEntropyLoss(), device=device, optimizer=opt,
                  train_mb_size=t.batch_size, train_epochs=t.epochs, eval_mb_size=256,
                  evaluator=evaluator)
    if method == "replay":
        return Replay(mem_size=m.mem_size, **common)
    if method == "ewc":
        return EWC(ewc_lambda=m.ewc_lambda, mode=m.mode, decay_factor=m.decay_factor, **common)
    if method == "lwf":
        return LwF(alpha=m.alpha, temperature=m.temperature, **common)
    return Naive(**common)


def avalanche_accuracy(method: str, cfg, device) -> tuple[float | None, int]:
    """Avalanche's own strategy from the initial model and stream a lethe run builds
    (None: the weights went non-finite; Avalanche has no check that stops it)."""
    from lethe.platform.runner import build_components, seed_everything

    seed_everything(cfg.seed, cfg.deterministic)
    stream, model, _ = build_components(cfg)
    strategy = avalanche_strategy(method, cfg, model, device)
    for exp in stream.experiences:
        strategy.train(exp.train, num_workers=0)
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        return None, len(stream.test.y)
    res = strategy.eval(stream.benchmark.test_stream, num_workers=0)
    accs = [res[f"Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp{e:03d}"]
            for e in range(len(stream.experiences))]
    return sum(accs) / len(accs), len(stream.test.y)


def lethe_accuracy(method: str, args) -> tuple[float | None, object]:
    """acc/avg_seen of a `run_experiment` (None: stopped by its non-finite-loss check)."""
    from lethe.errors import RunError
    from lethe.platform.runner import run_experiment

    with tempfile.TemporaryDirectory() as tmp:
        cfg = quality_config(method, args, tmp)
        try:
            return run_experiment(cfg).final["acc/avg_seen"], cfg
        except RunError as exc:
            print(f"[quality] lethe {method}: {exc}")
            return None, cfg


def verdict(ours: float | None, theirs: float | None, n_test: int) -> str:
    if ours is None or theirs is None:
        both = ours is None and theirs is None
        return "both diverged" if both else "NOT comparable: one diverged"
    # yardstick: 2 standard errors of a difference of two accuracies on n_test samples
    # (test-set sampling only; the seed-to-seed spread of a CL run is larger)
    p = (ours + theirs) / 2
    noise = 2 * math.sqrt(2 * p * (1 - p) / n_test)
    if abs(ours - theirs) < 1e-9:      # the same predictions; only the float sum differs
        return "identical"
    return "within noise" if abs(ours - theirs) <= noise else f"NOT within noise (±{noise:.3f})"


def quality(args, device) -> None:
    show = lambda v: "diverged" if v is None else f"{v:.4f}"  # noqa: E731
    print(f"\n[quality] final acc/avg_seen, 5-experience split digits, preset split_digits "
          f"(MLP 64-128-128-10, SGD lr 0.05 momentum 0.9, batch 32, replay mem 200), "
          f"{args.quality_epochs} epochs, seed {args.seed}; both sides start from the same "
          f"initial model and the same data")
    print(f"[quality] {'method':<7} {'lethe':>8} {'avalanche':>9} {'Δ':>8}  verdict")
    for method in QUALITY:
        ours, cfg = lethe_accuracy(method, args)
        theirs, n_test = avalanche_accuracy(method, cfg, device)
        delta = "-" if ours is None or theirs is None else f"{ours - theirs:+.4f}"
        print(f"[quality] {method:<7} {show(ours):>8} {show(theirs):>9} {delta:>8}  "
              f"{verdict(ours, theirs, n_test)}")


# --- main -----------------------------------------------------------------------------------
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds after the check")
    p.add_argument("--threads", type=int, default=1, help="torch threads of every side")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mlp-steps", type=int, default=200, help="about this many (whole epochs)")
    p.add_argument("--cnn-steps", type=int, default=50)
    p.add_argument("--quality-epochs", type=int, default=8,
                   help="the preset's own 8: after 2 the model is at chance on most experiences")
    p.add_argument("--parts", default="mlp,cnn,startup,quality",
                   help="comma list of mlp, cnn, startup, quality")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda: torch.cuda.is_available() is False on this machine")
    device = torch.device(args.device)
    parts = {s.strip() for s in args.parts.split(",") if s.strip()}

    import avalanche

    from lethe.engine.plugins import bars_shown   # what the runner's TrainProgress bars do

    bars = "ON (TQDM_DISABLE is not set: set it to time without)" if bars_shown() else "off"
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "-"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {platform.node()} {platform.machine()} cpus={os.cpu_count()} "
          f"load={load:.1f} python={platform.python_version()} torch={torch.__version__} "
          f"avalanche={avalanche.__version__} threads={torch.get_num_threads()} device={device} "
          f"gpu={gpu} progress bars {bars}")
    nan = float("nan")
    mlp = run_case(mlp_case(args.device, args.mlp_steps), device, args) if "mlp" in parts else {}
    if "cnn" in parts:
        run_case(cnn_case(args.device, args.cnn_steps, args.seed), device, args)
    z = startup(args, args.device) if "startup" in parts else nan
    if "quality" in parts:
        quality(args, device)
    print(f"lethe_vs_plain={mlp.get('lethe_vs_plain', nan):.2f} "
          f"lethe_vs_avalanche={mlp.get('lethe_vs_avalanche', nan):.2f} "
          f"startup_over_imports_s={z:.2f}")


if __name__ == "__main__":
    main()
