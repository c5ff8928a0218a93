"""Write a random segmentation mask decoder in the exact layout of big_vision's `vae-oid.npz`.

The real decoder comes from Google's storage (see the README); tests, docs and benchmarks need one
that any machine can build: same tensor names, PyTorch layouts and shapes, float32, random weights
(He-normal, so activations neither vanish nor explode; the last layer scaled so the 64x64 logits
span about [-1, 1] like the published decoder's, with both signs).

    python -m tools.make_random_mask_decoder OUT.npz [--codebook-dim 512] [--seed 0] [--force]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from mlx_paligemma.fsutil import atomic_path
from mlx_paligemma.mask_decoder import CODEBOOK_KEY, UPSAMPLE_INDICES, expected_shapes

DEFAULT_CODEBOOK_DIM = 512
# Shrinks the last conv so the logits span about [-1, 1], as the published decoder's do.
FINAL_SCALE = 0.2


def random_decoder_weights(codebook_dim: int = DEFAULT_CODEBOOK_DIM, seed: int = 0) -> dict[str, np.ndarray]:
    """Every decoder tensor, by its `vae-oid.npz` name, with He-normal weights and small random biases."""
    rng = np.random.default_rng(seed)
    upsample = {f"decoder.{i}.weight" for i in UPSAMPLE_INDICES}
    weights = {}
    for name, shape in expected_shapes(codebook_dim).items():
        if name == CODEBOOK_KEY:
            value = rng.standard_normal(shape)
        elif name.endswith(".bias"):
            value = 0.05 * rng.standard_normal(shape)
        else:
            # Conv2d (out, in, k, k): fan-in in*k*k. ConvTranspose2d (in, out, 4, 4) at stride 2: each output
            # pixel sees in*4 taps.
            fan_in = shape[0] * 4 if name in upsample else shape[1] * shape[2] * shape[3]
            value = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
            if name == "decoder.12.weight":
                value *= FINAL_SCALE
        weights[name] = value.astype(np.float32)
    return weights


def make_random_mask_decoder(
    path: str | Path, codebook_dim: int = DEFAULT_CODEBOOK_DIM, seed: int = 0, force: bool = False
) -> Path:
    """Write the random decoder to `path` (.npz, as `np.savez` writes it); returns the path."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"{path}: the output must end in .npz")
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; pass force=True to overwrite it")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **random_decoder_weights(codebook_dim, seed))
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    from mlx_paligemma.cli import ArgumentParser, fail

    p = ArgumentParser(prog="python -m tools.make_random_mask_decoder", description=__doc__.splitlines()[0])
    p.add_argument("out", help="output .npz file")
    p.add_argument("--codebook-dim", type=int, default=DEFAULT_CODEBOOK_DIM, help="codebook width D")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    args = p.parse_args(argv)
    try:
        print(make_random_mask_decoder(args.out, args.codebook_dim, args.seed, args.force))
    except (ValueError, FileExistsError) as e:
        return fail(p.prog, str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
