"""Fine-tune a PaliGemma checkpoint on JSON-lines data, in MLX: `python -m mlx_paligemma.finetune`.

    python -m mlx_paligemma.finetune --model google/paligemma-3b-pt-224 --data train.jsonl \
        --val val.jsonl --out my-adapter --lora-rank 8

Each data line is `{"image": path, "prefix": ..., "suffix": ...}` (paths relative to the file).
The loss is the mean cross-entropy of the suffix tokens (and the closing eos), each predicted from
the position before it, under the model's own prefix-LM masks (`models.paligemma.prefix_lm_masks`):
image + prompt bidirectional, suffix causal, padding never attended -- exactly the attention of
inference, unlike training code that reuses the all-visible prefill mask and lets each suffix token
see the answer's future.

Gradients are sums over tokens divided by the token count of the whole (global) batch, so
gradient accumulation and `mx.distributed` data parallelism (run under `mlx.launch`; gradients
summed with `all_sum`) give the same update as one process on the combined batch.

Memory: the frozen base stays in the checkpoint's dtype (`--dtype` to change it; a 4/8-bit or
mixed checkpoint trains as QLoRA); on the CPU its layers compute in float32 (`cpu_layers`). LoRA
parameters and the optimiser state are float32. `--dry-run` prints the estimate (`memory.py`)
and stops before loading; gradient checkpointing switches itself on when the estimate needs it.
Each micro-batch is evaluated on its own (the graph never spans the accumulation or the
validation set), and batches are prepared (decode, resize, tokenise) on a thread ahead of use.

The package, in reading order: `options` (FinetuneOptions, TrainResult), `data` (JSON lines,
batches, the prefetch thread), `loss` (forward pass and suffix loss), `state` (what a run writes),
`trainer` (the loop), `cli` (the command line).
"""

from ..errors import PaliGemmaError
from .cli import build_parser, main
from .data import Batcher, DataError, Example, Prefetcher, read_jsonl
from .loss import (
    forward,
    loc_token_range,
    order_loc_embeddings,
    suffix_loss,
    suffix_token_losses,
)
from .options import PROG, FinetuneOptions, TrainResult
from .state import OPTIMIZER_FILE, STATE_DIR, STATE_FILE, WEIGHTS_FILE, save_weights, write_checkpoint
from .trainer import finetune, grad_checkpointing, load_base, plan, set_trainable

__all__ = [
    "Batcher",
    "DataError",
    "Example",
    "FinetuneOptions",
    "OPTIMIZER_FILE",
    "PROG",
    "PaliGemmaError",
    "Prefetcher",
    "STATE_DIR",
    "STATE_FILE",
    "TrainResult",
    "WEIGHTS_FILE",
    "build_parser",
    "finetune",
    "forward",
    "grad_checkpointing",
    "load_base",
    "loc_token_range",
    "main",
    "order_loc_embeddings",
    "plan",
    "read_jsonl",
    "save_weights",
    "set_trainable",
    "suffix_loss",
    "suffix_token_losses",
    "write_checkpoint",
]
