"""Version mode of the update methods (MUSCLE's setting: frozen pretrained bases carrying task
LoRA adapters), its config errors, MUSCLE's paper preset twin through the CLI, and the SISA
paper preset's tiny twin."""
from __future__ import annotations

import copy
import re

import pytest
import torch

from lethe import registry
from lethe.errors import ConfigError
from lethe.methods.base import MethodContext
from lethe.platform.config import load_config
from lethe.platform.runner import build_components

TWIN = "paper/tiny/muscle_samsum_llama1_llama2"
BASE = "{name: hf_causal_lm, arch: llama, layers: 1, d_model: 16, heads: 2}"
# two tiny Llama bases pretrained one epoch each on a small corpus; one adapter epoch
FAST = ["scenario.source_args.markov_tokens=2000",
        (f"scenario.versions=[{{base: {BASE}, fraction: 0.5, pretrain_epochs: 1}},"
         f"{{base: {BASE}, fraction: 1.0, pretrain_epochs: 1}}]"),
        "train.epochs=1"]


def make_method(overrides: list[str], cls=None, preset: str = TWIN):
    cfg = load_config(preset, [*FAST, *overrides])
    torch.manual_seed(cfg.seed)
    stream, model, entry = build_components(cfg)
    ctx = MethodContext(train=cfg.train, device=torch.device("cpu"), stream=stream, seed=cfg.seed)
    return stream, (cls or entry.obj)(cfg.method, model, ctx)


def snapshotting(name: str):
    """The registered method, keeping a copy of each version's base + fresh adapter as built."""
    class Snap(registry.get("methods", name).obj):
        def _pretrained_base(self, payload):
            model = super()._pretrained_base(payload)
            self.__dict__.setdefault("built", []).append(copy.deepcopy(model))
            return model
    return Snap


@pytest.mark.parametrize("method", ["naive_update", "muscle"])
def test_version_mode_trains_only_the_adapter_and_leaves_the_base_bitwise_unchanged(method):
    stream, m = make_method([f"method.name={method}", "method.mode=adapter"],
                            cls=snapshotting(method))
    for k, exp in enumerate(stream.experiences):
        m.update(exp)
        built = dict(m.built[k].named_parameters())
        deployed = dict(m.model.named_parameters())
        assert deployed.keys() == built.keys()            # base + one adapter, unmerged
        lora = [n for n in deployed if ".lora_" in n]
        assert lora and all(deployed[n].requires_grad == (".lora_" in n) for n in deployed)
        for n, p in deployed.items():
            if ".lora_" not in n:
                assert torch.equal(p, built[n]), n        # the frozen base, bit for bit
        # LoRA B starts at zero; training moved it
        assert all(not built[n].any() for n in lora if ".lora_B." in n)
        assert any(deployed[n].abs().sum() > 0 for n in lora if ".lora_B." in n)
    # the two bases differ (v1 pretrained on more data): the update is a real base change
    b0, b1 = dict(m.built[0].named_parameters()), dict(m.built[1].named_parameters())
    assert any(not torch.equal(b0[n], b1[n]) for n in b0 if ".lora_" not in n)


class SpyMuscle(registry.get("methods", "muscle").obj):
    """Records the first compatibility-adapter minibatch: inputs, output, loss before/after."""

    def before_backward(self, strategy, **kwargs):
        first = self.new_model is not None and not hasattr(self, "seen")
        if first:
            self.seen = {"x": strategy.mb_x.clone(), "y": strategy.mb_y.clone(),
                         "out": strategy.mb_output.detach().clone(),
                         "before": float(strategy.loss.detach()), "new": copy.deepcopy(self.new_model)}
        super().before_backward(strategy, **kwargs)
        if first:
            self.seen["after"] = float(strategy.loss.detach())


def masked_kd_by_loop(out, teacher_old, teacher_new, y) -> float:
    """mean over tokens of KL(softmax(t) ‖ softmax(out)), t = old where new is wrong, else new
    (T = 1): one token at a time, [B, V, L] logits."""
    total, n = 0.0, 0
    for b in range(y.shape[0]):
        for pos in range(y.shape[1]):
            new = teacher_new[b, :, pos]
            t = teacher_old[b, :, pos] if int(new.argmax()) != int(y[b, pos]) else new
            log_t, log_s = t.log_softmax(0).double(), out[b, :, pos].log_softmax(0).double()
            total += float((log_t.exp() * (log_t - log_s)).sum())
            n += 1
    return total / n


