"""hf_encoder (the real pretrained MiniLM) and hf_causal_lm (tiny GPT-2 / Llama, local folders)."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from lethe.errors import ConfigError
from lethe.models.hf import HFCausalLMConfig, HFEncoderConfig, hf_causal_lm, hf_encoder, minilm_path
from lethe.models.vision import ModelInfo
from lethe.scenarios.text import tokenize

SENTENCES = ["a cat is sleeping on the sofa", "a kitten naps on the couch",
             "the central bank raised interest rates again"]


@pytest.fixture(scope="module")
def minilm():
    torch.manual_seed(0)
    return hf_encoder(OmegaConf.structured(HFEncoderConfig()), ModelInfo((2, 16), 4)).eval()


def test_minilm_mean_pooling_matches_sentence_transformers(minilm):
    """Our features are sentence-transformers' own all-MiniLM-L6-v2 embeddings (before its
    normalisation), computed by an independent library from the same folder."""
    from sentence_transformers import SentenceTransformer

    x = tokenize(SENTENCES, "minilm", 16)
    with torch.no_grad():
        ours = torch.nn.functional.normalize(minilm.features(x), dim=-1)
    ref = SentenceTransformer(minilm_path(), device="cpu").encode(SENTENCES, convert_to_tensor=True)
    assert torch.allclose(ours, ref.cpu(), atol=1e-4)
    sim = ours @ ours.T
    assert sim[0, 1] > sim[0, 2] + 0.3      # pretrained: cat ~ kitten, far from interest rates


def test_minilm_head_outputs_class_logits_and_accepts_ids_only(minilm):
    x = tokenize(SENTENCES, "minilm", 16)
    with torch.no_grad():
        out = minilm(x)
        ids_only = minilm(x[:, 0])
    assert out.shape == (3, 4)
    # [B, L] ids = all-ones mask: differs from the padded pass exactly where padding existed
    padded = (x[:, 1] == 0).any(1)
    assert torch.allclose(out[~padded], ids_only[~padded], atol=1e-5)
    assert not torch.allclose(out[padded], ids_only[padded], atol=1e-5)


def test_loading_leaves_the_process_environment_and_transformers_settings_alone(tmp_path):
    """Offline loading is per call (local_files_only), not HF_HUB_OFFLINE for the whole
    process; transformers' verbosity and bars are silenced only while lethe loads."""
    import os

    from transformers.utils import logging as hf_logging

    from lethe.models.hf import load_tokenizer

    before = dict(os.environ)
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_info()
    hf_logging.enable_progress_bar()
    try:
        hf_encoder(OmegaConf.structured(HFEncoderConfig()), ModelInfo((2, 8), 2))
        load_tokenizer.__wrapped__(minilm_path())    # past the cache: a real second load
        assert hf_logging.get_verbosity() == hf_logging.INFO
        assert hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.set_verbosity(verbosity)
        (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()
    assert dict(os.environ) == before


def test_hf_encoder_reports_missing_folder_and_bad_pooling():
    with pytest.raises(ConfigError, match="model.path: model folder not found"):
        hf_encoder(OmegaConf.structured(HFEncoderConfig(path="/nonexistent/enc")), ModelInfo((2, 8), 2))
    with pytest.raises(ConfigError, match="model.pooling"):
        hf_encoder(OmegaConf.structured(HFEncoderConfig(pooling="max")), ModelInfo((2, 8), 2))


def test_random_bert_encoder_builds_without_files():
    m = hf_encoder(OmegaConf.structured(HFEncoderConfig(path=None, hidden=32, layers=1, heads=2)),
                   ModelInfo((2, 8), 3))
    assert m(torch.randint(1, 100, (2, 2, 8)).clamp(max=1) * 5).shape == (2, 3)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_causal_lm_logits_give_the_hf_next_token_loss(arch):
    """logits [B, V, L] + plain cross-entropy on the shifted block = HF's own LM loss."""
    torch.manual_seed(0)
    model = hf_causal_lm(OmegaConf.structured(HFCausalLMConfig(arch=arch, max_positions=17)),
                         ModelInfo((16,), 50)).eval()
    block = torch.randint(0, 50, (3, 17))
    with torch.no_grad():
        logits = model(block[:, :-1])
        ours = torch.nn.functional.cross_entropy(logits, block[:, 1:])
        ref = model.lm(input_ids=block, labels=block).loss
    assert logits.shape == (3, 50, 16)
    # HF shifts inside: its 17-token pass scores the same 16 predictions (causal attention)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_causal_lm_loads_a_local_folder_and_checks_vocabulary(tmp_path):
    torch.manual_seed(0)
    model = hf_causal_lm(OmegaConf.structured(HFCausalLMConfig()), ModelInfo((8,), 40)).eval()
    model.lm.save_pretrained(tmp_path / "lm")
    again = hf_causal_lm(OmegaConf.structured(HFCausalLMConfig(path=str(tmp_path / "lm"))),
                         ModelInfo((8,), 40)).eval()
    x = torch.randint(0, 40, (2, 8))
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    with pytest.raises(ConfigError, match="vocabulary"):
        hf_causal_lm(OmegaConf.structured(HFCausalLMConfig(path=str(tmp_path / "lm"))),
                     ModelInfo((8,), 41))
    with pytest.raises(ConfigError, match="max_positions"):
        hf_causal_lm(OmegaConf.structured(HFCausalLMConfig(max_positions=4)), ModelInfo((8,), 40))
    with pytest.raises(ConfigError, match="did you mean 'llama'"):
        hf_causal_lm(OmegaConf.structured(HFCausalLMConfig(arch="lama")), ModelInfo((8,), 40))


@pytest.mark.parametrize("preset", ["hft_lm_local", "rewarm_lm_local", "conpet_dynamic_local"])
def test_realistic_presets_validate_and_name_their_missing_local_paths(preset):
    from lethe.platform.config import load_config
    from lethe.platform.runner import build_components

    cfg = load_config(preset)                 # every key is valid for its component
    with pytest.raises(ConfigError, match=r"scenario\.(paths\[0\]|path|test_path|tokenizer)"):
        build_components(cfg)                 # the data/model folders do not exist here
