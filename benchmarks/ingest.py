"""How fast the aggregator takes in one round of uploads, and how much memory that costs.

A real aggregator process (`python -m fedsilo aggregator`, plain HTTP, SQLite, in a temp
folder, configured by the FEDSILO_* variables `fedsilo run` uses) runs one fedavg round of
N trainer silos. The scripted silos are threads of this (separate) process, each sending
its own delta over loopback with httpx, all at once: a different payload per silo (the
same data section rotated by a per-silo offset: identical bytes would dedupe in the
content-addressed store), streamed from one shared buffer so 100 x 33.6 MB of client
payloads never sit in memory. Checksums are computed before the clock starts.

Per case: MB/s = all upload bytes / (first request -> the aggregator reports version 1,
i.e. every update accepted and the round aggregated); p50/p99 of the per-upload request
latency; the aggregator's peak RSS (VmHWM from /proc/<pid>/status, start-up included).
Next to them, the per-byte references measured on the same 7B-shape payload on this
machine: sha256, a write + fsync into the benchmark's folder, a numpy float32 add.

`--floor` adds, per case, a bare receiver fed by the same senders: a plain asyncio HTTP/1.1
server (no framework, no parsing, no checks, no database) that only hashes each body, writes it
and fsyncs it, off the event loop as the aggregator does. It is what this machine allows for the
essential per-byte work with the senders on the same cores: the ceiling for the aggregator.

Shapes: MiniLM-L6 with LoRA r=8 on query/value (6 layers, 384 wide) plus the 2-label head
(~301 KB), and a LLaMA-2-7B shape with LoRA r=16 on q_proj/v_proj (32 layers, 4096 wide,
~33.6 MB fp32).

    python benchmarks/ingest.py                              # 10 / 50 / 100 silos, both shapes
    python benchmarks/ingest.py --silos 10,50 --shapes 7b --out /tmp/before.md
    PYTHONPATH=/work/main/src python benchmarks/ingest.py    # the aggregator runs main's code
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import multiprocessing
import os
import secrets
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import torch
from harness import aggregator, cpu_seconds

from fedsilo.adapters import to_bytes
from fedsilo.api import models as m
from fedsilo.api.client import Client
from fedsilo.local.runner import free_port

CHUNK = 1024 * 1024
MB = 1e6


def minilm_shape() -> dict[str, tuple[int, ...]]:
    """MiniLM-L6 + LoRA r=8 on query/value + the sequence-classification head, as peft names them."""
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in range(6):
        for module in ("query", "value"):
            prefix = f"base_model.model.bert.encoder.layer.{layer}.attention.self.{module}"
            shapes[f"{prefix}.lora_A.weight"] = (8, 384)
            shapes[f"{prefix}.lora_B.weight"] = (384, 8)
    shapes["base_model.model.classifier.modules_to_save.default.weight"] = (2, 384)
    shapes["base_model.model.classifier.modules_to_save.default.bias"] = (2,)
    return shapes


def llama7b_shape() -> dict[str, tuple[int, ...]]:
    """LLaMA-2-7B + LoRA r=16 on q_proj/v_proj: 32 x 2 x (16x4096 + 4096x16) fp32 parameters."""
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in range(32):
        for module in ("q_proj", "v_proj"):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            shapes[f"{prefix}.lora_A.weight"] = (16, 4096)
            shapes[f"{prefix}.lora_B.weight"] = (4096, 16)
    return shapes


SHAPES = {"minilm": minilm_shape, "7b": llama7b_shape}


@dataclass
class Payloads:
    """Every silo's upload: one safetensors header, one data section rotated per silo."""

    header: bytes
    doubled: memoryview  # the data section twice: silo i's data is doubled[off_i : off_i + n]
    n: int

    @classmethod
    def of(cls, shapes: dict[str, tuple[int, ...]]) -> tuple[Payloads, bytes]:
        """The payloads, and an initial adapter (version 0) of the same layout."""
        g = torch.Generator().manual_seed(0)
        state = {k: torch.randn(s, generator=g) * 0.01 for k, s in shapes.items()}
        data = to_bytes(state)
        header_len = 8 + int.from_bytes(data[:8], "little")
        body = data[header_len:]
        return cls(data[:header_len], memoryview(body + body), len(body)), data

    @property
    def size(self) -> int:
        return len(self.header) + self.n

    def offset(self, silo: int) -> int:
        return (silo * 4 * 1009) % self.n  # a whole number of float32 values: every payload stays finite

    def chunks(self, silo: int) -> Iterator[bytes | memoryview]:
        yield self.header
        start = self.offset(silo)
        for at in range(start, start + self.n, CHUNK):
            yield self.doubled[at : min(at + CHUNK, start + self.n)]

    def digest(self, silo: int) -> str:
        h = hashlib.sha256()
        for chunk in self.chunks(silo):
            h.update(chunk)
        return h.hexdigest()


