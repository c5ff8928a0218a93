"""Write a tiny random PaliGemma 1 or 2 checkpoint laid out like a Hugging Face hub repository.

The tests compare the MLX port against `transformers.PaliGemmaForConditionalGeneration` and
`PaliGemmaProcessor`; real checkpoints are gigabytes, so this builds one of a few hundred kilobytes with the
same file set, key layout, config style and tokenizer conventions (special ids, `<loc>`/`<seg>` pieces
appended to the sentencepiece vocabulary, `<image>` just outside it, vocabulary padded to a multiple of 64).

Usable as a module (`make_tiny_checkpoint`, `verify_processor`, `verify_transformers_load`) and as a CLI:

    python tools/make_tiny_checkpoint.py OUT_DIR [--version 2] [--layout transformers] [--verify]

Benchmark sizes (mid, 3b, 3b-pg2, ...) are built by `python -m tools.presets`.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import sys
import time
from pathlib import Path

try:
    import torch
    from torch import nn
except ImportError:  # the package's plain install has no torch
    if __name__ == "__main__":
        print("make_tiny_checkpoint: error: torch is not installed: pip install torch", file=sys.stderr)
        sys.exit(2)
    raise

from mlx_paligemma.dtypes import NAMES, torch_dtypes
from mlx_paligemma.fsutil import atomic_dir

IMAGE_TOKEN = "<image>"
LOC_SEG_TOKENS = [f"<loc{i:04d}>" for i in range(1024)] + [f"<seg{i:03d}>" for i in range(128)]
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
NORMAL_PIECES = 400  # learned pieces besides specials, "\n" and the 256 byte-fallback pieces
VOCAB_MULTIPLE = 64  # the real model pads 257153 ids to 257216
DTYPES = {name: torch_dtypes()[name] for name in NAMES}
LAYOUTS = ("hub", "transformers")

VISION = dict(
    model_type="siglip_vision_model",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    patch_size=14,
    layer_norm_eps=1e-6,
    vision_use_head=False,
)
TEXT = {
    1: dict(
        model_type="gemma",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
    ),
    2: dict(
        model_type="gemma2",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        # Deliberately != head_dim, so a port scaling by head_dim**-0.5 is caught.
        query_pre_attn_scalar=24,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
    ),
}
DEFAULT_SLIDING_WINDOW = 8  # shorter than the test sequences, so the window really masks something
# Gemma 2 fields written even in a sparse config: head_dim, query_pre_attn_scalar and sliding_window differ
# from the class defaults (256, 256, 4096), and the soft-caps are what makes Gemma 2 numerics Gemma 2.
SPARSE_GEMMA2_FIELDS = (
    "head_dim",
    "query_pre_attn_scalar",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "sliding_window",
)

# On-disk key prefix -> in-memory transformers 5.x parameter prefix. The hub layout is that of the original
# google/paligemma-* repositories; the transformers layout is what 5.x `save_pretrained` writes.
KEY_PREFIXES = {
    "hub": {
        "vision_tower.vision_model.": "model.vision_tower.",
        "multi_modal_projector.": "model.multi_modal_projector.",
        "language_model.model.": "model.language_model.",
    },
    "transformers": {
        "vision_tower.": "model.vision_tower.",
        "multi_modal_projector.": "model.multi_modal_projector.",
        "language_model.model.": "model.language_model.",
    },
}
TIED_KEY = "lm_head.weight"  # tied to the text embedding, never stored


# --- tokenizer -------------------------------------------------------------------------------------------


def _corpus() -> list[str]:
    """A few hundred varied English lines (captions, questions, task prompts, digits, accents).

    Fixed, not drawn from the weight seed: every tiny checkpoint then shares one tokenizer.
    """
    rng = random.Random(20240514)
    subjects = (
        "a cat",
        "the dog",
        "two birds",
        "a red car",
        "an old man",
        "my friend",
        "the children",
        "a small boat",
        "three horses",
        "the café owner",
        "a young woman",
        "the blue train",
        "some people",
        "a brown cow",
        "the teacher",
        "an orange bus",
        "five sheep",
        "the baker",
    )
    verbs = (
        "sits on",
        "runs across",
        "looks at",
        "jumps over",
        "stands near",
        "sleeps under",
        "walks along",
        "drives past",
        "is waiting by",
        "is eating near",
        "flies above",
        "is painting",
    )
    places = (
        "the table",
        "a green field",
        "the river",
        "an empty street",
        "the mountain",
        "a wooden bench",
        "the kitchen",
        "a busy market",
        "the beach",
        "a snowy road",
        "the old bridge",
        "a quiet garden",
        "the window",
        "a large building",
        "the station",
        "a narrow path",
    )
    adjectives = ("bright", "dark", "sunny", "cloudy", "crowded", "peaceful", "colorful", "naïve", "strange")
    questions = (
        "what is the man holding",
        "how many people are there",
        "what color is the car",
        "where is the dog",
        "is it raining",
        "what is written on the sign",
        "who is smiling",
        "which animal is sleeping",
        "why is the street wet",
        "when was the photo taken",
    )
    answers = (
        "a blue umbrella",
        "four",
        "red",
        "on the sofa",
        "yes",
        "no",
        "open daily",
        "the girl",
        "the zebra",
        "after the storm",
        "in the morning",
        "the résumé",
        "crème brûlée",
    )
    things = ("cat", "dog", "car", "person", "tree", "bus", "bicycle", "bird", "horse", "boat", "chair", "sign")
    langs = ("en", "fr", "de", "es", "it")
    lines = []
    for _ in range(160):
        lines.append(
            f"{rng.choice(subjects).capitalize()} {rng.choice(verbs)} {rng.choice(places)} "
            f"on a {rng.choice(adjectives)} day."
        )
    for _ in range(60):
        lines.append(f"answer {rng.choice(langs)} {rng.choice(questions)}?")
        lines.append(f"{rng.choice(answers).capitalize()}, said {rng.choice(subjects)}.")
    for _ in range(50):
        a, b = rng.sample(things, 2)
        lines.append(f"detect {a} ; {b}")
        lines.append(f"segment {rng.choice(things)}")
        lines.append(f"caption {rng.choice(langs)}")
    for _ in range(60):
        lines.append(
            f"ocr: Room {rng.randint(1, 999)}, open {rng.randint(7, 11)}:{rng.randint(0, 59):02d} "
            f"to {rng.randint(17, 23)}:{rng.randint(0, 59):02d} (tel. +{rng.randint(10**8, 10**9)})"
        )
        lines.append(
            f"In {rng.randint(1900, 2024)}, {rng.randint(2, 99)}% of {rng.choice(things)}s were "
            f"{rng.choice(adjectives)}.  Really!"
        )
    return lines


def build_sentencepiece_model(corpus: list[str] | None = None, pieces: int = NORMAL_PIECES) -> bytes:
    """Train a small BPE sentencepiece model with Gemma's conventions and append the PaliGemma pieces.

    Like the Gemma tokenizer: no dummy prefix, whitespace kept verbatim, identity normalization, byte
    fallback, split digits, "\\n" its own piece. `<loc>`/`<seg>` are appended as user-defined pieces, as in
    the real vocabulary (256000..257151 there).
    """
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus() if corpus is None else corpus),
        model_writer=buffer,
        model_type="bpe",
        vocab_size=4 + 1 + 256 + pieces,
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        bos_id=BOS_ID,
        unk_id=UNK_ID,
        pad_piece="<pad>",
        eos_piece="</s>",
        bos_piece="<s>",
        unk_piece="<unk>",
        user_defined_symbols=["\n"],
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(buffer.getvalue())
    for token in LOC_SEG_TOKENS:
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = token, 0.0, sp_pb2.ModelProto.SentencePiece.USER_DEFINED
    return proto.SerializeToString()


def write_processor_files(
    out_dir: Path, image_size: int, num_image_tokens: int, sentencepiece_model: bytes | None = None
) -> int:
    """Write the tokenizer and image-processor files; return the `<image>` token id.

    `PaliGemmaProcessor` adds `<image>` after the sentencepiece vocabulary (id = number of pieces) and maps
    the `<loc>`/`<seg>` tokens to their existing ids.
    """
    # The PIL image processor by name: `SiglipImageProcessor` without torchvision falls back to it with a warning.
    from transformers import GemmaTokenizer, PaliGemmaProcessor
    from transformers import SiglipImageProcessorPil as SiglipImageProcessor

    model_bytes = build_sentencepiece_model() if sentencepiece_model is None else sentencepiece_model
    (out_dir / "tokenizer.model").write_bytes(model_bytes)
    # from_pretrained converts tokenizer.model to a tokenizers BPE backend (GemmaConverter).
    tokenizer = GemmaTokenizer.from_pretrained(
        out_dir,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token=None,
    )
    image_processor = SiglipImageProcessor(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        resample=3,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
        do_convert_rgb=True,
        image_seq_length=num_image_tokens,
    )
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    processor.save_pretrained(out_dir)

    # from_pretrained left the build directory's absolute path and loader flags in the init kwargs.
    tokenizer_config_path = out_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(tokenizer_config_path.read_text())
    for key in ("vocab_file", "is_local", "local_files_only"):
        tokenizer_config.pop(key, None)
    _write_json(tokenizer_config_path, tokenizer_config)
    # transformers 5 nests the image processor in processor_config.json; the hub repositories carry the
    # older preprocessor_config.json and special_tokens_map.json, which other readers look for.
    _write_json(
        out_dir / "preprocessor_config.json", {**image_processor.to_dict(), "processor_class": "PaliGemmaProcessor"}
    )
    _write_json(
        out_dir / "special_tokens_map.json",
        {
            "additional_special_tokens": [_added_token(IMAGE_TOKEN)],
            "bos_token": _added_token("<s>"),
            "eos_token": _added_token("</s>"),
            "pad_token": _added_token("<pad>"),
            "unk_token": _added_token("<unk>"),
        },
    )
    return processor.image_token_id


def _added_token(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


# --- model -----------------------------------------------------------------------------------------------


def _build_config(version: int, image_size: int, sliding_window: int | None, image_token_index: int, dtype: str):
    """The full transformers config; `image_token_index` and the vocabulary size come from the tokenizer."""
    from transformers import PaliGemmaConfig

    vocab_size = math.ceil((image_token_index + 1) / VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    text = dict(TEXT[version], vocab_size=vocab_size, dtype=dtype)
    if version == 2:
        text["sliding_window"] = sliding_window
    return PaliGemmaConfig(
        text_config=text,
        vision_config=dict(VISION, image_size=image_size, dtype=dtype),
        projection_dim=text["hidden_size"],
        image_token_index=image_token_index,
        vocab_size=vocab_size,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        dtype=dtype,
        architectures=["PaliGemmaForConditionalGeneration"],
    )


def _sparse_config(config, version: int) -> dict:
    """config.json in the style of google/paligemma-3b-pt-224: only the fields that repository lists.

    Everything else (head_dim, rope_theta, rms_norm_eps, hidden_act, ...) is left to the class defaults,
    which is exactly what a loader has to get right. `image_size` is listed because ours is not 224.
    """
    text, vision = config.text_config, config.vision_config
    dtype = str(config.dtype).removeprefix("torch.")
    text_config = {
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "model_type": text.model_type,
        "num_attention_heads": text.num_attention_heads,
        "num_hidden_layers": text.num_hidden_layers,
        "num_image_tokens": text.num_image_tokens,
        "num_key_value_heads": text.num_key_value_heads,
        "torch_dtype": dtype,
        "vocab_size": text.vocab_size,
    }
    if version == 2:
        text_config.update({key: getattr(text, key) for key in SPARSE_GEMMA2_FIELDS})
    return {
        "architectures": ["PaliGemmaForConditionalGeneration"],
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "hidden_size": 2048,  # as on the hub: NOT the text width
        "ignore_index": -100,
        "image_token_index": config.image_token_index,
        "model_type": "paligemma",
        "pad_token_id": PAD_ID,
        "projection_dim": config.projection_dim,
        "text_config": dict(sorted(text_config.items())),
        "torch_dtype": dtype,
        "transformers_version": "4.41.0.dev0",
        "vision_config": {
            "hidden_size": vision.hidden_size,
            "image_size": vision.image_size,
            "intermediate_size": vision.intermediate_size,
            "model_type": vision.model_type,
            "num_attention_heads": vision.num_attention_heads,
            "num_hidden_layers": vision.num_hidden_layers,
            "num_image_tokens": text.num_image_tokens,
            "patch_size": vision.patch_size,
            "projection_dim": config.projection_dim,
            "projector_hidden_act": "gelu_fast",
            "vision_use_head": False,
        },
    }


@torch.no_grad()
def _randomize(model: nn.Module, seed: int, weight_scale: float) -> None:
    """Overwrite transformers' init with one that exercises every path.

    The default init leaves Gemma RMSNorm weights at 0 and LayerNorms at 1/0, which hides `(1 + w)` and
    bias bugs, and its 0.02 std gives near-constant logits. Linear/conv weights get std
    weight_scale/sqrt(fan_in) and embeddings weight_scale/sqrt(dim), keeping activations O(1).
    """
    generator = torch.Generator().manual_seed(seed)

    def normal_(tensor: torch.Tensor, mean: float, std: float) -> None:
        tensor.copy_(torch.randn(tensor.shape, generator=generator) * std + mean)

    done = set()
    for module in model.modules():
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            normal_(weight, 0.0, weight_scale / math.sqrt(weight[0].numel()))
        elif isinstance(module, nn.Embedding):
            normal_(weight, 0.0, weight_scale / math.sqrt(module.embedding_dim))
        elif isinstance(module, nn.LayerNorm):
            normal_(weight, 1.0, 0.3)
        elif type(module).__name__.endswith("RMSNorm"):  # Gemma: scaled by (1 + weight)
            normal_(weight, 0.0, 0.3)
        else:
            continue
        if isinstance(bias, torch.Tensor):
            normal_(bias, 0.0, 0.2)
            done.add(id(bias))
        done.add(id(weight))
    missed = [name for name, param in model.named_parameters() if id(param) not in done]
    if missed:
        raise RuntimeError(f"parameters left at the transformers init: {missed}")


def _stored_tensors(model: nn.Module, layout: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's tensors under the on-disk names of `layout`, without the tied lm_head."""
    to_disk = {memory: disk for disk, memory in KEY_PREFIXES[layout].items()}
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name == TIED_KEY:
            continue
        prefix = next(p for p in to_disk if name.startswith(p))
        tensors[to_disk[prefix] + name[len(prefix) :]] = tensor.to(dtype).contiguous()
    return dict(sorted(tensors.items()))


