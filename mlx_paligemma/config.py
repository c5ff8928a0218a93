"""PaliGemma 1 and 2 configuration, parsed from a checkpoint's config.json.

The hub configs of the original checkpoints are sparse: fields they omit take the transformers
*class* defaults, which are collected here (and only here). Fields that fix tensor shapes are
required: guessing them would build a model that cannot match the weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

TEXT_MODEL_TYPES = ("gemma", "gemma2")
VISION_MODEL_TYPES = ("siglip_vision_model",)


def _require(section: dict, key: str, where: str) -> Any:
    if key not in section or section[key] is None:
        raise ConfigError(f"{where}: required field '{key}' is missing")
    return section[key]


def _rope_theta(text: dict) -> float:
    """transformers 5.x writes `rope_parameters: {rope_theta, rope_type}`; older files `rope_theta`."""
    params = text.get("rope_parameters")
    if isinstance(params, dict) and params.get("rope_theta") is not None:
        if params.get("rope_type", "default") != "default":
            raise ConfigError(f"text_config.rope_parameters: unsupported rope_type {params['rope_type']!r}")
        return float(params["rope_theta"])
    return float(text.get("rope_theta") or 10000.0)


@dataclass
class VisionConfig:
    """SigLIP vision tower."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    patch_size: int
    image_size: int = 224
    num_channels: int = 3
    layer_norm_eps: float = 1e-6

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_dict(cls, d: dict, where: str = "vision_config") -> VisionConfig:
        model_type = d.get("model_type", "siglip_vision_model")
        if model_type not in VISION_MODEL_TYPES:
            raise ConfigError(f"{where}.model_type: unsupported {model_type!r} (expected siglip_vision_model)")
        req = {
            k: int(_require(d, k, where))
            for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size")
        }
        return cls(
            **req,
            image_size=int(d.get("image_size") or 224),
            num_channels=int(d.get("num_channels") or 3),
            layer_norm_eps=float(d.get("layer_norm_eps") or 1e-6),
        )


@dataclass
class TextConfig:
    """Gemma 1 (`gemma`) or Gemma 2 (`gemma2`) decoder."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 8192  # longest sequence (image + prompt + answer) it was trained for
    # Gemma 2 only (None for Gemma 1):
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    sliding_window: int | None = None
    layer_types: list[str] = field(default_factory=list)

    @property
    def is_gemma2(self) -> bool:
        return self.model_type == "gemma2"

    @property
    def attention_scale(self) -> float:
        """Gemma 1 scales by head_dim^-0.5, Gemma 2 by query_pre_attn_scalar^-0.5 (differs for 28b)."""
        if self.query_pre_attn_scalar is not None:
            return self.query_pre_attn_scalar**-0.5
        return self.head_dim**-0.5

    def is_sliding(self, layer: int) -> bool:
        return self.sliding_window is not None and self.layer_types[layer] == "sliding_attention"

    @classmethod
    def from_dict(cls, d: dict, where: str = "text_config") -> TextConfig:
        model_type = d.get("model_type")
        if model_type not in TEXT_MODEL_TYPES:
            raise ConfigError(
                f"{where}.model_type: unsupported {model_type!r} (expected 'gemma' for PaliGemma 1 "
                f"or 'gemma2' for PaliGemma 2)"
            )
        req = {
            k: int(_require(d, k, where))
            for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        }
        cfg = cls(
            model_type=model_type,
            **req,
            num_key_value_heads=int(d.get("num_key_value_heads") or req["num_attention_heads"]),
            head_dim=int(d.get("head_dim") or 256),
            rms_norm_eps=float(d.get("rms_norm_eps") or 1e-6),
            rope_theta=_rope_theta(d),
            max_position_embeddings=int(d.get("max_position_embeddings") or 8192),
        )
        if req["num_attention_heads"] % cfg.num_key_value_heads:
            raise ConfigError(
                f"{where}: num_attention_heads {req['num_attention_heads']} is not a multiple "
                f"of num_key_value_heads {cfg.num_key_value_heads}"
            )
        if model_type == "gemma2":
            cfg.query_pre_attn_scalar = float(d.get("query_pre_attn_scalar") or 256)
            cfg.attn_logit_softcapping = d.get("attn_logit_softcapping", 50.0)
            cfg.final_logit_softcapping = d.get("final_logit_softcapping", 30.0)
            cfg.sliding_window = d.get("sliding_window", 4096)
            # Gemma 2 alternates sliding (even layers) and full attention unless told otherwise.
            cfg.layer_types = list(
                d.get("layer_types")
                or ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(cfg.num_hidden_layers)]
            )
            if len(cfg.layer_types) != cfg.num_hidden_layers:
                raise ConfigError(
                    f"{where}.layer_types: {len(cfg.layer_types)} entries for {cfg.num_hidden_layers} layers"
                )
        return cfg


@dataclass
class PaliGemmaConfig:
    vision_config: VisionConfig
    text_config: TextConfig
    image_token_id: int
    projection_dim: int
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    torch_dtype: str | None = None
    quantization: dict | None = None

    @property
    def version(self) -> int:
        return 2 if self.text_config.is_gemma2 else 1

    @property
    def num_image_tokens(self) -> int:
        return self.vision_config.num_patches

    @classmethod
    def from_dict(cls, d: dict) -> PaliGemmaConfig:
        if d.get("model_type") != "paligemma":
            raise ConfigError(f"model_type: unsupported {d.get('model_type')!r} (expected 'paligemma')")
        for key in ("vision_config", "text_config"):
            if not isinstance(d.get(key), dict):
                raise ConfigError(f"required section '{key}' is missing")
        text = TextConfig.from_dict(d["text_config"])
        vision = VisionConfig.from_dict(d["vision_config"])
        # PaliGemmaConfig's own default (256000) is wrong for every released checkpoint: require it.
        image_token_id = d.get("image_token_index", d.get("image_token_id"))
        if image_token_id is None:
            raise ConfigError("required field 'image_token_index' is missing")
        # The top-level hidden_size (2048) is not the text width of PaliGemma 2: never read it.
        projection_dim = int(d.get("projection_dim") or d["vision_config"].get("projection_dim") or text.hidden_size)
        if projection_dim != text.hidden_size:
            raise ConfigError(
                f"projection_dim {projection_dim} differs from text_config.hidden_size {text.hidden_size}"
            )
        dtype = (
            d.get("torch_dtype")
            or d.get("dtype")
            or d["text_config"].get("torch_dtype")
            or d["text_config"].get("dtype")
        )
        return cls(
            vision_config=vision,
            text_config=text,
            image_token_id=int(image_token_id),
            projection_dim=projection_dim,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", d["text_config"].get("tie_word_embeddings", True))),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=_first(d.get("eos_token_id")),
            pad_token_id=d.get("pad_token_id"),
            torch_dtype=dtype,
            quantization=d.get("quantization"),
        )


def _first(value):
    return value[0] if isinstance(value, list) and value else value


def load_config(model_dir: str | Path) -> PaliGemmaConfig:
    path = Path(model_dir) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found (a PaliGemma checkpoint directory has a config.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    try:
        return PaliGemmaConfig.from_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path}: malformed field ({e})") from None
