"""`ahl export`: a trained run -> a self-contained ONNX or OpenVINO model and its metadata, for inference without
torch.

The graph holds everything the scoring object does for one model (base, or AHL on the base model's features):
uint8 RGB images (B, S, S, 3) in, scaled to [0, 1]; the backbone; for AHL the features rounded to the feature
cache's dtype; the heads with the mean normal feature they compare with; the final score, each head's score and
the anomaly map at the input size out. The graph wraps the lab's own code: the backbone's ``multiscale`` and
``score_heads`` (ahl/method/forward.py), which owns the rounding, so the line computes what the lab does.
``metadata.json`` (docs/deployment.md lists its fields) records everything the line needs to decide as the lab did
and to trace where it came from; ``ahl.deploy.exported.load_exported`` reads both, with onnxruntime or OpenVINO
and no torch. OpenVINO's IR is converted from the ONNX graph by OpenVINO's own converter.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from ahl import __version__
from ahl.core import provenance
from ahl.core.console import setup_logging
from ahl.core.errors import UserError
from ahl.core.io import atomic_dir, read_json, write_json
from ahl.core.layout import AHL, BASE, DATA, SPLIT, THRESHOLDS
from ahl.data.mvtec import load_images
from ahl.data.protocol import Split
from ahl.deploy.exported import FORMAT_VERSION, METADATA, MODEL_FILES, OUTPUTS, load_exported
from ahl.deploy.files import optional_input
from ahl.evaluation.decision import DECISION, tolerance_for
from ahl.evaluation.localize import upsample
from ahl.evaluation.scorer import Scorer
from ahl.method.forward import score_heads
from ahl.models.backbones import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

OPSET = 18
CHECK_IMAGES = 8  # seeded images the export is scored on, by torch and by its runtime, to measure its tolerance
RUN_IMAGES = 32  # at most this many of the run's own validation and test images, scored too


class ExportedScorer(torch.nn.Module):
    """One model of a run as a graph: uint8 (B, S, S, 3) -> (score (B,), head scores (B, heads), map (B, S, S))."""

    def __init__(self, scorer: Scorer, model: str):
        super().__init__()
        self.network = scorer.base.model
        self.heads = scorer.base.model.heads if model == "base" else scorer.ahl
        self.feature_dtype = scorer.feature_dtype_of(model)
        self.size = scorer.size
        for s, m in enumerate(scorer.base.normal_mean):
            self.register_buffer(f"normal_mean_{s}", m.detach().float().clone())
        self.n_scales = len(scorer.base.normal_mean)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = images.permute(0, 3, 1, 2).float() / 255.0  # ahl.models.backbones.to_input
        features = self.network.features(x)
        mean = [getattr(self, f"normal_mean_{s}") for s in range(self.n_scales)]
        scored = score_heads(self.heads, features, mean, feature_dtype=self.feature_dtype)
        return scored.final, scored.per_head, upsample(scored.maps, (self.size, self.size))


def _check_out(out: Path) -> None:
    """The output folder is replaced as a whole: refuse one that holds anything but an earlier export."""
    if out.is_file():
        raise UserError(f"--out {out} is a file; name a folder for the exported model")
    if out.is_dir() and any(out.iterdir()) and not (out / METADATA).is_file():
        raise UserError(f"--out {out} is a folder that holds other files (no {METADATA}); name a new or empty folder")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def metadata_of(scorer: Scorer, model: str, fmt: str, checkpoints: dict) -> dict:
    """Everything the line needs to decide as the lab did, and to trace where it came from (docs/deployment.md)."""
    heads = scorer.base.model.heads if model == "base" else scorer.ahl
    backbone = dict(scorer.base.meta["backbone"])
    entry = scorer.thresholds.get(model) if scorer.thresholds else None
    calibration = None
    if isinstance(entry, dict):
        calibration = {k: entry.get(k) for k in ("rule", "target_fpr", "firmness")}
        calibration["validation"] = {k: (entry.get("validation") or {}).get(k) for k in ("normal", "anomaly")}
        calibration["runtime"] = scorer.thresholds.get("runtime")
    return {
        "format_version": FORMAT_VERSION,
        "format": fmt,
        "ahl_version": __version__,
        "model": model,
        "model_name": scorer.names[model],
        "classname": scorer.base.meta.get("classname"),
        "image_size": scorer.size,
        "input": {"name": "images", "layout": "NHWC", "dtype": "uint8", "channels": "RGB"},
        "preprocessing": {
            "read": "Pillow: 8-bit RGB (grey replicated), resized to image_size x image_size with Pillow's bilinear "
            "filter when its size differs (ahl.data.mvtec.load_image); the graph takes the result",
            "scale": "x / 255",
            "normalisation": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
            "scales": f"scale s at image_size / 2**s by ahl.models.backbones.downscale ({backbone.get('resize')})",
        },
        "backbone": backbone,
        "feature_dtype": scorer.feature_dtype_of(model) or "float32",
        "outputs": list(OUTPUTS),
        "head_names": list(heads.head_names),
        "threshold": scorer.threshold(model),
        "decision": DECISION,
        "calibration": calibration,
        "exporter": {"opset": OPSET, "torch": torch.__version__, "onnx": _version("onnx"),
                     "onnxscript": _version("onnxscript"), "openvino": _version("openvino") if fmt == "openvino" else None},  # fmt: skip
        "inputs": provenance.inputs(**checkpoints),
    }


def export(
    scorer: Scorer, out: str | Path, *, fmt: str = "onnx", model: str | None = None, checkpoints: dict | None = None,
    images: tuple[np.ndarray, str] | None = None,
) -> Path:  # fmt: skip
    """Write ``out/model.onnx`` (or model.xml + model.bin) and ``out/metadata.json`` atomically, as one folder, for
    ``model`` (default: AHL when trained, else the base model); ``checkpoints``: {name: path} of the files the
    run was loaded from (base, ahl, thresholds), whose sha256 the metadata records; ``images``: (uint8 images,
    what they are) scored by torch and the runtime, with seeded noise, to measure the export's tolerance
    (``run_images`` gives the run's own). Returns the model file."""
    if fmt not in MODEL_FILES:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(MODEL_FILES)}")
    model = model or scorer.models[-1]
    if model not in scorer.models:
        raise UserError(f"--model {model}: this run has {' and '.join(scorer.models)} only")
    factor = 2 ** (scorer.base.model.n_scales - 1)
    if scorer.size % factor:
        raise UserError(f"the run's image size {scorer.size} is not a multiple of {factor} (2 ** (n_scales - 1)): "
                        "its smaller scales cannot be resized exactly in the graph; retrain at a multiple of it")  # fmt: skip
    out = Path(out)
    _check_out(out)
    graph = ExportedScorer(scorer, model).eval()
    metadata = metadata_of(scorer, model, fmt, checkpoints or {})
    with atomic_dir(out) as tmp:
        _write_onnx(graph, tmp / "model.onnx", scorer.size)
        if fmt == "openvino":
            _onnx_to_openvino(tmp / "model.onnx", tmp / "model.xml")
        metadata["files"] = provenance.inputs(**{name: tmp / name for name in MODEL_FILES[fmt]})
        floor = tolerance_for(scorer.feature_dtype_of(model))
        metadata["tolerance"], metadata["tolerance_measured"] = floor, None
        write_json(tmp / METADATA, metadata)
        rng = np.random.default_rng(0)
        noise = rng.integers(0, 256, (CHECK_IMAGES, scorer.size, scorer.size, 3), dtype=np.uint8)
        check, what = (np.concatenate([images[0], noise]), f"{images[1]} and {CHECK_IMAGES} seeded noise images"
                       ) if images is not None and len(images[0]) else (noise, f"{CHECK_IMAGES} seeded noise images")  # fmt: skip
        measured = _measure(scorer, model, tmp, floor, check)
        if measured is not None:
            metadata["tolerance"] = max(floor, 2 * measured)
            metadata["tolerance_measured"] = {"max_abs_difference": measured, "images": what,
                                              "runtime": _version("onnxruntime" if fmt == "onnx" else "openvino")}  # fmt: skip
            write_json(tmp / METADATA, metadata)
    log.info("exported %s (%s) to %s", scorer.names[model], fmt, out)
    return out / MODEL_FILES[fmt][0]


