"""Model updates: flip metrics vs hand counts, the model_update scenario, naive_update / pct /
muscle through the platform (metrics, artifacts, checkpoint/resume, adapters)."""
from __future__ import annotations

import copy
import csv
import io

import pytest
import torch

from lethe import registry
from lethe.errors import ConfigError
from lethe.methods.base import MethodContext
from lethe.metrics import compat
from lethe.metrics.evaluator import Evaluator, PredictionStore
from lethe.platform import checkpoint as ckpt
from lethe.platform.config import load_config, validate
from lethe.platform.runner import build_components, run_experiment

# --- a small known example -------------------------------------------------------------
# 10 test samples, 3 classes; three versions. Correct (1) / wrong (0) per sample:
#   v0: 1 0 1 1 1 0 1 0 1 1   (acc 0.7)
#   v1: 1 1 0 1 1 1 0 1 1 0   (acc 0.7)
#   v2: 1 1 1 0 1 1 1 1 1 0   (acc 0.8)
Y = [0, 0, 1, 1, 2, 2, 0, 1, 2, 0]
V0 = [0, 1, 1, 1, 2, 0, 0, 2, 2, 0]
V1 = [0, 0, 2, 1, 2, 2, 1, 1, 2, 1]
V2 = [0, 0, 1, 0, 2, 2, 0, 1, 2, 2]


def known_store(rows=(("init", [1] * 10), ("update:0", V0), ("update:1", V1))) -> PredictionStore:
    n = len(Y)
    store = PredictionStore(torch.tensor(Y), torch.zeros(n, dtype=torch.long),
                            torch.zeros(n, dtype=torch.long), torch.arange(n), 1, 3)
    for label, p in rows:
        store.add(label, torch.tensor(p))
    return store


def test_update_metrics_equal_hand_counts_v0_to_v1():
    m = compat.update_metrics(known_store())
    # negative flips v0→v1: samples 2, 6, 9 → NFR 3/10; positive flips: 1, 5, 7 → PFR 3/10
    # NFI = 3 negative flips / 3 errors of v1 = 1; rel NFR = 0.3 / (0.7 · 0.3)
    expected = {"acc/version": 0.7, "nfr/prev": 0.3, "pfr/prev": 0.3, "nfi/prev": 1.0,
                "rel_nfr/prev": 0.3 / 0.21, "acc/gain_prev": 0.0,
                "nfr/v0": 0.3, "pfr/v0": 0.3, "nfi/v0": 1.0, "rel_nfr/v0": 0.3 / 0.21,
                "acc/gain_v0": 0.0}
    assert m.keys() == expected.keys()
    for k, v in expected.items():
        assert m[k] == pytest.approx(v, abs=1e-12), k


def test_update_metrics_equal_hand_counts_against_every_earlier_version():
    m = compat.update_metrics(known_store((("init", [1] * 10), ("update:0", V0),
                                           ("update:1", V1), ("update:2", V2))))
    # vs v1 (prev): negative flip 3 → 0.1; positive flips 2, 6 → 0.2; NFI 1/2;
    #               rel = 0.1 / (0.7 · 0.2); gain 0.8 − 0.7
    # vs v0:        negative flips 3, 9 → 0.2; positive 1, 5, 7 → 0.3; NFI 2/2;
    #               rel = 0.2 / (0.7 · 0.2); gain 0.1
    expected = {"acc/version": 0.8,
                "nfr/prev": 0.1, "pfr/prev": 0.2, "nfi/prev": 0.5, "rel_nfr/prev": 0.1 / 0.14,
                "acc/gain_prev": 0.1,
                "nfr/v1": 0.1, "pfr/v1": 0.2, "nfi/v1": 0.5, "rel_nfr/v1": 0.1 / 0.14, "acc/gain_v1": 0.1,
                "nfr/v0": 0.2, "pfr/v0": 0.3, "nfi/v0": 1.0, "rel_nfr/v0": 0.2 / 0.14, "acc/gain_v0": 0.1}
    assert m.keys() == expected.keys()
    for k, v in expected.items():
        assert m[k] == pytest.approx(v, abs=1e-12), k


