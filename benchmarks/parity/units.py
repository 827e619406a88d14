"""Unit-level parity: the official modules and ours on the same tensors with the same weights.

    python benchmarks/parity/units.py --official-dra DIR --official-devnet DIR --official-ahl DIR \
        [--cache cache/features] [--backbone efficientnet_lite0] [--out results/parity_units.md]

Each row feeds the official component (imported from the user's checkout, shims in memory) and ours the same
inputs and weights, and reports the largest absolute difference: ``equal`` when within float32 round-off,
``differs`` otherwise (the note says why), ``info`` for measured statistics (sampling, parameter ranges).
docs/parity.md explains every row.
"""

# The checks live in unit_checks/, one module per component compared; this script runs the sections asked for and
# writes the table.

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: this folder is on sys.path instead

from benchmarks.parity.common import find_checkouts, headless  # noqa: E402

headless()  # before torch, which imports tqdm

import torch  # noqa: E402

from benchmarks.parity.unit_checks.ahl_heads import ahl_devnet, ahl_heads, ahl_meta  # noqa: E402
from benchmarks.parity.unit_checks.augmentation import generators  # noqa: E402
from benchmarks.parity.unit_checks.base_training import base_loops, samplers  # noqa: E402
from benchmarks.parity.unit_checks.clustering import kmeans  # noqa: E402
from benchmarks.parity.unit_checks.dra import deviation_losses, dra_heads, image_level  # noqa: E402
from benchmarks.parity.unit_checks.helpers import Row  # noqa: E402
from benchmarks.parity.unit_checks.psi import psi, psi_weights  # noqa: E402


def write_table(rows: list[Row], out: Path | None) -> str:
    """The rows as a Markdown table (returned), also written to ``out`` as Markdown or, for a .csv, as CSV."""

    def fmt(d):
        return "" if d is None else f"{d:.3g}"

    lines = ["| component | max abs diff | verdict | evidence |", "|---|---|---|---|"]
    lines += [f"| {r.component} | {fmt(r.diff)} | {r.verdict} | {r.note.replace('|', '/')} |" for r in rows]
    text = "\n".join(lines) + "\n"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix == ".csv":
            with open(out, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["component", "max_abs_diff", "verdict", "evidence"])
                w.writerows([r.component, "" if r.diff is None else r.diff, r.verdict, r.note] for r in rows)
        else:
            out.write_text(text)
    return text


SECTIONS = ("dra", "loss", "image", "ahl", "psi", "generators", "base", "kmeans")


def main(argv: list[str] | None = None) -> int:
    """Check the checkouts, run the sections asked for (timing each on stderr), print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official-dra", help="checkout of https://github.com/Choubo/DRA")
    parser.add_argument("--official-devnet", help="checkout of https://github.com/Choubo/deviation-network-image")
    parser.add_argument("--official-ahl", help="checkout of https://github.com/mala-lab/AHL")
    parser.add_argument("--backbone", default="efficientnet_lite0", help="efficientnet_lite0 | resnet18")
    parser.add_argument("--pretrained", default="imagenet", help="imagenet | none (random weights)")
    parser.add_argument("--cache", type=Path, help="a feature cache (cache/features) for the k-means row")
    parser.add_argument("--only", nargs="*", choices=SECTIONS, help="run only these sections")
    parser.add_argument("--out", type=Path, help="write the table here (.md or .csv)")
    args = parser.parse_args(argv)
    roots = find_checkouts({"dra": args.official_dra, "devnet": args.official_devnet, "ahl": args.official_ahl})
    if roots is None:
        return 2
    dra, devnet, ahl = roots["dra"], roots["devnet"], roots["ahl"]
    torch.set_num_threads(min(2, torch.get_num_threads()))
    wanted = set(args.only or SECTIONS)
    sections = [
        ("dra", lambda: dra_heads(dra)),
        ("loss", lambda: deviation_losses({"DRA": dra, "DevNet": devnet, "AHL": ahl})),
        ("image", lambda: image_level("dra", dra, args.backbone, args.pretrained)
         + image_level("devnet", devnet, args.backbone, args.pretrained)),
        ("ahl", lambda: ahl_heads(ahl) + ahl_meta(ahl) + ahl_devnet(ahl)),
        ("psi", lambda: psi(ahl) + psi_weights(ahl)),
        ("generators", lambda: generators(dra, ahl) + samplers(dra)),
        ("base", lambda: base_loops(dra, devnet, args.backbone, args.pretrained)),
        ("kmeans", lambda: kmeans(ahl, args.cache)),
    ]  # fmt: skip
    rows: list[Row] = []
    for name, run in sections:
        if name in wanted:
            start = time.perf_counter()
            rows += run()
            print(f"[{name}: {time.perf_counter() - start:.1f} s]", file=sys.stderr)
    print(write_table(rows, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
