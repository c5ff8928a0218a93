"""Image + prompt -> model inputs, in numpy, for both backends.

Matches transformers' PaliGemmaProcessor with the PIL image path: RGB (transparency composited
on white), BICUBIC resize to the square model size, x/255, (x - mean)/std, channels first;
tokens `[<image>] * N + [bos] + sp.encode(prompt + "\\n")`, then `sp.encode(suffix) + [eos]`
with token_type_ids 1 for the suffix. Batches are left-padded so that generation can append
tokens to every row at the same position.
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from .config import PaliGemmaConfig
from .errors import ImageTooLargeError, ProcessorError

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]

# Largest image file decoded (width x height). A photo is 12-50 MP; a 100 MP RGB image already
# takes 300 MB decoded. PIL's own guard (warn above 89 MP, fail above 179 MP) prints a library
# warning at users, so it is replaced by this one limit; raise it with `max_image_pixels`
# (`--max-image-pixels`), or pass None to lift it.
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000
_PIL_LIMIT_LOCK = threading.Lock()


def _byte_ids(piece_to_id: Callable[[str], int], unk_id: int) -> frozenset[int]:
    """Ids of the byte-fallback pieces `<0x00>`..`<0xFF>`, which spell characters outside the vocabulary."""
    return frozenset(i for i in (piece_to_id(f"<0x{b:02X}>") for b in range(256)) if i != unk_id)


class Tokenizer:
    """The checkpoint's sentencepiece model (Gemma: no dummy prefix, byte fallback)."""

    def __init__(self, model_file: str | os.PathLike):
        import sentencepiece as spm

        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except (OSError, RuntimeError) as e:
            raise ProcessorError(f"{model_file}: not a readable sentencepiece model ({e})") from None
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.pad_id = max(self.sp.pad_id(), 0)
        self.vocab_size = self.sp.get_piece_size()
        self.byte_ids = _byte_ids(self.piece_to_id, self.sp.unk_id())

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

    def piece_to_id(self, piece: str) -> int:
        return self.sp.piece_to_id(piece)


class JsonTokenizer:
    """The same interface read from `tokenizer.json` (the `tokenizers` library), for checkpoints
    that ship no sentencepiece model, such as those mlx-vlm converts (mlx-community).

    PaliGemma's tokenizer.json encodes exactly like its sentencepiece model (no dummy prefix,
    "\\n" its own piece, byte fallback; tested on the tiny checkpoints). Special ids come from
    special_tokens_map.json / tokenizer_config.json, never from literals. One difference remains
    in decoding: an `<unk>` id decodes to "" here and to " ⁇ " in sentencepiece.
    """

    def __init__(self, model_dir: Path):
        from tokenizers import Tokenizer as HFTokenizer

        path = model_dir / "tokenizer.json"
        try:
            self.tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise ProcessorError(f"{path}: not a readable tokenizer.json ({e})") from None
        special = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            f = model_dir / name
            if f.is_file():
                try:
                    special = {**json.loads(f.read_text()), **special}
                except json.JSONDecodeError as e:
                    raise ProcessorError(f"{f}: not valid JSON ({e})") from None

        def token_id(role: str, default: str, required: bool = True) -> int:
            token = special.get(f"{role}_token", default)
            token = token.get("content", default) if isinstance(token, dict) else token
            found = self.tok.token_to_id(token)
            if found is None and required:
                raise ProcessorError(f"{path}: has no {role} token {token!r}")
            return -1 if found is None else found

        self.bos_id, self.eos_id = token_id("bos", "<bos>"), token_id("eos", "<eos>")
        self.pad_id = token_id("pad", "<pad>")
        self.unk_id = token_id("unk", "<unk>", required=False)
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.byte_ids = _byte_ids(self.piece_to_id, self.unk_id)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def piece_to_id(self, piece: str) -> int:
        """Like sentencepiece: an unknown piece is the unk id."""
        found = self.tok.token_to_id(piece)
        return self.unk_id if found is None else found