def test_update_metrics_need_two_versions_and_a_version_row_last():
    assert compat.update_metrics(known_store((("init", V1), ("update:0", V0)))) == {}
    assert compat.update_metrics(known_store((("update:0", V0), ("update:1", V1),
                                              ("learn:2", V2)))) == {}


def test_per_class_flips_and_flip_confusion_equal_hand_counts():
    rows = compat.per_class_flips(torch.tensor(V0), torch.tensor(V1), torch.tensor(Y), 3)
    # class 0 = samples 0, 1, 6, 9: v0 right on 0, 6, 9; v1 right on 0, 1
    #   negative flips 6, 9 (2, NFR 2/4), positive 1 (PFR 1/4), NFI 2/2, rel 0.5/(3/4 · 2/4)
    # class 1 = samples 2, 3, 7: negative flip 2, positive 7, NFI 1/1, rel (1/3)/((2/3)(1/3))
    # class 2 = samples 4, 5, 8: no negative flip, positive 5; v1 makes no error → rel NaN
    assert [(r["class"], r["n"], r["neg_flips"], r["pos_flips"]) for r in rows] == \
        [(0, 4, 2, 1), (1, 3, 1, 1), (2, 3, 0, 1)]
    assert rows[0]["acc_old"] == pytest.approx(0.75) and rows[0]["acc_new"] == pytest.approx(0.5)
    assert [r["nfr"] for r in rows] == pytest.approx([0.5, 1 / 3, 0.0])
    assert [r["pfr"] for r in rows] == pytest.approx([0.25, 1 / 3, 1 / 3])
    assert [r["nfi"] for r in rows] == pytest.approx([1.0, 1.0, 0.0])
    assert rows[0]["rel_nfr"] == pytest.approx(0.5 / 0.375)
    assert rows[1]["rel_nfr"] == pytest.approx(1.5)
    assert rows[2]["rel_nfr"] != rows[2]["rel_nfr"]          # NaN
    M = compat.flip_confusion(torch.tensor(V0), torch.tensor(V1), torch.tensor(Y), 3)
    # sample 2: old 1 → new 2; samples 6 and 9: old 0 → new 1
    assert M.tolist() == [[0, 2, 0], [0, 0, 1], [0, 0, 0]]


def test_update_reports_write_the_hand_counted_tables(tmp_path):
    store = known_store((("init", V2), ("update:0", V0), ("update:1", V1), ("update:2", V2)))
    files = compat.write_update_reports(store, tmp_path, "known")
    assert files == ["update_versions.csv", "flips_per_class_v0_v1.csv", "flip_confusion_v0_v1.csv",
                     "flip_confusion_v0_v1.png", "flips_per_class_v1_v2.csv",
                     "flip_confusion_v1_v2.csv", "flip_confusion_v1_v2.png"]
    versions = list(csv.DictReader(io.StringIO((tmp_path / "update_versions.csv").read_text())))
    assert [float(r["acc"]) for r in versions] == pytest.approx([0.7, 0.7, 0.8])
    assert [float(r["nfr_prev"]) for r in versions[1:]] == pytest.approx([0.3, 0.1])
    assert [float(r["acc_gain_prev"]) for r in versions[1:]] == pytest.approx([0.0, 0.1])
    per = list(csv.DictReader(io.StringIO((tmp_path / "flips_per_class_v0_v1.csv").read_text())))
    assert [int(r["neg_flips"]) for r in per] == [2, 1, 0]
    conf = list(csv.reader(io.StringIO((tmp_path / "flip_confusion_v0_v1.csv").read_text())))
    assert conf[1:] == [["old_0", "0", "2", "0"], ["old_1", "0", "0", "1"], ["old_2", "0", "0", "0"]]
    assert (tmp_path / "flip_confusion_v1_v2.png").read_bytes()[:4] == b"\x89PNG"


