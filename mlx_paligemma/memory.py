"""How much memory a run will need, from config.json alone: weights, activations, KV cache, optimiser.

Used by `--dry-run` (print the breakdown against the machine's memory and stop before loading),
by fine-tuning (switch gradient checkpointing on when the run would not fit without it), by the
README's table (`tools/memory_table.py`) and, with `tp_ranks`, by tensor-parallel loading.

Weights are exact: the model is built from the config with lazy (never evaluated) arrays,
quantized with the same rules as the quantize tool and the loader, and its arrays' byte sizes
summed. Activations follow what MLX keeps for the backward pass of each decoder layer (inputs of
every linear, the attention scores, the MLP's four intermediate tensors), with coefficients
checked against measured peaks (`benchmarks/bench_memory.py`); see `ACTIVATION_*` below.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import PaliGemmaConfig
from .errors import PaliGemmaError

MODES = ("generate", "lora", "full")
# Per token and decoder layer, in units of the compute dtype, what the backward pass keeps:
# about 8 hidden-width tensors (norm outputs, q/k/v/attention output, residuals), 6 MLP-width ones
# (gate, up, the GELU's output and what its gradient keeps, the product), and ATTENTION_COPIES
# copies of the (heads x keys) scores. The MLP count is measured, not derived: LoRA peaks on the CPU
# grow by 5.5-6.7 MLP-width tensors per token and layer beyond the weights (4-bit and float32
# bases, mid preset and tests/test_memory.py's spec); counting only gate, up, activation and
# product (4) gave estimates 25% low.
ACTIVATION_HIDDEN = 8
ACTIVATION_MLP = 6
ATTENTION_COPIES = {1: 2, 2: 4}  # Gemma 2's soft-cap keeps the scores, their tanh and the softmax
KV_STEP = 256  # the KV cache grows this many positions at a time (models/cache.py)
GB = 1e9


@dataclass
class MemoryEstimate:
    """Bytes of each part of a run's peak memory."""

    weights: int
    activations: int
    kv_cache: int = 0
    gradients: int = 0
    optimizer: int = 0
    trainable: int = 0  # trainable parameters (already counted in weights)

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.kv_cache + self.gradients + self.optimizer

    def report(self, available: Optional[int] = None, what: str = "") -> str:
        """The breakdown, one part a line, and whether it fits in `available` bytes."""
        rows = [
            ("weights", self.weights),
            ("activations", self.activations),
            ("KV cache", self.kv_cache),
            ("gradients", self.gradients),
            ("optimizer state", self.optimizer),
        ]
        lines = [f"memory estimate{f' ({what})' if what else ''}:"]
        lines += [f"  {name:<16} {value / GB:8.2f} GB" for name, value in rows if value or name == "activations"]
        lines.append(f"  {'total':<16} {self.total / GB:8.2f} GB")
        if available:
            lines.append(f"  {'available':<16} {available / GB:8.2f} GB ({available_memory_source()})")
            lines.append(fits_line(self.total, available))
        return "\n".join(lines)


def fits_line(total: int, available: int) -> str:
    if total <= available:
        return f"fits: {total / GB:.2f} GB of {available / GB:.2f} GB ({100 * total / available:.0f}%)"
    return f"will not fit: needs {total / GB:.2f} GB, the machine has {available / GB:.2f} GB"


def _on_gpu() -> bool:
    return mx.default_device().type == mx.DeviceType.gpu and mx.metal.is_available()


def available_memory() -> int:
    """On a Mac's GPU the recommended working set (what Metal lets one process keep resident), else
    the machine's total RAM."""
    if _on_gpu():
        info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
        size = int(info.get("max_recommended_working_set_size", 0))
        if size:
            return size
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def available_memory_source() -> str:
    return "the GPU's recommended working set" if _on_gpu() else "total RAM"


