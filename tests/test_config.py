"""Config parsing: sparse hub configs get the class defaults; bad configs are clear errors."""

from __future__ import annotations

import json

import pytest

import mlx_paligemma as mp
from mlx_paligemma.config import PaliGemmaConfig, load_config

# The text and vision sections of google/paligemma-3b-pt-224's config.json, as published.
HUB_PG1 = {
    "architectures": ["PaliGemmaForConditionalGeneration"],
    "bos_token_id": 2,
    "eos_token_id": 1,
    "hidden_size": 2048,
    "ignore_index": -100,
    "image_token_index": 257152,
    "model_type": "paligemma",
    "pad_token_id": 0,
    "projection_dim": 2048,
    "text_config": {
        "hidden_size": 2048,
        "intermediate_size": 16384,
        "model_type": "gemma",
        "num_attention_heads": 8,
        "num_hidden_layers": 18,
        "num_image_tokens": 256,
        "num_key_value_heads": 1,
        "torch_dtype": "float32",
        "vocab_size": 257216,
    },
    "torch_dtype": "float32",
    "transformers_version": "4.41.0.dev0",
    "vision_config": {
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "model_type": "siglip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 27,
        "num_image_tokens": 256,
        "patch_size": 14,
        "projection_dim": 2048,
        "projector_hidden_act": "gelu_fast",
        "vision_use_head": False,
    },
}


def pg2_28b(**text_overrides) -> dict:
    """A transformers-5-style PaliGemma 2 config (28b decoder shape)."""
    cfg = json.loads(json.dumps(HUB_PG1))
    cfg["projection_dim"] = 4608
    cfg["text_config"] = {
        "model_type": "gemma2",
        "hidden_size": 4608,
        "intermediate_size": 36864,
        "num_hidden_layers": 46,
        "num_attention_heads": 32,
        "num_key_value_heads": 16,
        "head_dim": 128,
        "query_pre_attn_scalar": 144,
        "vocab_size": 257216,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "use_bidirectional_attention": True,
        "sliding_window": 4096,
        **text_overrides,
    }
    return cfg


def test_sparse_hub_config_takes_class_defaults():
    cfg = PaliGemmaConfig.from_dict(HUB_PG1)
    t, v = cfg.text_config, cfg.vision_config
    assert (t.head_dim, t.rope_theta, t.rms_norm_eps) == (256, 10000.0, 1e-6)
    assert (v.image_size, v.layer_norm_eps, v.patch_size) == (224, 1e-6, 14)
    assert cfg.image_token_id == 257152 and cfg.num_image_tokens == 256 and cfg.tie_word_embeddings
    assert t.attention_scale == 256**-0.5 and t.final_logit_softcapping is None and t.sliding_window is None
    assert cfg.version == 1


def test_paligemma2_config_uses_text_width_and_query_scalar():
    cfg = PaliGemmaConfig.from_dict(pg2_28b())
    t = cfg.text_config
    assert cfg.version == 2 and t.hidden_size == 4608 and cfg.projection_dim == 4608
    assert t.attention_scale == 144**-0.5
    assert (t.attn_logit_softcapping, t.final_logit_softcapping, t.sliding_window) == (50.0, 30.0, 4096)
    assert t.layer_types[:3] == ["sliding_attention", "full_attention", "sliding_attention"]
    assert [t.is_sliding(i) for i in range(4)] == [True, False, True, False]


def test_rope_parameters_and_rope_theta_both_accepted():
    assert PaliGemmaConfig.from_dict(pg2_28b(rope_parameters={"rope_theta": 5.0})).text_config.rope_theta == 5.0
    old = pg2_28b(rope_theta=7.0)
    del old["text_config"]["rope_parameters"]
    assert PaliGemmaConfig.from_dict(old).text_config.rope_theta == 7.0


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c["text_config"].update(model_type="llama"), "text_config.model_type: unsupported 'llama'"),
        (lambda c: c.update(model_type="llava"), "model_type: unsupported 'llava'"),
        (lambda c: c["vision_config"].update(model_type="clip_vision_model"), "vision_config.model_type"),
        (lambda c: c["text_config"].pop("vocab_size"), "text_config: required field 'vocab_size' is missing"),
        (lambda c: c["vision_config"].pop("patch_size"), "vision_config: required field 'patch_size' is missing"),
        (lambda c: c.pop("image_token_index"), "required field 'image_token_index' is missing"),
        (lambda c: c.pop("text_config"), "required section 'text_config' is missing"),
        (
            lambda c: c["text_config"].update(num_key_value_heads=3),
            "text_config: num_attention_heads 8 is not a multiple of num_key_value_heads 3",
        ),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path, mutate, message):
    cfg = json.loads(json.dumps(HUB_PG1))
    mutate(cfg)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(mp.ConfigError, match="config.json: " + message.replace("(", r"\(").replace(")", r"\)")):
        load_config(tmp_path)


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(mp.PaliGemmaError, match="config.json: not found"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(mp.PaliGemmaError, match="config.json: not valid JSON"):
        load_config(tmp_path)
