"""The files of `ahl predict` and `ahl infer` (no torch here): the inputs (files, folders, globs) and the
outputs that must never overwrite them, images read as the stages read them, heatmap files and predictions.csv."""

from __future__ import annotations

import argparse
import glob
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ahl import __version__
from ahl.core.console import setup_logging
from ahl.core.errors import UserError
from ahl.core.io import atomic_path
from ahl.core.spreadsheet import write_csv
from ahl.data.mvtec import CORRUPT_FIX, IMAGE_SUFFIXES, MAX_PIXELS, load_image, to_8bit
from ahl.evaluation.decision import borderline, decide
from ahl.evaluation.overlay import overlay

log = logging.getLogger("ahl.deploy")


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


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_outputs(inputs: list[str], files: list[Path], out: Path, heatmaps: Path | None) -> None:
    """Refuse, before anything is scored, an output that would overwrite an input or be read as one: --out an
    input image, a folder or inside an input folder; --heatmaps a file, an input folder, inside or around one, or
    a folder where a heatmap would replace an input image. Paths are compared with their links resolved."""
    folders = [Path(a).resolve() for a in inputs if Path(a).is_dir()]
    images = {f.resolve() for f in files}
    target = out.resolve()
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; name the CSV to write, e.g. --out {out / 'predictions.csv'}")
    if not target.parent.is_dir():
        raise UserError(f"--out {out}: the folder {out.parent} does not exist; create it or name another file")
    if target in images or any(_inside(target, f) for f in folders):
        raise UserError(f"--out {out} is an input image or inside an input folder; write the CSV elsewhere")
    if heatmaps is None:
        return
    heat = heatmaps.resolve()
    if heatmaps.exists() and not heatmaps.is_dir():
        raise UserError(f"--heatmaps {heatmaps} is a file; name a folder for the overlays (it is created)")
    if any(_inside(heat, f) or _inside(f, heat) for f in folders) or any(_inside(i, heat) for i in images):
        raise UserError(
            f"--heatmaps {heatmaps} overlaps the inputs (the overlays would replace them or be scored next time); "
            "name a folder outside the input folders"
        )
    if any(heat / name in images for name in heatmap_names(files).values()):
        raise UserError(f"--heatmaps {heatmaps}: an overlay would replace an input image; name another folder")


def read_batch(
    paths: list[Path], size: int, max_pixels: int | None = MAX_PIXELS
) -> tuple[np.ndarray, list[Path], dict[Path, str]]:
    """Load images as the stages do (RGB, bilinear to ``size``); unreadable ones and those above ``max_pixels``
    -> {path: reason}, so that the rest of the batch is scored."""
    images, ok, errors = [], [], {}
    for path in paths:
        try:
            images.append(load_image(path, size, max_pixels))
            ok.append(path)
        except UserError as exc:
            errors[path] = str(exc).replace(f"; {CORRUPT_FIX}", "")
    return np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8), ok, errors



def batches(paths: list[Path], size: int, batch_size: int, max_pixels: int | None, errors: dict[Path, str]):
    """``paths`` read in batches of ``batch_size``: yields (images (N, S, S, 3) uint8, their paths, how many were
    skipped); the skipped ones go into ``errors`` ({path: reason}) with a warning each."""
    for start in range(0, len(paths), batch_size):
        images, ok, bad = read_batch(paths[start : start + batch_size], size, max_pixels)
        errors.update(bad)
        for reason in bad.values():
            log.warning("skipped %s", reason)
        yield images, ok, len(bad)

def heatmap_names(paths: list[Path]) -> dict[Path, Path]:
    """Where each image's heatmap goes, relative to the heatmap folder: its path below the inputs' common folder,
    as .png (a name taken twice, e.g. a.png and a.jpg, keeps its suffix: a.jpg.png)."""
    if not paths:
        return {}
    root = Path(os.path.commonpath([p.resolve().parent for p in paths]))
    names = {p: p.resolve().relative_to(root).with_suffix(".png") for p in paths}
    taken = pd.Series([str(n) for n in names.values()]).duplicated(keep=False).to_numpy()
    return {p: n.with_name(p.name + ".png") if dup else n for (p, n), dup in zip(names.items(), taken)}