def _write_weights(out_dir: Path, tensors: dict[str, torch.Tensor], shards: int) -> None:
    """One model.safetensors, or `shards` files of about equal size plus model.safetensors.index.json."""
    from safetensors.torch import save_file

    metadata = {"format": "pt"}
    if shards == 1:
        save_file(tensors, out_dir / "model.safetensors", metadata=metadata)
        return
    if not 1 <= shards <= len(tensors):
        raise ValueError(f"shards must be between 1 and {len(tensors)}, got {shards}")
    names = list(tensors)
    sizes = [tensors[name].nbytes for name in names]
    total = sum(sizes)
    # Cut where the running size passes the next 1/shards quantile, or as soon as only one tensor is left
    # per remaining shard, so that no shard is empty.
    bounds, running = [0], 0
    for i, size in enumerate(sizes[:-1]):
        running += size
        cuts_left, tensors_left = shards - len(bounds), len(names) - (i + 1)
        if cuts_left and (running >= total * len(bounds) / shards or tensors_left == cuts_left):
            bounds.append(i + 1)
    bounds.append(len(names))
    weight_map = {}
    for index in range(shards):
        file_name = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        chunk = names[bounds[index] : bounds[index + 1]]
        save_file({name: tensors[name] for name in chunk}, out_dir / file_name, metadata=metadata)
        weight_map.update(dict.fromkeys(chunk, file_name))
    _write_json(
        out_dir / "model.safetensors.index.json",
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
    )


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _resolve_options(
    *,
    version: int,
    layout: str,
    shards: int,
    image_size: int,
    sliding_window: int | None,
    sparse_config: bool | None,
    dtype: str,
    seed: int,
    weight_scale: float,
) -> dict:
    """Validate the options before anything is written and fill in the version-dependent defaults."""
    if version not in TEXT:
        raise ValueError(f"version must be 1 or 2, got {version}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    if shards < 1:
        raise ValueError(f"shards must be at least 1, got {shards}")
    patch = VISION["patch_size"]
    if image_size < patch or image_size % patch:
        raise ValueError(f"image_size must be a positive multiple of the patch size {patch}, got {image_size}")
    if version == 1 and sliding_window is not None:
        raise ValueError("sliding_window only applies to version 2 (Gemma 2)")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be positive, got {sliding_window}")
    return dict(
        version=version,
        layout=layout,
        shards=shards,
        image_size=image_size,
        sliding_window=(sliding_window or DEFAULT_SLIDING_WINDOW) if version == 2 else None,
        sparse_config=version == 1 if sparse_config is None else sparse_config,
        dtype=dtype,
        seed=seed,
        weight_scale=weight_scale,
    )


def _write_checkpoint(
    out_dir: Path,
    *,
    version: int,
    layout: str,
    shards: int,
    image_size: int,
    sliding_window: int | None,
    sparse_config: bool,
    dtype: str,
    seed: int,
    weight_scale: float,
) -> None:
    from transformers import GenerationConfig, PaliGemmaForConditionalGeneration

    num_image_tokens = (image_size // VISION["patch_size"]) ** 2
    image_token_index = write_processor_files(out_dir, image_size, num_image_tokens)
    config = _build_config(version, image_size, sliding_window, image_token_index, dtype)

    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(config)
    _randomize(model, seed, weight_scale)
    _write_weights(out_dir, _stored_tensors(model, layout, DTYPES[dtype]), shards)

    if sparse_config:
        _write_json(out_dir / "config.json", _sparse_config(config, version))
    else:
        config.save_pretrained(out_dir)
    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID).save_pretrained(out_dir)


def _build_atomically(out_dir: Path, replace: bool, options: dict) -> Path:
    """Build in a sibling temp dir and rename it into place, so a failed build leaves nothing half-written."""
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    if out_dir.exists() and any(out_dir.iterdir()) and not replace:
        raise FileExistsError(f"{out_dir} exists and is not empty")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out_dir, replace=True) as tmp:  # an existing (empty, or replace=True) one goes when done
        _write_checkpoint(tmp, **options)
    return out_dir


