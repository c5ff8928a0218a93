"""The "teach it something new" recipe at toy scale: a LoRA fine-tune of the demo model on scenes with a
new shape lowers the loss on them, and the adapter loads (library and command line)."""

from __future__ import annotations

import subprocess
import sys

import mlx.core as mx
import numpy as np

import mlx_paligemma as mp
from mlx_paligemma.finetune import Batcher, finetune, read_jsonl, suffix_loss
from mlx_paligemma.grammar import answer_grammar
from tools import shapes
from tools.teach_new_shape import DATA_SEED, finetune_options


def mean_loss(model, processor, data) -> float:
    batcher = Batcher(read_jsonl(data), processor)
    batch = {k: mx.array(v) for k, v in batcher.batch(np.arange(len(batcher))).items()}
    return float(suffix_loss(model, batch))


def test_a_few_lora_steps_teach_the_new_shape_and_the_adapter_loads(tmp_path):
    new = shapes.Vocabulary(("star",))
    data = shapes.write_dataset(tmp_path / "data", 6, DATA_SEED, absent_detect=0.0, vocab=new)
    before = mean_loss(*mp.load("demo"), data)
    opts = finetune_options(tmp_path, minutes=None, max_steps=8, lr=2e-3, batch=8)
    opts.quiet, opts.pad_multiple = True, 64  # one padded length: one compiled shape
    finetune(opts)
    model, processor = mp.load("demo", adapter_path=tmp_path / "adapter")
    after = mean_loss(model, processor, data)
    assert after < 0.7 * before, (before, after)
    image = tmp_path / "data" / "images" / "000000.png"
    run = subprocess.run(
        [sys.executable, "-m", "mlx_paligemma", "generate", "--adapter-path", str(tmp_path / "adapter")]
        + ["--image", str(image), "--prompt", "detect star", "--max-tokens", "12", "--no-stream"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    # the CLI constrains detect prompts to the answer grammar by default: compare with the same
    grammar = answer_grammar(processor, "detect star")
    expected = mp.generate(model, processor, str(image), "detect star", max_tokens=12, logits_processors=[grammar])
    assert run.stdout.strip() == expected.text.strip()
