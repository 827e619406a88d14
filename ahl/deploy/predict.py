"""`ahl predict`: score new images with a trained run's base model and AHL heads -> predictions.csv, heatmaps.

    ahl predict IMAGE|FOLDER|GLOB ... [--out predictions.csv] [--heatmaps DIR] [--threshold T] [--device auto]

Images are scored by the run's scorer (ahl/evaluation/scorer.py), the one calibrate and evaluate use, under the
project's runtime section (params.yaml, when it is there), so a test image gets the score evaluate wrote in
results/scores.csv on every device.
Unreadable files are listed (a row with an ``error`` and a warning) and skipped; outputs are written atomically.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from ahl.core.config import from_params, load_yaml
from ahl.core.console import show_progress
from ahl.core.errors import UserError
from ahl.core.layout import AHL, BASE, THRESHOLDS
from ahl.core.runtime import AUTOCAST, Runtime, RuntimeConfig, configure_tf32, resolve_device
from ahl.data.mvtec import MAX_PIXELS
from ahl.deploy.files import (
    batches,
    caption,
    check_outputs,
    command_parser,
    heatmap_names,
    optional_input,
    resolve_inputs,
    run_command,
    write_heatmap,
    write_predictions,
)
from ahl.evaluation.decision import checked_threshold, tolerance_for
from ahl.evaluation.localize import upsample
from ahl.evaluation.scorer import Scorer

log = logging.getLogger("ahl.deploy.predict")


def choose_threshold(scorer: Scorer, model: str, threshold: float | None, source: str) -> tuple[float | None, str]:
    """The decision threshold of ``model`` (base or ahl) and where it came from: --threshold, else the run's
    thresholds file (read by the scorer through its provenance check), else none (is_anomaly left empty)."""
    if threshold is not None:
        return checked_threshold(threshold, "--threshold", "give a score, e.g. --threshold 1.5"), "--threshold"
    if not scorer.thresholds:
        return None, f"none ({source} not found)"
    if model not in scorer.thresholds:
        raise UserError(f"{source} has no threshold for {model!r}; rerun the pipeline or give --threshold")
    value = scorer.threshold(model)
    return value, source if value is not None else f"none ({source}: no validation slice)"


def score_files(scorer: Scorer, paths: list[Path], batch_size: int, model: str, max_pixels: int | None = MAX_PIXELS):
    """Rows of scores (one per readable file), patch maps of ``model`` per file, and {file: reason} for the rest."""
    rows, maps, errors = [], {}, {}
    bar = tqdm(total=len(paths), desc="predict", unit="img", disable=not show_progress())
    for images, ok, skipped in batches(paths, scorer.size, batch_size, max_pixels, errors):
        if ok:
            scores = scorer.score_images(images, batch_size)
            columns = scores.columns()
            rows += [{"path": str(p), **{k: float(v[i]) for k, v in columns.items()}} for i, p in enumerate(ok)]
            maps.update({p: [m[i : i + 1] for m in scores.maps[model]] for i, p in enumerate(ok)})
        bar.update(len(ok) + skipped)
    bar.close()
    return rows, maps, errors


def runtime_of(args: argparse.Namespace) -> Runtime:
    """--device with the project's runtime section (``--params``, when it exists: the runtime evaluate scored
    with), --autocast and --channels-last overriding it."""
    try:
        device = resolve_device(args.device)
    except UserError as exc:
        raise UserError(str(exc).replace("params.yaml: device", "--device")) from None
    config = RuntimeConfig()
    if Path(args.params).is_file():
        config = from_params(RuntimeConfig, load_yaml(args.params).get("runtime"), "runtime")
    if args.autocast is not None:
        config = replace(config, autocast=args.autocast)
    if args.channels_last is not None:
        config = replace(config, channels_last={"true": True, "false": False}.get(args.channels_last, "auto"))
    runtime = Runtime.resolve(device, config)
    configure_tf32(runtime)
    return runtime


def predict(args: argparse.Namespace) -> pd.DataFrame:
    """Everything `ahl predict` does; returns the table it wrote."""
    paths = resolve_inputs(args.inputs)
    check_outputs(args.inputs, paths, Path(args.out), Path(args.heatmaps) if args.heatmaps else None)
    runtime = runtime_of(args)
    ahl = None if args.model == "base" else optional_input(args.ahl, AHL, "--ahl")
    if args.model == "ahl" and ahl is None:
        raise UserError(f"--model ahl: {AHL} does not exist; train AHL (`dvc repro train_ahl`) or give --ahl")
    model = "ahl" if ahl is not None else "base"
    chosen = optional_input(args.thresholds, THRESHOLDS, "--thresholds")
    read = chosen is not None and args.threshold is None  # --threshold: the file is not read
    scorer = Scorer.load(Path(args.base), ahl, thresholds=chosen if read else None, runtime=runtime)
    threshold, source = choose_threshold(scorer, model, args.threshold, str(chosen or THRESHOLDS))
    log.info("%d images, model %s, threshold %s from %s, %s", len(paths), model, threshold, source, runtime.device)
    rows, maps, errors = score_files(scorer, paths, args.batch_size, model, args.max_pixels)
    names = {p: Path(args.heatmaps) / n for p, n in heatmap_names(list(maps)).items()} if args.heatmaps else None
    scores = {r["path"]: r[f"score_{model}"] for r in rows}
    for path, m in tqdm(maps.items() if names else (), desc="heatmaps", disable=not show_progress()):
        at = caption(model, scores[str(path)], threshold)
        write_heatmap(names[path], path, lambda size, m=m: upsample(m, size)[0].numpy(), at)
    tolerance = tolerance_for(scorer.feature_dtype_of(model))
    return write_predictions(args.out, rows, scorer.columns(), model, threshold, tolerance, errors, paths, names)


def parser() -> argparse.ArgumentParser:
    p = command_parser("ahl predict", __doc__)
    p.add_argument("--base", default=BASE, help=f"the base model (default: {BASE})")
    p.add_argument("--ahl", help=f"AHL's heads (default: {AHL}, skipped when it does not exist)")
    p.add_argument(
        "--model",
        choices=("auto", "ahl", "base"),
        default="auto",
        help="the model that decides (score, is_anomaly, heatmaps); auto: ahl when --ahl exists, else base",
    )
    p.add_argument("--threshold", type=float, help="decision threshold on the score (overrides --thresholds)")
    p.add_argument(
        "--thresholds", help=f"thresholds chosen by the pipeline (default: {THRESHOLDS}, skipped when absent)"
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--params", default="params.yaml", help="the runtime section is read from here when it exists")
    p.add_argument("--autocast", choices=AUTOCAST, help="overrides the params' runtime.autocast (default: auto)")
    p.add_argument(
        "--channels-last", choices=("auto", "true", "false"), help="overrides the params' runtime.channels_last"
    )
    return p


def main(argv: list[str] | None = None) -> None:
    run_command(parser(), predict, argv)


if __name__ == "__main__":
    main()
