"""A bounded load test of `ahl serve` on loopback, next to `ahl infer`'s in-process rate at the same batch.

    python benchmarks/bench_serve.py [--run .] [--requests 2000] [--clients 8] [--batch 16] [--threads N]

The run in ``--run`` (a project after `dvc repro`) is exported (ONNX) into a temporary folder. First, in a process
of its own, `ahl infer`'s path: its test images read from their PNG files and scored at ``--batch`` (images/s).
Then `ahl serve` over the export in a subprocess (``--batch-size --batch``), and ``--clients`` threads post
``--requests`` requests in all, one PNG each as the raw body, and stop. Reported: images/s, the latency's p50, p95
and p99, the errors (must be 0), the server's RSS before and after the load and its peak, and served / infer.
The clients share the machine's cores with the server: on a small machine they are part of what is measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss_mb(pid: int, key: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def infer_rate(export: Path, files: list[Path], batch: int, threads: int) -> float:
    """`ahl infer`'s scoring path in this process: read the files as it reads them, score them at ``batch``."""
    from ahl.deploy.exported import load_exported
    from ahl.deploy.infer import score_files

    run = load_exported(export, threads=threads)
    score_files(run, files[:batch], batch, None)  # warm-up
    start = time.perf_counter()
    rows, _, errors = score_files(run, files, batch, None)
    assert not errors and len(rows) == len(files)
    return len(files) / (time.perf_counter() - start)


@contextlib.contextmanager
def server(export: Path, batch: int, threads: int):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "ahl.deploy.cli", "serve", "--export", str(export), "--port", str(port),
           "--batch-size", str(batch), "--threads", str(threads)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    import requests

    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            if proc.poll() is not None:
                raise SystemExit(f"ahl serve exited: {proc.stderr.read()}")
            time.sleep(0.1)
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait(30)


def load(url: str, bodies: list[bytes], n_requests: int, clients: int) -> tuple[list[float], int, float]:
    """(latencies in s, errors, wall s) of ``n_requests`` posts from ``clients`` threads."""
    import requests

    latencies, errors, lock, counter = [], [0], threading.Lock(), iter(range(n_requests))

    def client() -> None:
        session = requests.Session()
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t0 = time.perf_counter()
            res = session.post(f"{url}/v1/score", data=bodies[i % len(bodies)], headers={"Content-Type": "image/png"})
            took = time.perf_counter() - t0
            with lock:
                latencies.append(took)
                errors[0] += res.status_code != 200

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, errors[0], time.perf_counter() - start


def mean_batch(url: str) -> float:
    """The mean number of images per runtime batch the server formed (its /metrics)."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(requests.get(f"{url}/metrics").text):
        if family.name == "ahl_batch_images":
            values = {s.name: s.value for s in family.samples}
            return values["ahl_batch_images_sum"] / values["ahl_batch_images_count"]
    raise SystemExit("the server's /metrics has no ahl_batch_images")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default=".", help="a project with a trained run (models/base.pt, models/ahl.pt)")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--infer-only", help=argparse.SUPPRESS)
    args = p.parse_args()
    run_dir = Path(args.run).resolve()
    files = sorted((run_dir / "data/mvtec").glob("*/test/*/*.png"))
    if args.infer_only:
        print(json.dumps({"images_per_s": infer_rate(Path(args.infer_only), files, args.batch, args.threads)}))
        return
    with tempfile.TemporaryDirectory() as tmp:
        export = Path(tmp) / "deploy"
        subprocess.run([sys.executable, "-m", "ahl.deploy.cli", "export", "--out", str(export)], cwd=run_dir,
                       check=True, capture_output=True)  # fmt: skip
        bodies = [f.read_bytes() for f in files]
        with server(export, args.batch, args.threads) as (url, pid):
            before = rss_mb(pid)
            latencies, errors, wall = load(url, bodies, args.requests, args.clients)
            after, peak = rss_mb(pid), rss_mb(pid, "VmHWM")
            formed = mean_batch(url)
        infer = {}
        for batch in sorted({args.batch, max(1, round(formed))}):
            cmd = [sys.executable, __file__, "--run", str(run_dir), "--batch", str(batch), "--threads",
                   str(args.threads), "--infer-only", str(export)]  # fmt: skip
            infer[batch] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)["images_per_s"]
    p50, p95, p99 = np.percentile(np.array(latencies) * 1000, [50, 95, 99])
    served, same = args.requests / wall, infer[max(1, round(formed))]
    print(f"{args.requests} requests (1 image each) from {args.clients} clients, --batch-size {args.batch}, "
          f"{args.threads} runtime threads, {len(files)} distinct images; the server formed batches of {formed:.1f} "
          f"images on average; infer at batch {args.batch}: {infer[args.batch]:.1f} images/s")  # fmt: skip
    print("| images/s | p50 ms | p95 ms | p99 ms | errors | server RSS MB before / after / peak | mean batch | "
          "infer images/s at that batch | served / infer |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {served:.1f} | {p50:.1f} | {p95:.1f} | {p99:.1f} | {errors} | {before:.0f} / {after:.0f} / {peak:.0f} | "
          f"{formed:.1f} | {same:.1f} | {served / same:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
