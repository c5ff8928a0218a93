"""Fine-tuning: the loss against transformers, masking, trainable sets, overfitting, LoRA merge, resume, CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_paligemma import finetune as ft
from mlx_paligemma.load import load, load_model
from mlx_paligemma.lora import apply_lora, load_adapters, merge_lora, save_adapters
from mlx_paligemma.processor import Processor
from tests.helpers import hf_model, noise_image

PROMPTS = ["caption en", "answer en what is this?", "detect cat", "caption es"]
SUFFIXES = ["a cat on a mat", "7", "<loc0001><loc0002><loc0100><loc0200> cat", "un gato"]


def _write_data(directory: Path, n: int = 8, seed: int = 0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        name = f"img{i}.png"
        noise_image(40 + 3 * i, 30 + 2 * i, seed=seed + i).save(directory / name)
        lines.append(json.dumps({"image": name, "prefix": PROMPTS[i % 4], "suffix": SUFFIXES[i % 4]}))
    path = directory / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _params(model) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def test_suffix_loss_equals_transformers(ckpt_dir):
    """Mean cross-entropy over suffix tokens (+ eos), under the prefix-LM mask, as transformers computes it
    from the processor's `labels`."""
    import torch
    from transformers import PaliGemmaProcessor

    images = [noise_image(64, 48, seed=i) for i in range(3)]
    prompts, suffixes = PROMPTS[:3], SUFFIXES[:3]
    hf_proc = PaliGemmaProcessor.from_pretrained(ckpt_dir)
    hf_batch = hf_proc(images=images, text=prompts, suffix=suffixes, return_tensors="pt", padding="longest")
    with torch.no_grad():
        ref = hf_model(Path(ckpt_dir))(**hf_batch).loss.item()

    model = load_model(ckpt_dir, "float32")
    processor = Processor.from_dir(ckpt_dir, model.config)
    batch = {k: mx.array(v) for k, v in processor(images, prompts, suffixes).items()}
    ours = ft.suffix_loss(model, batch).item()
    assert abs(ours - ref) < 1e-4, (ours, ref)


def test_later_suffix_token_does_not_change_earlier_losses(pg2_dir):
    """Suffix attention is causal: changing the last answer token leaves every earlier position's loss term."""
    model = load_model(pg2_dir, "float32")
    processor = Processor.from_dir(pg2_dir, model.config)
    image = noise_image(50, 50, seed=3)
    a = processor([image], ["caption en"], ["a cat on a mat"])
    b = {k: v.copy() for k, v in a.items()}
    first = a["input_ids"].shape[1] - 2  # the last answer token, just before eos
    assert a["token_type_ids"][0, first] == 1
    b["input_ids"][0, first] = (a["input_ids"][0, first] + 7) % 200 + 10
    losses = []
    for batch in (a, b):
        batch = {k: mx.array(v) for k, v in batch.items()}
        nll, w = ft.suffix_token_losses(ft.forward(model, batch), batch)
        losses.append(np.array(nll[0]))
    # nll[t-1] is the loss of predicting token t: positions before `first` - 1 predict unchanged tokens
    # from unchanged contexts.
    np.testing.assert_allclose(losses[0][: first - 1], losses[1][: first - 1], rtol=0, atol=1e-6)
    assert abs(losses[0][first - 1] - losses[1][first - 1]) > 1e-3  # the changed token itself does differ


def _opts(tmp_path: Path, data: Path, **kw) -> ft.FinetuneOptions:
    base = dict(data=str(data), out=str(tmp_path / "out"), batch_size=4, seed=0, quiet=True)
    base.update(kw)
    return ft.FinetuneOptions(**base)


def test_one_step_changes_only_trainable_parameters(pg1_dir, tmp_path):
    data = _write_data(tmp_path / "data")
    before = _params(load_model(pg1_dir, "float32"))
    seen = {}

    def grab(step, model, processor, info):
        seen.update(_params(model))

    ft.finetune(_opts(tmp_path, data, model=str(pg1_dir), lora_rank=4, lr=1e-2, max_steps=1), callback=grab)
    lora = {k for k in seen if ".lora_" in k}
    assert lora and all(k.replace("_proj.linear.", "_proj.") in before for k in seen if "_proj.linear." in k)
    changed = {k for k in lora if not np.array_equal(seen[k], np.zeros_like(seen[k]))}
    assert {k for k in lora if k.endswith("lora_b")} <= changed  # B starts at zero and moves
    for k, v in seen.items():
        if ".lora_" not in k:
            np.testing.assert_array_equal(v, before[k.replace("_proj.linear.", "_proj.")], err_msg=k)

    seen.clear()
    ft.finetune(_opts(tmp_path, data, model=str(pg1_dir), full=True, lr=1e-2, max_steps=1, force=True), callback=grab)
    for k, v in seen.items():
        if k.startswith("vision_tower."):
            np.testing.assert_array_equal(v, before[k], err_msg=k)  # frozen by default
        elif k.endswith(".weight") and k.startswith("language_model.layers."):
            assert not np.array_equal(v, before[k]), k


