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


def subpixel_kernel(weight: np.ndarray) -> np.ndarray:
    """A ConvTranspose2d(k=4, stride=2, padding=1) weight (in, out, 4, 4) as a 3x3 conv weight (4*out, 3, 3, in).

    Output pixel (2i + a, 2j + b) of the transposed conv sums input pixels (i + dy, j + dx), dy, dx in
    {-1, 0, 1}, with kernel tap (a + 1 - 2 dy, b + 1 - 2 dx) when that lies in 0..3. Channel
    (a, b, out) of the 3x3 conv holds those taps; a pixel shuffle then interleaves the four phases.
    """
    inp, out = weight.shape[:2]
    kernel = np.zeros((2, 2, out, 3, 3, inp), dtype=weight.dtype)
    for a in range(2):
        for b in range(2):
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ky, kx = a + 1 - 2 * dy, b + 1 - 2 * dx
                    if 0 <= ky < 4 and 0 <= kx < 4:
                        kernel[a, b, :, dy + 1, dx + 1, :] = weight[:, :, ky, kx].T
    return kernel.reshape(4 * out, 3, 3, inp)


class Upsample(nn.Module):
    """`torch.nn.ConvTranspose2d(in, out, 4, stride=2, padding=1)`, computed as a 3x3 conv to 4 x out
    channels followed by a pixel shuffle (the sub-pixel form of the same linear map).

    Why not `nn.ConvTranspose2d`: on MLX's CPU backend its kernel is ~9x slower than conv2d (the last
    upsampling alone took 3.9 s for 100 objects, 0.42 s this way, MKL preloaded); conv2d is fast
    on every backend. The weights are the file's ConvTranspose2d ones, rearranged by `subpixel_kernel`.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.out_channels = out_channels
        self.weight = mx.zeros((4 * out_channels, 3, 3, in_channels))
        self.bias = mx.zeros((4 * out_channels,))

    def __call__(self, x: mx.array) -> mx.array:
        batch, height, width, _ = x.shape
        y = mx.conv2d(x, self.weight, padding=1) + self.bias  # (B, H, W, [a, b, out])
        y = y.reshape(batch, height, width, 2, 2, self.out_channels).transpose(0, 1, 3, 2, 4, 5)
        return y.reshape(batch, 2 * height, 2 * width, self.out_channels)


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
