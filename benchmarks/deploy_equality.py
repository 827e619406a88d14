"""How far an export's outputs are from the scorer's, on a run's test set: per model (base, AHL) and format (ONNX on
onnxruntime, OpenVINO), the largest absolute and relative difference of the score, the head scores and the anomaly
map (relative to each map's largest |value|), and the images whose decision (score > threshold) differs.

    python benchmarks/deploy_equality.py [--run .] [--batch 16]

``--run``: a project after `dvc repro` (its data/split.json names the test set). The scorer runs in float32 on the
CPU, as `ahl predict --device cpu --autocast none` does.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ahl import load_exported, load_run  # noqa: E402
from ahl.data.mvtec import load_image  # noqa: E402


def differences(lab: dict, line: dict) -> list[str]:
    """Max |difference| and max relative difference per output; a map's relative to its image's largest |value|
    (a pixel near 0 has no meaningful relative difference)."""
    cells = []
    for key in ("score", "head_scores", "anomaly_map"):
        a, b = lab[key].astype(np.float64), line[key].astype(np.float64)
        scale = np.abs(a).max(axis=(1, 2), keepdims=True) if key == "anomaly_map" else np.abs(a)
        rel = np.abs(a - b) / np.maximum(scale, 1e-12)
        cells += [f"{np.abs(a - b).max():.1e}", f"{rel.max():.1e}"]
    return cells


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default=".")
    p.add_argument("--batch", type=int, default=16)
    args = p.parse_args()
    root = Path(args.run)
    split = json.loads((root / "data/split.json").read_text())
    mvtec = root / "data/mvtec" / split["classname"]
    print(f"{split['classname']}: ", end="")
    print("| model | format | score abs | score rel | heads abs | heads rel | map abs | map rel | decisions differ |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model in ("base", "ahl"):
        run = load_run(root, model=model)
        images = np.stack([load_image(mvtec / e["file"], run.size) for e in split["test"]])
        lab = run.score(images, args.batch)
        with tempfile.TemporaryDirectory() as tmp:
            for fmt in ("onnx", "openvino"):
                line = load_exported(run.export(Path(tmp) / fmt, format=fmt))
                out = line.score(images, args.batch)
                flips = int((line.decide(out["score"]) != run.decide(lab["score"])).sum())
                name = run.scorer.names[model]
                cells = differences(lab, out)
                print(f"| {name} | {fmt} | {' | '.join(cells)} | {flips} of {len(images)} |")


if __name__ == "__main__":
    main()
