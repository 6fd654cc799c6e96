"""LR schedules: formulas at key steps, config errors, per-step application in real runs, and
the run's plots (drawn without touching matplotlib's or logging's process-wide state)."""
from __future__ import annotations

import logging
import math
import subprocess
import sys

import pytest
from conftest import only_run, run_cli

from lethe.engine import schedules as S
from lethe.errors import ConfigError
from lethe.platform.config import load_config

ETA = 0.01


def test_rewarm_cosine_key_steps():
    T, W = 201, 10                         # warmup_frac 0.05 · 201 = 10.05 → 10 steps
    lr = [S.rewarm_cosine(s, T, ETA, warmup_frac=0.05, eta_min_frac=0.1) for s in range(T)]
    assert lr[0] == pytest.approx(ETA / 11)
    assert lr[5] == pytest.approx(ETA * 6 / 11)
    assert lr[W] == pytest.approx(ETA)                  # peak right after warm-up
    assert max(lr) == lr[W]
    assert lr[W + 95] == pytest.approx(0.5 * (ETA + 0.1 * ETA))   # half-way down the cosine
    assert lr[-1] == pytest.approx(0.1 * ETA)            # η_min at the last step
    s = 150
    assert lr[s] == pytest.approx(0.001 + 0.5 * 0.009 * (1 + math.cos(math.pi * (s - W) / 190)))
    assert all(a > b for a, b in zip(lr[W:], lr[W + 1:]))  # decays monotonically


def test_rewarm_cosine_without_warmup_starts_at_peak():
    assert S.rewarm_cosine(0, 40, ETA, warmup_frac=0.01) == pytest.approx(ETA)  # round(0.4) = 0
    assert S.rewarm_cosine(39, 40, ETA, warmup_frac=0.01) == pytest.approx(0.1 * ETA)
    assert S.rewarm_cosine(0, 1, ETA) == pytest.approx(ETA)


def inv_sqrt_ref(x, alpha=10.0):
    h = lambda v: 1 / math.sqrt(1 + alpha * v) - 1  # noqa: E731
    return ETA + (0.5 * ETA - ETA) * h(x) / h(1)


@pytest.mark.parametrize("kind,mid", [
    ("cosine", 0.75 * ETA),                 # η_const + ½(η_max−η_const)(1 + cos(π/2))
    ("linear", 0.75 * ETA),
    ("inv_sqrt", inv_sqrt_ref(0.5)),
])
def test_infinite_first_experience_key_steps(kind, mid):
    cfg = S.LRScheduleConfig(name="infinite", warmup_frac=0.01, cooldown_frac=0.2, anneal_frac=0.1,
                             eta_const_frac=0.5, eta_min_frac=0.1, cooldown=kind)
    f = S.experience_schedule(cfg, ETA, 1000, first=True)   # W=10, C=200, A=100
    assert f(0) == pytest.approx(ETA / 11)
    assert f(10) == pytest.approx(ETA)
    assert f(110) == pytest.approx(mid)
    assert f(210) == pytest.approx(0.5 * ETA)                # cool-down ends at η_const
    assert f(500) == f(899) == pytest.approx(0.5 * ETA)      # constant phase
    assert f(900) == pytest.approx(0.5 * ETA * (0.2 ** (1 / 100)))   # η_const·(η_min/η_const)^(1/A)
    assert f(949) == pytest.approx(0.5 * ETA * (0.2 ** (50 / 100)))
    assert f(999) == pytest.approx(0.1 * ETA)                # η_min at the checkpoint
    if kind == "inv_sqrt":                                   # steeper at first than linear
        assert f(30) < ETA + (0.5 * ETA - ETA) * 0.1 - 1e-6


def test_infinite_later_experiences_stay_constant_then_anneal():
    cfg = S.LRScheduleConfig(name="infinite", anneal_frac=0.1, eta_const_frac=0.5)
    f = S.experience_schedule(cfg, ETA, 500, first=False)   # A = 50
    assert f(0) == f(449) == pytest.approx(0.5 * ETA)        # no re-warming
    assert f(450) == pytest.approx(0.5 * ETA * 0.2 ** (1 / 50))
    assert f(499) == pytest.approx(0.1 * ETA)


def test_eta_max_overrides_train_lr():
    cfg = S.LRScheduleConfig(name="rewarm_cosine", eta_max=0.5, warmup_frac=0.0)
    assert S.experience_schedule(cfg, ETA, 10, first=True)(0) == pytest.approx(0.5)