def load_image(image: ImageInput, max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """A path, PIL image or HWC/HW uint8 numpy array as a PIL image.

    A file larger than `max_pixels` (width x height) is refused from its header, before it is
    decoded: a tiny PNG can claim billions of pixels (a decompression bomb).
    """
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise ProcessorError(f"image array of shape {image.shape}: expected (H, W), (H, W, 3) or (H, W, 4)")
        if image.dtype != np.uint8:
            raise ProcessorError(f"image array of dtype {image.dtype}: expected uint8 (0..255)")
        return Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image)
    if isinstance(image, (str, os.PathLike)):
        path = Path(image).expanduser()
        if path.is_dir():
            raise ProcessorError(f"{path}: is a directory, not an image file")
        try:
            img = _open_unguarded(path)
            try:
                width, height = img.size
                if max_pixels is not None and width * height > max_pixels:
                    raise ImageTooLargeError(str(path), width, height, max_pixels)
                img.load()
            except BaseException:
                img.close()
                raise
            return img
        except FileNotFoundError:
            raise ProcessorError(f"{path}: image file not found") from None
        except IsADirectoryError:
            raise ProcessorError(f"{path}: is a directory, not an image file") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise ProcessorError(f"{path}: not a readable image ({e})") from None
    raise ProcessorError(f"unsupported image type {type(image).__name__}: pass a path, a PIL image or a numpy array")


def _open_unguarded(path: Path) -> Image.Image:
    """`Image.open` without PIL's decompression-bomb warning or error: `load_image` applies its own limit."""
    with _PIL_LIMIT_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def check_image_tokens(input_ids: Any, num_images: int, num_image_tokens: int, image_token_id: int) -> None:
    """Each row must hold exactly `num_image_tokens` image tokens, one image per row.

    Checked in numpy before the model runs (both backends' `embed_inputs` trust it), so the
    forward pass never reads a device array back to the host.
    """
    ids = np.asarray(input_ids)
    ids = ids[None] if ids.ndim == 1 else ids
    counts = (ids == image_token_id).sum(axis=1)
    if num_images != ids.shape[0] or (counts != num_image_tokens).any():
        raise ProcessorError(
            f"each row needs exactly {num_image_tokens} image tokens (id {image_token_id}) for its image; "
            f"got {counts.tolist()} tokens for {num_images} images"
        )


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB as transformers makes it: transparency composited on white, 16-bit scaled to 8-bit."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # PIL's convert() clips 16-bit values at 255; scale the full range down instead.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        img = Image.fromarray(np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8), mode="L")
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


