"""What tests/test_sharding.py runs under `mlx.launch -n 2 --backend ring`: one launch, several checks.

    python -m tests.two_rank_checks SPEC.json

SPEC: {"out": DIR, "models": {name: checkpoint dir}, "image_dir": DIR, "batch_out": FILE}. Every rank
writes what it saw to DIR/rank{r}-...: per model the logits of a padded two-row batch, greedy tokens,
the bytes of the language model it holds and the peak memory of loading; the stdout of
`generate --shard`. Then the ranks run `batch` over image_dir, split by rank (rank 0 writing
batch_out) and with the model sharded (batch_out + ".sharded"). The test compares it all with one process.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

import mlx_paligemma as mp
from tests.helpers import noise_image

PROMPTS = ["caption en", "answer en what is the colour of the thing on the left?"]
MAX_TOKENS = 12
VISION_SHARDED = ("pg2", "pg1-q4")  # these also split the vision tower (--shard-vision)


def images():
    return [noise_image(64, 48, seed=1), noise_image(40, 72, seed=2)]


def language_model_bytes(model) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.language_model.parameters()))


def model_outputs(model, processor) -> dict:
    """Full-forward logits of a left-padded batch, greedy tokens of each prompt alone and of the batch."""
    batch = processor(images=images(), prompts=PROMPTS)
    logits = model(
        batch["input_ids"],
        batch["pixel_values"],
        attention_mask=batch["attention_mask"],
        token_type_ids=batch["token_type_ids"],
    )
    results = mp.generate(model, processor, images(), PROMPTS, max_tokens=MAX_TOKENS)
    sampled = mp.generate(model, processor, images()[0], PROMPTS[0], max_tokens=MAX_TOKENS, temperature=1.0, seed=5)
    return {
        "logits": np.array(logits),
        "tokens": [r.token_ids for r in results],
        "sampled": sampled.token_ids,
        "lm_bytes": language_model_bytes(model),
    }


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    rank = mx.distributed.init().rank()
    for name, model_dir in spec["models"].items():
        mx.reset_peak_memory()
        before = mx.get_active_memory()  # the previous model's outputs, still referenced
        model, processor = mp.load(model_dir, shard=True, shard_vision=name in VISION_SHARDED)
        found = {"load_peak": mx.get_peak_memory() - before, **model_outputs(model, processor)}
        del model
        np.save(out / f"rank{rank}-{name}-logits.npy", found.pop("logits"))
        (out / f"rank{rank}-{name}.json").write_text(json.dumps(found))

    from mlx_paligemma.commands import generate

    image = out / "cli.png"
    if rank == 0:
        images()[0].save(image)
    mx.eval(mx.distributed.all_sum(mx.array(1)))  # a barrier: rank 1 waits for the image
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = generate.main(
            ["--model", spec["models"]["pg2"], "--image", str(image), "--prompt", PROMPTS[0], "--shard"]
            + ["--max-tokens", str(MAX_TOKENS)]
        )
    (out / f"rank{rank}-cli.json").write_text(json.dumps({"status": status, "stdout": printed.getvalue()}))

    from mlx_paligemma.commands import batch

    args = ["--model", spec["models"]["pg1"], "--images", spec["image_dir"], "--prompt", PROMPTS[0]]
    args += ["--max-batch", "2", "--max-tokens", "6", "--quiet"]
    split = batch.main([*args, "--out", spec["batch_out"]])
    sharded = batch.main([*args, "--out", spec["batch_out"] + ".sharded", "--shard"])
    (out / f"rank{rank}-batch.json").write_text(json.dumps({"status": [split, sharded]}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
