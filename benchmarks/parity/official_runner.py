"""Run an official base-model train script (DRA's or DevNet's ``train.py``) with the parity shims, on the files
our split chose, and write its test scores per image.

    python benchmarks/parity/official_runner.py --kind dra --official DIR --handover handover.json \
        --backbone efficientnet_lite0 --pretrained imagenet --seed 0 --scores scores.csv -- [train.py flags]

The train script runs unchanged through ``runpy`` as ``__main__``; before that, in memory only: CUDA calls go to
the CPU, ``os.listdir`` is sorted, the backbone builder returns our backbone, the dataset's file lists are those
of the hand-over file (our split.json), the global RNGs are seeded (the DRA script seeds nothing), and
``sklearn.metrics.roc_auc_score`` records the per-image scores the script computes its AUC from.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import runpy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: this folder is on sys.path instead

from benchmarks.parity.common import find_checkouts, headless  # noqa: E402

headless()  # before torch, which imports tqdm

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.parity.shims import (  # noqa: E402
    Patches,
    ScoreRecorder,
    replace_backbone,
    sorted_listdir,
    torch2,
)

KINDS = ("dra", "devnet")


def handover_lists(split: dict) -> dict[str, list[str]]:
    """Our split.json -> the four file lists the official dataset class is given (paths relative to the subset
    directory, as the official code writes them: ``train/good/x.png``, ``test/<class>/y.png``). Contaminated
    training "normals" (anomalies labelled normal) stay in the normal list, as in our training."""
    train, test = split["train"], split["test"]
    return {
        "classname": split["classname"],
        "train_normal": [s["file"] for s in train if s["label"] == 0],
        "train_anomaly": [s["file"] for s in train if s["label"] == 1],
        "test_normal": [s["file"] for s in test if s["label"] == 0],
        "test_anomaly": [s["file"] for s in test if s["label"] == 1],
    }


def write_handover(split_json: Path, out: Path) -> dict[str, list[str]]:
    lists = handover_lists(json.loads(Path(split_json).read_text()))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(lists, indent=1))
    return lists


def install_handover(patches: Patches, mvtecad, lists: dict, kind: str) -> None:
    """The official MVTecAD dataset picks its anomalies by shuffling ``os.listdir`` order with its own seed;
    here it gets exactly the hand-over lists instead (its ``split_outlier`` returns them, and the lists are
    set again after ``__init__``, so nothing of its own selection survives)."""
    cls = mvtecad.MVTecAD
    init = cls.__init__

    def n_anomaly(self) -> int:
        return int(getattr(self.args, "nAnomaly" if kind == "dra" else "n_anomaly"))

    def anomalies(self) -> list[str]:
        if self.train:
            return list(lists["train_anomaly"]) if n_anomaly(self) else []  # DRA's reference loader: nAnomaly 0
        return list(lists["test_anomaly"])

    def split_outlier(self):
        return (anomalies(self), []) if kind == "dra" else anomalies(self)

    def __init__(self, args, train=True, *a, **k):
        init(self, args, train, *a, **k)
        normals = list(lists["train_normal"] if self.train else lists["test_normal"])
        outliers = anomalies(self)
        self.images = normals + outliers
        self.labels = np.array([0.0] * len(normals) + [1.0] * len(outliers))
        self.normal_idx = np.argwhere(self.labels == 0).flatten()
        self.outlier_idx = np.argwhere(self.labels == 1).flatten()

    patches.setattr(cls, "split_outlier", split_outlier)
    patches.setattr(cls, "__init__", __init__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_official(kind: str, root: Path, lists: dict, backbone: str, pretrained: str, seed: int, argv: list[str]):
    """Run ``root/train.py argv`` with the shims; returns (files, labels, scores) of its test set."""
    sys.path.insert(0, str(root))
    import importlib

    from benchmarks.parity import ours

    with Patches() as p:
        torch2(p)
        sorted_listdir(p)
        net = importlib.import_module("modeling.net")
        replace_backbone(p, net, backbone, lambda: ours.backbone_body(backbone, pretrained))
        install_handover(p, importlib.import_module("datasets.mvtecad"), lists, kind)
        recorder = ScoreRecorder()
        recorder.install(p)
        seed_everything(seed)
        old_argv = sys.argv
        sys.argv = [str(root / "train.py"), *argv]
        try:
            scope = runpy.run_path(str(root / "train.py"), run_name="__main__")
        finally:
            sys.argv = old_argv
    if not recorder.calls:
        raise RuntimeError("the official script computed no AUC: no test scores were recorded")
    labels, scores = recorder.calls[-1]
    files = list(scope["trainer"].test_loader.dataset.images)
    if len(files) != len(scores):
        raise RuntimeError(f"{len(files)} test files but {len(scores)} scores recorded")
    return files, labels, scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=KINDS, required=True)
    parser.add_argument("--official", help="checkout of the official DRA or DevNet repository")
    parser.add_argument("--handover", type=Path, required=True, help="file lists written from our split.json")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--pretrained", default="imagenet")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scores", type=Path, required=True, help="output CSV: file, label, score")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the official train.py flags")
    args = parser.parse_args(argv)
    roots = find_checkouts({args.kind: args.official})
    if roots is None:
        return 2
    root = roots[args.kind]
    torch.set_num_threads(min(2, torch.get_num_threads()))
    lists = json.loads(args.handover.read_text())
    train_args = [a for a in args.train_args if a != "--"] if args.train_args[:1] == ["--"] else args.train_args
    start = time.perf_counter()
    files, labels, scores = run_official(args.kind, root, lists, args.backbone, args.pretrained, args.seed, train_args)
    seconds = time.perf_counter() - start
    args.scores.parent.mkdir(parents=True, exist_ok=True)
    with open(args.scores, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "label", "score"])
        w.writerows(zip(files, [int(v) for v in labels], scores))
    (args.scores.parent / "official_seconds.txt").write_text(f"{seconds:.1f}\n")
    print(f"official {args.kind}: {len(files)} test scores in {args.scores} ({seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