def write_heatmap(path: Path, image_file: Path, heat_at: Callable[[tuple[int, int]], np.ndarray], caption: str):
    """The overlay of one image at its own size (``heat_at(size)``: its heatmap at (H, W)), written atomically."""
    with Image.open(image_file) as im:
        image = np.asarray(to_8bit(im).convert("RGB"))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray(overlay(image, heat_at(image.shape[:2]), caption)).save(tmp, format="PNG")


def caption(model: str, score: float, threshold: float | None) -> str:
    """The text drawn on a heatmap: the model, its score and, with a threshold, the decision."""
    decided = "" if threshold is None else (" anomaly" if score > threshold else " normal")
    return f"{model} {score:.4g}{decided}"


def write_predictions(
    out: str | Path, rows: list[dict], columns: list[str], model: str, threshold: float | None, tolerance: float,
    errors: dict[Path, str], paths: list[Path], heatmaps: dict[Path, Path] | None = None,
) -> pd.DataFrame:  # fmt: skip
    """predictions.csv: per readable file its ``rows`` (path + ``columns``) with the deciding ``model``'s score,
    is_anomaly, threshold, borderline (the score within ``tolerance`` of the threshold: a lab/line difference
    could flip the decision) and heatmap, the unreadable ones with their error, in the order of ``paths``; written
    atomically with spreadsheet-safe cells. A warning lists the skipped files; none readable is an error."""
    table = pd.DataFrame(rows, columns=["path", *columns])
    table.insert(1, "score", table[f"score_{model}"])
    table.insert(2, "is_anomaly", decide(table["score"].to_numpy(), threshold) if threshold is not None else pd.NA)
    table.insert(3, "threshold", threshold)
    near = borderline(table["score"].to_numpy(), threshold, tolerance)
    table.insert(4, "borderline", near if near is not None else pd.NA)
    if heatmaps is not None:
        table["heatmap"] = [str(heatmaps[Path(p)]) for p in table["path"]]
    skipped = pd.DataFrame({"path": [str(p) for p in errors], "error": list(errors.values())})
    table = pd.concat([table.assign(error=""), skipped], ignore_index=True) if errors else table.assign(error="")
    order = {str(p): i for i, p in enumerate(paths)}
    table = table.sort_values("path", key=lambda s: s.map(order), kind="stable").reset_index(drop=True)
    write_csv(out, table, float_format="%.6g")  # file names: spreadsheet-safe
    if errors:
        log.warning(
            "%d of %d files unreadable and skipped (listed in %s with their error)", len(errors), len(paths), out
        )
    if not rows:
        raise UserError(f"none of the {len(paths)} files could be read as an image (see {out})")
    return table


def optional_input(given: str | None, default: str, flag: str) -> str | None:
    """A file named by ``flag`` must exist; only the ``default`` may be absent (then None): a typo in a path never
    silently drops a model or its threshold."""
    if given is not None:
        if not Path(given).is_file():
            raise UserError(f"{flag} {given}: no such file; give an existing file, or leave {flag} out to use "
                            f"{default} when it exists")  # fmt: skip
        return given
    return default if Path(default).is_file() else None


def command_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """The arguments `ahl predict` and `ahl infer` share: the inputs, --out, --heatmaps, --max-pixels,
    --batch-size, -v (the model's are each's own)."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("inputs", nargs="+", help="image files, folders (searched recursively) or glob patterns")
    p.add_argument("--out", default="predictions.csv", help="the CSV written (default: predictions.csv)")
    p.add_argument("--heatmaps", metavar="DIR", help="write a PNG overlay per image into DIR")
    p.add_argument(
        "--max-pixels", type=int, default=MAX_PIXELS,
        help=f"skip (with a warning) images of more pixels than this (default {MAX_PIXELS:,}: ~6,300 x 6,300)",
    )  # fmt: skip
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (does not change the scores)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def run_command(p: argparse.ArgumentParser, command: Callable, argv: list[str] | None) -> None:
    """Parse ``argv`` with ``p`` (a command_parser), run ``command(args)`` (it returns the table it wrote) and
    print its summary; a UserError is one line and exit status 2."""
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    try:
        for name in ("batch_size", "max_pixels"):
            if getattr(args, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        table = command(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    decided = table["is_anomaly"].dropna()
    near = int(table["borderline"].dropna().astype(bool).sum())
    print(f"{len(table)} files -> {args.out}: {int(decided.sum())} of {len(decided)} decided anomalous"
          + (f", {near} borderline (within the lab/line tolerance of the threshold)" if near else ""))  # fmt: skip
