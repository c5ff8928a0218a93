"""What tests/test_server_shard.py runs under `mlx.launch -n 2 --backend ring`: the server CLI, each rank
writing its pid first (so the test can stop rank 0 as Ctrl-C or a service manager would) and its exit
status last.

    python -m tests.two_rank_server DIR SERVER_ARGS...
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from mlx_paligemma.server import main  # before mlx.core: its fast CPU BLAS (see blas.py)


def run(out: Path, argv: list[str]) -> int:
    import mlx.core as mx

    rank = mx.distributed.init().rank()
    (out / f"rank{rank}.pid").write_text(str(os.getpid()))
    status = main(argv)
    (out / f"rank{rank}.exit").write_text(str(status))
    return status


if __name__ == "__main__":
    sys.exit(run(Path(sys.argv[1]), sys.argv[2:]))