def make_tiny_checkpoint(
    out_dir,
    *,
    version: int = 1,
    layout: str = "hub",
    shards: int = 1,
    image_size: int = 56,
    sliding_window: int | None = None,
    sparse_config: bool | None = None,
    dtype: str = "float32",
    seed: int = 0,
    weight_scale: float = 1.0,
) -> Path:
    """Write a tiny random PaliGemma `version` (1 or 2) checkpoint into `out_dir` (absent or empty).

    `layout` "hub" uses the keys of the original hub repositories, "transformers" those of 5.x
    `save_pretrained`. `sparse_config` (default: True for version 1, False for 2) writes a config.json
    listing only the fields of google/paligemma-3b-pt-224. `sliding_window` (version 2 only) defaults to 8.
    Returns the absolute path.
    """
    options = _resolve_options(
        version=version,
        layout=layout,
        shards=shards,
        image_size=image_size,
        sliding_window=sliding_window,
        sparse_config=sparse_config,
        dtype=dtype,
        seed=seed,
        weight_scale=weight_scale,
    )
    return _build_atomically(Path(out_dir), False, options)


# --- verification ----------------------------------------------------------------------------------------

VERIFY_PROMPTS = (
    "caption en",
    "answer en what is on the table?",
    "detect cat ; dog",
    "ocr\nline two",
    "In 2024, 42% of cars.",
    "café ☕",
    "  leading spaces",
    "tabs\tand  double  spaces",
    "<loc0005><loc1023> cat",
    "",
)
VERIFY_SUFFIXES = ("a cat on a mat", "<loc0001><loc0002><loc0003><loc0004> dog ; <seg127>", " naïve 7\n")


