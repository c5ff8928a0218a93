"""Server throughput, time to first token and latency at 1, 4 and 16 clients arriving at random.

    python -m benchmarks.bench_server --preset mid             # the mid preset, built on the fly
    python -m benchmarks.bench_server --model DIR [--concurrency 1,4,16] [--max-tokens 32]
    python -m benchmarks.bench_server --preset mid --checkout ../old-tree --label static

The server runs as its own process (`python -m mlx_paligemma.server --port 0`, as a user starts
it; on Linux the package itself loads a fast BLAS for MLX, see mlx_paligemma/blas.py); with
`--checkout PATH` it is that tree's server (e.g. a worktree of an older commit), so two versions
are measured by the same client on the same model. Each client is a thread that waits a random
(exponential, `--mean-gap-s`, fixed `--seed`) time, sends a streamed greedy chat completion with
an image of its own, reads it to the end, and starts over: arrivals are staggered, as a Poisson
process per client. Per level the table gives requests/s, p50/p95 time to the first streamed
token, p50/p95 latency (send to last byte) and the sizes of the groups the server prefilled.
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
    cwd = None
    if args.checkout:  # that tree's package, not this one's
        cwd = str(Path(args.checkout).resolve())
        env["PYTHONPATH"] = cwd + os.pathsep + env.get("PYTHONPATH", "")
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
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
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


def _quantiles(values: list[float]) -> tuple[float, float]:
    """(p50, p95)."""
    if len(values) == 1:
        return values[0], values[0]
    q = statistics.quantiles(values, n=20, method="inclusive")
    return statistics.median(values), q[18]


def run_level(
    base: str,
    concurrency: int,
    requests: int,
    urls: list[str],
    args: argparse.Namespace,
    bar,
) -> dict:
    import httpx
    import numpy as np

    stats_before = httpx.get(f"{base}/v1/stats", timeout=args.timeout).json()
    latencies: list[float] = []
    ttfts: list[float] = []
    tokens: list[int] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def client(k: int) -> None:
        gaps = np.random.default_rng([args.seed, concurrency, k])  # the same arrivals on every run
        with httpx.Client(timeout=args.timeout) as http:
            while True:
                time.sleep(gaps.exponential(args.mean_gap_s))
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                content = [
                    {"type": "text", "text": PROMPTS[i % len(PROMPTS)]},
                    {"type": "image_url", "image_url": {"url": urls[i % len(urls)]}},
                ]
                body = {
                    "messages": [{"role": "user", "content": content}],
                    "max_tokens": args.max_tokens,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
                tic = time.perf_counter()
                first, used = None, 0
                with http.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
                    r.raise_for_status()
                    for line in r.iter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        event = json.loads(line[len("data: ") :])
                        delta = (event.get("choices") or [{}])[0].get("delta", {})
                        if first is None and delta.get("content"):
                            first = time.perf_counter() - tic
                        if event.get("usage"):
                            used = event["usage"]["completion_tokens"]
                elapsed = time.perf_counter() - tic
                with lock:
                    latencies.append(elapsed)
                    ttfts.append(elapsed if first is None else first)
                    tokens.append(used)
                    bar.update(1)

    tic = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(client, k) for k in range(concurrency)]:
            f.result()
    wall = time.perf_counter() - tic
    after = httpx.get(f"{base}/v1/stats", timeout=args.timeout).json()
    batches = after["batches"] - stats_before["batches"]
    p50_lat, p95_lat = _quantiles(latencies)
    p50_ttft, p95_ttft = _quantiles(ttfts)
    return {
        "concurrency": concurrency,
        "requests": requests,
        "seconds": round(wall, 2),
        "requests_per_s": round(requests / wall, 3),
        "generated_tokens_per_s": round(sum(tokens) / wall, 1),
        "p50_ttft_s": round(p50_ttft, 3),
        "p95_ttft_s": round(p95_ttft, 3),
        "p50_latency_s": round(p50_lat, 3),
        "p95_latency_s": round(p95_lat, 3),
        "mean_batch": round(requests / max(batches, 1), 2),
        "batch_sizes": {
            k: v - stats_before["batch_sizes"].get(k, 0)
            for k, v in after["batch_sizes"].items()
            if v > stats_before["batch_sizes"].get(k, 0)
        },
        "rows_joined_while_running": after.get("rows_joined_while_running", 0)
        - stats_before.get("rows_joined_while_running", 0),
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
    p.add_argument("--mean-gap-s", type=float, default=1.0, help="mean random wait before each request (1.0 s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the arrival times (0)")
    p.add_argument("--checkout", metavar="PATH", help="run the server of the package in this source tree")
    p.add_argument("--label", default="", help="name of this run in the output (e.g. static, continuous)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    from tqdm import tqdm

    with tempfile.TemporaryDirectory(prefix="bench-server-") as tmp:
        model, described = build_model(args, Path(tmp))
        proc, base = start_server(model, args)
        try:
            import httpx

            urls = images(max(levels) * max(args.rounds, 2) + 8, args.image_size)  # one image per request
            warm = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": urls[0]}}]}]}
            for _ in range(2):
                httpx.post(
                    f"{base}/v1/chat/completions", json={**warm, "max_tokens": 4}, timeout=600
                ).raise_for_status()
            rows = []
            for c in levels:
                n = args.rounds * c if args.rounds > 0 else max(2 * c, 8)
                with tqdm(total=n, desc=f"{c} clients", unit="req", file=sys.stderr) as bar:
                    rows.append(run_level(base, c, n, urls[1:], args, bar))
        finally:
            proc.terminate()
            proc.wait(30)
    machine = f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs"
    if args.json:
        out = {"label": args.label, "model": described, "machine": machine, "max_tokens": args.max_tokens}
        print(json.dumps({**out, "mean_gap_s": args.mean_gap_s, "seed": args.seed, "rows": rows}))
        return 0
    server = f"the server of {args.checkout}" if args.checkout else "this tree's server"
    print(
        f"{args.label + ': ' if args.label else ''}{server}; model: {described}; machine: {machine}; greedy, "
        f"max_tokens {args.max_tokens}, --max-batch {args.max_batch}, --batch-window-ms {args.batch_window_ms:g}, "
        f"mean gap {args.mean_gap_s:g} s, seed {args.seed}"
    )
    print(
        "| clients | requests | req/s | generated tok/s | p50 TTFT (s) | p95 TTFT (s) | p50 latency (s) "
        "| p95 latency (s) | prefill groups (size: count) | joined while running |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    for r in rows:
        groups = ", ".join(f"{k}: {v}" for k, v in sorted(r["batch_sizes"].items(), key=lambda kv: int(kv[0])))
        print(
            f"| {r['concurrency']} | {r['requests']} | {r['requests_per_s']:.2f} | {r['generated_tokens_per_s']:.1f} | "
            f"{r['p50_ttft_s']:.3f} | {r['p95_ttft_s']:.3f} | {r['p50_latency_s']:.3f} | {r['p95_latency_s']:.3f} | "
            f"{groups} | {r['rows_joined_while_running']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
