"""Every option of `mlx-paligemma finetune` and what a run returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from ..dtypes import NAMES
from ..errors import PaliGemmaError

PROG = "mlx-paligemma finetune"
DESCRIPTION = "Fine-tune a PaliGemma checkpoint on JSON-lines data, in MLX: `python -m mlx_paligemma.finetune`."


@dataclass
class FinetuneOptions:
    """Every option of the command; defaults follow the published recipes for the 3B checkpoints
    (LoRA rank 8, alpha 16, lr 2e-5, vision tower frozen)."""

    model: str = ""
    data: str = ""
    out: str = ""
    val: Optional[str] = None
    lora_rank: Optional[int] = 8
    lora_alpha: float = 16.0
    lora_layers: str = "attn"
    full: bool = False
    train_vision: bool = False
    epochs: int = 1
    max_steps: Optional[int] = None
    time_budget: Optional[float] = None
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-5
    min_lr_ratio: float = 0.0
    warmup: int = 0
    weight_decay: float = 0.0
    clip: float = 1.0
    seed: int = 0
    save_every: int = 0
    val_every: int = 0
    resume: bool = False
    # True (or -1): recompute every decoder and vision layer in the backward pass; k: the first k decoder
    # layers only (memory falls by about one layer's activations per layer, time rises by its forward).
    grad_checkpoint: Union[bool, int] = False
    loc_smoothing: float = 0.0
    order_loc_embeddings: bool = False
    pad_multiple: int = 8
    merge: bool = False
    merge_dtype: Optional[str] = None
    dtype: Optional[str] = None
    dry_run: bool = False
    image_cache: int = 1024
    force: bool = False
    quiet: bool = False

    def check(self) -> None:
        if not self.full and (self.lora_rank is None or self.lora_rank < 1):
            raise PaliGemmaError("--lora-rank: must be a positive integer (or pass --full)")
        if self.lora_layers not in ("attn", "all"):
            raise PaliGemmaError(f"--lora-layers: must be 'attn' or 'all', got {self.lora_layers!r}")
        for name in ("epochs", "batch_size", "grad_accum", "pad_multiple"):
            if getattr(self, name) < 1:
                raise PaliGemmaError(f"--{name.replace('_', '-')}: must be at least 1")
        if self.time_budget is not None and self.time_budget <= 0:
            raise PaliGemmaError("--time-budget: must be positive (minutes)")
        if self.max_steps is not None and self.max_steps < 1:
            raise PaliGemmaError("--max-steps: must be at least 1")
        if self.lr <= 0:
            raise PaliGemmaError("--lr: must be positive")
        for name in ("dtype", "merge_dtype"):
            value = getattr(self, name)
            if value is not None and value not in NAMES:
                raise PaliGemmaError(f"--{name.replace('_', '-')}: must be one of {', '.join(NAMES)}, got {value!r}")
        if self.merge_dtype is not None and not self.merge:
            raise PaliGemmaError("--merge-dtype: only with --merge")
        if self.image_cache < 0:
            raise PaliGemmaError("--image-cache: must be >= 0")
        if not isinstance(self.grad_checkpoint, bool) and self.grad_checkpoint < -1:
            raise PaliGemmaError("--grad-checkpoint: a number of layers (>= 0), or nothing for all of them")
        if self.warmup < 0 or self.save_every < 0 or self.val_every < 0 or self.clip < 0 or self.loc_smoothing < 0:
            raise PaliGemmaError("--warmup, --save-every, --val-every, --clip and --loc-smoothing must be >= 0")


@dataclass
class TrainResult:
    out: Path
    steps: int
    train_loss: float
    val_loss: Optional[float]
    seconds: float
    history: list[dict] = field(default_factory=list)
