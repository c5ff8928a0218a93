"""The VQ-VAE mask decoder in PyTorch: the reference twin of `models/mask_decoder.py`.

Built on `torch.nn.Conv2d` / `ConvTranspose2d(in, out, 4, stride=2, padding=1)`, the layers the
published `vae-oid.npz` was saved from, so its tensors load by name without any layout change;
only the codebook is renamed. NCHW inside; same class and method names as the MLX module.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import nn

from ..mask_decoder import (
    CODEBOOK_KEY,
    GRID,
    MASK_SIZE,
    NUM_CODES,
    UPSAMPLE_CHANNELS,
    WIDTH,
    check_codes,
)
from .device import DeviceLike, choose_device


class ResBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(dim, dim, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(dim, dim, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(dim, dim, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


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
        self.decoder = nn.Sequential(*layers)

    @property
    def device(self) -> torch.device:
        return self.codebook.weight.device

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        codes = torch.as_tensor(codes, device=self.device).long()  # numpy or lists are welcome
        batch = codes.shape[0]
        x = self.codebook(codes).reshape(batch, GRID, GRID, -1).permute(0, 3, 1, 2)  # row-major 4x4 grid, NCHW
        return self.decoder(x)[:, 0]

    def decode(self, codes) -> np.ndarray:
        """Numpy in, numpy out: codes are checked on the host, then all objects run as one batch."""
        codes = check_codes(codes)
        if len(codes) == 0:
            return np.zeros((0, MASK_SIZE, MASK_SIZE), np.float32)
        with torch.no_grad():
            out = self(torch.from_numpy(codes).long().to(self.device))
        return out.float().cpu().numpy()

    @staticmethod
    def sanitize(weights: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """The file's names -> this module's: only the codebook moves (the layers are the file's own)."""
        return {("codebook.weight" if k == CODEBOOK_KEY else k): torch.from_numpy(v) for k, v in weights.items()}

    @classmethod
    def from_weights(cls, weights: dict[str, np.ndarray], device: Optional[DeviceLike] = None) -> MaskDecoder:
        """Build from checked tensors (see `mask_decoder.load_decoder_tensors`), float32, eval mode."""
        target = choose_device(device)
        with torch.device("meta"):
            model = cls(int(weights[CODEBOOK_KEY].shape[1]))
        state = {k: v.to(target) for k, v in cls.sanitize(weights).items()}
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval().requires_grad_(False)
