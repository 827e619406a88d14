"""An exported run (``ahl export``) scored on onnxruntime or the OpenVINO runtime: numpy and Pillow, no torch.

    from ahl import load_exported
    run = load_exported("deploy")            # model.onnx, or model.xml + model.bin, and metadata.json
    out = run.score(images)                  # uint8 (N, S, S, 3) RGB at run.size, or image files
    out["score"], out["head_scores"], out["anomaly_map"], run.decide(out["score"]), run.borderline(out["score"])

The same interface as ``load_run`` (ahl/deploy/api.py), which scores with the training stack.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ahl.core.errors import UserError
from ahl.core.provenance import sha256_file
from ahl.deploy.images import as_images
from ahl.evaluation.decision import borderline, checked_threshold, decide

METADATA = "metadata.json"  # as ahl/deploy/export.py writes it
FORMAT_VERSION = 2  # of metadata.json: 2 added the provenance, the calibration, the tolerance, outputs by name
MODEL_FILES = {"onnx": ("model.onnx",), "openvino": ("model.xml", "model.bin")}
OUTPUTS = ("score", "head_scores", "anomaly_map")  # the graph's outputs, read by these names
KEYS = ("format_version", "format", "model", "image_size", "outputs", "head_names", "threshold", "decision",
        "tolerance", "files")  # fmt: skip
AGAIN = "export the run again with `ahl export`"


@dataclass
class ExportedRun:
    """An export: its metadata and ``run``, the model on its runtime (uint8 images -> {output name: array})."""

    run: Callable[[np.ndarray], dict[str, np.ndarray]]
    metadata: dict
    folder: Path

    @property
    def size(self) -> int:
        return int(self.metadata["image_size"])

    @property
    def model(self) -> str:
        """The exported model: base or ahl."""
        return self.metadata["model"]

    @property
    def head_names(self) -> tuple[str, ...]:
        return tuple(self.metadata["head_names"])

    @property
    def threshold(self) -> float | None:
        return checked_threshold(self.metadata["threshold"], f"{self.folder / METADATA}: threshold", AGAIN)

    @property
    def tolerance(self) -> float:
        """The largest lab/line score difference this export allows for (its metadata's, measured at export)."""
        return float(self.metadata["tolerance"])

    def decide(self, scores: np.ndarray) -> np.ndarray | None:
        """``score > threshold`` per image, as calibrate chose it; None when the run had no threshold."""
        return decide(scores, self.threshold)

    def borderline(self, scores: np.ndarray) -> np.ndarray | None:
        """Per image: its score lies within the export's tolerance of the threshold (None without one)."""
        return borderline(scores, self.threshold, self.tolerance)

    def score(self, images: np.ndarray | Sequence[str | Path], batch_size: int = 32) -> dict[str, np.ndarray]:
        """{score (N,), head_scores (N, heads), anomaly_map (N, S, S)} of RGB images (N, S, S, 3) (uint8, or
        floats in [0, 1]) or of image files (read and resized as the stages read them)."""
        images = as_images(images, self.size)
        parts = [self.run(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
        if not parts:
            n_heads = len(self.head_names)
            return {"score": np.zeros(0, np.float32), "head_scores": np.zeros((0, n_heads), np.float32),
                    "anomaly_map": np.zeros((0, self.size, self.size), np.float32)}  # fmt: skip
        return {name: np.concatenate([p[name] for p in parts]) for name in OUTPUTS}


def _metadata(folder: Path) -> dict:
    meta_file = folder / METADATA
    if not meta_file.is_file():
        raise UserError(f"{folder} holds no {METADATA}: it is not an export of this project; {AGAIN}")
    try:
        metadata = json.loads(meta_file.read_text())
        missing = [k for k in KEYS if k not in metadata]
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        raise UserError(f"{meta_file} is corrupt ({type(exc).__name__}: {exc}); {AGAIN}") from None
    if missing:
        raise UserError(f"{meta_file} lacks {', '.join(missing)} (not written by `ahl export` of this version); {AGAIN}")
    if metadata["format_version"] != FORMAT_VERSION or sorted(metadata["outputs"]) != sorted(OUTPUTS):
        raise UserError(f"{meta_file}: an export of another version (format_version {metadata['format_version']!r}); "
                        f"{AGAIN}")  # fmt: skip
    if metadata["format"] not in MODEL_FILES:
        raise UserError(f"{meta_file}: unknown format {metadata['format']!r}; {AGAIN}")
    return metadata


def _check_files(folder: Path, metadata: dict) -> list[Path]:
    """The model files, each present and with the sha256 the metadata recorded when it was written."""
    files = [folder / name for name in MODEL_FILES[metadata["format"]]]
    for path in files:
        if not path.is_file():
            raise UserError(f"{path} is missing ({METADATA} names a {metadata['format']} export); {AGAIN}")
        if sha256_file(path) != metadata["files"].get(path.name):
            raise UserError(
                f"{path} does not match {folder / METADATA} (another sha256): the file is corrupt or truncated, or "
                f"the two come from different exports; {AGAIN}"
            )
    return files


def _onnxruntime(files: list[Path], device: str, threads: int | None) -> tuple[Callable, list]:
    try:
        import onnxruntime
    except ImportError:
        raise UserError("onnxruntime is not installed: pip install onnxruntime (or pip install '.[deploy]')") from None
    providers = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
    if device not in providers:
        raise UserError(f"device {device!r}: an ONNX export runs on cpu or cuda")
    try:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or 0  # 0: onnxruntime's default (the physical cores)
        session = onnxruntime.InferenceSession(str(files[0]), options, providers=providers[device])
    except Exception as exc:  # onnxruntime raises its own types (InvalidProtobuf, Fail, ...)
        raise UserError(f"{files[0]} cannot be loaded by onnxruntime ({' '.join(str(exc).split())[:200]})") from None
    return (lambda x: dict(zip(OUTPUTS, session.run(list(OUTPUTS), {"images": x})))), session.get_inputs()[0].shape


def _openvino(files: list[Path], device: str, threads: int | None) -> tuple[Callable, list]:
    try:
        import openvino
    except ImportError:
        raise UserError("openvino is not installed: pip install openvino (or pip install '.[deploy]')") from None
    try:
        # float32 as exported: OpenVINO's CPU plugin would otherwise compute in bfloat16 where the CPU has it
        config = {"INFERENCE_PRECISION_HINT": "f32"} | ({"INFERENCE_NUM_THREADS": threads} if threads else {})
        compiled = openvino.Core().compile_model(str(files[0]), device.upper(), config)
    except Exception as exc:  # openvino raises RuntimeError with its own text
        raise UserError(f"{files[0]} cannot be loaded by OpenVINO ({' '.join(str(exc).split())[:200]})") from None
    request = compiled.create_infer_request()
    shape = [d.get_length() if d.is_static else None for d in compiled.input(0).get_partial_shape()]

    def run(x: np.ndarray) -> dict[str, np.ndarray]:
        result = request.infer({"images": x})
        return {name: np.array(result[compiled.output(name)]) for name in OUTPUTS}

    return run, shape


def load_exported(path: str | Path, device: str = "cpu", threads: int | None = None) -> ExportedRun:
    """The export in folder ``path`` (or named by one of its files) on its runtime: onnxruntime for model.onnx,
    OpenVINO for model.xml; ``device``: cpu (default), cuda (onnxruntime) or an OpenVINO device (gpu, npu);
    ``threads``: the runtime's intra-op threads (default: its own choice)."""
    path = Path(path)
    folder = path.parent if path.is_file() else path
    metadata = _metadata(folder)
    files = _check_files(folder, metadata)
    run, shape = (_onnxruntime if metadata["format"] == "onnx" else _openvino)(files, device.lower(), threads)
    size = metadata["image_size"]
    if list(shape[1:]) != [size, size, 3]:
        raise UserError(f"{files[0]} takes images of shape {shape}, but {METADATA} says {size} x {size} x 3; {AGAIN}")
    return ExportedRun(run, metadata, folder)