def test_muscle_version_mode_distils_from_the_previous_base_plus_adapter():
    stream, m = make_method(["method.kd_weight=0.5"], cls=SpyMuscle)
    m.update(stream.experiences[0])
    prev = copy.deepcopy(m.model).eval()                   # v0: base_0 + adapter_0, deployed
    bare_prev = type(m)._bare_base(prev)                   # base_0 alone, without its adapter
    m.update(stream.experiences[1])
    s = m.seen
    with torch.no_grad():
        old, new, bare = prev(s["x"]), s["new"](s["x"]), bare_prev(s["x"])
    wrong = (new.argmax(1) != s["y"]).double().mean()
    assert 0 < wrong < 1                                   # both teachers are used
    kd = s["after"] - s["before"]
    assert kd == pytest.approx(0.5 * masked_kd_by_loop(s["out"], old, new, s["y"]), abs=1e-6)
    # the teacher is base_0 *with* adapter_0: without it (one adapter epoch) the loss differs
    # by a hundred times the tolerance above
    assert abs(kd - 0.5 * masked_kd_by_loop(s["out"], bare, new, s["y"])) > 1e-4


def test_version_mode_checkpoint_resumes_the_next_update_exactly():
    import io

    from lethe.platform import checkpoint as ckpt

    def predictions(stream, method):   # next-token logits of the held-out blocks
        with torch.no_grad():
            return method.model.eval()(stream.test.x[:, :-1])

    # save after v0 (base pretrained in the run + its adapter), restore into a method built
    # from the config, serve v1 (new base, task adapter, compatibility adapter) in both
    stream, a = make_method([])
    a.update(stream.experiences[0])
    buf = io.BytesIO()
    torch.save({"method": a.state_dict(), "rng": ckpt.rng_state()}, buf)
    a.update(stream.experiences[1])
    want = predictions(stream, a)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    stream_b, b = make_method([])
    assert not any(".lora_" in n for n, _ in b.model.named_parameters())   # the top-level model
    b.load_state_dict(state["method"])
    assert b.version == 0 and any(".lora_" in n for n, _ in b.model.named_parameters())
    ckpt.set_rng_state(state["rng"])
    b.update(stream_b.experiences[1])
    assert torch.equal(predictions(stream_b, b), want)


MODE_ERRORS = [
    (["method.mode=full"], "scenario.versions[i].base is set (version mode"),
    (["method.name=naive_update", "method.mode=full"], "set method.mode: adapter"),
    (["method.name=pct"], "method 'pct' has no version (adapter) mode"),
    (["method.compat_init=copy"], "method.compat_init='copy' must be one of task, zero"),
    (["method.mode=adaptor"], "method.mode='adaptor' must be one of full, adapter"),
]


@pytest.mark.parametrize("over,match", MODE_ERRORS)
def test_version_mode_method_errors_name_the_key(over, match):
    with pytest.raises(ConfigError, match=re.escape(match)):
        make_method(over)


SCENARIO_ERRORS = [
    (f"[{{base: {BASE}}}, {{fraction: 1.0}}]", ("scenario.versions[1]: version mode needs a base "
                                                "on every version")),
    (f"[{{base: {BASE}, model: {{name: mlp}}}}]", ("set base (the frozen pretrained model of this "
                                                   "version) or model")),
    ("[{base: /models/llama-7b}]", "scenario.versions[0].base='/models/llama-7b' must be a model node"),
    ("[{base: {name: hf_causal_lm, arhc: llama}}]", "scenario.versions[0].base.unknown key 'model.arhc'"),
    (f"[{{base: {BASE}, pretrain_epochs: -1}}]", "pretrain_epochs=-1 must be >= 0"),
    ("[{fraction: 1.0, pretrain_epochs: 2}]", "pretrain_epochs applies to a version-mode base"),
]


@pytest.mark.parametrize("versions,match", SCENARIO_ERRORS)
def test_version_mode_scenario_errors_name_the_key(versions, match):
    over = [f"scenario.versions={versions}"]
    with pytest.raises(ConfigError, match=re.escape(match)):
        cfg = load_config(TWIN, over)
        build_components(cfg)


def test_method_mode_adapter_needs_bases_and_pretraining_needs_a_corpus():
    with pytest.raises(ConfigError, match="method.mode=adapter trains task adapters on frozen bases"):
        build_components(load_config("compat_muscle_digits", ["method.mode=adapter"]))
    with pytest.raises(ConfigError, match="the source has only one; e.g. source_args: "
                                          r"\{markov_corpora: 2\}"):
        build_components(load_config(TWIN, [*FAST, "scenario.source_args.markov_corpora=1"]))


def test_version_mode_stream_trains_on_the_task_and_tests_on_its_held_out_part():
    cfg = load_config(TWIN, FAST)
    stream, _, _ = build_components(cfg)
    source = registry.get("scenarios", "lm_corpora").obj(_source_cfg(cfg), cfg.seed)
    task = source.experiences[-1].train.dataset
    p = [e.payload for e in stream.experiences]
    # every version's task data is the whole second corpus; pretraining sets nest in the first
    assert all(set(e.train.dataset.sample_id) == set(task.sample_id) for e in stream.experiences)
    pre = [set(q["pretrain"].dataset.sample_id) for q in p]
    first = set(source.experiences[0].train.dataset.sample_id)
    assert pre[0] < pre[1] == first and len(pre[0]) == round(0.5 * len(first))
    assert stream.test.ids.tolist() == source.test.ids[source.test.exp == 1].tolist()