# --- the model_update scenario ------------------------------------------------------------
VERSIONS = [{"fraction": 0.5, "model": {"name": "mlp", "hidden": 16, "layers": 1}},
            {"fraction": 1.0, "model": {"name": "simple_cnn", "channels": 4}}]


def scenario(**over) -> dict:
    return {"name": "model_update", "source_args": {"n_experiences": 2, "test_fraction": 0.5},
            "versions": VERSIONS, **over}


def build_stream(sc: dict, seed: int = 0):
    cfg = validate({"scenario": sc, "model": "mlp", "method": "naive_update"})
    return registry.get("scenarios", "model_update").obj(cfg.scenario, seed)


def test_model_update_stream_nests_the_data_and_fixes_the_test_set():
    s = build_stream(scenario(versions=VERSIONS + [{"fraction": 0.75, "init": "scratch"}]))
    assert [e.kind for e in s.experiences] == ["update"] * 3
    ids = [set(e.train.dataset.sample_id) for e in s.experiences]
    assert len(ids[1]) == 898 and len(ids[0]) == 449 and len(ids[2]) == 674   # rounded shares
    assert ids[0] < ids[2] < ids[1]                          # nested: more data keeps the old
    assert not ids[1] & set(s.test.ids.tolist())             # test set disjoint from training
    assert len(s.test.y) == 899 and set(s.test.exp.tolist()) == {0}   # one evaluation set
    p = [e.payload for e in s.experiences]
    assert [q["version"] for q in p] == [0, 1, 2]
    assert p[1]["model"] == {"name": "simple_cnn", "channels": 4, "dropout": 0.0}
    assert p[2]["model"] is None and p[0]["n_train"] == 449
    other = build_stream(scenario(), seed=1)                 # another seed, another half
    assert set(other.experiences[0].train.dataset.sample_id) != ids[0]
    fixed = build_stream(scenario(data_seed=0), seed=1)
    assert set(fixed.experiences[0].train.dataset.sample_id) == ids[0]


@pytest.mark.parametrize("sc,match", [
    (scenario(versions=[]), "scenario.versions is empty"),
    (scenario(versions=[{"fraction": 0.0}]), r"scenario.versions\[0\].fraction=0.0 must be in \(0, 1\]"),
    (scenario(versions=[{"fraction": 1.0, "model": {"name": "mlp", "hiden": 3}}]),
     r"scenario.versions\[0\].unknown key 'model.hiden'; did you mean 'hidden'"),
    (scenario(versions=[{"fraction": 1.0, "model": {"name": "mpl"}}]),
     r"scenario.versions\[0\].model.name: unknown model 'mpl'; did you mean 'mlp'"),
    (scenario(versions=[{"fraction": 1.0, "init": "previous"}]), "version 0 has no previous version"),
    (scenario(versions=[{"fraction": 1.0}, {"fraction": 1.0, "init": "warm"}]),
     r"scenario.versions\[1\].init='warm' must be one of scratch, previous"),
    (scenario(source_args={"n_experience": 2}), "scenario.source_args: unknown key 'scenario.n_experience'"),
])
def test_model_update_config_errors_name_the_key(sc, match):
    with pytest.raises(ConfigError, match=match):
        build_stream(sc)


def test_methods_and_scenarios_must_agree_on_update_experiences():
    with pytest.raises(ConfigError, match="method 'naive' cannot serve update experiences"):
        build_components(load_config("compat_naive_digits", ["method.name=naive"]))
    with pytest.raises(ConfigError, match="method 'pct' cannot serve learn experiences"):
        build_components(load_config("split_digits", ["method.name=pct"]))