def run_images(scorer: Scorer, limit: int = RUN_IMAGES) -> tuple[np.ndarray, str] | None:
    """Up to ``limit`` of the run's own validation and test images (data/split.json of the project in the working
    directory, spread over the list so that normals and anomalies are both in), at the run's size: what a line
    will see, for the export to measure its tolerance on. None when the project holds no split, not the split the
    base model was trained on (its checkpoint records the split's sha256), or not its images."""
    if not Path(SPLIT).is_file() or provenance.sha256_file(SPLIT) != scorer.base.meta.get("inputs", {}).get("split"):
        return None
    try:
        split = Split.from_dict(read_json(SPLIT))
    except (UserError, ValueError, KeyError, TypeError):
        return None
    files = [s.file for s in [*split.validation, *split.test]]
    root = Path(DATA) / split.classname
    if not files or not all((root / f).is_file() for f in files):
        return None
    files = [files[k] for k in sorted(set(np.linspace(0, len(files) - 1, min(limit, len(files))).astype(int)))]
    return load_images(root, files, scorer.size), f"{len(files)} of {SPLIT}'s validation and test images"


def _measure(scorer: Scorer, model: str, folder: Path, floor: float, images: np.ndarray) -> float | None:
    """The largest |score difference| between the scorer (float32, CPU) and the export on its runtime, over
    ``images``; a runtime that computes the graph otherwise than torch fails the export here. None (the
    tolerance stays ``floor``) when the scorer computes otherwise (bfloat16, a GPU) or the runtime is not
    installed here."""
    if scorer.runtime.describe()["device"] != "cpu" or scorer.runtime.dtype is not None:
        log.warning("the export's tolerance was not measured: the run is loaded on %s", scorer.runtime.describe())
        return None
    try:
        line = load_exported(folder)
    except UserError as exc:
        log.warning("the export's tolerance was not measured (%s)", exc)
        return None
    lab = scorer.score_images(images, CHECK_IMAGES, [model]).final[model]
    measured = float(np.abs(lab.astype(np.float64) - line.score(images)["score"]).max())
    if measured > 10 * floor:
        raise UserError(f"the exported model's scores differ from the lab's by up to {measured:.3g} on "
                        f"{len(images)} test images (more than 10 x {floor:g}): this runtime does not compute the "
                        "graph as torch does")  # fmt: skip
    return measured


