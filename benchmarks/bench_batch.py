"""Throughput of `mlx-paligemma batch`, and tensor-parallel decode/prefill beside one process.

    python -m benchmarks.bench_batch --workdir /tmp/bench-batch                 # mid preset (1.9 GB float32)
    python -m benchmarks.bench_batch --workdir /tmp/bench-batch --preset tiny   # a functional check

1. `batch` over `--images` synthetic images at `--max-batch` 1, 8 and 16 (one process, the CLI itself, in
   a subprocess each): images/s from the wall time of the whole command minus its model load.
2. `mlx.launch -n 2 --backend ring` with `mp.load(shard=True)` against one process: prefill tokens/s,
   decode tokens/s, and the all_sum time per decoded token (a collective of one token's hidden state,
   timed alone, times the collectives each token makes: two per layer, the embedding's and the token
   broadcast; plus the logits' all_gather, timed alone too).

On one host the two ranks share the machine's cores and talk over loopback, so the two-rank figures
here say that it works and what the collectives cost, not the speed-up: on two Macs each rank has a
whole GPU and its own memory bandwidth (decode is bandwidth-bound, each rank reads half the weights),
and each collective crosses Thunderbolt or Ethernet: a token's time in collectives is the count per
token measured here times that link's latency for a few kB.
"""

# ruff: noqa: I001  (mlx_paligemma is imported before mlx.core on purpose: it preloads the fast BLAS)
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BATCH_SIZES = (1, 8, 16)


def make_images(folder: Path, n: int) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (240 + i % 7 * 16, 320, 3), dtype=np.uint8)).save(folder / f"{i:04d}.png")


def time_batch(model: Path, images: Path, out: Path, max_batch: int, max_tokens: int) -> dict:
    """One `batch` run in its own process (images/s: after subtracting the start-up and model load)."""
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "mlx_paligemma", "batch", "--model", str(model), "--images", str(images)]
    cmd += ["--prompt", "caption en", "--out", str(out), "--max-batch", str(max_batch)]
    cmd += ["--max-tokens", str(max_tokens), "--quiet"]
    tic = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    total = time.perf_counter() - tic
    n = len(out.read_text().splitlines())
    return dict(max_batch=max_batch, images=n, wall_s=total)


def startup_seconds(model: Path) -> float:
    """Wall time of a process that imports the package and loads the model: what each batch run pays first."""
    tic = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import mlx_paligemma as mp; mp.load({str(model)!r})"], check=True)
    return time.perf_counter() - tic