def _source_cfg(cfg):
    from lethe.schema import validate_component

    return validate_component("scenario", {"name": "lm_corpora", **dict(cfg.scenario.source_args)})


@pytest.mark.integration
def test_tiny_muscle_paper_twin_runs_through_the_cli_and_logs_flips(tmp_path):
    from conftest import run_cli
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/m.db"
    res = run_cli(["run", TWIN, f"tracking.uri={uri}", "tracking.experiment=v",
                   f"checkpoint.dir={tmp_path}/ck"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("v").experiment_id])
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    for key in ("nfr/prev", "em_nfr/prev", "sdf/prev", "muscle/mask_frac"):
        assert key in metrics and 0.0 <= metrics[key] <= 1.0, key
    assert run.data.params["paper.metric"] == "em_nfr/prev" and run.data.params["method.mode"] == "adapter"


# --- the paper presets (MUSCLE, SISA) and their tiny twins ---------------------------------------
PAPER = ["paper/muscle_samsum_llama1_llama2", "paper/sisa_svhn"]


def raw(name: str):
    from omegaconf import OmegaConf

    from lethe.platform.config import resolve_path

    return OmegaConf.load(resolve_path(name))


@pytest.mark.parametrize("name", PAPER)
def test_paper_preset_and_its_twin_share_the_method_and_paper_block(name):
    from omegaconf import OmegaConf

    paper, twin = raw(name), raw(name.replace("paper/", "paper/tiny/"))
    assert OmegaConf.to_container(paper.method) == OmegaConf.to_container(twin.method)
    assert paper.paper == twin.paper
    assert paper.paper.value is not None or paper.paper.note.startswith("unverified")
    assert paper.requires and all(r.source.startswith("http") for r in paper.requires)


def test_muscle_paper_preset_loads_once_its_downloads_exist(tmp_path):
    keys = ["scenario.source_args.paths[0]", "scenario.source_args.tokenizer",
            "scenario.versions[0].base.path", "scenario.versions[1].base.path"]
    with pytest.raises(ConfigError, match=re.escape("scenario.source_args.paths[0]: not found")):
        load_config(PAPER[0])
    (tmp_path / "train.jsonl").write_text('{"text": "a"}\n')
    for d in ("tok", "llama1", "llama2"):
        (tmp_path / d).mkdir()
    over = [f"scenario.source_args.paths=[{tmp_path / 'train.jsonl'}]",
            f"scenario.source_args.tokenizer={tmp_path / 'tok'}",
            (f"scenario.versions=[{{base: {{name: hf_causal_lm, path: {tmp_path / 'llama1'}}}}},"
             f"{{base: {{name: hf_causal_lm, path: {tmp_path / 'llama2'}}}}}]")]
    cfg = load_config(PAPER[0], over)
    assert {r.key for r in cfg.requires} == set(keys)
    assert cfg.method.mode == "adapter" and cfg.scenario.versions[1].base.path.endswith("llama2")


def test_sisa_paper_preset_keeps_the_official_recipe(tmp_path):
    cfg = load_config(PAPER[1], [f"scenario.root={tmp_path}", f"scenario.test_root={tmp_path}"])
    # example-scripts/purchase-sharding: init.sh 5; sisa.py --slices 1 --epochs 20
    # --batch_size 16 --learning_rate 0.001 --optimizer sgd; aggregation.py uniform vote
    assert (cfg.method.shards, cfg.method.slices, cfg.method.aggregation) == (5, 1, "vote")
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.lr, cfg.train.optimizer) == \
        (20, 16, 0.001, "sgd")
    assert sum(r.n for r in cfg.scenario.forget_requests) == 15   # r = j·S/5, j ≤ 15


@pytest.mark.integration
def test_tiny_sisa_paper_twin_runs_and_logs_the_paper_metric(tmp_path):
    from mlflow.tracking import MlflowClient

    from lethe.platform.runner import run_experiment

    uri = f"sqlite:///{tmp_path}/m.db"
    res = run_experiment(load_config("paper/tiny/sisa_svhn", [
        f"tracking.uri={uri}", "tracking.experiment=twins", f"checkpoint.dir={tmp_path}/ck"]))
    run = MlflowClient(uri).get_run(res.run_id)
    assert run.info.status == "FINISHED"
    metric = run.data.params["paper.metric"]
    assert 0.5 < run.data.metrics[metric] <= 1.0               # five voting MLPs on digits
    assert run.data.metrics["unlearn/retrain_samples"] > 0
