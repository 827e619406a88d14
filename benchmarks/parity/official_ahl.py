"""Run the official AHL (DRA heads) on OUR cached features: the official main.py reads one .npy per image, so our
feature cache is written out in its layout, and its test scores are collected per image.

    python benchmarks/parity/official_ahl.py --official-ahl DIR --work WORK/ours --out DIR --seed 0 \
        --epochs 10 --steps 5 --batch 24

WORK/ours is a pipeline folder run.py made (data/mvtec, data/split.json, cache/features). The official heads
hard-code 512 input channels and a 3x3 stride-3 composite conv, so the cache must hold 512-channel maps of at
least 3x3 at every scale (ResNet-18 at >= 192 px). Shims as for the base models (shims.py), plus: autograd's
anomaly detection (switched on by main.py) stays off, and main.py's dataset class gets our split's anomalies.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import os
import runpy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: this folder is on sys.path instead

from benchmarks.parity.common import find_checkouts, headless  # noqa: E402

headless()  # before torch, which imports tqdm

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.parity.official_runner import handover_lists  # noqa: E402
from benchmarks.parity.shims import (  # noqa: E402
    Patches,
    ScoreRecorder,
    kmeans_n_init_10,
    official_path,
    sorted_listdir,
    torch2,
)

# our pseudo-anomaly family -> the official AHL folder it reads (datasets/*_feature_extraction.py write them)
FAMILY_DIRS = {"draem": "aug_dream", "cutpaste": "aug_paste", "cutmix": "aug_mix"}


class Unsupported(Exception):
    """The cache cannot be fed to the official AHL code (channels or map size)."""


def check_cache(cache) -> None:
    for s, x in enumerate(cache.test.scales):
        channels, h, w = x.shape[1:]
        if channels != 512 or min(h, w) < 3:
            raise Unsupported(
                f"the official AHL heads need 512-channel feature maps of at least 3x3 (they hard-code 512 channels "
                f"and a 3x3 stride-3 conv); scale {s} of the cache is {channels}x{h}x{w}: run our side with "
                "--backbone resnet18 and --image-size >= 192"
            )


def write_feature_tree(work: Path, cache, split: dict, root: Path) -> dict[str, list[str]]:
    """root/<class>/{train,test}/...: links to the images of our split only (the official lists come from
    listing these folders); root/<class>/feature{,_scale}/<file stem>.npy: our cached features per image;
    aug_{dream,paste,mix}{,_scale}/train/good/<stem>.npy: our pseudo anomalies of each train normal."""
    lists = handover_lists(split)
    cls = lists["classname"]
    base = root / cls
    source = work / "data" / "mvtec" / cls
    for rel in lists["train_normal"] + lists["train_anomaly"] + lists["test_normal"] + lists["test_anomaly"]:
        dst = base / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists():
            os.symlink((source / rel).resolve(), dst)

    def save(folder: str, rel: str, scales, i: int) -> None:
        stem = os.path.splitext(rel)[0]
        for s, name in enumerate((folder, f"{folder}_scale")):
            path = base / name / f"{stem}.npy"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, np.asarray(scales[s][i], dtype=np.float32))

    for fs in (cache.train_normal, cache.train_anomaly, cache.test):
        for i, rel in enumerate(fs.files):
            save("feature", rel, fs.scales, i)
    for family, folder in FAMILY_DIRS.items():
        if family not in cache.pseudo:
            raise Unsupported(f"the cache has no {family} pseudo anomalies; the official AHL reads all three families")
        for i, rel in enumerate(cache.train_normal.files):
            save(folder, rel, cache.pseudo[family].scales, i)
    return lists


def install_ahl_handover(patches: Patches, mvtecad, lists: dict) -> None:
    """The AHL dataset class (datasets/mvtecad.py) builds its support/query sets inside __init__, so only its
    anomaly choice is replaced; its normals come from listing the folders, which hold our split's files only."""

    def split_outlier(self):
        return (list(lists["train_anomaly"]), []) if self.train else (list(lists["test_anomaly"]), [])

    patches.setattr(mvtecad.MVTecAD, "split_outlier", split_outlier)


def run(root: Path, data_root: Path, lists: dict, argv: list[str]):
    with official_path(root), Patches() as p:
        torch2(p)
        sorted_listdir(p)
        kmeans_n_init_10(p)  # HADG's k-means with the scikit-learn default the code was written for
        p.setattr(torch.autograd, "set_detect_anomaly", lambda *a, **k: None)  # main.py switches it on globally
        install_ahl_handover(p, importlib.import_module("datasets.mvtecad"), lists)
        recorder = ScoreRecorder()
        recorder.install(p)
        old = sys.argv
        sys.argv = [str(root / "main.py"), *argv]
        try:
            scope = runpy.run_path(str(root / "main.py"), run_name="__main__")
        finally:
            sys.argv = old
    labels, scores = recorder.calls[-1]  # the last epoch's test pass (no selection on the test set)
    files = list(scope["trainer"].test_loader.dataset.images)
    per_epoch = [float(np.round(__import__("sklearn.metrics").metrics.roc_auc_score(y, s), 4)) for y, s in recorder.calls]
    return files, labels, scores, per_epoch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official-ahl", help="checkout of https://github.com/mala-lab/AHL")
    parser.add_argument("--work", type=Path, required=True, help="our pipeline folder (data/, cache/features)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=24)
    args = parser.parse_args(argv)
    roots = find_checkouts({"ahl": args.official_ahl})
    if roots is None:
        return 2
    root = roots["ahl"]
    from benchmarks.parity import ours

    torch.set_num_threads(min(2, torch.get_num_threads()))
    split = json.loads((args.work / "data" / "split.json").read_text())
    cache = ours.load_cache(args.work / "cache" / "features")
    try:
        check_cache(cache)
    except Unsupported as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    data_root = args.out / "data"
    lists = write_feature_tree(args.work, cache, split, data_root)
    n_anomalies = len(lists["train_anomaly"])
    size = int(json.loads((args.work / "cache" / "features" / "index.json").read_text()).get("meta", {}).get("image_size", 448))
    flags = [
        "--dataset_root", str(data_root), "--classname", lists["classname"], "--feat_classname", lists["classname"],
        "--experiment_dir", str(args.out / "exp"), "--nAnomaly", str(n_anomalies), "--epochs", str(args.epochs),
        "--steps_per_epoch", str(args.steps), "--batch_size", str(args.batch), "--workers", "0",
        "--ramdn_seed", str(args.seed), "--model_name", "DRA", "--n_scales", "2", "--img_size", str(size),
    ]  # fmt: skip
    start = time.perf_counter()
    files, labels, scores, per_epoch = run(root, data_root, lists, flags)
    seconds = time.perf_counter() - start
    with open(args.out / "scores.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "label", "score"])
        w.writerows(zip(files, [int(v) for v in labels], scores))
    (args.out / "official_seconds.txt").write_text(f"{seconds:.1f}\n")
    (args.out / "per_epoch_auc_roc.json").write_text(json.dumps(per_epoch))
    print(f"official AHL: {len(files)} test scores in {args.out / 'scores.csv'} ({seconds:.0f} s); per epoch {per_epoch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
