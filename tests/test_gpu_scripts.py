"""The GPU benchmark scripts' CPU-compatible parts, so that they cannot rot while no GPU runs them: the plan of
benchmarks/bench_cuda.py and its measurements at a tiny size, and benchmarks/gpu_protocol.sh's params."""

from __future__ import annotations

import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_cuda  # noqa: E402

from ahl.core.runtime import Runtime  # noqa: E402
from ahl.models.base import BackboneConfig  # noqa: E402


def test_bench_cuda_dry_run_names_the_backbone_and_both_ahl_runs(capsys):
    argv = ["--device", "cpu", "--dry-run", "--backbone", "efficientnet_lite0", "--image-size", "64"]
    assert bench_cuda.main(argv) == 0
    out = capsys.readouterr().out
    assert "backbone efficientnet_lite0 (imagenet weights) at 64 px" in out
    # on the CPU float32 only (bfloat16 is emulated there); on CUDA float32 and bf16 + channels_last
    assert "bench_ahl.py --device cpu\n" in out and "--bf16" not in out and "bfloat16" not in out
    cuda = torch.device("cuda")
    assert [c[-1] for c in bench_cuda.bench_ahl_commands(cuda, full=False)] == ["cuda", "--bf16"]
    labels = [(label, r.dtype, r.channels_last) for label, r in bench_cuda.variants(cuda, False)]
    assert labels == [("float32", None, False), ("bfloat16 autocast + channels_last", torch.bfloat16, True)]


def test_bench_cuda_measures_every_row_at_a_tiny_size():
    torch.set_num_threads(1)
    backbone = BackboneConfig(name="efficientnet_lite0", pretrained="none", image_size=64, n_scales=2)
    # train_base's rate is the difference of a (1 + steps)-step and a 1-step run: 3 steps keep it clear of timing
    # noise on a busy machine (1 step once measured a negative difference under load)
    rows = bench_cuda.stage_rows(backbone, Runtime(torch.device("cpu")), Namespace(batch=4, steps=3, cache_images=2))
    assert len(rows) == 4
    for what, r, bare in rows:
        assert r["images_per_s"] > 0 and r["seconds"] > 0, what
    assert rows[1][2] is rows[0][1] and rows[3][2] is rows[2][1]  # train_base vs fwd+bwd, caching vs forward


def test_gpu_protocol_dry_run_writes_the_papers_params_and_checks_them(tmp_path):
    env = {**os.environ, "DEVICE": "cpu", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    work = tmp_path / "work"
    res = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_protocol.sh"), "--dry-run", str(work)],
                         env=env, capture_output=True, text=True, check=False)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    params = yaml.safe_load((work / "params.yaml").read_text())
    assert params["backbone"]["image_size"] == 448 and params["protocol"]["n_anomalies"] == 10
    assert (params["base"]["epochs"], params["base"]["steps_per_epoch"], params["base"]["batch_size"]) == (30, 20, 48)
    assert (params["ahl"]["epochs"], params["ahl"]["steps_per_epoch"], params["ahl"]["batch_size"]) == (30, 20, 48)
    assert (work / "data/selection.json").is_file() and "would run" in res.stdout
    again = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_protocol.sh"), "--dry-run", str(work)],
                           env=env, capture_output=True, text=True, check=False)  # fmt: skip
    assert again.returncode == 2 and "already holds a run" in again.stderr
