"""AHL's features rounded to the cache's float16 in arithmetic that every runtime keeps: bit for bit numpy's
``astype(float16)`` in torch, on onnxruntime and on OpenVINO (which folds a float32 -> float16 -> float32 cast pair
away), over every finite float16, the ties between them and their neighbours, overflow, subnormals and nan."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ahl.method.cache import as_cached


def values() -> np.ndarray:
    finite = np.arange(0, 0x7C00, dtype=np.uint16).view(np.float16)  # every finite float16 >= 0
    with np.errstate(over="ignore"):
        after = np.nextafter(finite, np.float16(np.inf)).astype(np.float32)
    finite = finite.astype(np.float32)
    ties = (finite + after) / 2  # exactly halfway: float32 holds 13 more bits
    rng = np.random.default_rng(0)
    spread = rng.standard_normal(50_000).astype(np.float32) * np.float32(10.0) ** rng.uniform(-9, 6, 50_000).astype(
        np.float32
    )
    edges = np.array([65504, 65519.996, 65520, 65536, 1e6, 3.4e38, np.inf, np.nan, 0, 2**-25, 2**-26, 1e-45,
                      1.5 * 2**-24, 2**-14, np.nextafter(np.float32(2**-14), np.float32(0))], np.float32)  # fmt: skip
    v = np.concatenate([finite, ties, np.nextafter(ties, np.float32(np.inf)), np.nextafter(ties, np.float32(0)),
                        spread, edges])  # fmt: skip
    return np.concatenate([v, -v]).astype(np.float32)


def numpy_rounding(v: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return v.astype(np.float16).astype(np.float32)


def same_bits(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Where ``got`` differs from ``want`` bit for bit (every nan counts as equal)."""
    differ = got.view(np.uint32) != want.view(np.uint32)
    return differ & ~(np.isnan(got) & np.isnan(want))


class Rounding(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return as_cached([x], "float16")[0]


@pytest.fixture(scope="module")
def graph(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("rounding") / "rounding.onnx"
    example = torch.zeros(8, dtype=torch.float32)
    torch.onnx.export(Rounding(), (example,), str(path), input_names=["x"], output_names=["y"], opset_version=18,
                      dynamic_shapes={"x": {0: torch.export.Dim("n", min=1)}}, dynamo=True, verbose=False)  # fmt: skip
    return str(path)


def test_torch_rounds_as_numpy_does():
    v = values()
    got = Rounding()(torch.from_numpy(v)).numpy()
    assert not same_bits(got, numpy_rounding(v)).any()


def test_onnxruntime_rounds_as_numpy_does(graph):
    import onnxruntime

    v = values()
    got = onnxruntime.InferenceSession(graph, providers=["CPUExecutionProvider"]).run(["y"], {"x": v})[0]
    differ = same_bits(got, numpy_rounding(v))
    assert not differ.any(), f"{differ.sum()} values differ, e.g. {v[differ][:5]} -> {got[differ][:5]}"


def test_openvino_rounds_as_numpy_does(graph):
    import openvino

    v = values()
    compiled = openvino.Core().compile_model(openvino.convert_model(graph), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    got = np.array(compiled.create_infer_request().infer({"x": v})[compiled.output("y")])
    differ = same_bits(got, numpy_rounding(v))
    assert not differ.any(), f"{differ.sum()} values differ, e.g. {v[differ][:5]} -> {got[differ][:5]}"