@pytest.mark.parametrize("override,message", [
    ("train.lr_schedule.name=rewarm_cosin", "did you mean 'rewarm_cosine'"),
    ("train.lr_schedule.cooldown=sqrt", "cooldown"),
    ("train.lr_schedule.warmup_frac=1.5", "warmup_frac"),
    ("train.lr_schedule.eta_min_frac=0", "eta_min_frac"),
    ("train.lr_schedule.anneal_frac=0.9", "must fit in the first experience"),
    ("train.lr_schedule.warmup=0.1", "unknown key 'train.lr_schedule.warmup'.*warmup_frac"),
])
def test_bad_schedule_settings_fail_at_config_time(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("infinite_schedule_digits", [override])


# --- the Hugging Face / torch schedules --------------------------------------------------
def hf_linear_ref(s, T, W):
    """The multiplier as HF's get_linear_schedule_with_warmup writes it."""
    return s / W if s < W else max(0.0, (T - s) / (T - W))


def hf_sched(name, **kw):
    return S.LRScheduleConfig(name=name, **kw)


def test_warmup_linear_key_steps():
    f = S.experience_schedule(hf_sched("warmup_linear", warmup_steps=10), ETA, 100, first=True)
    assert f(0) == 0.0                                   # HF's first step: lr 0
    assert f(5) == pytest.approx(ETA * 5 / 10)
    assert f(10) == pytest.approx(ETA)                   # end of warm-up: the peak
    assert f(55) == pytest.approx(ETA * 45 / 90)         # half-way down
    assert f(99) == pytest.approx(ETA * 1 / 90)          # last step: one step short of 0


@pytest.mark.parametrize("low", [None, 0.1])
def test_cosine_key_steps(low):
    f = S.experience_schedule(hf_sched("cosine", warmup_steps=10, eta_min_frac=low), ETA, 100, True)
    eta_min = 0.0 if low is None else 0.1 * ETA         # HF's default: decay to 0
    assert f(0) == 0.0
    assert f(5) == pytest.approx(ETA / 2)
    assert f(10) == pytest.approx(ETA)
    assert f(55) == pytest.approx(eta_min + 0.5 * (ETA - eta_min))
    assert f(99) == pytest.approx(eta_min + 0.5 * (ETA - eta_min) * (1 + math.cos(math.pi * 89 / 90)))


def test_step_key_steps():
    f = S.experience_schedule(hf_sched("step", step_size=2, gamma=0.5), ETA, 35, True, steps_per_epoch=7)
    assert f(0) == f(13) == pytest.approx(ETA)           # epochs 0 and 1
    assert f(14) == pytest.approx(ETA * 0.5)             # epoch 2: first decay
    assert f(27) == pytest.approx(ETA * 0.5)             # epoch 3
    assert f(34) == pytest.approx(ETA * 0.25)            # epoch 4, the last step


def torch_lrs(make_scheduler, steps, steps_per_epoch=None):
    """lr of every optimizer step under a torch scheduler; per epoch when steps_per_epoch."""
    import torch

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=ETA)
    sched = make_scheduler(opt)
    out = []
    for s in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        if steps_per_epoch is None or (s + 1) % steps_per_epoch == 0:
            sched.step()
    return out


# T, warmup_frac, warmup_steps: shares that round and ceil differently (0.05·201 = 10.05,
# 0.07·100 = 7.000000000000001), none, and a warm-up longer than the experience
HF_CASES = [(201, 0.05, 0), (100, 0.07, 0), (50, 0.0, 0), (40, 0.01, 60), (30, 0.01, 4)]


