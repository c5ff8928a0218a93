"""The VQ-VAE decoder that turns PaliGemma's sixteen `<seg>` codes into a 64x64 mask, in MLX.

Architecture of big_vision's `vae-oid.npz` decoder (its JAX evaluator,
`evaluators/proj/paligemma/transfers/segmentation.py`, is the origin): codebook lookup laid out as
a 4x4 grid, 1x1 conv to 128 channels + ReLU, two residual blocks (3x3, ReLU, 3x3, ReLU, 1x1, plus
the input, no activation after the sum), four stride-2 transposed convs (kernel 4, padding 1) to
8, 16, 32, 64 pixels with 128, 64, 32, 16 channels, each + ReLU, and a 1x1 conv to one channel.
MLX convolutions are NHWC with (out, kh, kw, in) weights; `sanitize` converts the file's PyTorch
layouts, the only place that knows them (the transposed convs run in their sub-pixel form, see
`Upsample`). The module tree keeps the PyTorch indices
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


# Transposed-conv taps (kernel 4, stride 2, padding 1) feeding output rows of parity a: rows 2i come
# from input rows (i - 1, i) through taps (3, 1), rows 2i + 1 from (i, i + 1) through taps (2, 0).
# The same holds for columns.
_PHASE_TAPS = ((3, 1), (2, 0))


def subpixel_kernel(weight: np.ndarray) -> np.ndarray:
    """A ConvTranspose2d(k=4, stride=2, padding=1) weight (in, out, 4, 4) as a 2x2 conv weight (4*out, 2, 2, in).

    Each of the four output phases (row parity a, column parity b) is a 2x2 convolution of the input
    with the taps in `_PHASE_TAPS`; output channel (a, b, out) of the combined conv holds phase (a, b).
    """
    inp, out = weight.shape[:2]
    kernel = np.zeros((2, 2, out, 2, 2, inp), dtype=weight.dtype)
    for a in range(2):
        for b in range(2):
            for r, ky in enumerate(_PHASE_TAPS[a]):
                for c, kx in enumerate(_PHASE_TAPS[b]):
                    kernel[a, b, :, r, c, :] = weight[:, :, ky, kx].T
    return kernel.reshape(4 * out, 2, 2, inp)


class Upsample(nn.Module):
    """`torch.nn.ConvTranspose2d(in, out, 4, stride=2, padding=1)`, computed as one 2x2 conv to 4 x out
    channels (one block per output phase) whose phases are then interleaved: the same linear map.

    Why not `nn.ConvTranspose2d`: on MLX's CPU backend its kernel is ~9x slower than conv2d (the last
    upsampling alone took 3.9 s for 100 objects, 0.2 s this way, MKL preloaded); conv2d is fast on
    every backend. The weights are the file's ConvTranspose2d ones, rearranged by `subpixel_kernel`.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.out_channels = out_channels
        self.weight = mx.zeros((4 * out_channels, 2, 2, in_channels))
        self.bias = mx.zeros((4 * out_channels,))

    def __call__(self, x: mx.array) -> mx.array:
        batch, height, width, _ = x.shape
        # Padded by one, window (i, j) covers input rows i-1..i and columns j-1..j: phase (a, b) is the
        # conv output shifted by (a, b).
        y = mx.conv2d(x, self.weight, padding=1) + self.bias  # (B, H + 1, W + 1, [a, b, out])
        y = y.reshape(batch, height + 1, width + 1, 2, 2, self.out_channels)
        rows = [
            mx.stack([y[:, a : a + height, b : b + width, a, b] for b in range(2)], axis=3) for a in range(2)
        ]  # each (B, H, W, 2, out)
        return mx.stack(rows, axis=2).reshape(batch, 2 * height, 2 * width, self.out_channels)


class MaskDecoder(nn.Module):
    """(B, 16) codes 0..127 -> (B, 64, 64) float32 mask logits, roughly in [-1, 1]; the mask is > 0."""

    def __init__(self, codebook_dim: int):
        super().__init__()
        self.codebook = nn.Embedding(NUM_CODES, codebook_dim)
        layers: list[nn.Module] = [nn.Conv2d(codebook_dim, WIDTH, 1), nn.ReLU(), ResBlock(WIDTH), ResBlock(WIDTH)]
        inp = WIDTH
        for out in UPSAMPLE_CHANNELS:
            layers += [Upsample(inp, out), nn.ReLU()]
            inp = out
        layers.append(nn.Conv2d(inp, 1, 1))
        self.decoder = layers

    def __call__(self, codes: mx.array) -> mx.array:
        codes = mx.array(codes) if not isinstance(codes, mx.array) else codes  # numpy or lists are welcome
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

        Conv2d (out, in, kh, kw) -> (out, kh, kw, in); ConvTranspose2d (in, out, 4, 4) -> the 3x3
        sub-pixel kernel (4*out, 3, 3, in) of `Upsample`, its bias repeated for the four phases.
        """
        upsample = {f"decoder.{i}" for i in UPSAMPLE_INDICES}
        out = {}
        for key, value in weights.items():
            layer, _, kind = key.rpartition(".")
            if key == CODEBOOK_KEY:
                key = "codebook.weight"
            elif layer in upsample:
                value = subpixel_kernel(value) if kind == "weight" else np.tile(value, 4)
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
