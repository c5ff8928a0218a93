"""`python -m mlx_paligemma.convert_mask_decoder vae-oid.npz vae-oid.safetensors`: the mask decoder as safetensors.

big_vision publishes the segmentation mask decoder as a numpy archive; this writes the same
tensors (names, PyTorch layouts, float32) as safetensors, after the same strict check the loader
does. Both files load with `mlx_paligemma.load_mask_decoder`. User errors: one line, exit 2.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

from .cli import ArgumentParser, main_entry, run_main
from .mask_decoder import convert

PROG = "python -m mlx_paligemma.convert_mask_decoder"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = ArgumentParser(
        prog=PROG,
        description="Convert big_vision's segmentation mask decoder (vae-oid.npz) to safetensors.",
    )
    parser.add_argument("src", help="vae-oid.npz (or a directory / hub repo id holding it)")
    parser.add_argument("dst", help="output .safetensors file")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output file")
    args = parser.parse_args(argv)

    def body() -> int:
        print(convert(args.src, args.dst, force=args.force))
        return 0

    return run_main(PROG, body)


if __name__ == "__main__":
    main_entry(main)