def verify_processor(out_dir) -> None:
    """Check that `PaliGemmaProcessor.from_pretrained(out_dir)` tokenizes exactly like sentencepiece.

    Expected: `[<image>] * N + [bos] + sp.encode(prompt + "\\n")`, then `sp.encode(suffix) + [eos]`.
    """
    import numpy as np
    import sentencepiece as spm
    from PIL import Image
    from transformers import PaliGemmaProcessor

    out_dir = Path(out_dir)
    config = json.loads((out_dir / "config.json").read_text())
    sp = spm.SentencePieceProcessor(model_file=str(out_dir / "tokenizer.model"))
    processor = PaliGemmaProcessor.from_pretrained(out_dir)
    tokenizer = processor.tokenizer
    image_id = config["image_token_index"]
    num_image_tokens = config["text_config"]["num_image_tokens"]

    assert image_id == sp.get_piece_size(), f"image_token_index {image_id} != sentencepiece size {sp.get_piece_size()}"
    assert tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == image_id, (
        f"processor maps <image> to {tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)}, config says {image_id}"
    )
    assert processor.image_token_id == image_id
    assert processor.image_seq_length == num_image_tokens, (
        f"processor image_seq_length {processor.image_seq_length} != {num_image_tokens}"
    )
    assert config["text_config"]["vocab_size"] > image_id
    for token in ("<loc0005>", "<seg127>", "<s>", "</s>", "<pad>", "\n"):
        assert tokenizer.convert_tokens_to_ids(token) == sp.piece_to_id(token), (
            f"{token!r}: processor id {tokenizer.convert_tokens_to_ids(token)}, sentencepiece {sp.piece_to_id(token)}"
        )
    ids = (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id)
    assert ids == (PAD_ID, EOS_ID, BOS_ID, UNK_ID), f"pad/eos/bos/unk ids {ids}"

    # Both image-processor files (hub style and transformers 5 style) must say the same thing.
    nested = json.loads((out_dir / "processor_config.json").read_text())["image_processor"]
    legacy = json.loads((out_dir / "preprocessor_config.json").read_text())
    assert {**nested, "processor_class": "PaliGemmaProcessor"} == legacy, (
        "preprocessor_config.json and processor_config.json disagree"
    )

    # Pixels: transparency composited onto white, bicubic resize to a square, [0, 255] -> [-1, 1].
    image_size = processor.image_processor.size["height"]
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 45, 4), dtype=np.uint8), "RGBA")
    rgb = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image).convert("RGB")
    resized = np.asarray(rgb.resize((image_size, image_size), Image.BICUBIC), dtype=np.float32)
    want_pixels = (resized / 127.5 - 1.0).transpose(2, 0, 1)[None]
    pixels = processor(images=image, text=IMAGE_TOKEN, return_tensors="np")["pixel_values"]
    assert pixels.shape == want_pixels.shape and np.allclose(pixels, want_pixels, atol=1e-5), (
        f"pixel_values differ from white-composited bicubic [-1, 1] pixels (max {np.abs(pixels - want_pixels).max()})"
    )

    prefix = [image_id] * num_image_tokens + [BOS_ID]
    for prompt in VERIFY_PROMPTS:
        # The documented form "<image>" + prompt; the bare prompt (image tokens inferred) must agree.
        got = processor(images=image, text=IMAGE_TOKEN + prompt, return_tensors="np")
        want = prefix + sp.encode(prompt + "\n")
        assert got["input_ids"][0].tolist() == want, (
            f"prompt {prompt!r}: processor {got['input_ids'][0].tolist()[len(prefix) :]}, "
            f"sentencepiece {want[len(prefix) :]} (after the image tokens and bos)"
        )
    bare = processor(images=image, text=VERIFY_PROMPTS[1], return_tensors="np")["input_ids"][0].tolist()
    assert bare == prefix + sp.encode(VERIFY_PROMPTS[1] + "\n"), f"bare prompt {VERIFY_PROMPTS[1]!r}: {bare}"
    for suffix in VERIFY_SUFFIXES:
        got = processor(images=image, text=IMAGE_TOKEN + "answer en why", suffix=suffix, return_tensors="np")
        want_prefix = prefix + sp.encode("answer en why\n")
        want = want_prefix + sp.encode(suffix) + [EOS_ID]
        assert got["input_ids"][0].tolist() == want, (
            f"suffix {suffix!r}: processor {got['input_ids'][0].tolist()[len(want_prefix) :]}, "
            f"sentencepiece + eos {want[len(want_prefix) :]}"
        )
        token_types = [0] * len(want_prefix) + [1] * (len(want) - len(want_prefix))
        assert got["token_type_ids"][0].tolist() == token_types, f"suffix {suffix!r}: wrong token_type_ids"