def tp_worker(model: str, max_tokens: int, out: str) -> None:
    """Run under mlx.launch (or alone): prefill and decode speed, and the collectives' cost per token."""
    import mlx_paligemma as mp
    import mlx.core as mx
    import numpy as np

    group = mx.distributed.init()
    sharded = group.size() > 1
    m, processor = mp.load(model, shard=sharded)
    image = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    mp.generate(m, processor, image, "caption en", max_tokens=2)  # warm-up
    runs = [mp.generate(m, processor, image, "caption en", max_tokens=max_tokens).stats for _ in range(3)]
    best = max(runs, key=lambda s: s.generation_tps)
    row = dict(
        ranks=group.size(),
        prompt_tokens=best.prompt_tokens,
        prefill_tps=max(s.prefill_tps for s in runs),
        decode_tps=best.generation_tps,
        generated=best.generation_tokens,
    )
    if sharded:
        text = m.config.text_config

        def timed(op, x, repeats: int = 200) -> float:
            mx.eval(op(x))
            tic = time.perf_counter()
            for _ in range(repeats):
                x = op(x)
                mx.eval(x)
            return (time.perf_counter() - tic) / repeats

        hidden = mx.zeros((1, 1, text.hidden_size), m.dtype)
        rows = -(-text.vocab_size // group.size())
        logits = mx.zeros((rows, 1), mx.float32)
        all_sum = timed(lambda x: mx.distributed.all_sum(x, group=group), hidden)
        gather = timed(lambda x: mx.distributed.all_gather(x, group=group)[:rows], logits)
        per_token = 2 * text.num_hidden_layers + 2  # attention + MLP per layer, embedding, token broadcast
        row.update(
            all_sum_us=all_sum * 1e6,
            all_sums_per_token=per_token,
            all_gather_logits_us=gather * 1e6,
            collectives_ms_per_token=(per_token * all_sum + gather) * 1e3,
        )
    if group.rank() == 0:
        Path(out).write_text(json.dumps(row))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_batch", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True, help="preset checkpoint, images and outputs go here")
    parser.add_argument("--preset", default="mid", help="tools.presets name (default mid)")
    parser.add_argument("--images", type=int, default=48, help="synthetic images for the batch runs (default 48)")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per answer (default 16)")
    parser.add_argument("--ranks", type=int, default=2, help="ranks of the tensor-parallel run (default 2)")
    parser.add_argument("--tp-worker", nargs=3, metavar=("MODEL", "MAX_TOKENS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tp_worker:
        tp_worker(args.tp_worker[0], int(args.tp_worker[1]), args.tp_worker[2])
        return 0

    from tools.presets import build_preset

    args.workdir.mkdir(parents=True, exist_ok=True)
    model = args.workdir / args.preset
    if not (model / "config.json").exists():
        build_preset(args.preset, model, replace=True)
    images = args.workdir / f"images-{args.images}"
    if not images.is_dir():
        make_images(images, args.images)

    load_s = min(startup_seconds(model) for _ in range(2))
    batch_rows = []
    for max_batch in BATCH_SIZES:
        row = time_batch(model, images, args.workdir / f"out-{max_batch}.jsonl", max_batch, args.max_tokens)
        row["images_per_s"] = row["images"] / max(row["wall_s"] - load_s, 1e-9)
        batch_rows.append(row)

    tp_rows = []
    launch = shutil.which("mlx.launch") or str(Path(sys.executable).with_name("mlx.launch"))
    for ranks in (1, args.ranks):
        out = args.workdir / f"tp-{ranks}.json"
        worker = ["-m", "benchmarks.bench_batch", "--workdir", str(args.workdir), "--tp-worker", str(model)]
        worker += [str(args.max_tokens), str(out)]
        if ranks == 1:
            cmd = [sys.executable, *worker]
        else:
            cmd = [launch, "-n", str(ranks), "--backend", "ring", "--python", sys.executable, *worker]
        subprocess.run(cmd, check=True, cwd=ROOT)
        tp_rows.append(json.loads(out.read_text()))

    print(
        f"\n`batch`, {args.preset} preset, {args.images} images, {args.max_tokens} tokens each "
        f"(start-up + load {load_s:.1f}s)\n"
    )
    print("| --max-batch | images | wall s | images/s |\n| ---: | ---: | ---: | ---: |")
    for r in batch_rows:
        print(f"| {r['max_batch']} | {r['images']} | {r['wall_s']:.1f} | {r['images_per_s']:.2f} |")
    print(f"\ntensor parallel, {args.preset} preset, one image, {args.max_tokens} tokens\n")
    print("| ranks | prefill tok/s | decode tok/s | all_sum us | all_sums/token | logits all_gather us | ms/token |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in tp_rows:
        extra = (
            f"{r['all_sum_us']:.0f} | {r['all_sums_per_token']} | {r['all_gather_logits_us']:.0f} | "
            f"{r['collectives_ms_per_token']:.2f}"
            if r["ranks"] > 1
            else "- | - | - | -"
        )
        print(f"| {r['ranks']} | {r['prefill_tps']:.1f} | {r['decode_tps']:.1f} | {extra} |")
    (args.workdir / "bench_batch.json").write_text(
        json.dumps(dict(batch=batch_rows, tensor_parallel=tp_rows), indent=2)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
