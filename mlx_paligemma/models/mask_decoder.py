"""The VQ-VAE decoder that turns PaliGemma's sixteen `<seg>` codes into a 64x64 mask, in MLX.

Architecture of big_vision's `vae-oid.npz` decoder (its JAX evaluator,
`evaluators/proj/paligemma/transfers/segmentation.py`, is the origin): codebook lookup laid out as
a 4x4 grid, 1x1 conv to 128 channels + ReLU, two residual blocks (3x3, ReLU, 3x3, ReLU, 1x1, plus
the input, no activation after the sum), four stride-2 transposed convs (kernel 4, padding 1) to
8, 16, 32, 64 pixels with 128, 64, 32, 16 channels, each + ReLU, and a 1x1 conv to one channel.
MLX convolutions are NHWC with (out, kh, kw, in) weights; `sanitize` converts the file's PyTorch
layouts, the only place that knows them. The module tree keeps the PyTorch indices
(`decoder.0`, `decoder.2.net.0`, ...) so the twin in `reference/mask_decoder.py` reads line for line.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..mask_decoder import (
    CODEBOOK_KEY,
    GRID,
    MASK_SIZE,
    NUM_CODES,
    UPSAMPLE_CHANNELS,
    UPSAMPLE_INDICES,
    WIDTH,
    check_codes,
)


class ResBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = [
            nn.Conv2d(dim, dim, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(dim, dim, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(dim, dim, 1),
        ]

    def __call__(self, x: mx.array) -> mx.array:
        h = x
        for layer in self.net:
            h = layer(h)
        return x + h


class MaskDecoder(nn.Module):
    """(B, 16) codes 0..127 -> (B, 64, 64) float32 mask logits, roughly in [-1, 1]; the mask is > 0."""

    def __init__(self, codebook_dim: int):
        super().__init__()
        self.codebook = nn.Embedding(NUM_CODES, codebook_dim)
        layers: list[nn.Module] = [nn.Conv2d(codebook_dim, WIDTH, 1), nn.ReLU(), ResBlock(WIDTH), ResBlock(WIDTH)]
        inp = WIDTH
        for out in UPSAMPLE_CHANNELS:
            layers += [nn.ConvTranspose2d(inp, out, 4, stride=2, padding=1), nn.ReLU()]
            inp = out
        layers.append(nn.Conv2d(inp, 1, 1))
        self.decoder = layers

    def __call__(self, codes: mx.array) -> mx.array:
        batch = codes.shape[0]
        x = self.codebook(codes).reshape(batch, GRID, GRID, -1)  # row-major 4x4 grid, NHWC
        for layer in self.decoder:
            x = layer(x)
        return x[..., 0]

    def decode(self, codes) -> np.ndarray:
        """Numpy in, numpy out: codes are checked on the host, then all objects run as one batch."""
        codes = check_codes(codes)
        if len(codes) == 0:
            return np.zeros((0, MASK_SIZE, MASK_SIZE), np.float32)
        out = self(mx.array(codes))
        mx.eval(out)
        return np.array(out, dtype=np.float32)

    @staticmethod
    def sanitize(weights: dict[str, np.ndarray]) -> dict[str, mx.array]:
        """The file's names and PyTorch layouts -> this module's parameters.

        Conv2d (out, in, kh, kw) -> (out, kh, kw, in); ConvTranspose2d (in, out, kh, kw) ->
        (out, kh, kw, in): MLX's conv_transpose2d with that layout equals torch's (no kernel flip).
        """
        upsample = {f"decoder.{i}.weight" for i in UPSAMPLE_INDICES}
        out = {}
        for key, value in weights.items():
            if key == CODEBOOK_KEY:
                key = "codebook.weight"
            elif key in upsample:
                value = value.transpose(1, 2, 3, 0)
            elif value.ndim == 4:
                value = value.transpose(0, 2, 3, 1)
            out[key] = mx.array(np.ascontiguousarray(value))
        return out

    @classmethod
    def from_weights(cls, weights: dict[str, np.ndarray]) -> MaskDecoder:
        """Build from checked tensors (see `mask_decoder.load_decoder_tensors`), float32, eval mode."""
        model = cls(int(weights[CODEBOOK_KEY].shape[1]))
        model.load_weights(list(cls.sanitize(weights).items()), strict=True)
        mx.eval(model.parameters())
        return model.eval()