def _read_stored(out_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = out_dir / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    )
    tensors = {}
    for file_name in files:
        tensors.update(load_file(out_dir / file_name))
    return tensors


def verify_transformers_load(out_dir) -> dict:
    """Check that `PaliGemmaForConditionalGeneration.from_pretrained` loads every stored tensor unchanged.

    Guards against loaders that silently random-initialise a part of the model on a key-layout mismatch.
    Returns transformers' loading info (all of whose lists must be empty).
    """
    from transformers import PaliGemmaForConditionalGeneration

    out_dir = Path(out_dir)
    stored = _read_stored(out_dir)
    layout = "hub" if any(k.startswith("vision_tower.vision_model.") for k in stored) else "transformers"
    to_memory = KEY_PREFIXES[layout]
    dtype = next(iter(stored.values())).dtype
    model, info = PaliGemmaForConditionalGeneration.from_pretrained(out_dir, dtype=dtype, output_loading_info=True)
    problems = {key: value for key, value in info.items() if value}
    assert not problems, f"{layout} layout: loading info reports {problems}"

    params = dict(model.named_parameters(remove_duplicate=False))
    expected = set()
    for key, tensor in stored.items():
        prefix = next((p for p in to_memory if key.startswith(p)), None)
        assert prefix is not None, f"unexpected stored key {key}"
        name = to_memory[prefix] + key[len(prefix) :]
        assert name in params, f"stored {key} has no parameter {name}"
        assert params[name].dtype == tensor.dtype and torch.equal(params[name], tensor), (
            f"parameter {name} differs from stored {key}"
        )
        expected.add(name)
    missing = set(params) - expected - {TIED_KEY}
    assert not missing, f"parameters not loaded from the file: {sorted(missing)}"
    assert params[TIED_KEY].data_ptr() == params["model.language_model.embed_tokens.weight"].data_ptr(), (
        "lm_head is not tied to the text embedding"
    )
    return info


