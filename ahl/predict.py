"""`ahl predict`: score new images with a trained run's base model and AHL heads -> predictions.csv, heatmaps.

    ahl predict IMAGE|FOLDER|GLOB ... [--out predictions.csv] [--heatmaps DIR] [--threshold T] [--device auto]

The AHL heads run on the frozen base model's features rounded to the feature cache's dtype, exactly as the
features and evaluate stages compute them, so a test image gets the score evaluate wrote in results/scores.csv.
Unreadable files are listed (a row with an ``error`` and a warning) and skipped; outputs are written atomically.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from ahl import provenance
from ahl.backbones import to_input
from ahl.data.mvtec import CORRUPT_FIX, IMAGE_SUFFIXES, load_image, to_8bit
from ahl.errors import UserError
from ahl.features import as_cached
from ahl.io import atomic_path, read_json
from ahl.localize import PatchMaps, overlay, patch_maps, upsample
from ahl.model import load_checkpoint, load_heads
from ahl.console import setup_logging, show_progress
from ahl.runtime import resolve_device

log = logging.getLogger("ahl.predict")
BASE, AHL, THRESHOLDS = "models/base.pt", "models/ahl.pt", "models/thresholds.json"


def resolve_inputs(inputs: list[str]) -> list[Path]:
    """Image files named by the arguments: files, folders (their images, recursively) or glob patterns; sorted per
    argument, duplicates dropped. A path that does not exist or a pattern that matches nothing is an error."""
    found: dict[Path, None] = {}
    for arg in inputs:
        path = Path(arg)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise UserError(f"folder {arg} holds no images ({', '.join(IMAGE_SUFFIXES)}); name another folder")
        elif path.is_file():
            files = [path]
        elif glob.has_magic(arg):
            files = sorted(Path(p) for p in glob.glob(arg, recursive=True) if Path(p).is_file())
            if not files:
                raise UserError(f"the pattern {arg!r} matches no files; check it (quote it so the shell leaves it)")
        else:
            raise UserError(f"no such file or folder: {arg}; give images, folders of images or a glob pattern")
        found.update(dict.fromkeys(files))
    return list(found)


@dataclass
class Predictor:
    """A trained run: the base model (backbone + heads) and, when given, AHL's heads on its features."""

    ckpt: object  # ahl.model.Checkpoint
    ahl: torch.nn.Module | None
    feature_dtype: str
    device: torch.device

    @classmethod
    def load(cls, base: Path, ahl: Path | None, device: torch.device) -> Predictor:
        ckpt = load_checkpoint(base, device)
        heads, dtype = None, "float32"
        if ahl is not None:
            heads, meta = load_heads(ahl)
            provenance.check(ahl, meta.get("inputs"), "python stages/train_ahl.py", base=base)
            dtype = meta.get("feature_dtype", "float16")
            if "feature_dtype" not in meta:
                log.warning("%s does not record its feature dtype (an older run): assuming float16", ahl)
            heads.to(device).eval()
        return cls(ckpt, heads, dtype, device)

    @property
    def size(self) -> int:
        return self.ckpt.meta["backbone"]["image_size"]

    def columns(self) -> list[str]:
        models = {"base": self.ckpt.model.heads, **({"ahl": self.ahl} if self.ahl is not None else {})}
        return [f"score_{k}" for k in models] + [f"{k}_{h}" for k, m in models.items() for h in m.head_names]

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, PatchMaps]]:
        """uint8 images (B, S, S, 3) -> (columns of scores, patch maps per model)."""
        model, reference = self.ckpt.model, self.ckpt.reference
        feats = model.features(to_input(images, self.device))
        out, maps = {}, {}
        models = {"base": (model.heads, feats)}
        if self.ahl is not None:
            models["ahl"] = (self.ahl, as_cached(feats, self.feature_dtype))  # as the cache holds them
        for key, (heads, f) in models.items():
            per_head = heads(f, reference if heads.uses_reference else None).float()
            out[f"score_{key}"] = heads.final_score(per_head).cpu().numpy()
            for j, name in enumerate(heads.head_names):
                out[f"{key}_{name}"] = per_head[:, j].cpu().numpy()
            maps[key] = [m.cpu() for m in patch_maps(heads, f, reference)]
        return out, maps


def read_batch(paths: list[Path], size: int) -> tuple[np.ndarray, list[Path], dict[Path, str]]:
    """Load images as the stages do (RGB, bilinear to ``size``); unreadable ones -> {path: reason}."""
    images, ok, errors = [], [], {}
    for path in paths:
        try:
            images.append(load_image(path, size))
            ok.append(path)
        except UserError as exc:
            errors[path] = str(exc).replace(f"; {CORRUPT_FIX}", "")
    return np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8), ok, errors


def choose_threshold(model: str, threshold: float | None, thresholds: Path) -> tuple[float | None, str]:
    """The decision threshold of ``model`` (base or ahl) and where it came from: --threshold, else the file the
    pipeline writes (``{"base": {"threshold": t, ...}, "ahl": {...}}``), else none (is_anomaly left empty)."""
    if threshold is not None:
        return threshold, "--threshold"
    if not thresholds.is_file():
        return None, f"none ({thresholds} not found)"
    try:
        value = read_json(thresholds)[model]["threshold"]
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{thresholds} has no threshold for {model!r} ({exc}); rerun the pipeline or give --threshold")
    if not isinstance(value, (int, float)) or not np.isfinite(value):
        raise UserError(f"{thresholds}: {model}.threshold = {value!r} is not a number; rerun the pipeline")
    return float(value), str(thresholds)


