"""Server throughput and latency at 1, 4 and 16 concurrent clients.

    python -m benchmarks.bench_server --preset mid             # the mid preset, built on the fly
    python -m benchmarks.bench_server --model DIR [--concurrency 1,4,16] [--max-tokens 32]

The server runs as its own process (`python -m mlx_paligemma.server --port 0`, as a user starts
it; on Linux the package itself loads a fast BLAS for MLX, see mlx_paligemma/blas.py). Each client
is a thread that sends greedy chat completions back to back,
each with its own image and prompt. Per concurrency level the table gives requests/s, generated
tokens/s, p50/p95 latency (send to last byte) and the mean batch size the server reports.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PROMPTS = ["caption en", "answer en what is in the image?", "detect cat ; dog", "caption de", "describe en"]


def build_model(args: argparse.Namespace, workdir: Path) -> tuple[str, str]:
    """(model path, description) from --model or --preset."""
    if args.model:
        return args.model, f"--model {args.model}"
    from tools import make_tiny_checkpoint as tiny
    from tools.presets import build_preset

    if args.preset == "tiny":
        path = tiny.make_tiny_checkpoint(workdir / "tiny", version=2, layout="transformers", weight_scale=0.5, seed=7)
        return str(path), "tiny PaliGemma 2 (tools.make_tiny_checkpoint, 56 px, width 64)"
    return str(build_preset(args.preset, workdir / args.preset)), f"preset {args.preset}"


def start_server(model: str, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "mlx_paligemma.server", "--model", model, "--port", "0"]
    cmd += [
        "--max-batch",
        str(args.max_batch),
        "--batch-window-ms",
        str(args.batch_window_ms),
        "--log-level",
        "warning",
    ]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stderr.readline()
    if "serving" not in line:
        proc.kill()
        raise SystemExit(f"bench_server: error: the server did not start: {line.strip() or proc.stderr.read()}")
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep draining its log
    return proc, line.split(" on ", 1)[1].split()[0].rstrip("/")


def images(n: int, size: int) -> list[str]:
    import numpy as np
    from PIL import Image

    urls = []
    for i in range(n):
        rng = np.random.default_rng(i)
        coarse = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return urls


def run_level(
    base: str, concurrency: int, requests: int, urls: list[str], max_tokens: int, bar, timeout: float = 1800
) -> dict:
    import httpx

    stats_before = httpx.get(f"{base}/v1/stats", timeout=timeout).json()
    latencies: list[float] = []
    tokens: list[int] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def client() -> None:
        with httpx.Client(timeout=timeout) as http:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                body = {
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {"type": "text", "text": PROMPTS[i % len(PROMPTS)]},
                                {"type": "image_url", "image_url": {"url": urls[i % len(urls)]}},
                            ],
                        }
                    ],
                    "max_tokens": max_tokens,
                }
                tic = time.perf_counter()
                r = http.post(f"{base}/v1/chat/completions", json=body)
                elapsed = time.perf_counter() - tic
                r.raise_for_status()
                with lock:
                    latencies.append(elapsed)
                    tokens.append(r.json()["usage"]["completion_tokens"])
                    bar.update(1)

    tic = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(client) for _ in range(concurrency)]:
            f.result()
    wall = time.perf_counter() - tic
    after = httpx.get(f"{base}/v1/stats", timeout=timeout).json()
    batches = after["batches"] - stats_before["batches"]
    q = statistics.quantiles(latencies, n=20, method="inclusive") if len(latencies) > 1 else latencies * 19
    return {
        "concurrency": concurrency,
        "requests": requests,
        "seconds": round(wall, 2),
        "requests_per_s": round(requests / wall, 3),
        "generated_tokens_per_s": round(sum(tokens) / wall, 1),
        "p50_latency_s": round(statistics.median(latencies), 3),
        "p95_latency_s": round(q[18], 3),
        "mean_batch": round(requests / max(batches, 1), 2),
        "batch_sizes": {
            k: v - stats_before["batch_sizes"].get(k, 0)
            for k, v in after["batch_sizes"].items()
            if v > stats_before["batch_sizes"].get(k, 0)
        },
        "mean_completion_tokens": round(sum(tokens) / len(tokens), 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_server", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint directory (default: build --preset)")
    p.add_argument("--preset", default="mid", help="tools.make_tiny_checkpoint preset to build (mid; tiny)")
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts (1,4,16)")
    p.add_argument(
        "--rounds", type=int, default=0, help="requests per client at each level (default: 2, and at least 8 in all)"
    )
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--batch-window-ms", type=float, default=10.0, help="the server's --batch-window-ms (10)")
    p.add_argument("--image-size", type=int, default=320, help="side of the generated test images (320)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--timeout", type=float, default=1800, help="seconds a client waits for one answer (1800)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    from tqdm import tqdm

    with tempfile.TemporaryDirectory(prefix="bench-server-") as tmp:
        model, described = build_model(args, Path(tmp))
        proc, base = start_server(model, args)
        try:
            import httpx

            urls = images(32, args.image_size)
            warm = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": urls[0]}}]}]}
            for _ in range(2):
                httpx.post(
                    f"{base}/v1/chat/completions", json={**warm, "max_tokens": 4}, timeout=600
                ).raise_for_status()
            rows = []
            for c in levels:
                n = args.rounds * c if args.rounds > 0 else max(2 * c, 8)
                with tqdm(total=n, desc=f"{c} clients", unit="req", file=sys.stderr) as bar:
                    rows.append(run_level(base, c, n, urls, args.max_tokens, bar, args.timeout))
        finally:
            proc.terminate()
            proc.wait(30)
    machine = f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs"
    if args.json:
        print(json.dumps({"model": described, "machine": machine, "max_tokens": args.max_tokens, "rows": rows}))
        return 0
    print(
        f"model: {described}; machine: {machine}; greedy, max_tokens {args.max_tokens}, "
        f"--max-batch {args.max_batch}, --batch-window-ms {args.batch_window_ms:g}"
    )
    print("| clients | requests | req/s | generated tok/s | p50 latency (s) | p95 latency (s) | mean batch | batches |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        print(
            f"| {r['concurrency']} | {r['requests']} | {r['requests_per_s']:.2f} | {r['generated_tokens_per_s']:.1f} | "
            f"{r['p50_latency_s']:.3f} | {r['p95_latency_s']:.3f} | {r['mean_batch']:.1f} | "
            + ", ".join(f"{k}: {v}" for k, v in sorted(r["batch_sizes"].items(), key=lambda kv: int(kv[0])))
            + " |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