@torch.no_grad()
def _write_onnx(graph: ExportedScorer, path: Path, size: int) -> None:
    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.onnx.export(
        graph, (example,), str(path), input_names=["images"], output_names=list(OUTPUTS),
        dynamic_shapes={"images": {0: batch}}, opset_version=OPSET, dynamo=True, external_data=False, verbose=False,
    )  # fmt: skip


def _onnx_to_openvino(onnx: Path, xml: Path) -> None:
    """The ONNX graph converted by OpenVINO's own converter to its IR (model.xml + model.bin), weights in float32."""
    try:
        import openvino
    except ImportError:
        raise UserError("--format openvino needs openvino: pip install openvino") from None
    openvino.save_model(openvino.convert_model(str(onnx)), str(xml), compress_to_fp16=False)
    onnx.unlink()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ahl export", description=__doc__.split("\n\n")[0])
    p.add_argument("--format", default="onnx", choices=tuple(MODEL_FILES),
                   help="onnx (model.onnx, for onnxruntime) or openvino (model.xml + model.bin)")  # fmt: skip
    p.add_argument("--out", default="deploy", help="the folder for the model and metadata.json (default: deploy)")
    p.add_argument("--model", choices=("base", "ahl"), help="which model decides (default: ahl when trained)")
    p.add_argument("--base", default=BASE, help=f"the base model (default: {BASE})")
    p.add_argument("--ahl", help=f"AHL's heads (default: {AHL}, skipped when it does not exist)")
    p.add_argument("--thresholds", help=f"the thresholds (default: {THRESHOLDS}, skipped when it does not exist)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        ahl = optional_input(args.ahl, AHL, "--ahl")
        thresholds = optional_input(args.thresholds, THRESHOLDS, "--thresholds")
        files = {"base": args.base} | ({"ahl": ahl} if ahl else {}) | ({"thresholds": thresholds} if thresholds else {})
        scorer = Scorer.load(args.base, ahl, thresholds=thresholds)
        path = export(scorer, args.out, fmt=args.format, model=args.model, checkpoints=files,
                      images=run_images(scorer))  # fmt: skip
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    if ahl is None:
        log.warning("%s does not exist: exported the base model alone", AHL)
    if thresholds is None:
        log.warning("%s does not exist: the export has no threshold (run `dvc repro calibrate`)", THRESHOLDS)
    print(path)


if __name__ == "__main__":
    main()