def references(payload: bytes, folder: Path) -> dict[str, float]:
    """MB/s of sha256, write + fsync, and a numpy float32 add, on `payload` (best of 3)."""
    times: dict[str, list[float]] = {"sha256": [], "write_fsync": [], "numpy_add": []}
    a = np.frombuffer(payload[: len(payload) // 4 * 4], dtype=np.float32)
    b, out = a.copy(), np.empty_like(a)
    for i in range(3):
        t = time.perf_counter()
        hashlib.sha256(payload).hexdigest()
        times["sha256"].append(time.perf_counter() - t)
        path = folder / f"ref-{i}.bin"
        t = time.perf_counter()
        with path.open("wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        times["write_fsync"].append(time.perf_counter() - t)
        path.unlink()
        t = time.perf_counter()
        np.add(a, b, out=out)
        times["numpy_add"].append(time.perf_counter() - t)
    return {k: len(payload) / min(v) / MB for k, v in times.items()}


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def document(silos: int, max_bytes: int) -> dict[str, object]:
    return {
        "apiVersion": "fedsilo.io/v1alpha1",
        "kind": "FederatedJob",
        "metadata": {"name": "bench"},
        "spec": {
            "baseModel": {"path": "models/none"},
            "task": {"type": "sequence-classification", "labels": ["neg", "pos"]},
            "training": {"rounds": 1, "localSteps": 1, "batchSize": 4},
            "aggregation": {
                "strategy": "fedavg",
                "minSilos": silos,
                "roundTimeoutSeconds": 3600,
                "maxUpdateBytes": max_bytes,
            },
            "silos": [{"name": silo_name(i), "data": {"path": "x.csv"}} for i in range(silos)],
        },
    }


def silo_name(i: int) -> str:
    return f"silo-{i:03d}"


@dataclass
class Row:
    shape: str
    silos: int
    payload_bytes: int
    seconds: float
    p50: float
    p99: float
    rss_mb: float
    cpu_s: float  # the aggregator's CPU seconds from the first request to the aggregated round

    @property
    def mb_s(self) -> float:
        return self.silos * self.payload_bytes / self.seconds / MB


async def _bare_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, folder: Path) -> None:
    """Keep-alive HTTP/1.1 with Content-Length bodies: sha256 + write + fsync each, then 200."""
    try:
        while True:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
            length = int(head.split("content-length:", 1)[1].split("\r\n", 1)[0])
            await _bare_body(reader, length, folder)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        return
    finally:
        writer.close()


async def _bare_body(reader: asyncio.StreamReader, length: int, folder: Path) -> str:
    """Hash and write `length` bytes of `reader` in 256 KiB batches off the loop, fsync; the digest."""
    digest = hashlib.sha256()
    with tempfile.NamedTemporaryFile(dir=folder, delete=False) as f:

        def absorb(data: bytes) -> None:
            digest.update(data)
            f.write(data)

        batch: list[bytes] = []
        pending = 0
        while length > 0:
            chunk = await reader.readexactly(min(length, 64 * 1024))
            batch.append(chunk)
            pending += len(chunk)
            length -= len(chunk)
            if pending >= 256 * 1024 or length == 0:
                await asyncio.to_thread(absorb, b"".join(batch))
                batch, pending = [], 0
        await asyncio.to_thread(lambda: (f.flush(), os.fsync(f.fileno())))
    return digest.hexdigest()


def bare_receiver(port: int, folder: Path) -> None:
    """The floor server's process body (see the module docstring)."""

    async def serve() -> None:
        server = await asyncio.start_server(lambda r, w: _bare_connection(r, w, folder), "127.0.0.1", port,
                                            backlog=1024)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


def send_all(url_of: Callable[[int], str], silos: int, payloads: Payloads, headers_of: Callable[[int], dict[str, str]]
             ) -> tuple[float, list[float]]:
    """Every silo's upload at once, one thread each after a barrier: (perf_counter at the start, latencies)."""
    latencies: list[float] = [0.0] * silos
    errors: list[str] = []
    barrier = threading.Barrier(silos + 1)

    def upload(i: int) -> None:
        with httpx.Client(timeout=600) as http:
            barrier.wait()
            t = time.perf_counter()
            r = http.put(url_of(i), content=payloads.chunks(i), headers=headers_of(i))
            latencies[i] = time.perf_counter() - t
        if r.status_code != 200:
            errors.append(f"{silo_name(i)}: {r.status_code} {r.text[:200]}")

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(silos)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit("uploads refused:\n" + "\n".join(errors[:5]))
    return started, latencies


def row_of(shape: str, silos: int, size: int, seconds: float, latencies: list[float], rss: float, cpu: float) -> Row:
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    return Row(shape, silos, size, seconds, statistics.median(latencies), q[98], rss, cpu)


def run_floor(shape: str, silos: int, payloads: Payloads, root: Path) -> Row:
    folder = Path(tempfile.mkdtemp(prefix=f"bare-{shape}-{silos}-", dir=root))
    port = free_port()
    server = multiprocessing.get_context("spawn").Process(target=bare_receiver, args=(port, folder), daemon=True)
    server.start()
    try:
        deadline = time.monotonic() + 30
        while not _listening(port):
            if time.monotonic() > deadline:
                raise SystemExit("the bare receiver did not start")
            time.sleep(0.05)
        assert server.pid is not None
        cpu = cpu_seconds(server.pid)
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(payloads.size)}
        started, latencies = send_all(lambda i: f"http://127.0.0.1:{port}/upload/{i}", silos, payloads,
                                      lambda i: headers)
        seconds = time.perf_counter() - started
        rss, cpu = peak_rss_mb(server.pid), cpu_seconds(server.pid) - cpu
    finally:
        server.terminate()
        server.join(10)
    return row_of(f"{shape}, bare receiver", silos, payloads.size, seconds, latencies, rss, cpu)


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def run_case(shape: str, silos: int, payloads: Payloads, initial: bytes, root: Path) -> Row:
    tokens = {silo_name(i): f"{silo_name(i)}-token-{secrets.token_hex(8)}" for i in range(silos)}
    digests = [payloads.digest(i) for i in range(silos)]
    work = Path(tempfile.mkdtemp(prefix=f"{shape}-{silos}-", dir=root))
    with aggregator(work, document(silos, 2 * payloads.size), tokens, FEDSILO_TICK_SECONDS="0.2") as agg:
        url, admin_token, pid = agg.url, agg.admin, agg.pid
        clients = [Client(url, "bench", tokens[silo_name(i)], silo_name(i), retries=0) for i in range(silos)]
        for c in clients:
            c.join(m.JoinRequest(n_train_examples=1000, n_eval_examples=10))
        clients[0].put_initial(initial)
        admin = Client(url, "bench", admin_token, retries=0)

        def headers(i: int) -> dict[str, str]:
            return {
                "Authorization": f"Bearer {tokens[silo_name(i)]}",
                "Content-Type": m.SAFETENSORS_MEDIA_TYPE,
                "Content-Length": str(payloads.size),
                m.HEADER_EXAMPLES: str(10 + i),
                m.HEADER_SHA256: digests[i],
            }

        cpu = cpu_seconds(pid)
        started, latencies = send_all(lambda i: f"{url}/v1/jobs/bench/rounds/1/updates/{silo_name(i)}", silos, payloads,
                                headers)
        while admin.status().version < 1:
            if time.perf_counter() - started > 900:
                raise SystemExit("the round did not aggregate")
            time.sleep(0.02)
        seconds = time.perf_counter() - started
        rss, cpu = peak_rss_mb(pid), cpu_seconds(pid) - cpu
    return row_of(shape, silos, payloads.size, seconds, latencies, rss, cpu)


def table(rows: list[Row], refs: dict[str, float]) -> str:
    lines = [
        "| shape | silos | payload | MB/s | p50 upload s | p99 upload s | aggregator peak RSS MB "
        "| aggregator CPU s per GB | % of slowest reference |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    slowest = min(refs.values())
    for r in rows:
        lines.append(
            f"| {r.shape} | {r.silos} | {r.payload_bytes / MB:.3f} MB | {r.mb_s:.1f} | {r.p50:.2f} | {r.p99:.2f} "
            f"| {r.rss_mb:.0f} | {r.cpu_s / (r.silos * r.payload_bytes / 1e9):.2f} | {100 * r.mb_s / slowest:.1f} % |"
        )
    lines += [
        "",
        "Per-byte references on the 7B-shape payload, this machine (best of 3): "
        + ", ".join(f"{k} {v:.0f} MB/s" for k, v in refs.items())
        + f"; slowest: {min(refs, key=lambda k: refs[k])}.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--silos", default="10,50,100", help="comma-separated silo counts")
    parser.add_argument("--shapes", default="minilm,7b", help="comma-separated: minilm, 7b")
    parser.add_argument("--out", type=Path, help="also write the table (markdown) here")
    parser.add_argument("--floor", action="store_true", help="also time a bare receiver per case (the ceiling)")
    args = parser.parse_args()
    counts = [int(x) for x in args.silos.split(",")]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="fedsilo-ingest-") as tmp:
        root = Path(tmp)
        built = {name: Payloads.of(SHAPES[name]()) for name in args.shapes.split(",")}
        refs = references(Payloads.of(llama7b_shape())[1], root)
        rows = []
        for name, (payloads, initial) in built.items():
            for n in counts:
                rows.append(run_case(name, n, payloads, initial, root))
                print(f"{name} x {n}: {rows[-1]}", file=sys.stderr, flush=True)
                if args.floor:
                    rows.append(run_floor(name, n, payloads, root))
                    print(f"{name} x {n}, bare: {rows[-1]}", file=sys.stderr, flush=True)
    load_after = os.getloadavg()
    code = "main" if "/work/main/" in os.environ.get("PYTHONPATH", "") else "this checkout"
    text = table(rows, refs) + (
        f"\n\nAggregator code: {code}. Load average (1/5/15 min) before: "
        f"{' '.join(f'{x:.2f}' for x in load_before)}, after: {' '.join(f'{x:.2f}' for x in load_after)} "
        f"({os.cpu_count()} cores, shared)."
    )
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
