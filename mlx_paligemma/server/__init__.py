"""A local server for apps: OpenAI-compatible chat API, PaliGemma task endpoints, batching, a web page.

    python -m mlx_paligemma.server --model google/paligemma2-3b-mix-224 --port 8080

`app.py` is the HTTP layer (validation, OpenAI shapes, streaming), `batcher.py` the engine (one
worker thread owns the model and runs waiting requests as batches), `follower.py` the other ranks
of a model split over `mlx.launch` (`--shard`), `static/` the page at `/`, `__main__.py` the command
line. Needs the `server` extra (FastAPI, uvicorn).
"""

from __future__ import annotations

from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The `server` command (imported lazily: FastAPI is only needed when serving)."""
    from .__main__ import main as _main

    return _main(argv)


__all__ = ["main"]
