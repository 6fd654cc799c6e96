"""Vision paper presets (lethe/conf/paper/{mos,clr,s3t}_*) and their tiny CPU twins; the MOS
and CLR options the presets rely on (classifier-alignment sample count, official CLR loss)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lethe.errors import ConfigError
from lethe.platform.config import load_config
from lethe.scenarios.image_folder import write_digit_pngs
from lethe.scenarios.transforms import build as build_transforms

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Stand-ins for the downloads (existence is all the config checks) and a digits folder."""
    root = tmp_path_factory.mktemp("paper")
    for d in ("cifar", "inr/train/a", "inr/test/a"):
        (root / d).mkdir(parents=True)
    (root / "w.pth").touch()
    write_digit_pngs(root / "digits", per_class=24)
    write_digit_pngs(root / "digits_test", per_class=6)
    return root


def real(name, files):
    over = {"paper/mos_imagenet_r": [f"scenario.root={files}/inr/train",
                                     f"scenario.test_root={files}/inr/test"]}.get(
        name, [f"scenario.dataset_root={files}/cifar"])
    return load_config(name, over + [f"model.weights_path={files}/w.pth"])


@pytest.mark.parametrize("name, needs", [
    ("paper/mos_cifar100_b0inc5", "cifar-100-python.tar.gz"),
    ("paper/mos_imagenet_r", "imagenet-r"),
    ("paper/clr_cifar100", "cifar-100-python.tar.gz"),
    ("paper/s3t_cifar10_vit", "cifar-10-python.tar.gz"),
])
def test_paper_preset_without_its_data_fails_at_config_time_naming_the_download(name, needs):
    with pytest.raises(ConfigError, match=f"not found: .*download: .*{needs}"):
        load_config(name)


def test_missing_weights_name_the_file_to_export(files):
    with pytest.raises(ConfigError, match="model.weights_path: not found: 'weights/vit_b16_in21k"
                                          ".pth'.*vit_base_patch16_224.augreg_in21k"):
        load_config("paper/mos_cifar100_b0inc5", [f"scenario.dataset_root={files}/cifar"])


@pytest.mark.parametrize("name, avg, note_last", [
    ("paper/mos_cifar100_b0inc5", 0.9330, "89.25"), ("paper/mos_imagenet_r", 0.8296, "77.93")])
def test_mos_presets_use_pilots_pipeline_order_and_the_papers_average_accuracy(
        files, name, avg, note_last):
    cfg = real(name, files)
    assert cfg.scenario.transforms == "pilot" and cfg.scenario.class_order == "pilot"
    # Table 1: average incremental accuracy on lethe's [0, 1] scale, last accuracy in the note
    assert cfg.paper.metric == "acc/avg_incremental" and cfg.paper.value == pytest.approx(avg)
    assert note_last in cfg.paper.note
    assert cfg.method.ca_samples_per_class is None        # official 5 × batch
    assert cfg.method.merge_momentum == 0.1 and cfg.method.ca_epochs == 30


def test_clr_preset_is_the_official_recipe(files):
    cfg = real("paper/clr_cifar100", files)
    train, eval_ = build_transforms(cfg.scenario.transforms)
    for pipe in (train, eval_):   # Resize((224, 224)) + ImageNet mean/std, no augmentation
        assert [type(t).__name__ for t in pipe.transforms] == ["Resize", "ToTensor", "Normalize"]
        assert list(pipe.transforms[0].size) == [224, 224]
        assert (pipe.transforms[2].mean, pipe.transforms[2].std) == IMAGENET
    assert not cfg.model.small_input
    t = cfg.train
    assert (t.optimizer, t.lr, t.batch_size, t.epochs) == ("adam", 0.001, 32, 60)
    assert (t.lr_schedule.name, t.lr_schedule.step_size, t.lr_schedule.gamma) == ("step", 20, 0.1)
    assert cfg.eval.every_epochs == 1 and cfg.checkpoint.select == "best"
    assert cfg.method.l2_form == "official"
    assert cfg.paper.value is None and cfg.paper.note.startswith("unverified")


def test_s3t_preset_has_the_papers_vit_lora_and_inputs(files):
    cfg = real("paper/s3t_cifar10_vit", files)
    lora = cfg.method.lora
    assert (lora.rank, lora.alpha, lora.dropout, lora.rslora, lora.fused_qkv) == (16, 16, 0.1, True, "qv")
    assert (cfg.train.optimizer, cfg.train.lr, cfg.train.epochs, cfg.train.batch_size) == \
        ("adamw", 0.002, 15, 128)
    assert cfg.train.lr_schedule.name == "warmup_linear" and cfg.train.lr_schedule.warmup_frac == 0
    train, eval_ = build_transforms(cfg.scenario.transforms)
    assert [type(t).__name__ for t in train.transforms][:2] == ["RandomResizedCrop", "RandomHorizontalFlip"]
    assert eval_.transforms[-1].mean == [0.5] * 3 and eval_.transforms[-1].std == [0.5] * 3