@pytest.mark.parametrize("T,frac,steps", HF_CASES)
def test_warmup_linear_and_cosine_match_transformers(tmp_path, T, frac, steps):
    from transformers import TrainingArguments
    from transformers.optimization import (
        get_cosine_schedule_with_warmup,
        get_cosine_with_min_lr_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    args = TrainingArguments(output_dir=str(tmp_path), warmup_steps=steps or frac, report_to="none")
    W = args.get_warmup_steps(T)                         # the Trainer's own warm-up length
    refs = {
        "warmup_linear": lambda o: get_linear_schedule_with_warmup(o, W, T),
        "cosine": lambda o: get_cosine_schedule_with_warmup(o, W, T),
        "cosine_min": lambda o: get_cosine_with_min_lr_schedule_with_warmup(o, W, T, min_lr_rate=0.1),
    }
    for key, make in refs.items():
        name, low = ("cosine", 0.1) if key == "cosine_min" else (key, None)
        cfg = hf_sched(name, warmup_frac=frac, warmup_steps=steps, eta_min_frac=low)
        expected = torch_lrs(make, T)
        for first in (True, False):                     # restarts alike at every experience
            f = S.experience_schedule(cfg, ETA, T, first)
            assert [f(s) for s in range(T)] == pytest.approx(expected, rel=1e-12, abs=1e-15), key


@pytest.mark.parametrize("step_size,gamma,per_epoch,epochs", [(20, 0.1, 3, 45), (1, 0.5, 4, 5),
                                                              (3, 1.0, 2, 7)])
def test_step_matches_torch_steplr(step_size, gamma, per_epoch, epochs):
    import torch

    expected = torch_lrs(lambda o: torch.optim.lr_scheduler.StepLR(o, step_size, gamma),
                         per_epoch * epochs, steps_per_epoch=per_epoch)
    cfg = hf_sched("step", step_size=step_size, gamma=gamma)
    f = S.experience_schedule(cfg, ETA, per_epoch * epochs, first=False, steps_per_epoch=per_epoch)
    assert [f(s) for s in range(per_epoch * epochs)] == pytest.approx(expected, rel=1e-12)


def test_warmup_steps_override_the_share_for_the_paper_schedules():
    cfg = hf_sched("rewarm_cosine", warmup_frac=0.5, warmup_steps=3)
    f = S.experience_schedule(cfg, ETA, 100, first=True)
    assert f(0) == pytest.approx(ETA / 4) and f(3) == pytest.approx(ETA)   # η_max·(s+1)/(W+1)
    assert f(99) == pytest.approx(0.1 * ETA)             # its η_min default stays 0.1·η_max


@pytest.mark.parametrize("overrides,message", [
    (["train.lr_schedule.name=cosin"], "did you mean 'cosine'"),
    (["train.lr_schedule.name=warmup_lin"], "did you mean 'warmup_linear'"),
    (["train.lr_schedule.name=step"], "needs 'train.lr_schedule.step_size'"),
    (["train.lr_schedule.name=step", "train.lr_schedule.step_size=0"], "'train.lr_schedule.step_size': 0"),
    (["train.lr_schedule.name=step", "train.lr_schedule.step_size=20", "train.lr_schedule.gamma=0"],
     r"'train.lr_schedule.gamma': 0.0 must be in \(0, 1\]"),
    (["train.lr_schedule.name=step", "train.lr_schedule.step_size=20", "train.lr_schedule.gamma=1.5"],
     "'train.lr_schedule.gamma'"),
    (["train.lr_schedule.name=warmup_linear", "train.lr_schedule.warmup_steps=-1"],
     "'train.lr_schedule.warmup_steps': -1 must be ≥ 0"),
    (["train.lr_schedule.name=warmup_linear", "train.lr_schedule.warmup_steps=2.5"], "warmup_steps"),
    (["train.lr_schedule.name=cosine", "train.lr_schedule.eta_min_frac=1.5"], "'train.lr_schedule.eta_min_frac'"),
    (["train.lr_schedule.name=step", "train.lr_schedule.step_sise=3"], "did you mean 'step_size'"),
])
def test_bad_new_schedule_settings_fail_at_config_time(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("split_digits", overrides)


# --- in real runs ---------------------------------------------------------------------------
def steps_per_experience(cfg) -> list[int]:
    """Training steps of each experience, from the data sizes (independent of the plugin):
    the first experience uses Avalanche's loader (last batch kept); later ones the replay
    sampler (compute-equivalent: as many full batches as the new data fills)."""
    from lethe.platform.runner import build_components

    stream, _, _ = build_components(cfg)
    b, out = cfg.train.batch_size, []
    for e in stream.experiences:
        n = len(e.train.dataset)
        out.append(cfg.train.epochs * (math.ceil(n / b) if e.index == 0 else n // b))
    return out


def logged_lr(uri, run_id):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    hist = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/lr"))
    arts = {a.path for a in client.list_artifacts(run_id)}
    return hist, arts


@pytest.mark.integration
@pytest.mark.parametrize("preset", ["rewarm_replay_digits", "infinite_schedule_digits"])
def test_runs_apply_the_schedule_at_every_step(tmp_path, preset):
    from lethe.platform.runner import run_experiment

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    cfg = load_config(preset, [f"tracking.uri={uri}", f"checkpoint.dir={tmp_path / 'ck'}",
                               "train.epochs=2", "eval.save_predictions=false"])
    lethe_log = logging.getLogger("lethe")
    level = lethe_log.level
    lethe_log.setLevel(logging.ERROR)     # a library caller's choice, which a run must keep
    try:
        res = run_experiment(cfg)
        assert lethe_log.level == logging.ERROR
    finally:
        lethe_log.setLevel(level)
    hist, arts = logged_lr(uri, res.run_id)
    sched = cfg.train.lr_schedule
    expected = []
    for k, T in enumerate(steps_per_experience(cfg)):
        f = S.experience_schedule(sched, cfg.train.lr, T, first=k == 0)
        expected += [f(s) for s in range(T)]
    assert [s for s, _ in hist] == list(range(len(expected)))   # one value per step, no others
    assert [v for _, v in hist] == pytest.approx(expected, rel=1e-12)
    assert "lr_schedule.png" in arts
    if preset == "rewarm_replay_digits":    # re-warmed at every experience: 5 peaks at η_max
        assert sum(1 for _, v in hist if v == pytest.approx(cfg.train.lr)) >= 5


RUN_SCHEDULES = {
    # name: (overrides, the lr at local step s of an experience of T steps, E per epoch)
    "warmup_linear": (["train.lr_schedule.warmup_frac=0.2"],
                      lambda s, T, E: 0.05 * hf_linear_ref(s, T, math.ceil(0.2 * T))),
    "step": (["train.lr_schedule.step_size=1", "train.lr_schedule.gamma=0.5"],
             lambda s, T, E: 0.05 * 0.5 ** (s // E)),
}


@pytest.mark.integration
@pytest.mark.parametrize("name", sorted(RUN_SCHEDULES))
def test_lethe_run_logs_the_new_schedules_step_by_step(tmp_path, store, name):
    """`lethe run split_digits` (SGD, lr 0.05, batch 32), naive: every experience restarts the
    schedule over ⌈n/32⌉ steps per epoch, 2 epochs."""
    from lethe.platform.runner import build_components

    extra, ref = RUN_SCHEDULES[name]
    overrides = ["method.name=naive", "train.epochs=2", f"train.lr_schedule.name={name}", *extra,
                 "eval.save_predictions=false"]
    res = run_cli(["run", "split_digits", *store["overrides"], *overrides], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    stream, _, _ = build_components(load_config("split_digits", overrides))
    expected = []
    for e in stream.experiences:
        per_epoch = math.ceil(len(e.train.dataset) / 32)
        expected += [ref(s, 2 * per_epoch, per_epoch) for s in range(2 * per_epoch)]
    client, run = only_run(store["uri"])
    hist = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/lr"))
    assert [s for s, _ in hist] == list(range(len(expected)))
    assert [v for _, v in hist] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert sum(v == 0.0 for _, v in hist) == (5 if name == "warmup_linear" else 0)  # HF: 0 first


PLOTS = """
import sys
import matplotlib
matplotlib.use("svg")            # the caller's backend, which lethe's plots must keep
import torch
from PIL import Image
from lethe.metrics.compat import write_flip_confusion_png
from lethe.metrics.evaluator import PredictionStore
from lethe.platform import report

out = sys.argv[1]
report.write_schedule_png([0, 1, 2, 3], [0.1, 0.05, 0.02, 0.01], out + "/lr.png", "lr", [2])
store = PredictionStore(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 1]),
                        torch.zeros(3, dtype=torch.long), torch.arange(3), 2, 2)
store.add("exp_0", torch.tensor([0, 0, 0]))
store.add("exp_1", torch.tensor([0, 1, 0]))
report.write_accuracy_png(store, out + "/acc.png", "acc")
write_flip_confusion_png(torch.tensor([[0, 2], [1, 0]]),
                         [{"neg_flips": 2, "pos_flips": 0}, {"neg_flips": 1, "pos_flips": 1}],
                         out + "/flips.png", "flips")
assert "matplotlib.pyplot" not in sys.modules
assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
print(*(Image.open(f"{out}/{n}.png").size for n in ("lr", "acc", "flips")))
"""


def test_plots_keep_the_callers_matplotlib_backend_and_never_load_pyplot(tmp_path):
    """In a fresh process (pytest's may have pyplot loaded already)."""
    res = subprocess.run([sys.executable, "-c", PLOTS, str(tmp_path)], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    # figure inches × 110 dpi: lr 7×3; accuracy (1 + 0.6·2)×(1 + 0.45·2); flips (4 + 0.9·2)×(1.5 + 0.4·2)
    assert res.stdout.split() == ["(770,", "330)", "(242,", "209)", "(638,", "253)"]