def test_overfits_eight_examples(pg1_dir, tmp_path):
    data = _write_data(tmp_path / "data")
    opts = _opts(
        tmp_path, data, model=str(pg1_dir), full=True, train_vision=True, lr=3e-3, warmup=5, batch_size=8, max_steps=30
    )
    result = ft.finetune(opts)
    model, processor = load(result.out)
    examples = ft.read_jsonl(data)
    batch = {k: mx.array(v) for k, v in ft.Batcher(examples, processor).batch(range(8)).items()}
    assert ft.suffix_loss(model, batch).item() < 0.05


def test_merged_lora_gives_the_adapter_logits(pg1_dir, tmp_path):
    model, processor = load(pg1_dir, dtype="float32")
    apply_lora(model, rank=4, alpha=8, layers="all")
    mx.random.seed(1)
    for _, m in model.named_modules():
        if hasattr(m, "lora_b"):
            m.lora_b = mx.random.normal(m.lora_b.shape) * 0.1
    batch = processor([noise_image(40, 40)], ["caption en"])
    with_adapters = np.array(model(**batch))
    save_adapters(model, tmp_path / "adapters", base_model=str(pg1_dir))

    reloaded, _ = load(pg1_dir, dtype="float32", adapter_path=tmp_path / "adapters")
    np.testing.assert_allclose(np.array(reloaded(**batch)), with_adapters, rtol=0, atol=1e-5)
    merge_lora(model)
    assert not any(".lora_" in k for k, _ in tree_flatten(model.parameters()))
    np.testing.assert_allclose(np.array(model(**batch)), with_adapters, rtol=0, atol=1e-4)
    # The merged model is written as an ordinary checkpoint that load() reads.
    ft.write_checkpoint(model, tmp_path / "merged", Path(pg1_dir))
    merged, _ = load(tmp_path / "merged")
    np.testing.assert_allclose(np.array(merged(**batch)), with_adapters, rtol=0, atol=1e-4)


def test_adapters_refuse_a_different_base(pg1_dir, pg2_dir, tmp_path):
    model = load_model(pg1_dir, "float32")
    apply_lora(model, rank=2, alpha=4)
    save_adapters(model, tmp_path / "a", base_model=str(pg1_dir))
    with pytest.raises(ft.PaliGemmaError, match="adapters trained on a different base|does not belong"):
        load_adapters(load_model(pg2_dir, "float32"), tmp_path / "a")


def test_resume_gives_the_uninterrupted_parameters(pg1_dir, tmp_path):
    data = _write_data(tmp_path / "data")
    common = dict(model=str(pg1_dir), full=True, lr=3e-3, warmup=2, max_steps=6, save_every=3)
    straight = ft.finetune(_opts(tmp_path / "a", data, **common))
    expected = _params(load_model(straight.out, "float32"))

    def stop_after_four(step, model, processor, info):
        if step == 4:
            raise KeyboardInterrupt

    opts = _opts(tmp_path / "b", data, **common)
    with pytest.raises(KeyboardInterrupt):
        ft.finetune(opts, callback=stop_after_four)
    assert json.loads((Path(opts.out) / ft.STATE_FILE).read_text())["step"] == 3
    resumed = ft.finetune(_opts(tmp_path / "b", data, resume=True, **common))
    assert resumed.steps == 6
    got = _params(load_model(resumed.out, "float32"))
    for k in expected:
        np.testing.assert_allclose(got[k], expected[k], rtol=0, atol=1e-6, err_msg=k)