# --- the tiny twins, end to end ----------------------------------------------------------
def _twin(name, files, store, extra=()):
    from lethe.platform.runner import run_experiment

    roots = [f"scenario.root={files}/digits"]
    if name.endswith("mos_imagenet_r"):
        roots.append(f"scenario.test_root={files}/digits_test")
    cfg = load_config(f"paper/tiny/{name}", roots + store["overrides"] + list(extra))
    return cfg, run_experiment(cfg)


@pytest.mark.integration
@pytest.mark.parametrize("name", ["mos_cifar100_b0inc5", "mos_imagenet_r"])
def test_mos_twin_runs_with_pilot_order_and_5x_batch_alignment_samples(files, store, monkeypatch, name):
    from lethe.methods import mos
    from lethe.platform.runner import build_components

    drawn, real_sample = [], mos.sample_gaussians
    monkeypatch.setattr(mos, "sample_gaussians",
                        lambda m, f, n, s: drawn.append(n) or real_sample(m, f, n, s))
    cfg, result = _twin(name, files, store)
    # one draw per alignment epoch after every task from the second on
    assert drawn == [5 * cfg.train.batch_size] * (cfg.method.ca_epochs * 4)
    stream, _, _ = build_components(cfg)
    assert stream.class_order == np.random.RandomState(1993).permutation(10).tolist()
    assert 0.0 <= result.final["acc/avg_incremental"] <= 1.0


@pytest.mark.integration
def test_clr_twin_runs_the_step_schedule_and_keeps_the_best_epoch(files, store):
    from mlflow.tracking import MlflowClient

    _, result = _twin("clr_cifar100", files, store)
    lrs = {round(m.value, 12) for m in MlflowClient(store["uri"]).get_metric_history(
        result.run_id, "train/lr")}
    # StepLR(step_size=1, γ=0.1) from 1e-3 over 3 epochs: 1e-3, 1e-4, 1e-5 (η·γ^⌊epoch/1⌋)
    assert lrs == {round(1e-3 * 0.1 ** e, 12) for e in range(3)}
    assert result.final["forgetting/avg"] == 0.0      # CLR's per-task state, restored by task id


@pytest.mark.integration
def test_s3t_twin_runs_its_deletions_on_a_lazy_image_folder(files, store):
    cfg, result = _twin("s3t_cifar10_vit", files, store)
    assert 0.0 <= result.final["acc/avg_seen"] <= 1.0
    assert len(cfg.scenario.forget_requests) == 2


# --- CLR's regulariser -------------------------------------------------------------------
def _clr(form):
    from lethe.methods.base import MethodContext
    from lethe.methods.clr import CLR
    from lethe.platform.runner import build_components

    cfg = load_config("clr_split_digits", [f"method.l2_form={form}", "model.channels=8"])
    torch.manual_seed(0)
    stream, model, _ = build_components(cfg)
    ctx = MethodContext(train=cfg.train, device=torch.device("cpu"), stream=stream, seed=0)
    method = CLR(cfg.method, model, ctx)
    method._begin_task(0, [3, 7])
    with torch.no_grad():   # non-identity kernels, so the two forms differ visibly
        for p in method.model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    return method


def test_clr_official_penalty_is_the_sum_of_norms_of_every_trained_tensor():
    method = _clr("official")
    trained = [(n, p) for n, p in method.model.named_parameters() if p.requires_grad]
    assert any(".clr." in n for n, _ in trained) and any("linear" in n for n, _ in trained)
    expected = sum(float(np.sqrt((p.detach().double().numpy() ** 2).sum())) for _, p in trained)
    assert float(method.penalty()) == pytest.approx(expected, rel=1e-5)


def test_clr_default_penalty_is_the_squared_norm_of_the_clr_kernels_only():
    method = _clr("squared")
    expected = sum(float((p.detach().double().numpy() ** 2).sum())
                   for n, p in method.model.named_parameters() if ".clr." in n)
    assert float(method.penalty()) == pytest.approx(expected, rel=1e-5)


def test_clr_unknown_l2_form_is_a_config_error():
    with pytest.raises(ConfigError, match="method.l2_form: 'sqared' must be one of squared, official"):
        _clr("sqared")


@pytest.mark.integration
def test_compare_shows_the_mos_papers_number_beside_two_seeds_of_its_twin(files, store):
    import html
    import re
    import statistics

    from mlflow.tracking import MlflowClient

    from lethe.dashboards import compare

    for seed in (0, 1):
        _twin("mos_cifar100_b0inc5", files, store, [f"seed={seed}", "method.ca_epochs=1"])
    client = MlflowClient(store["uri"])
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    values = [r.data.metrics["acc/avg_incremental"] for r in runs]
    page = compare.write_compare(store["uri"], experiment="test", out=files / "compare.html")
    text = html.unescape(page.path.read_text())
    body = re.search(r"<table class='sortable' id='paper'>(.*?)</table>", text, re.DOTALL).group(1)
    want = f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"   # sample std
    row = re.findall(r"<tr>(.*?)</tr>", body, re.DOTALL)[1]
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row, re.DOTALL)
    assert cells[1:5] == ["acc/avg_incremental", want, "2", "0.9330"]
