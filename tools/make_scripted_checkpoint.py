"""Turn a tiny PaliGemma 1 checkpoint into one whose greedy answer to any prompt is a given text.

A tiny random model never writes a well-formed segmentation answer, yet the CLI and the docs need one
that runs the whole path (image, prompt, generation, `<seg>` parsing, mask decoding) without fakes.
This rewrites only the language model of a checkpoint made by `tools.make_tiny_checkpoint`
(PaliGemma 1, Gemma decoder) so that it is a lookup table of next tokens:

- every attention output projection is zero, so a position's state is its own token embedding;
- the embedding of each token of the chain (the prompt's final "\\n", the answer's tokens) holds an
  "output" vector a (dims 0..31), a "key" b (dims 32..62) and a constant (dim 63);
- layer 0's MLP has one neuron per chain token, firing only on its key (gate = beta * (<b_n, b> - tau),
  GELU ~ 0 below the threshold), that writes K * a(next token) into the residual;
- the final norm keeps only the output dims, so the tied LM head scores <a(next), a(j)>: the next
  token wins, tokens outside the chain score 0.

The vision tower is untouched and random. Greedy decoding then emits the answer and `<eos>` whatever
the image and prompt (the prompt must end with the processor's "\\n", as every PaliGemma prompt does).

    python -m tools.make_scripted_checkpoint SRC_DIR OUT_DIR "<loc0100>...<seg012> cat"
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

OUT_DIMS = slice(0, 32)
KEY_DIMS = slice(32, 63)
CONST_DIM = 63
CONST = 4.0  # the embeddings' constant component: keeps every chain token's RMS within a few percent
OUTPUT_GAIN = 100.0  # K: how far the looked-up next-token vector outweighs the current token's own


def _unit_vectors(count: int, dim: int, rng: np.random.Generator, tries: int = 200) -> np.ndarray:
    """`count` unit vectors in `dim` dimensions, the set with the smallest largest |cosine| of `tries` draws."""
    best, best_cos = None, np.inf
    for _ in range(tries):
        v = rng.standard_normal((count, dim))
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        gram = np.abs(v @ v.T - np.eye(count))
        if gram.max() < best_cos:
            best, best_cos = v, gram.max()
    return best


def script_weights(weights: dict[str, np.ndarray], chain: list[int], seed: int = 0) -> dict[str, np.ndarray]:
    """The language-model tensors rewritten so that token chain[i] is followed by chain[i + 1].

    `weights` are a PaliGemma 1 checkpoint's tensors by their hub names; chain[:-1] must be distinct.
    """
    prefix = "language_model.model."
    embed = weights[prefix + "embed_tokens.weight"].copy()
    hidden = embed.shape[1]
    gate = weights[prefix + "layers.0.mlp.gate_proj.weight"]
    if hidden != 64 or gate.shape[0] < len(chain) - 1:
        raise ValueError(f"needs text width 64 and >= {len(chain) - 1} MLP neurons, got {hidden}, {gate.shape[0]}")
    sources, targets = chain[:-1], chain[1:]
    if len(set(sources)) != len(sources):
        raise ValueError("every token of the chain but the last must be distinct (each has one successor)")
    rng = np.random.default_rng(seed)
    out_ids = sorted(set(targets))
    out_vec = dict(zip(out_ids, _unit_vectors(len(out_ids), OUT_DIMS.stop - OUT_DIMS.start, rng)))
    keys = _unit_vectors(len(sources), KEY_DIMS.stop - KEY_DIMS.start, rng)
    tau = (1.0 + np.abs(keys @ keys.T - np.eye(len(keys))).max()) / 2  # halfway between a match and the rest
    beta = 20.0 / (1.0 - tau)  # a matching neuron's gate is 20, every other one <= -20 (GELU ~ 0)

    embed[:, OUT_DIMS] = 0.0  # no token outside the chain can win the argmax
    for token in set(chain):
        embed[token, KEY_DIMS] = 0.0
        embed[token, CONST_DIM] = CONST
    for token, vec in out_vec.items():
        embed[token, OUT_DIMS] = vec
    for token, key in zip(sources, keys):
        embed[token, KEY_DIMS] = key

    # Layer 0's MLP input is RMS-normalised: a chain token's state is e / r with r ~ CONST / 8 (the
    # constant dominates), so its key dims read key / r and its constant dim CONST / r.
    r = CONST / np.sqrt(hidden)
    gate_w = np.zeros_like(gate)
    up_w = np.zeros_like(weights[prefix + "layers.0.mlp.up_proj.weight"])
    down_w = np.zeros_like(weights[prefix + "layers.0.mlp.down_proj.weight"])
    for n, (key, target) in enumerate(zip(keys, targets)):
        gate_w[n, KEY_DIMS] = beta * r * key  # gate = beta * (<key_n, key> - tau)
        gate_w[n, CONST_DIM] = -beta * tau * r / CONST
        up_w[n, CONST_DIM] = r / CONST  # up = 1
        down_w[OUT_DIMS, n] = OUTPUT_GAIN * out_vec[target] / (beta * (1 - tau))  # GELU(x) ~ x at a match
    out = dict(weights)
    out[prefix + "embed_tokens.weight"] = embed
    out[prefix + "layers.0.mlp.gate_proj.weight"] = gate_w.astype(gate.dtype)
    out[prefix + "layers.0.mlp.up_proj.weight"] = up_w
    out[prefix + "layers.0.mlp.down_proj.weight"] = down_w
    layers = sorted({k.split(".")[3] for k in weights if k.startswith(prefix + "layers.")}, key=int)
    for layer in layers:
        p = f"{prefix}layers.{layer}."
        out[p + "self_attn.o_proj.weight"] = np.zeros_like(weights[p + "self_attn.o_proj.weight"])
        out[p + "input_layernorm.weight"] = np.zeros_like(weights[p + "input_layernorm.weight"])
        out[p + "post_attention_layernorm.weight"] = np.zeros_like(weights[p + "post_attention_layernorm.weight"])
        if layer != "0":
            out[p + "mlp.down_proj.weight"] = np.zeros_like(weights[p + "mlp.down_proj.weight"])
    norm = np.full(hidden, -1.0, embed.dtype)  # Gemma's norm scales by (1 + w): 0 outside the output dims
    norm[OUT_DIMS] = 0.0
    out[prefix + "norm.weight"] = norm
    return out


def make_scripted_checkpoint(src_dir: str | Path, out_dir: str | Path, answer: str, seed: int = 0) -> Path:
    """Copy the tiny PaliGemma 1 checkpoint `src_dir` to `out_dir` (absent) with its LM scripted to say `answer`."""
    from safetensors.numpy import load_file, save_file

    from mlx_paligemma.processor import Tokenizer

    src_dir, out_dir = Path(src_dir), Path(out_dir)
    tokenizer = Tokenizer(src_dir / "tokenizer.model")
    ids = tokenizer.encode(answer)
    if tokenizer.decode(ids) != answer:
        raise ValueError(f"{answer!r} does not survive a tokenizer round trip")
    chain = [tokenizer.piece_to_id("\n"), *ids, tokenizer.eos_id]
    shutil.copytree(src_dir, out_dir)
    files = sorted(out_dir.glob("*.safetensors"))
    weights: dict[str, np.ndarray] = {}
    for path in files:
        weights.update(load_file(str(path)))
    scripted = script_weights(weights, chain, seed)
    for path in files:  # each shard rewritten with its own tensors
        names = list(load_file(str(path)))
        save_file({k: np.ascontiguousarray(scripted[k]) for k in names}, str(path), metadata={"format": "pt"})
    return out_dir


def main(argv: Optional[Sequence[str]] = None) -> int:
    from mlx_paligemma.cli import ArgumentParser, fail

    p = ArgumentParser(prog="python -m tools.make_scripted_checkpoint", description=__doc__.splitlines()[0])
    p.add_argument("src", help="a tiny PaliGemma 1 checkpoint made by tools.make_tiny_checkpoint")
    p.add_argument("out", help="output directory (must not exist)")
    p.add_argument("answer", help="the text every prompt will be answered with")
    args = p.parse_args(argv)
    try:
        print(make_scripted_checkpoint(args.src, args.out, args.answer))
    except (ValueError, OSError) as e:
        return fail(p.prog, str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
