"""LR schedules: formulas at key steps, config errors, per-step application in real runs, and
the run's plots (drawn without touching matplotlib's or logging's process-wide state)."""
from __future__ import annotations

import logging
import math
import subprocess
import sys

import pytest

from lethe.errors import ConfigError
from lethe.engine import schedules as S
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
