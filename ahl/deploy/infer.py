"""`ahl infer`: score new images with an exported run (`ahl export`) -> predictions.csv, heatmaps; no torch.

    ahl infer IMAGE|FOLDER|GLOB ... [--export deploy] [--out predictions.csv] [--heatmaps DIR] [--threshold T]

The inspection machine's `ahl predict`: the same inputs, the same checks that no output overwrites an input, the
same CSV (path, score, is_anomaly, threshold, the model's score and head scores, heatmap, error) and heatmaps, from
model.onnx (onnxruntime) or model.xml (OpenVINO) and metadata.json. Needs numpy, Pillow, pandas, matplotlib and a
runtime (`pip install '.[deploy]'`), never torch, timm or dvc.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from ahl.deploy.exported import ExportedRun, load_exported
from ahl.deploy.files import (
    batches,
    caption,
    check_outputs,
    command_parser,
    heatmap_names,
    resolve_inputs,
    run_command,
    write_heatmap,
    write_predictions,
)
from ahl.evaluation.decision import checked_threshold

log = logging.getLogger("ahl.deploy.infer")


def resized(heat: np.ndarray) -> Callable[[tuple[int, int]], np.ndarray]:
    """``heat`` (S, S) as a function of the image's (H, W): bilinear, as Pillow resizes a float image."""
    return lambda size: np.asarray(Image.fromarray(heat.astype(np.float32), "F").resize(size[::-1], Image.BILINEAR))


def score_files(run: ExportedRun, paths: list[Path], batch_size: int, max_pixels: int | None):
    """Rows (path, score_<model>, <model>_<head>...) of the readable files, their maps (S, S), and {file: reason}."""
    rows, maps, errors = [], {}, {}
    key = run.model
    for images, ok, _ in batches(paths, run.size, batch_size, max_pixels, errors):
        if ok:
            out = run.score(images, batch_size)
            for i, path in enumerate(ok):
                heads = {f"{key}_{name}": float(out["head_scores"][i, j]) for j, name in enumerate(run.head_names)}
                rows.append({"path": str(path), f"score_{key}": float(out["score"][i]), **heads})
                maps[path] = out["anomaly_map"][i]
    return rows, maps, errors


def infer(args: argparse.Namespace):
    """Everything `ahl infer` does; returns the table it wrote."""
    paths = resolve_inputs(args.inputs)
    check_outputs(args.inputs, paths, Path(args.out), Path(args.heatmaps) if args.heatmaps else None)
    run = load_exported(args.export, args.device)
    given = checked_threshold(args.threshold, "--threshold", "give a score, e.g. --threshold 1.5")
    threshold = given if given is not None else run.threshold
    if threshold is None:
        log.warning("the export has no threshold (the run had no validation slice): is_anomaly is left empty")
    log.info("%d images, %s (%s), threshold %s", len(paths), run.metadata.get("model_name"), run.folder, threshold)
    rows, maps, errors = score_files(run, paths, args.batch_size, args.max_pixels)
    names = {p: Path(args.heatmaps) / n for p, n in heatmap_names(list(maps)).items()} if args.heatmaps else None
    for row in rows if names else ():
        path = Path(row["path"])
        write_heatmap(names[path], path, resized(maps[path]), caption(run.model, row[f"score_{run.model}"], threshold))
    columns = [f"score_{run.model}", *(f"{run.model}_{h}" for h in run.head_names)]
    return write_predictions(args.out, rows, columns, run.model, threshold, run.tolerance, errors, paths, names)


def parser() -> argparse.ArgumentParser:
    p = command_parser("ahl infer", __doc__)
    p.add_argument("--export", default="deploy", help="the folder `ahl export` wrote (default: deploy)")
    p.add_argument("--threshold", type=float, help="decision threshold on the score (default: the export's)")
    p.add_argument("--device", default="cpu", help="cpu (default); cuda (onnxruntime-gpu); an OpenVINO device")
    return p


def main(argv: list[str] | None = None) -> None:
    run_command(parser(), infer, argv)


if __name__ == "__main__":
    main()