def weight_bytes(
    config: PaliGemmaConfig,
    dtype: mx.Dtype,
    quantization: Optional[dict] = None,
    float32_small: bool = False,
    tp_ranks: int = 1,
) -> tuple[int, int]:
    """(bytes of all weights, bytes of the decoder layers' weights) for `config` stored in `dtype`,
    quantized as `quantization` (a config.json "quantization" entry: global and per-layer bits) says.

    `float32_small`: everything but linear and embedding weights in float32 (the CPU fine-tuning
    layout of a half-precision base). `tp_ranks`: one rank's share of a tensor-parallel model (decoder
    layers and the tied embedding split, KV heads split down to one per rank, vision tower whole).
    """
    from .models import Model
    from .quantize import quantization_predicate

    model = Model(config)  # lazy: nothing is allocated while only shapes are read
    if quantization:
        nn.quantize(model, class_predicate=quantization_predicate(quantization))
    big = {f"{p}.weight" for p, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}
    total = layers = 0
    for key, array in tree_flatten(model.parameters()):
        if mx.issubdtype(array.dtype, mx.floating):
            itemsize = 4 if float32_small and key not in big else dtype.size
        else:
            itemsize = array.dtype.size
        size = array.size * itemsize
        if key.startswith("language_model.layers."):
            # k/v keep whole heads: with fewer KV heads than ranks each rank holds a copy of one (sharding.py)
            kv_split = ".k_proj." in key or ".v_proj." in key
            size //= min(tp_ranks, config.text_config.num_key_value_heads) if kv_split else tp_ranks
            layers += size
        elif key.startswith("language_model.embed_tokens."):  # split over the vocabulary (sharding.py)
            size = -(-size // tp_ranks)
        total += size
    return total, layers


def lora_parameters(config: PaliGemmaConfig, rank: int, layers: str) -> int:
    t = config.text_config
    q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    shapes = [(t.hidden_size, q), (t.hidden_size, kv), (t.hidden_size, kv), (q, t.hidden_size)]
    if layers == "all":
        shapes += [(t.hidden_size, t.intermediate_size)] * 2 + [(t.intermediate_size, t.hidden_size)]
    return t.num_hidden_layers * sum(rank * (i + o) for i, o in shapes)


def _layer_activations(config: PaliGemmaConfig, batch: int, length: int, itemsize: int, tp_ranks: int) -> int:
    """Bytes one decoder layer keeps for the backward pass."""
    t = config.text_config
    tokens = batch * length
    per_token = ACTIVATION_HIDDEN * t.hidden_size + ACTIVATION_MLP * t.intermediate_size // tp_ranks
    scores = batch * (t.num_attention_heads // tp_ranks) * length * length * ATTENTION_COPIES[config.version]
    return (tokens * per_token + scores) * itemsize


def _vision_transient(config: PaliGemmaConfig, batch: int, itemsize: int) -> int:
    """The vision tower's largest working set (one layer at a time, nothing kept when it is frozen)."""
    v = config.vision_config
    p = v.num_patches
    return batch * (p * (4 * v.hidden_size + 2 * v.intermediate_size) + 2 * v.num_attention_heads * p * p) * itemsize


def _slice_transient() -> int:
    """The float32 slices of weights that `cpu_layers` makes on the fly (dequantized or cast)."""
    from .cpu_layers import CHUNK_ELEMENTS

    return 4 * CHUNK_ELEMENTS * 4


def checkpointed_layers(grad_checkpoint: Union[bool, int], num_layers: int) -> int:
    """How many of `num_layers` decoder layers fine-tuning's `grad_checkpoint` recomputes: True (or -1)
    all of them (and the vision tower's), False or 0 none, k the first k."""
    if grad_checkpoint is True or (not isinstance(grad_checkpoint, bool) and grad_checkpoint < 0):
        return num_layers
    return min(int(grad_checkpoint or 0), num_layers)


def estimate(
    config: PaliGemmaConfig,
    mode: str = "lora",
    dtype: str = "bfloat16",
    quantization: Optional[dict] = None,
    batch: int = 1,
    text_tokens: int = 32,
    max_tokens: int = 100,
    lora_rank: int = 8,
    lora_layers: str = "attn",
    grad_checkpoint: Union[bool, int] = False,
    compute_dtype: Optional[str] = None,
    tp_ranks: int = 1,
) -> MemoryEstimate:
    """Peak memory of generating (`mode="generate"`) or of a training step (`"lora"`, `"full"`).

    `dtype`: what float weights are stored in; `compute_dtype`: what activations are computed in
    (default: float32 on the CPU, else `dtype`). `text_tokens`: prompt (+ answer when training)
    tokens besides the image's; `max_tokens`: tokens generated. `tp_ranks`: tensor-parallel ranks,
    which divide the decoder's weights, KV heads and per-layer activations (vision is replicated).
    `grad_checkpoint`: True to recompute every layer in the backward pass, k for the first k decoder layers.
    """
    if mode not in MODES:
        raise PaliGemmaError(f"memory estimate: mode must be one of {', '.join(MODES)}, got {mode!r}")
    kv_heads = config.text_config.num_key_value_heads
    if tp_ranks < 1 or (kv_heads % tp_ranks and tp_ranks % kv_heads):
        raise PaliGemmaError(
            f"memory estimate: tp_ranks must be >= 1 and divide the {kv_heads} KV heads or be a multiple of them, "
            f"got {tp_ranks}"
        )
    storage = getattr(mx, dtype)
    if compute_dtype is None:
        compute_dtype = dtype if _on_gpu() else "float32"
    compute = getattr(mx, compute_dtype)
    cb = compute.size
    t = config.text_config
    length = config.num_image_tokens + text_tokens
    half_on_cpu = compute_dtype == "float32" and dtype != "float32"
    if mode == "full":
        storage = compute
    weights, _ = weight_bytes(
        config, storage, quantization, float32_small=half_on_cpu and mode == "lora", tp_ranks=tp_ranks
    )
    vision = _vision_transient(config, batch, cb)
    if (quantization or half_on_cpu) and compute_dtype == "float32" and not _on_gpu():
        vision += _slice_transient()
    if mode == "generate":
        positions = math.ceil((length + max_tokens) / KV_STEP) * KV_STEP
        kv = 2 * batch * positions * t.num_hidden_layers * max(t.num_key_value_heads // tp_ranks, 1) * t.head_dim * cb
        prefill = _layer_activations(config, batch, length, cb, tp_ranks) // 2  # one layer, nothing kept
        logits = batch * t.vocab_size * 4
        return MemoryEstimate(weights, max(vision, prefill) + logits, kv_cache=kv)

    if mode == "lora":
        trainable = lora_parameters(config, lora_rank, lora_layers) * 4
        weights += trainable
    else:
        trainable = sum(a.size for _, a in _decoder_and_head_shapes(config)) * compute.size
    per_layer = _layer_activations(config, batch, length, cb, tp_ranks)
    # Checkpointed layers keep only their input (the residual stream) and are recomputed one at a time in
    # the backward pass. The peak is where the backward pass starts; a recomputation adds one layer's
    # activations to it only when the last layer is checkpointed too (every layer), the first k are
    # recomputed later, when the layers above them have freed theirs.
    layers = t.num_hidden_layers
    recomputed = checkpointed_layers(grad_checkpoint, layers)
    stored = (layers - recomputed) * per_layer + recomputed * batch * length * t.hidden_size * cb
    if recomputed == layers:
        stored += per_layer
    head = 3 * batch * text_tokens * t.vocab_size * 4  # float32 logits, their softmax and gradient
    activations = stored + max(vision, head)
    return MemoryEstimate(weights, activations, gradients=trainable, optimizer=2 * trainable, trainable=trainable)


def _decoder_and_head_shapes(config: PaliGemmaConfig):
    """(name, lazy array) of every parameter a full fine-tune trains (the vision tower stays frozen)."""
    from .models import Model

    return [(k, a) for k, a in tree_flatten(Model(config).parameters()) if not k.startswith("vision_tower.")]


def estimate_generate(
    model_dir,
    dtype: Optional[str] = None,
    batch: int = 1,
    text_tokens: int = 32,
    max_tokens: int = 100,
    tp_ranks: int = 1,
) -> MemoryEstimate:
    """`mlx-paligemma generate --dry-run`: generation from a checkpoint folder, as `load()` would hold it
    (float32 on the CPU unless `dtype`, else the checkpoint's dtype), from config.json and the tensor
    index only. `tp_ranks`: per rank of a tensor-parallel run (see `estimate`)."""
    from .checkpoint import open_checkpoint, stored_dtype
    from .config import load_config

    config = load_config(model_dir)
    if dtype is None:
        dtype = stored_dtype(open_checkpoint(model_dir)) if _on_gpu() else "float32"
    return estimate(
        config,
        mode="generate",
        dtype=dtype,
        quantization=config.quantization,
        batch=batch,
        text_tokens=text_tokens,
        max_tokens=max_tokens,
        compute_dtype=dtype,
        tp_ranks=tp_ranks,
    )