def heatmap_names(paths: list[Path]) -> dict[Path, Path]:
    """Where each image's heatmap goes, relative to the heatmap folder: its path below the inputs' common folder,
    as .png (a name taken twice, e.g. a.png and a.jpg, keeps its suffix: a.jpg.png)."""
    if not paths:
        return {}
    root = Path(os.path.commonpath([p.resolve().parent for p in paths]))
    names = {p: p.resolve().relative_to(root).with_suffix(".png") for p in paths}
    taken = pd.Series([str(n) for n in names.values()]).duplicated(keep=False).to_numpy()
    return {p: n.with_name(p.name + ".png") if dup else n for (p, n), dup in zip(names.items(), taken)}


def write_heatmap(path: Path, image_file: Path, maps: PatchMaps, caption: str) -> None:
    """The overlay of one image at its own size, written atomically."""
    with Image.open(image_file) as im:
        image = np.asarray(to_8bit(im).convert("RGB"))
    heat = upsample(maps, image.shape[:2])[0].numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray(overlay(image, heat, caption)).save(tmp, format="PNG")


def score_files(predictor: Predictor, paths: list[Path], batch_size: int, model: str):
    """Rows of scores (one per readable file), patch maps of ``model`` per file, and {file: reason} for the rest."""
    rows, maps, errors = [], {}, {}
    bar = tqdm(total=len(paths), desc="predict", unit="img", disable=not show_progress())
    for start in range(0, len(paths), batch_size):
        images, ok, bad = read_batch(paths[start : start + batch_size], predictor.size)
        errors.update(bad)
        for reason in bad.values():
            log.warning("skipped %s", reason)
        if ok:
            scores, batch_maps = predictor(images)
            rows += [{"path": str(p), **{k: float(v[i]) for k, v in scores.items()}} for i, p in enumerate(ok)]
            maps.update({p: [m[i : i + 1] for m in batch_maps[model]] for i, p in enumerate(ok)})
        bar.update(len(ok) + len(bad))
    bar.close()
    return rows, maps, errors


def predict(args: argparse.Namespace) -> pd.DataFrame:
    """Everything `ahl predict` does; returns the table it wrote."""
    paths = resolve_inputs(args.inputs)
    try:
        device = resolve_device(args.device)
    except UserError as exc:
        raise UserError(str(exc).replace("params.yaml: device", "--device")) from None
    ahl = Path(args.ahl) if args.model != "base" and (args.model == "ahl" or Path(args.ahl).is_file()) else None
    model = "ahl" if ahl is not None else "base"
    predictor = Predictor.load(Path(args.base), ahl, device)
    threshold, source = choose_threshold(model, args.threshold, Path(args.thresholds))
    log.info("%d images, model %s, threshold %s from %s, %s", len(paths), model, threshold, source, device)
    rows, maps, errors = score_files(predictor, paths, args.batch_size, model)
    table = pd.DataFrame(rows, columns=["path", *predictor.columns()])
    table.insert(1, "score", table[f"score_{model}"])
    table.insert(2, "is_anomaly", (table["score"] > threshold) if threshold is not None else pd.NA)
    table.insert(3, "threshold", threshold)
    if args.heatmaps:
        names = heatmap_names(list(maps))
        for row, (path, m) in tqdm(zip(table.itertuples(), maps.items()), desc="heatmaps", disable=not show_progress()):
            decided = "" if threshold is None else (" anomaly" if row.is_anomaly else " normal")
            write_heatmap(Path(args.heatmaps) / names[path], path, m, f"{model} {row.score:.4g}{decided}")
        table["heatmap"] = [str(Path(args.heatmaps) / names[Path(p)]) for p in table["path"]]
    skipped = pd.DataFrame({"path": [str(p) for p in errors], "error": list(errors.values())})
    table = pd.concat([table.assign(error=""), skipped], ignore_index=True) if errors else table.assign(error="")
    order = {str(p): i for i, p in enumerate(paths)}
    table = table.sort_values("path", key=lambda s: s.map(order), kind="stable").reset_index(drop=True)
    with atomic_path(args.out) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    if errors:
        log.warning(
            "%d of %d files unreadable and skipped (listed in %s with their error)", len(errors), len(paths), args.out
        )
    if not rows:
        raise UserError(f"none of the {len(paths)} files could be read as an image (see {args.out})")
    return table


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ahl predict", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("inputs", nargs="+", help="image files, folders (searched recursively) or glob patterns")
    p.add_argument("--out", default="predictions.csv", help="the CSV written (default: predictions.csv)")
    p.add_argument("--heatmaps", metavar="DIR", help="write a PNG overlay per image into DIR")
    p.add_argument("--base", default=BASE, help=f"the base model (default: {BASE})")
    p.add_argument("--ahl", default=AHL, help=f"AHL's heads (default: {AHL})")
    p.add_argument(
        "--model",
        choices=("auto", "ahl", "base"),
        default="auto",
        help="the model that decides (score, is_anomaly, heatmaps); auto: ahl when --ahl exists, else base",
    )
    p.add_argument("--threshold", type=float, help="decision threshold on the score (overrides --thresholds)")
    p.add_argument(
        "--thresholds", default=THRESHOLDS, help=f"thresholds chosen by the pipeline (default: {THRESHOLDS})"
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (does not change the scores)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        if args.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
        table = predict(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    decided = table["is_anomaly"].dropna()
    print(f"{len(table)} files -> {args.out}: {int(decided.sum())} of {len(decided)} decided anomalous")


if __name__ == "__main__":
    main()