# --- methods, driven directly (no MLflow) ---------------------------------------------------
# the presets' update (MLP on half the data → CNN on all of it), small and short
FAST = ["scenario.versions=[{fraction: 0.5, model: {name: mlp, hidden: 16, layers: 1}},"
        "{fraction: 1.0, model: {name: simple_cnn, channels: 8}}]", "train.epochs=3"]


def make_method(preset: str, overrides: list[str], cls=None):
    cfg = load_config(preset, [*FAST, *overrides])
    torch.manual_seed(cfg.seed)
    stream, model, entry = build_components(cfg)
    ctx = MethodContext(train=cfg.train, device=torch.device("cpu"), stream=stream, seed=cfg.seed)
    return stream, (cls or entry.obj)(cfg.method, model, ctx)


def predictions(stream, method) -> torch.Tensor:
    ev = Evaluator(stream.test, "cpu")
    return ev.predict(method.predict, method.model)


def test_pct_with_a_heavy_distillation_term_copies_the_old_version():
    # λ = 200 (½·mean over 10 classes: λ = 10 on the summed squares), L2: the new (wider) MLP
    # is pulled onto the old MLP's logits, so it makes the old model's predictions;
    # naive_update on the same data and init flips many more of them
    over = ["method.lam=200", "method.distance=l2", "train.epochs=5",
            "scenario.versions=[{fraction: 0.5, model: {name: mlp, hidden: 16, layers: 1}},"
            "{fraction: 1.0, model: {name: mlp, hidden: 64, layers: 1}}]"]
    stream, pct = make_method("compat_pct_digits", over)
    pct.update(stream.experiences[0])
    old = predictions(stream, pct)
    naive = copy.deepcopy(pct)
    naive.__class__ = registry.get("methods", "naive_update").obj
    rng = torch.get_rng_state()
    pct.update(stream.experiences[1])
    torch.set_rng_state(rng)                                 # same init and batches
    naive.update(stream.experiences[1])
    assert pct.model[1].out_features == 64                   # v1 is the payload's model
    agree_pct = float((predictions(stream, pct) == old).double().mean())
    agree_naive = float((predictions(stream, naive) == old).double().mean())
    assert agree_pct > 0.9 and agree_pct > agree_naive + 0.15, (agree_pct, agree_naive)


class SpyMuscle(registry.get("methods", "muscle").obj):
    """Keeps a copy of f₂ (the new version before its adapter) to compare with."""

    def before_training_epoch(self, strategy, **kwargs):
        super().before_training_epoch(strategy, **kwargs)
        if self.new_model is not None and not hasattr(self, "f2"):
            self.f2 = copy.deepcopy(self.new_model)


def test_muscle_merges_a_low_rank_adapter_into_the_frozen_new_version():
    stream, m = make_method("compat_muscle_digits", ["method.rank=2", "method.adapter_epochs=2"],
                            cls=SpyMuscle)
    m.update(stream.experiences[0])
    assert not hasattr(m, "f2")                  # version 0: no old model, no adapter
    m.update(stream.experiences[1])
    f2, deployed = m.f2, m.model
    assert type(deployed) is type(f2) and all(p.requires_grad for p in deployed.parameters())
    layers = [(n, mod) for n, mod in f2.named_modules()
              if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d))]
    assert len(layers) == 3                      # conv, conv, head: every one adapted
    for name, mod in layers:
        delta = (deployed.get_submodule(name).weight - mod.weight).detach().flatten(1)
        assert 0 < torch.linalg.matrix_rank(delta.double(), atol=1e-6) <= 2, name
    for (n, a), (_, b) in zip(f2.named_buffers(), deployed.named_buffers()):
        assert torch.equal(a, b), n              # BatchNorm statistics of f₂ stay frozen
    stats = m.log_params()
    assert 0.0 <= stats["muscle/mask_frac"] <= 1.0
    # LoRA of rank r: A [r, in·k·k] and B [out, r] per layer of the 8-channel CNN
    assert stats["muscle/adapter_params"] == 2 * ((1 * 9 + 8) + (8 * 9 + 16) + (16 + 10))


