"""Scoring speed and memory of a trained run: torch eager (the scorer `ahl predict` uses) against its export on
onnxruntime and on OpenVINO, on the CPU, at the same batch and thread count, each in its own process.

    python benchmarks/bench_deploy.py [--run .] [--batch 16] [--images 128] [--threads N] [--repeats 5]

For each runtime: the load time (model files -> ready), the first image's latency (load + one image scored, what
a line sees after a restart), images/s over ``--images`` images at ``--batch`` after one warm-up batch (the median
of ``--repeats`` passes), and the process's peak RSS. The export (``ahl export``, both formats) is made into a temporary folder from ``--run``
(a project after `dvc repro`). Images are random uint8 at the run's size: the speed does not depend on content.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RUNTIMES = ("torch", "onnxruntime", "openvino")


def peak_rss_mb() -> float:
    """This process's peak resident memory: VmHWM (its own; ru_maxrss would carry the parent's across fork+exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: KiB on most systems


def worker(args: argparse.Namespace) -> dict:
    """One runtime in this process: load, first image, throughput, peak RSS."""
    start = time.perf_counter()
    if args.worker == "torch":
        import torch

        from ahl import load_run

        torch.set_num_threads(args.threads)
        run = load_run(args.run)
    else:
        from ahl import load_exported

        run = load_exported(Path(args.exports) / args.worker, threads=args.threads)
    loaded = time.perf_counter()
    images = np.random.default_rng(0).integers(0, 256, (args.images, run.size, run.size, 3), dtype=np.uint8)
    run.score(images[:1])
    first = time.perf_counter()
    run.score(images[: args.batch], args.batch)  # warm-up
    rates = []
    for _ in range(args.repeats):  # the median pass: one pass is at the mercy of whatever else the machine runs
        t0 = time.perf_counter()
        run.score(images, args.batch)
        rates.append(args.images / (time.perf_counter() - t0))
    rss = peak_rss_mb()
    return {"runtime": args.worker, "load_s": loaded - start, "first_s": first - start,
            "images_per_s": float(np.median(rates)), "peak_rss_mb": rss}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default=".", help="a project with a trained run (models/base.pt, models/ahl.pt)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of every runtime (default 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed passes over the images; the median is reported")
    p.add_argument("--worker", choices=RUNTIMES, help=argparse.SUPPRESS)
    p.add_argument("--exports", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    from ahl import load_run

    run = load_run(args.run)
    with tempfile.TemporaryDirectory() as tmp:
        sizes = {}
        for fmt, name in (("onnx", "onnxruntime"), ("openvino", "openvino")):
            model = run.export(Path(tmp) / name, format=fmt)
            sizes[name] = sum(f.stat().st_size for f in model.parent.glob("model.*")) / 1e6
        rows = []
        for name in RUNTIMES:
            sizes_args = ["--batch", str(args.batch), "--images", str(args.images), "--threads", str(args.threads),
                          "--repeats", str(args.repeats)]  # fmt: skip
            cmd = [sys.executable, __file__, "--worker", name, "--exports", tmp, "--run", args.run, *sizes_args]
            rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
    base = rows[0]["images_per_s"]
    print(f"{run.scorer.names[run.model]} at {run.size} px, batch {args.batch}, {args.images} images, "
          f"{args.threads} threads")  # fmt: skip
    print("| runtime | model files MB | load s | first image s | images/s | vs torch | peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        size = f"{sizes[r['runtime']]:.1f}" if r["runtime"] in sizes else "(base.pt + ahl.pt)"
        print(f"| {r['runtime']} | {size} | {r['load_s']:.2f} | {r['first_s']:.2f} | {r['images_per_s']:.1f} | "
              f"{r['images_per_s'] / base:.2f}x | {r['peak_rss_mb']:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
