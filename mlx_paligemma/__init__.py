"""PaliGemma on Apple MLX.

import mlx_paligemma as mp
model, processor = mp.load("google/paligemma-3b-mix-224")
print(mp.generate(model, processor, "cat.jpg", "caption en").text)

Where things are: `load.py` (MLX) and `reference/` (PyTorch) load checkpoints found and checked by
`checkpoint.py` and `config.py`; `processor.py` makes numpy inputs; `models/` holds the MLX modules
and their KV cache; `engine.py` is the one decode loop (rows join and leave a running batch; the
library, the CLI and the server all use it) and `generation.py` the API over it (`generate`, ...);
`tasks.py` parses boxes, `segmentation.py` and `mask_decoder.py` turn `<seg>` codes into masks,
`finetune/` and `lora.py` train, `memory.py` estimates what a run needs, `cpu_layers.py` makes
quantized and half-precision layers fast on a CPU, `sharding.py` splits a model over `mlx.launch` ranks
(tensor parallel), `batch_job.py` holds the batch job's inputs, results file and rank merge. The command
lines: `__main__.py` (`mlx-paligemma SUBCOMMAND`) dispatches to `commands/generate.py`, `commands/batch.py`,
`commands/demo.py`, `quantize.py`, `doctor.py`, `finetune/` and `server/`.
"""

# First, before anything imports mlx.core: importing blas loads a fast BLAS for MLX's CPU backend on Linux,
# importing allocator sets glibc's malloc to keep the CPU's temporaries' pages (allocator.py).
from . import allocator, blas  # noqa: F401  (isort keeps them first)
from .errors import CheckpointError, ConfigError, MissingDependencyError, PaliGemmaError, ProcessorError
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
from .mask_decoder import load_mask_decoder
from .segmentation import Segmentation, draw_segmentations, mask_to_rle, parse_segmentations, rle_to_mask, segment
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
    "load_mask_decoder",
    "segment",
    "parse_segmentations",
    "draw_segmentations",
    "Segmentation",
    "mask_to_rle",
    "rle_to_mask",
    "ImageEmbedding",
    "GenerationResult",
    "GenerationChunk",
    "GenerationStats",
    "PaliGemmaError",
    "ConfigError",
    "CheckpointError",
    "ProcessorError",
    "MissingDependencyError",
]
__version__ = "0.1.0"