def test_lora_resume_and_merge_flag(pg1_dir, tmp_path):
    data = _write_data(tmp_path / "data")
    result = ft.finetune(_opts(tmp_path, data, model=str(pg1_dir), lora_rank=2, max_steps=2, lr=1e-2, merge=True))
    assert (result.out / "adapters.safetensors").is_file() and (result.out / "adapter_config.json").is_file()
    a, processor = load(pg1_dir, adapter_path=result.out)
    b, _ = load(result.out / "merged")
    batch = processor([noise_image(30, 30)], ["caption en"])
    np.testing.assert_allclose(np.array(a(**batch)), np.array(b(**batch)), rtol=0, atol=1e-4)


def _run_cli(argv, capsys):
    code = ft.main(argv)
    return code, capsys.readouterr().err


def test_cli_reports_every_bad_line_and_exits_2(pg1_dir, tmp_path, capsys):
    data = _write_data(tmp_path / "data", n=2)
    lines = data.read_text().splitlines()
    lines += [
        '{"image": "img0.png", "prefix": "caption en"',  # line 3: malformed
        json.dumps({"image": "missing.png", "prefix": "caption en", "suffix": "x"}),  # line 4
        json.dumps({"image": "img1.png", "suffix": "x"}),  # line 5: no prefix
    ]
    data.write_text("\n".join(lines) + "\n")
    code, err = _run_cli(["--model", str(pg1_dir), "--data", str(data), "--out", str(tmp_path / "o")], capsys)
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "line 3" in err and "malformed JSON" in err
    assert "line 4" in err and "missing.png" in err and "not found" in err
    assert "line 5" in err and "'prefix'" in err
    assert not (tmp_path / "o").exists()


def test_cli_empty_file_exits_2(pg1_dir, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, err = _run_cli(["--model", str(pg1_dir), "--data", str(empty), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "empty" in err


def test_cli_refuses_to_overwrite_output(pg1_dir, tmp_path, capsys):
    data = _write_data(tmp_path / "data", n=2)
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "mine.txt").write_text("keep")
    code, err = _run_cli(["--model", str(pg1_dir), "--data", str(data), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "--force" in err
    assert (tmp_path / "o" / "mine.txt").read_text() == "keep"


def test_grad_checkpoint_gives_the_same_gradients(pg1_dir):
    import mlx.nn as nn

    model = load_model(pg1_dir, "float32")
    processor = Processor.from_dir(pg1_dir, model.config)
    batch = {k: mx.array(v) for k, v in processor([noise_image(40, 40)], ["caption en"], ["a cat"]).items()}
    grad = nn.value_and_grad(model, lambda b: ft.suffix_loss(model, b))
    loss, plain = grad(batch)
    call = type(model.language_model.layers[0]).__call__
    with ft.grad_checkpointing(model):
        assert type(model.language_model.layers[0]).__call__ is not call
        loss_ckpt, ckpt = grad(batch)
    assert type(model.language_model.layers[0]).__call__ is call  # restored
    assert abs(loss.item() - loss_ckpt.item()) < 1e-6
    for (k, a), (_, b) in zip(tree_flatten(plain), tree_flatten(ckpt)):
        np.testing.assert_allclose(np.array(b), np.array(a), rtol=1e-4, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("layers", [1, True])
def test_grad_checkpoint_recomputes_the_layers_asked_for(pg1_dir, monkeypatch, layers):
    """`grad_checkpoint=k` wraps the first k decoder layers only; True every decoder and vision layer.
    The gradients equal the plain ones either way."""
    import mlx.nn as nn

    model = load_model(pg1_dir, "float32")
    processor = Processor.from_dir(pg1_dir, model.config)
    batch = {k: mx.array(v) for k, v in processor([noise_image(40, 40)], ["caption en"], ["a cat"]).items()}
    grad = nn.value_and_grad(model, lambda b: ft.suffix_loss(model, b))
    _, plain = grad(batch)
    calls = []
    real = mx.checkpoint

    def counting(fn):
        calls.append(fn)
        return real(fn)

    monkeypatch.setattr(mx, "checkpoint", counting)
    with ft.grad_checkpointing(model, layers):
        _, ckpt = grad(batch)
    decoder, vision = len(model.language_model.layers), len(model.vision_tower.encoder.layers)
    assert len(calls) == (decoder + vision if layers is True else 1)
    for (k, a), (_, b) in zip(tree_flatten(plain), tree_flatten(ckpt)):
        np.testing.assert_allclose(np.array(b), np.array(a), rtol=1e-4, atol=1e-6, err_msg=k)
