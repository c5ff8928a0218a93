"""PaliGemma on Apple MLX.

    import mlx_paligemma as mp
    model, processor = mp.load("google/paligemma-3b-mix-224")
"""

from .errors import CheckpointError, ConfigError, PaliGemmaError, ProcessorError
from .load import load

__all__ = ["load", "PaliGemmaError", "ConfigError", "CheckpointError", "ProcessorError"]
__version__ = "0.1.0"