class Processor:
    """Turns images and prompts into `input_ids`, `attention_mask`, `token_type_ids`, `pixel_values`."""

    def __init__(
        self,
        tokenizer: Tokenizer | JsonTokenizer,
        config: PaliGemmaConfig,
        image_size: int | None = None,
        image_mean: Sequence[float] = (0.5, 0.5, 0.5),
        image_std: Sequence[float] = (0.5, 0.5, 0.5),
        rescale_factor: float = 1 / 255,
        to_array: Callable[[np.ndarray], Any] = lambda a: a,
        max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
    ):
        self.tokenizer = tokenizer
        self.max_image_pixels = max_image_pixels  # image files larger than this are refused (None: no limit)
        self.image_token_id = config.image_token_id
        self.num_image_tokens = config.num_image_tokens
        self.image_size = image_size or config.vision_config.image_size
        self.image_mean = np.asarray(image_mean, dtype=np.float32).reshape(3, 1, 1)
        self.image_std = np.asarray(image_std, dtype=np.float32).reshape(3, 1, 1)
        self.rescale_factor = rescale_factor
        self.to_array = to_array

    @classmethod
    def from_dir(
        cls, model_dir: str | os.PathLike, config: PaliGemmaConfig, to_array: Callable[[np.ndarray], Any] = lambda a: a
    ) -> Processor:
        model_dir = Path(model_dir)
        tok_file = model_dir / "tokenizer.model"
        if tok_file.is_file():
            tokenizer: Tokenizer | JsonTokenizer = Tokenizer(tok_file)
        elif (model_dir / "tokenizer.json").is_file():
            tokenizer = JsonTokenizer(model_dir)
        else:
            raise ProcessorError(f"{model_dir}: no tokenizer.model or tokenizer.json (the checkpoint's tokenizer)")
        kwargs: dict[str, Any] = {}
        pre = model_dir / "preprocessor_config.json"
        if pre.is_file():
            try:
                d = json.loads(pre.read_text())
            except json.JSONDecodeError as e:
                raise ProcessorError(f"{pre}: not valid JSON ({e})") from None
            size = d.get("size") or {}
            if isinstance(size, dict) and size.get("height"):
                if size.get("height") != size.get("width"):
                    raise ProcessorError(f"{pre}: size {size} is not square")
                kwargs["image_size"] = int(size["height"])
            if d.get("do_normalize", True):
                kwargs["image_mean"] = d.get("image_mean", (0.5, 0.5, 0.5))
                kwargs["image_std"] = d.get("image_std", (0.5, 0.5, 0.5))
            else:
                kwargs["image_mean"], kwargs["image_std"] = (0.0,) * 3, (1.0,) * 3
            kwargs["rescale_factor"] = d.get("rescale_factor", 1 / 255) if d.get("do_rescale", True) else 1.0
        if kwargs.get("image_size", config.vision_config.image_size) != config.vision_config.image_size:
            raise ProcessorError(
                f"{pre}: image size {kwargs['image_size']} differs from the model's {config.vision_config.image_size}"
            )
        return cls(tokenizer, config, to_array=to_array, **kwargs)

    # -- images -------------------------------------------------------------------------------
    def load_image(self, image: ImageInput) -> Image.Image:
        """`load_image` with this processor's `max_image_pixels`."""
        return load_image(image, self.max_image_pixels)

    def preprocess_image(self, image: ImageInput) -> np.ndarray:
        """(3, S, S) float32 in the model's normalised range."""
        rgb = to_rgb(self.load_image(image))
        rgb = rgb.resize((self.image_size, self.image_size), resample=Image.Resampling.BICUBIC)
        x = (np.asarray(rgb, dtype=np.float64) * self.rescale_factor).astype(np.float32).transpose(2, 0, 1)
        return (x - self.image_mean) / self.image_std

    # -- text ---------------------------------------------------------------------------------
    def prompt_ids(self, prompt: str, suffix: str | None = None) -> tuple[list[int], list[int]]:
        """Token ids and token_type_ids of one row (prefix 0, suffix 1)."""
        prefix = [self.image_token_id] * self.num_image_tokens + [self.tokenizer.bos_id]
        prefix += self.tokenizer.encode(prompt + "\n")
        ids, types = prefix, [0] * len(prefix)
        if suffix is not None:
            tail = self.tokenizer.encode(suffix) + [self.tokenizer.eos_id]
            ids, types = ids + tail, types + [1] * len(tail)
        return ids, types

    def encode_prompts(self, prompts: Sequence[str], suffixes: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Left-padded `input_ids`, `attention_mask`, `token_type_ids` (numpy int32) for a batch of prompts."""
        if suffixes is not None and len(suffixes) != len(prompts):
            raise ProcessorError(f"{len(suffixes)} suffixes for {len(prompts)} prompts")
        rows = [self.prompt_ids(p, suffixes[i] if suffixes is not None else None) for i, p in enumerate(prompts)]
        length = max(len(ids) for ids, _ in rows)
        input_ids = np.full((len(rows), length), self.tokenizer.pad_id, dtype=np.int32)
        attention_mask = np.zeros((len(rows), length), dtype=np.int32)
        token_type_ids = np.zeros((len(rows), length), dtype=np.int32)
        for i, (ids, types) in enumerate(rows):
            input_ids[i, length - len(ids) :] = ids
            attention_mask[i, length - len(ids) :] = 1
            token_type_ids[i, length - len(ids) :] = types
        return dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)

    def __call__(
        self,
        images: ImageInput | Sequence[ImageInput],
        prompts: str | Sequence[str],
        suffixes: str | Sequence[str] | None = None,
    ) -> dict[str, Any]:
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if isinstance(suffixes, str):
            suffixes = [suffixes]
        if len(images) != len(prompts):
            raise ProcessorError(f"{len(images)} images for {len(prompts)} prompts: pass one image per prompt")
        batch = self.encode_prompts(prompts, suffixes)
        batch["pixel_values"] = np.stack([self.preprocess_image(img) for img in images])
        return {k: self.to_array(v) for k, v in batch.items()}

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)