@pytest.mark.parametrize("preset,extra", [("compat_pct_digits", []),
                                          ("compat_muscle_digits", ["method.adapter_epochs=1"])])
def test_checkpoint_state_resumes_the_next_update_exactly(preset, extra):
    # three versions: MLP → CNN → a fresh CNN (architecture inherited). Save after v1 through
    # torch.save/weights_only load, restore into a method built from the config (whose
    # top-level model is the MLP), serve v2 in both: identical predictions, bitwise
    over = ["scenario.versions=[{fraction: 0.5, model: {name: mlp, hidden: 16, layers: 1}},"
            "{fraction: 0.75, model: {name: simple_cnn, channels: 4}}, {fraction: 1.0}]",
            "train.epochs=2", *extra]
    stream, a = make_method(preset, over)
    a.update(stream.experiences[0])
    a.update(stream.experiences[1])
    buf = io.BytesIO()
    torch.save({"method": a.state_dict(), "rng": ckpt.rng_state()}, buf)
    a.update(stream.experiences[2])
    want = predictions(stream, a)

    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    stream_b, b = make_method(preset, over)
    assert isinstance(b.model[1], torch.nn.Linear)           # built as the top-level MLP
    b.load_state_dict(state["method"])
    assert b.version == 1 and isinstance(b.model[0], torch.nn.Conv2d)
    ckpt.set_rng_state(state["rng"])
    b.update(stream_b.experiences[2])
    assert torch.equal(predictions(stream_b, b), want)


# --- through the runner ---------------------------------------------------------------------
@pytest.mark.integration
def test_naive_update_run_logs_flip_metrics_and_reports(tmp_path, store):
    from conftest import only_run

    res = run_experiment(load_config("compat_naive_digits", [*store["overrides"], *FAST]))
    client, run = only_run(store["uri"])
    preds = torch.load(client.download_artifacts(run.info.run_id, "predictions.pt", str(tmp_path)),
                       weights_only=True)
    labels = (tmp_path / "labels.txt")
    labels.write_text(open(client.download_artifacts(run.info.run_id, "predictions_labels.txt",
                                                     str(tmp_path))).read())
    assert labels.read_text().split() == ["init", "update:0", "update:1"]
    p0, p1, y = preds["preds"][1], preds["preds"][2], preds["targets"]
    # recount from the stored predictions, independently of lethe.metrics
    neg = int(((p0 == y) & (p1 != y)).sum())
    pos = int(((p0 != y) & (p1 == y)).sum())
    err = int((p1 != y).sum())
    acc0, acc1 = float((p0 == y).double().mean()), float((p1 == y).double().mean())
    logged = {k: v for k, v in run.data.metrics.items()}
    assert logged["nfr/prev"] == pytest.approx(neg / len(y))
    assert logged["nfr/v0"] == pytest.approx(neg / len(y))
    assert logged["pfr/prev"] == pytest.approx(pos / len(y))
    assert logged["nfi/prev"] == pytest.approx(neg / err)
    assert logged["acc/gain_prev"] == pytest.approx(acc1 - acc0)
    assert logged["rel_nfr/v0"] == pytest.approx((neg / len(y)) / (acc0 * (1 - acc1)))
    assert res.final["acc/version"] == pytest.approx(acc1)
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"update_versions.csv", "flips_per_class_v0_v1.csv", "flip_confusion_v0_v1.csv",
            "flip_confusion_v0_v1.png"} <= arts
    per = list(csv.DictReader(open(client.download_artifacts(
        run.info.run_id, "flips_per_class_v0_v1.csv", str(tmp_path)))))
    assert sum(int(r["neg_flips"]) for r in per) == neg
    conf = list(csv.reader(open(client.download_artifacts(
        run.info.run_id, "flip_confusion_v0_v1.csv", str(tmp_path)))))
    assert sum(int(v) for row in conf[1:] for v in row[1:]) == neg
