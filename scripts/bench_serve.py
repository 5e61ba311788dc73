"""Server throughput vs offline `Embedder` throughput on one bundle, at the same batch size.

    python scripts/bench_serve.py BUNDLE [--batch-size 8] [--concurrency 1,8,32,64] [--requests 96] [--kind image]
        [--json serve.json]

Offline: `Embedder.embed(items, batch_size=B)` over the items (decoded PIL images / strings), after a warm-up.
Server: `pue-serve BUNDLE --max-batch B` in its own process; at each concurrency level, that many clients (asyncio +
httpx, one request of `--rows-per-request` rows at a time, images as PNG data URLs, encoding_format float) send
`--requests` requests in total. Reported per level: rows/s, the ratio to offline, latency p50/p90/p99 per request,
503s. The offline run ends (and its Embedder is closed) before the server starts: the two never share the CPU.
The clients do run on the same machine as the server (on 2 cores they take a share of it).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from pue.data import patch_set
from pue.runtime import Embedder, Query


def items_for(kind: str, count: int) -> tuple[list[Query], list[object]]:
    """`count` queries for the offline run and the same rows as the server receives them."""
    patches = [Image.open(path).convert("RGB") for path in patch_set("heldout")]
    queries, wire = [], []
    for i in range(count):
        image = patches[i % len(patches)]
        text = f"tissue {i}: {'glandular ' * (i % 4)}epithelium"
        row_kind = kind if kind != "mixed" else ("image", "text", "composed")[i % 3]
        if row_kind == "text":
            queries.append(Query(text=text))
            wire.append(text)
            continue
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        queries.append(Query(image=image, text=text if row_kind == "composed" else None))
        wire.append({"image": url, "text": text} if row_kind == "composed" else {"image": url})
    return queries, wire


def offline_throughput(bundle: Path, queries: list[Query], batch_size: int, rounds: int) -> float:
    with Embedder.load(bundle, batch_size=batch_size) as embedder:
        embedder.embed(queries[: batch_size * 2], batch_size=batch_size)  # warm-up
        best = float("inf")
        for _ in range(rounds):
            started = time.perf_counter()
            embedder.embed(queries, batch_size=batch_size)
            best = min(best, time.perf_counter() - started)
    return len(queries) / best


async def load_level(url: str, model: str, wire: list[object], concurrency: int, requests: int, rows: int) -> dict:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    counter = iter(range(requests))

    async def client_loop(client: httpx.AsyncClient) -> None:
        for number in counter:
            start = (number * rows) % len(wire)
            body = {"model": model, "input": [wire[(start + k) % len(wire)] for k in range(rows)]}
            begun = time.perf_counter()
            response = await client.post("/v1/embeddings", json=body)
            latencies.append(time.perf_counter() - begun)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    ok = statuses.get(200, 0)
    ms = np.asarray(latencies) * 1000
    return {
        "concurrency": concurrency,
        "requests": requests,
        "rows_per_request": rows,
        "rows_per_s": ok * rows / wall,
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "wall_s": wall,
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(bundle: Path, batch_size: int, max_wait_ms: float, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "pue.cli.serve_app", str(bundle), "--port", str(port), "--model-name", "bench"]
    command += ["--max-batch", str(batch_size), "--max-wait-ms", str(max_wait_ms), "--max-queue", "100000"]
    command += ["--no-access-log"]
    env = {k: v for k, v in os.environ.items() if k != "PUE_API_KEY"}
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"pue-serve exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    process.kill()
    raise SystemExit("pue-serve did not become ready in 300 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--concurrency", default="1,8,32,64")
    parser.add_argument("--requests", type=int, default=96, help="Requests per concurrency level.")
    parser.add_argument("--rows-per-request", type=int, default=1)
    parser.add_argument("--kind", choices=("image", "text", "composed", "mixed"), default="image")
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--offline-rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, help="Write the results here too.")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    rows = args.requests * args.rows_per_request
    queries, wire = items_for(args.kind, max(rows, args.batch_size * 4))
    offline = offline_throughput(args.bundle, queries[:rows], args.batch_size, args.offline_rounds)
    print(f"offline Embedder: {offline:.2f} rows/s (batch {args.batch_size}, {rows} {args.kind} rows)", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        process, url = start_server(args.bundle, args.batch_size, args.max_wait_ms, Path(tmp) / "serve.log")
        try:
            asyncio.run(load_level(url, "bench", wire, 4, args.batch_size, args.rows_per_request))  # warm-up
            for level in levels:
                result = asyncio.run(load_level(url, "bench", wire, level, args.requests, args.rows_per_request))
                result["ratio_vs_offline"] = result["rows_per_s"] / offline
                results.append(result)
                print(
                    f"  concurrency {level:>3}: {result['rows_per_s']:.2f} rows/s ({result['ratio_vs_offline']:.1%} of "
                    f"offline), p50 {result['p50_ms']:.0f} ms, p99 {result['p99_ms']:.0f} ms, {result['statuses']}",
                    flush=True,
                )
        finally:
            process.send_signal(signal.SIGTERM)
            exit_code = process.wait(timeout=120)
    report = {
        "bundle": str(args.bundle),
        "precision": json.loads((args.bundle / "manifest.json").read_text())["precision"],
        "kind": args.kind,
        "batch_size": args.batch_size,
        "max_wait_ms": args.max_wait_ms,
        "offline_rows_per_s": offline,
        "levels": results,
        "server_exit_code": exit_code,
        "cpu_count": os.cpu_count(),
    }
    print()
    print(markdown_table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


def markdown_table(report: dict) -> str:
    lines = [
        f"Offline `Embedder`: {report['offline_rows_per_s']:.2f} rows/s ({report['kind']} rows, batch "
        f"{report['batch_size']}, precision {report['precision']}).",
        "",
        "| clients | rows/s | vs offline | p50 ms | p90 ms | p99 ms | statuses |",
        "|---|---|---|---|---|---|---|",
    ]
    for level in report["levels"]:
        statuses = ", ".join(f"{k}: {v}" for k, v in level["statuses"].items())
        lines.append(
            f"| {level['concurrency']} | {level['rows_per_s']:.2f} | {level['ratio_vs_offline']:.1%} | "
            f"{level['p50_ms']:.0f} | {level['p90_ms']:.0f} | {level['p99_ms']:.0f} | {statuses} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
