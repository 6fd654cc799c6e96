"""Language-model methods against their official protocols: train.epochs=0 on a TOFU stream
(the checkpoint is already fine-tuned), LoKU's official schedule and FILA's SVD, ConPET's
full-data replay and unmasked static head, ReLearn's official augmentation, cut and KL."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from tofu_helpers import small, tiny_llama  # noqa: E402

from lethe.errors import ConfigError  # noqa: E402
from lethe.methods.base import MethodContext  # noqa: E402
from lethe.platform.config import load_config  # noqa: E402
from lethe.platform.runner import build_components  # noqa: E402

CPU = torch.device("cpu")
TINY = ["model.d_model=32", "model.heads=2", "model.layers=1", "device=cpu"]


# ====================================================== train.epochs=0 on a TOFU stream

def test_tofu_learn_with_zero_epochs_keeps_the_fine_tuned_checkpoint(tmp_path):
    """A checkpoint already fine-tuned on TOFU: train.epochs=0 serves the learn experience
    without a single update (weights bitwise the saved ones); 0 elsewhere, or without a
    checkpoint, is a config error naming the fix."""
    base = ["train.epochs=1", *small(tmp_path), *TINY]
    stream, _, _ = build_components(load_config("ga_tofu_synthetic", base))
    tiny_llama(stream, 7).lm.save_pretrained(tmp_path / "tofu_ft")
    saved = {n: w.clone() for n, w in tiny_llama(stream, 7).state_dict().items()}
    cfg = load_config("ga_tofu_synthetic", base + ["train.epochs=0", f"model.path={tmp_path / 'tofu_ft'}"])
    stream, model, entry = build_components(cfg)
    method = entry.obj(cfg.method, model, MethodContext(train=cfg.train, device=CPU, stream=stream,
                                                       seed=cfg.seed))
    learn = next(e for e in stream.experiences if e.kind == "learn")
    method.serve(learn)
    assert method.learned == [learn.index]
    for n, w in method.model.state_dict().items():
        assert torch.equal(w, saved[n]), n
    with pytest.raises(ConfigError, match="train.epochs=0 skips TOFU's fine-tuning.*set model.path"):
        load_config("ga_tofu_synthetic", base + ["train.epochs=0"])
    with pytest.raises(ConfigError, match="'train.epochs': must be ≥ 1 \\(0 is allowed only for "
                                          "scenario.name=tofu"):
        load_config("split_digits", ["train.epochs=0"])
    with pytest.raises(ConfigError, match="'train.epochs': must be ≥ 1"):
        load_config("ga_tofu_synthetic", base + ["train.epochs=-1", f"model.path={tmp_path}"])
