"""How much DRA's test-time reference set moves the AUC: ours (one fixed set of n_ref normals, unrotated) vs the
official evaluation (a fresh batch of n_ref training normals per test batch, drawn through the training loader and
so randomly rotated), both on the same trained model.

    python benchmarks/parity/reference_effect.py WORK/ours [WORK/ours ...] --draws 10 --batch 24

WORK/ours is a pipeline folder made by run.py --keep (models/base.pt, data/split.json, data/mvtec). Prints one
row per folder: the AUC-ROC with our fixed reference, and mean ± std (min, max) over ``--draws`` official-style
draws; the overall AUC and that of normals vs unseen-class anomalies where there are any.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: this folder is on sys.path instead

from benchmarks.parity import ours  # noqa: E402


def aucs(labels: np.ndarray, unseen: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    keep = (labels == 0) | unseen
    part = roc_auc_score(labels[keep], scores[keep]) if unseen.any() else float("nan")
    return roc_auc_score(labels, scores), part


@torch.no_grad()
def official_style_scores(
    model, test, normals, n_ref: int, batch: int, rotation: float, seed: int, pseudo: float = 0.0
) -> np.ndarray:
    """Per test batch, the reference is the eval-mode mean feature of the next n_ref normals of a permutation cycle
    of the training normals, each rotated by an angle in [-rotation, rotation] (nearest, as RandomRotation), each
    first turned into a CutPaste pseudo anomaly with probability ``pseudo`` (the official reference loader is a
    training loader: 0.5)."""
    rng = np.random.default_rng(seed)
    order = []
    out = []
    for start in range(0, len(test), batch):
        if len(order) < n_ref:
            order += rng.permutation(len(normals)).tolist()
        pick, order = order[:n_ref], order[n_ref:]
        refs = normals[pick].copy()
        for j in range(len(refs)):
            if pseudo > 0 and rng.random() < pseudo:  # no draw at 0: the same stream as without it
                refs[j] = ours.cutpaste(refs[j], rng)
        refs = ours.rotate(refs, rotation, rng, "nearest")
        normal_mean = ours.normal_mean_of(model, refs, torch.device("cpu"))
        out.append(ours.score_images(model, test[start : start + batch], normal_mean, batch))
    return np.concatenate(out)


def one(work: Path, draws: int, batch: int, pseudo: float = 0.0) -> dict:
    ckpt = ours.load_checkpoint(work / "models" / "base.pt")
    if not ckpt.model.heads.uses_normal_mean:
        raise SystemExit(f"{work}: {ckpt.meta['model']} has no reference set (DRA only)")
    split = json.loads((work / "data" / "split.json").read_text())
    root = work / "data" / "mvtec" / split["classname"]
    size = ckpt.meta["backbone"]["image_size"]
    test = ours.load_images(root, [s["file"] for s in split["test"]], size)
    normals = ours.load_images(root, [s["file"] for s in split["train"] if s["label"] == 0], size)
    labels = np.array([s["label"] for s in split["test"]])
    unseen = np.array([s["label"] == 1 and not s["seen"] for s in split["test"]])
    fixed = aucs(labels, unseen, ours.score_images(ckpt.model, test, ckpt.normal_mean, batch))
    n_ref, rotation = ckpt.meta["base"]["n_ref"], ckpt.meta["base"]["rotation"]
    drawn = np.array([
        aucs(labels, unseen, official_style_scores(ckpt.model, test, normals, n_ref, batch, rotation, seed, pseudo))
        for seed in range(draws)
    ])  # fmt: skip
    return {"work": str(work), "fixed": fixed, "drawn": drawn}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("work", type=Path, nargs="+")
    p.add_argument("--draws", type=int, default=10)
    p.add_argument("--batch", type=int, default=24, help="the official test batch size (its --batch_size)")
    p.add_argument("--pseudo", type=float, default=0.0,
                   help="probability that a drawn reference image is a pseudo anomaly (the official loader: 0.5)")
    a = p.parse_args(argv)
    print("| run | AUC-ROC fixed ref (ours) | AUC-ROC per-batch rotated refs (official) | unseen fixed | unseen official |")
    print("|---|---|---|---|---|")
    for work in a.work:
        r = one(work, a.draws, a.batch, a.pseudo)
        d = r["drawn"]

        def ms(col):
            v = d[:, col]
            return f"{v.mean():.4f} ± {v.std():.4f} ({v.min():.4f}-{v.max():.4f})"

        print(f"| {work.parent.name} | {r['fixed'][0]:.4f} | {ms(0)} | {r['fixed'][1]:.4f} | {ms(1)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
