"""`ahl export`: a trained run -> a self-contained ONNX or OpenVINO model and its metadata, for inference without
torch.

The graph holds everything the scoring object does for one model (base, or AHL on the base model's features):
uint8 RGB images (B, S, S, 3) in, scaled to [0, 1]; the backbone; for AHL the features rounded to the feature
cache's dtype, as evaluate and predict round them; the heads with the mean normal feature they compare with; the
final score, each head's score and the anomaly map at the input size out. ``metadata.json`` carries the image
size, the layout, the threshold and its rule, the output names, the sha256 of the checkpoints and of the model
files, so that the line decides as the lab did (``ahl.deploy.exported.load_exported`` reads both, with onnxruntime
or OpenVINO and no torch). OpenVINO's IR is converted from the ONNX graph by OpenVINO's own converter.
"""

from __future__ import annotations

import argparse
import functools
import logging
from pathlib import Path

import torch

from ahl import __version__
from ahl.core import provenance
from ahl.core.errors import UserError
from ahl.core.io import atomic_dir, write_json
from ahl.deploy.exported import METADATA, MODEL_FILES
from ahl.evaluation.localize import upsample
from ahl.evaluation.scorer import Scorer
from ahl.method.forward import forward

log = logging.getLogger(__name__)

OUTPUTS = ("score", "head_scores", "anomaly_map")
OPSET = 18


class ExportedScorer(torch.nn.Module):
    """One model of a run as a graph: uint8 (B, S, S, 3) -> (score (B,), head scores (B, heads), map (B, S, S))."""

    def __init__(self, scorer: Scorer, model: str):
        super().__init__()
        self.network = scorer.base.model
        self.heads = scorer.base.model.heads if model == "base" else scorer.ahl
        self.round_to = getattr(torch, scorer.feature_dtype) if model == "ahl" else None
        self.size = scorer.size
        for s, m in enumerate(scorer.base.normal_mean):
            self.register_buffer(f"normal_mean_{s}", m.detach().float().clone())
        self.n_scales = len(scorer.base.normal_mean)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = images.permute(0, 3, 1, 2).float() / 255.0
        net = self.network
        features = [net.backbone(downscale(x, 2**s, net.resize)) for s in range(net.n_scales)]
        if self.round_to is not None:  # AHL's heads saw the cached features: rounded to the cache's dtype
            features = [f.to(self.round_to).float() for f in features]
        mean = (
            [getattr(self, f"normal_mean_{s}") for s in range(self.n_scales)] if self.heads.uses_normal_mean else None
        )
        weights = dict(self.heads.named_parameters())
        per_head = forward(self.heads, weights, dict(self.heads.named_buffers()), features, mean).float()
        maps = self.heads.patch_maps(features[0], mean[0] if mean is not None else None)
        return self.heads.final_score(per_head), per_head, upsample(maps, (self.size, self.size))


def multiscale_input(images: torch.Tensor, size: int, resize: str) -> torch.Tensor:
    if resize == "nearest":
        return torch.nn.functional.interpolate(images, size=(size, size), mode="nearest")
    return torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", antialias=True)


def downscale(images: torch.Tensor, factor: int, resize: str) -> torch.Tensor:
    """``images`` (B, C, S, S) at S / factor, as the backbone's smaller scales make them (ahl/models/backbones.py
    multiscale), in ops every runtime computes alike: antialiased bilinear as a depthwise convolution with the
    triangle filter torch uses (renormalised at the borders), nearest as every factor-th pixel. OpenVINO's own
    antialiased resize gives other values."""
    if factor == 1:
        return images
    size = images.shape[-1]
    if size % factor:  # not a whole factor (no configuration of this project): torch's own resize
        return multiscale_input(images, size // factor, resize)
    if resize == "nearest":
        return images[..., ::factor, ::factor]
    taps = torch.arange(2 * factor, dtype=torch.float32)
    weights = 1 - (taps + 0.5 - factor).abs() / factor
    kernel = (weights[:, None] * weights[None, :]).expand(images.shape[1], 1, -1, -1).contiguous()
    conv = functools.partial(torch.nn.functional.conv2d, stride=factor, padding=factor // 2, groups=images.shape[1])
    return conv(images, kernel) / conv(torch.ones_like(images[:1]), kernel)


def _check_out(out: Path) -> None:
    """The output folder is replaced as a whole: refuse one that holds anything but an earlier export."""
    if out.is_file():
        raise UserError(f"--out {out} is a file; name a folder for the exported model")
    if out.is_dir() and any(out.iterdir()) and not (out / METADATA).is_file():
        raise UserError(f"--out {out} is a folder that holds other files (no {METADATA}); name a new or empty folder")


def export(
    scorer: Scorer, out: str | Path, *, fmt: str = "onnx", model: str | None = None, checkpoints: dict | None = None
) -> Path:
    """Write ``out/model.onnx`` and ``out/metadata.json`` (atomically, as one folder) for ``model`` (default: AHL
    when trained, else the base model); ``checkpoints``: {name: path} of the files the run was loaded from, whose
    sha256 the metadata records. Returns the model file."""
    if fmt not in MODEL_FILES:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(MODEL_FILES)}")
    model = model or scorer.models[-1]
    if model not in scorer.models:
        raise UserError(f"--model {model}: this run has {' and '.join(scorer.models)} only")
    heads = scorer.base.model.heads if model == "base" else scorer.ahl
    out = Path(out)
    _check_out(out)
    graph = ExportedScorer(scorer, model).eval()
    metadata = {
        "format": fmt,
        "ahl_version": __version__,
        "model": model,
        "model_name": scorer.names[model],
        "image_size": scorer.size,
        "input": {"name": "images", "layout": "NHWC", "dtype": "uint8", "channels": "RGB"},
        "outputs": list(OUTPUTS),
        "head_names": list(heads.head_names),
        "threshold": scorer.threshold(model),
        "rule": "is_anomaly = score > threshold",
        "inputs": provenance.inputs(**(checkpoints or {})),
    }
    with atomic_dir(out) as tmp:
        _write_onnx(graph, tmp / "model.onnx", scorer.size)
        if fmt == "openvino":
            _onnx_to_openvino(tmp / "model.onnx", tmp / "model.xml")
        metadata["files"] = provenance.inputs(**{name: tmp / name for name in MODEL_FILES[fmt]})
        write_json(tmp / METADATA, metadata)
    log.info("exported %s (%s) to %s", scorer.names[model], fmt, out)
    return out / MODEL_FILES[fmt][0]


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
    p.add_argument(
        "--format", default="onnx", help="onnx (model.onnx, for onnxruntime) or openvino (model.xml + model.bin)"
    )
    p.add_argument("--out", default="deploy", help="the folder for the model and metadata.json (default: deploy)")
    p.add_argument("--model", choices=("base", "ahl"), help="which model decides (default: ahl when trained)")
    p.add_argument("--base", default="models/base.pt")
    p.add_argument("--ahl", default="models/ahl.pt", help="AHL's heads (skipped when the file does not exist)")
    p.add_argument("--thresholds", default="models/thresholds.json", help="(skipped when it does not exist)")
    return p


def main(argv: list[str] | None = None) -> None:
    import sys

    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        files = {"base": args.base} | ({"ahl": args.ahl} if Path(args.ahl).is_file() else {})
        thresholds = args.thresholds if Path(args.thresholds).is_file() else None
        scorer = Scorer.load(files["base"], files.get("ahl"), thresholds=thresholds)
        path = export(scorer, args.out, fmt=args.format, model=args.model, checkpoints=files)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(path)


if __name__ == "__main__":
    main()