# --- CLI -------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--version", type=int, choices=(1, 2), default=1)
    parser.add_argument("--layout", choices=LAYOUTS, default="hub")
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=None, help="56")
    parser.add_argument("--sliding-window", type=int, default=None)
    sparse = parser.add_mutually_exclusive_group()
    sparse.add_argument(
        "--sparse-config",
        dest="sparse_config",
        action="store_true",
        default=None,
        help="hub-style sparse config.json (default for version 1)",
    )
    sparse.add_argument(
        "--full-config",
        dest="sparse_config",
        action="store_false",
        help="config.json as transformers 5 writes it (default for version 2)",
    )
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weight-scale", type=float, default=1.0)
    parser.add_argument("--verify", action="store_true", help="check the processor and transformers loading")
    parser.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    args = parser.parse_args(argv)
    args.dtype, args.image_size = args.dtype or "float32", args.image_size or 56

    start = time.perf_counter()
    try:
        options = _resolve_options(
            version=args.version,
            layout=args.layout,
            shards=args.shards,
            image_size=args.image_size,
            sliding_window=args.sliding_window,
            sparse_config=args.sparse_config,
            dtype=args.dtype,
            seed=args.seed,
            weight_scale=args.weight_scale,
        )
        out_dir = _build_atomically(args.out_dir, args.force, options)
    except FileExistsError as error:
        hint = " (use --force to replace it)" if args.out_dir.is_dir() else ""
        print(f"error: {error}{hint}", file=sys.stderr)
        return 2
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start
    config = json.loads((out_dir / "config.json").read_text())
    print(out_dir)
    print(
        f"PaliGemma {args.version} ({config['text_config']['model_type']}), {args.layout} layout, "
        f"{args.shards} shard(s), {args.dtype}, {'sparse' if options['sparse_config'] else 'full'} config, "
        f"{args.image_size}px image -> {config['text_config']['num_image_tokens']} tokens, "
        f"<image> id {config['image_token_index']}, vocab {config['text_config']['vocab_size']}, "
        f"seed {args.seed}, built in {elapsed:.1f}s"
    )
    if args.verify:
        verify_processor(out_dir)
        info = verify_transformers_load(out_dir)
        print(
            f"verified: processor tokenization matches sentencepiece; transformers loads every tensor "
            f"(loading info {info})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
