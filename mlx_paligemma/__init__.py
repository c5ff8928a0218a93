"""PaliGemma on Apple MLX.

import mlx_paligemma as mp
model, processor = mp.load("google/paligemma-3b-mix-224")
print(mp.generate(model, processor, "cat.jpg", "caption en").text)
"""

# First, before anything imports mlx.core: importing blas loads a fast BLAS for MLX's CPU backend on Linux.
from . import blas  # noqa: F401  (isort keeps it first)
from .errors import CheckpointError, ConfigError, PaliGemmaError, ProcessorError
from .generation import (
    GenerationChunk,
    GenerationResult,
    GenerationStats,
    ImageEmbedding,
    answer,
    caption,
    detect,
    encode_image,
    generate,
    stream_generate,
)
from .load import load
from .tasks import Detection, draw_detections, parse_detections

__all__ = [
    "load",
    "generate",
    "stream_generate",
    "encode_image",
    "caption",
    "answer",
    "detect",
    "parse_detections",
    "draw_detections",
    "Detection",
    "ImageEmbedding",
    "GenerationResult",
    "GenerationChunk",
    "GenerationStats",
    "PaliGemmaError",
    "ConfigError",
    "CheckpointError",
    "ProcessorError",
]
__version__ = "0.1.0"
