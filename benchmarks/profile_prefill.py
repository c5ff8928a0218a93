"""Where the time to first token goes: the vision tower and the LM prefill, op by op, with MLX's own ops
("before") and with the package's CPU choices ("after": models/fast_math.py, the patch embedding as a matmul).

    python -m benchmarks.profile_prefill --preset mid                 # or --model DIR; --image-size 448
    python -m benchmarks.profile_prefill --preset 3b-pg2 --repeats 3 --json

Each op runs alone on inputs of the model's real shapes (batch 1, the image's tokens, then image + prompt
for the decoder), evaluated synchronously, median of `--repeats`, times the number of layers it runs in.
The last rows time the whole vision tower and the whole prefill (vision + decoder + head) both ways.
On a GPU both columns use MLX's ops (the approximations are CPU-only), so they agree.
"""

# ruff: noqa: I001  (mlx_paligemma is imported before mlx.core on purpose: it preloads the fast BLAS)
from __future__ import annotations

import mlx_paligemma as mp
import mlx.core as mx
import mlx.nn as nn

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

from mlx_paligemma.models import fast_math


CLOCK = {"clock": time.perf_counter}


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    mx.eval(fn())
    clock = CLOCK["clock"]
    times = []
    for _ in range(repeats):
        tic = clock()
        mx.eval(fn())
        times.append(clock() - tic)
    return statistics.median(times) * 1e3


@contextlib.contextmanager
def mlx_ops() -> Iterator[None]:
    """MLX's own ops everywhere, as before the CPU replacements (the patch embedding is timed separately)."""
    original = fast_math.use_fast_math
    fast_math.use_fast_math = lambda x: False
    try:
        yield
    finally:
        fast_math.use_fast_math = original


def _conv_patches(model, pixels_nhwc: mx.array) -> mx.array:
    """The strided convolution the matmul replaces (same weights)."""
    conv = model.vision_tower.embeddings.patch_embedding
    return conv(pixels_nhwc)


