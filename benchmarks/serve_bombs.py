"""Dimension bombs against ``freetickets serve``: the server's memory and its other clients, bombs vs plain images.

Issue 22's target: while a bounded burst of dimension bombs (a 2 KB 1 x 1,000,000 1-bit PNG, a
172 KB 1 x 89,000,000 one, a 60,000-square header) is refused, the server's resident memory stays
under 500 MB and every bomb gets a 400 naming its limit. The baseline is the same burst of plain
28 x 28 PNGs in the same run; the script prints the peak RSS of both, their ratio, and the median
latency of a ``/v2`` request sent during each burst against an idle one.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/serve_bombs.py            # about 1 minute on 2 cores

The server is a subprocess on 127.0.0.1 (a free port); the burst is ``--concurrency`` clients x
``--requests`` requests each, bounded in count and by a 60 s client timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import struct
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import httpx
import numpy as np
import psutil
from PIL import Image
from serve_load import build_model, free_port, request_bodies, subprocess_server

TARGET_RSS_MB = 500


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def one_bit_png(width: int, height: int, rows: int | None = None) -> bytes:
    """An all-black 1-bit PNG of ``width`` x ``height``; ``rows``: store only that many (a header-only bomb)."""
    data = zlib.compress((b"\x00" + bytes((width + 7) // 8)) * (height if rows is None else rows), 9)
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def plain_png(seed: int) -> bytes:
    image = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


BOMBS = {
    "1x1,000,000 1-bit PNG": one_bit_png(1, 1_000_000),
    "1x89,000,000 1-bit PNG": one_bit_png(1, 89_000_000),
    "60,000-square header": one_bit_png(60_000, 60_000, rows=1),
}


class PeakRss:
    """The highest resident set size of a process, sampled every 10 ms in a thread."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def burst(base: str, blobs: list[bytes], concurrency: int, requests: int) -> tuple[dict[int, int], float]:
    """``concurrency`` clients each sending ``requests`` of ``blobs`` (cycled) to /v1/predict; also one
    ``/v2`` infer during the burst. Returns the status counts and that /v2 request's latency."""
    statuses: dict[int, int] = {}
    body, headers, _ = request_bodies()
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:

        async def one_client(index: int) -> None:
            for i in range(requests):
                blob = blobs[(index + i) % len(blobs)]
                reply = await client.post("/v1/predict", files={"files": ("x.png", blob, "image/png")})
                statuses[reply.status_code] = statuses.get(reply.status_code, 0) + 1

        async def probe() -> float:
            await asyncio.sleep(0.05)
            started = time.perf_counter()
            await client.post("/v2/models/model/infer", content=body, headers=headers)
            return time.perf_counter() - started

        *_, latency = await asyncio.gather(*(one_client(i) for i in range(concurrency)), probe())
    return statuses, latency


def idle_latency(base: str, rounds: int = 5) -> float:
    body, headers, _ = request_bodies()
    times = []
    with httpx.Client(base_url=base, timeout=60) as client:
        for _ in range(rounds):
            started = time.perf_counter()
            client.post("/v2/models/model/infer", content=body, headers=headers)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="an exported ensemble folder (default: build the demo shape)")
    parser.add_argument("--concurrency", type=int, default=8, help="clients in the burst (default: 8)")
    parser.add_argument("--requests", type=int, default=6, help="requests per client (default: 6)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else build_model(Path(tmp) / "model")
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "freetickets_hub.cli", "serve", str(model), "--port", str(port)]
        with subprocess_server([*command, "--name", "model"], base, "/v2/health/ready") as process:
            idle_s = idle_latency(base)
            results = {}
            for name, blobs in (
                ("plain 28x28 PNGs", [plain_png(i) for i in range(8)]),
                ("bombs", list(BOMBS.values())),
            ):
                with PeakRss(process.pid) as rss:
                    statuses, during_s = asyncio.run(burst(base, blobs, args.concurrency, args.requests))
                results[name] = {"peak_rss_mb": rss.peak / 2**20, "statuses": statuses, "v2_latency_s": during_s}
            with httpx.Client(base_url=base, timeout=60) as client:  # each bomb's own answer, once
                answers = {
                    name: client.post("/v1/predict", files={"files": ("x.png", blob, "image/png")}).json()
                    for name, blob in BOMBS.items()
                }
    plain, bombs = results["plain 28x28 PNGs"], results["bombs"]
    print(json.dumps({"idle_v2_latency_s": idle_s, **results}, indent=2, default=str))
    for name, answer in answers.items():
        print(f"{name} ({len(BOMBS[name]):,} bytes): {answer.get('error', answer)}")
    print(f"peak RSS: bombs {bombs['peak_rss_mb']:.0f} MB vs plain {plain['peak_rss_mb']:.0f} MB "
          f"({bombs['peak_rss_mb'] / plain['peak_rss_mb']:.2f}x); target < {TARGET_RSS_MB} MB")  # fmt: skip
    print(f"/v2 latency during the burst: bombs {bombs['v2_latency_s'] * 1e3:.1f} ms, plain "
          f"{plain['v2_latency_s'] * 1e3:.1f} ms, idle {idle_s * 1e3:.1f} ms")  # fmt: skip
    met = bombs["peak_rss_mb"] < TARGET_RSS_MB and set(bombs["statuses"]) <= {400}
    print("target met" if met else "TARGET MISSED")
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