def _vision_ops(model, repeats: int) -> list[tuple[str, float, float]]:
    vt = model.vision_tower
    cfg = vt.config
    n, d, layers = (cfg.image_size // cfg.patch_size) ** 2, cfg.hidden_size, cfg.num_hidden_layers
    layer = vt.encoder.layers[0]
    heads = layer.self_attn.num_heads
    pixels = mx.random.normal((1, cfg.image_size, cfg.image_size, 3))
    x = mx.random.normal((1, n, d))
    q = mx.random.normal((1, heads, n, d // heads))
    h = mx.random.normal((1, n, cfg.intermediate_size))
    mx.eval(pixels, x, q, h)
    rows = [
        (
            "patch embedding (conv -> reshape + matmul)",
            lambda: _conv_patches(model, pixels),
            lambda: vt.embeddings(pixels),
            1,
        ),
        ("layer norms (mx.fast.layer_norm)", lambda: layer.layer_norm1(x), None, 2 * layers),
        ("q, k, v, out projections", lambda: layer.self_attn.q_proj(x), None, 4 * layers),
        (
            "attention core (QK^T, softmax, @V)",
            lambda: mx.fast.scaled_dot_product_attention(q, q, q, scale=layer.self_attn.scale),
            lambda: layer.self_attn.core(q, q, q),
            layers,
        ),
        ("MLP fc1 + fc2", lambda: layer.mlp.fc2(layer.mlp.fc1(x)), None, layers),
        ("GELU (tanh)", lambda: nn.gelu_approx(h), lambda: fast_math.gelu_approx(h), layers),
        ("residual adds", lambda: x + x, None, 2 * layers),
        ("post layer norm + projector", lambda: model.multi_modal_projector(vt.post_layernorm(x)), None, 1),
    ]
    return _time_rows(rows, repeats)


def _text_ops(model, prompt_tokens: int, repeats: int) -> list[tuple[str, float, float]]:
    lm = model.language_model
    cfg = lm.config
    L, D, layers = prompt_tokens, cfg.hidden_size, cfg.num_hidden_layers
    layer = lm.layers[0]
    attn = layer.self_attn
    x = mx.random.normal((1, L, D))
    q = mx.random.normal((1, attn.n_heads, L, attn.head_dim))
    kv = mx.random.normal((1, attn.n_kv_heads, L, attn.head_dim))
    heads_out = mx.random.normal((1, L, attn.n_heads * attn.head_dim))
    h = mx.random.normal((1, L, cfg.intermediate_size))
    mask = mx.ones((1, 1, L, L), mx.bool_)
    mx.eval(x, q, kv, heads_out, h, mask)
    norms = 4 if cfg.is_gemma2 else 2
    if attn.softcap is None:
        core = (
            lambda: mx.fast.scaled_dot_product_attention(q, kv, kv, scale=attn.scale, mask=mask),
            lambda: attn._matmul_attention(q, kv, kv, mask),
        )
    else:
        core = (lambda: _softcapped(attn, q, kv, mask), lambda: attn._matmul_attention(q, kv, kv, mask))
    rows = [
        ("embed tokens", lambda: lm.embed(mx.zeros((1, L), mx.int32)), None, 1),
        (f"RMS norms x{norms} (mx.fast.rms_norm)", lambda: layer.input_layernorm(x), None, norms * layers),
        (
            "q, k, v, o projections",
            lambda: (attn.q_proj(x), attn.k_proj(x), attn.v_proj(x), attn.o_proj(heads_out)),
            None,
            layers,
        ),
        ("RoPE (q, k)", lambda: (attn.rope(q), attn.rope(kv)), None, layers),
        ("attention core" + (" (soft-capped: tanh, mask, softmax)" if attn.softcap else ""), *core, layers),
        (
            "MLP gate + up + down",
            lambda: layer.mlp.down_proj(layer.mlp.gate_proj(x) * layer.mlp.up_proj(x)),
            None,
            layers,
        ),
        ("GELU (tanh) * up", lambda: nn.gelu_approx(h) * h, lambda: fast_math.gelu_approx(h) * h, layers),
        ("residual adds", lambda: x + x, None, 2 * layers),
        ("final norm + LM head (last position)", lambda: model.logits(lm.norm(x[:, -1])), None, 1),
    ]
    return _time_rows(rows, repeats)


def _softcapped(attn, q: mx.array, kv: mx.array, mask: mx.array) -> mx.array:
    with mlx_ops():
        return attn._matmul_attention(q, kv, kv, mask)


def _time_rows(rows, repeats: int) -> list[tuple[str, float, float]]:
    out = []
    for name, before, after, times in rows:
        t_before = _median_ms(before, repeats) * times
        t_after = _median_ms(after, repeats) * times if after is not None else t_before
        out.append((name, t_before, t_after))
    return out


def _end_to_end(model, processor, repeats: int) -> list[tuple[str, float, float]]:
    from tests.helpers import noise_image

    batch = processor(images=[noise_image(640, 480)], prompts=["caption en"])
    pixels = mx.array(batch["pixel_values"])

    def vision() -> mx.array:
        return model.encode_image(pixels)

    def prefill() -> mx.array:
        cache = model.make_cache()
        return model.prefill(mx.array(batch["input_ids"]), model.encode_image(pixels), cache)

    embeddings = model.vision_tower.embeddings
    conv_call = type(embeddings).__call__

    def conv_embeddings(self, pixels_nhwc):
        return _conv_patches(model, pixels_nhwc).reshape(1, -1, self.position_embedding.weight.shape[-1]) + (
            self.position_embedding.weight
        )

    rows = []
    for name, fn in (("whole vision tower + projector", vision), ("whole prefill (vision + decoder + head)", prefill)):
        with mlx_ops():
            type(embeddings).__call__ = conv_embeddings
            try:
                before = _median_ms(fn, repeats)
            finally:
                type(embeddings).__call__ = conv_call
        rows.append((name, before, _median_ms(fn, repeats)))
    return rows


def profile(model_dir: str, repeats: int) -> dict:
    model, processor = mp.load(model_dir)
    prompt_tokens = processor.encode_prompts(["caption en"])["input_ids"].shape[1]
    return dict(
        blas=mp.blas.blas_report()["mlx_blas"],
        device=str(mx.default_device()),
        dtype=str(model.dtype).replace("mlx.core.", ""),
        image_tokens=model.config.num_image_tokens,
        prompt_tokens=int(prompt_tokens),
        vision=_vision_ops(model, repeats),
        text=_text_ops(model, int(prompt_tokens), repeats),
        total=_end_to_end(model, processor, repeats),
    )


def markdown(r: dict) -> str:
    lines = [
        f"{r['device']}, {r['dtype']}, BLAS {r['blas']}; {r['image_tokens']} image tokens, "
        f"{r['prompt_tokens']} prefix tokens in all",
        "",
        "| part | op (all layers) | MLX ops ms | this package ms |",
        "| --- | --- | ---: | ---: |",
    ]
    for part, key in (("vision", "vision"), ("decoder prefill", "text"), ("end to end", "total")):
        lines += [f"| {part} | {name} | {before:.1f} | {after:.1f} |" for name, before, after in r[key]]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint directory")
    p.add_argument("--preset", help="build a random checkpoint instead (tools/presets.py: tiny, mid, 3b-pg2, ...)")
    p.add_argument("--image-size", type=int, default=None, help="the preset's image size (224, 448, 896)")
    p.add_argument("--dtype", default=None, help="the preset's dtype")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    p.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with the process's CPU time (all threads) instead of the wall clock: steadier on a shared machine",
    )
    args = p.parse_args(argv)
    if args.cpu_time:
        CLOCK["clock"] = time.process_time
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from tools.presets import build_preset

            preset = args.preset or "mid"
            model = str(build_preset(preset, Path(tmp) / "ckpt", dtype=args.dtype, image_size=args.image_size))
        r = profile(model, args.repeats)
    print(json.dumps(r) if args.json else markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
