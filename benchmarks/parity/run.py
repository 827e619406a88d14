"""End-to-end parity: our pipeline and the official train script on the same class, split, budget and backbone.

    python benchmarks/parity/run.py --official-dra DIR --official-devnet DIR --class brick --model dra \
        --seeds 0 1 2 --out results/parity [--image-size 128 --epochs 10 --steps 10 --batch 24 ...]

Per seed: (a) ours: the project's ahl/, stages/ and params.yaml are copied to a work folder, params.yaml is edited
there, and the stage scripts run as plain commands in dvc.yaml's order (selection ... evaluate); (b) official: the official train.py
(DRA's or DevNet's) runs through official_runner.py on ours' converted MVTec-layout folder and exactly the files
of ours' data/split.json, with the same image size, epochs, steps, batch size, seed and backbone; (c) both sides'
test scores are scored by the same function here. Writes OUT/runs.csv (one row per side and seed) and
OUT/summary.md (mean ± std over seeds).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from sklearn.metrics import average_precision_score, roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: this folder is on sys.path instead

from benchmarks.parity.common import HERE, ROOT, find_checkouts  # noqa: E402
from benchmarks.parity.official_runner import write_handover  # noqa: E402

DATA_STAGES = ("selection", "local_manifest", "download", "convert", "split")  # what the official side needs
PROJECT_PARTS = ("ahl", "stages", "params.yaml", "dvc.yaml")
METRICS = ("auc_roc", "auc_pr", "seen_auc_roc", "unseen_auc_roc")


def copy_project(project: Path, work: Path, parts: tuple[str, ...] = PROJECT_PARTS) -> None:
    """The stage scripts and the library they import, plus params.yaml: all a pipeline run needs."""
    for part in parts:
        src = project / part
        if not src.exists():
            raise FileNotFoundError(f"{src} missing: --project must be a checkout of this project")
        if src.is_dir():
            shutil.copytree(src, work / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, work / part)


def edit_params(path: Path, changes: dict[str, object]) -> None:
    """Set dotted keys (``base.epochs``) in a params.yaml; unknown keys are an error, not a silent addition."""
    params = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        node = params
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        if leaf not in node:
            raise KeyError(f"params.yaml has no key {dotted}; the project's params changed, update run.py")
        node[leaf] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def overrides(pairs: list[str]) -> dict[str, object]:
    """``KEY=VALUE`` strings -> {dotted key: YAML value}."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: --set {pair!r}: expected KEY=VALUE, e.g. base.grad_clip=0")
        out[key.strip()] = yaml.safe_load(value)
    return out


def thread_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env["TQDM_DISABLE"] = "1"
    env["MPLBACKEND"] = "Agg"
    return env


def pipeline_stages(project: Path) -> tuple[str, ...]:
    """The project's stages in dvc.yaml's order (a topological order), each a script stages/<name>.py."""
    stages = tuple(yaml.safe_load((project / "dvc.yaml").read_text())["stages"])
    missing = [s for s in (*stages, *DATA_STAGES) if not (project / "stages" / f"{s}.py").is_file()]
    if missing or not set(DATA_STAGES) <= set(stages):
        raise RuntimeError(f"{project}: stages {missing or DATA_STAGES} have no script or are not in dvc.yaml")
    return stages


def run_ours(work: Path, stages: tuple[str, ...], env: dict, log) -> dict[str, float]:
    seconds = {}
    for stage in stages:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, f"stages/{stage}.py"], cwd=work, env=env, stdout=log, stderr=log)
        seconds[stage] = time.perf_counter() - start
        if proc.returncode:
            raise RuntimeError(f"ours: stage {stage} failed (exit {proc.returncode}); see {log.name}")
    return seconds


def official_args(kind: str, a: argparse.Namespace, data_root: Path, classname: str, seed: int, exp: Path) -> list[str]:
    common = [
        "--dataset_root", str(data_root), "--classname", classname, "--experiment_dir", str(exp),
        "--img_size", str(a.image_size), "--n_scales", "2", "--backbone", a.backbone, "--epochs", str(a.epochs),
        "--steps_per_epoch", str(a.steps), "--batch_size", str(a.batch), "--workers", "0", "--topk", "0.1",
        "--ramdn_seed", str(seed),
    ]  # fmt: skip
    if kind == "dra":
        return common + ["--nAnomaly", str(a.n_anomalies), "--nRef", "5", "--total_heads", "4"]
    return common + ["--n_anomaly", str(a.n_anomalies)]


def scores_metrics(split: dict, scores: dict[str, float]) -> dict[str, float]:
    """AUC-ROC/PR overall and of normals vs seen-class / unseen-class anomalies, from per-file scores."""
    test = split["test"]
    missing = [s["file"] for s in test if s["file"] not in scores]
    if missing:
        raise ValueError(f"{len(missing)} test files have no score, e.g. {missing[0]}")
    y = np.array([s["label"] for s in test])
    seen = np.array([s["seen"] for s in test], bool)
    x = np.array([scores[s["file"]] for s in test], float)
    out = {"auc_roc": roc_auc_score(y, x), "auc_pr": average_precision_score(y, x)}
    for name, part in (("seen", seen), ("unseen", ~seen)):
        keep = (y == 0) | ((y == 1) & part)
        if (y[keep] == 1).any():
            out[f"{name}_auc_roc"] = roc_auc_score(y[keep], x[keep])
    return out


def read_scores(path: Path, column: str) -> dict[str, float]:
    with open(path) as f:
        return {row["file"]: float(row[column]) for row in csv.DictReader(f)}


def summarise(rows: list[dict]) -> str:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["class"], r["model"], r["side"]), []).append(r)
    lines = [
        "| class | model | side | seeds | AUC-ROC | AUC-PR | seen AUC-ROC | unseen AUC-ROC | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (cls, model, side), rs in groups.items():
        def ms(key, digits=3):
            v = [float(r[key]) for r in rs if r.get(key) not in (None, "")]
            return f"{np.mean(v):.{digits}f} ± {np.std(v):.{digits}f}" if v else "-"

        seeds = ",".join(str(r["seed"]) for r in rs)
        lines.append(f"| {cls} | {model} | {side} | {seeds} | {ms('auc_roc')} | {ms('auc_pr')} | {ms('seen_auc_roc')} "
                     f"| {ms('unseen_auc_roc')} | {ms('seconds', 0)} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, rows: list[dict]) -> None:
    fields = ["class", "model", "side", "seed", *METRICS, "seconds", "budget"]
    with open(out / "runs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    (out / "summary.md").write_text(summarise(rows))


def official_ahl_row(a, seed: int, ours_dir: Path, work: Path, split: dict, env: dict) -> list[dict]:
    """The official AHL (DRA heads) on our feature cache of this seed (official_ahl.py); [] when the cache
    cannot be fed to it (it needs 512-channel maps of >= 3x3)."""
    cmd = [
        sys.executable, str(HERE / "official_ahl.py"), "--official-ahl", str(a.official_ahl), "--work", str(ours_dir),
        "--out", str(work / "official_ahl"), "--seed", str(seed), "--epochs", str(a.ahl_epochs),
        "--steps", str(a.ahl_steps), "--batch", str(a.batch),
    ]  # fmt: skip
    start = time.perf_counter()
    with open(work / "official_ahl.log", "w") as log:
        proc = subprocess.run(cmd, env=env, stdout=log, stderr=log)
    if proc.returncode == 3:
        print(f"official AHL skipped: {(work / 'official_ahl.log').read_text().strip().splitlines()[-1]}", flush=True)
        return []
    if proc.returncode:
        raise RuntimeError(f"official AHL failed (exit {proc.returncode}); see {work / 'official_ahl.log'}")
    scores = read_scores(work / "official_ahl" / "scores.csv", "score")
    return [{"side": "official AHL", "seconds": time.perf_counter() - start, **scores_metrics(split, scores)}]


def one_seed(a, seed: int, official_root: Path | None, out: Path, env: dict) -> list[dict]:
    name = f"{a.label}-{a.model}-s{seed}"
    keep = a.keep
    work_parent = out / "work" if keep else Path(tempfile.mkdtemp(prefix=f"parity-{name}-"))
    work = work_parent / name if keep else work_parent
    if keep and work.exists():
        shutil.rmtree(work)
    (work / "ours").mkdir(parents=True)
    budget = f"{a.backbone}/{a.pretrained} {a.image_size}px, {a.epochs}x{a.steps}x{a.batch}, M={a.n_anomalies}"
    if a.known_class:
        budget += f", hard: {a.known_class}"
    if a.overrides:
        budget += ", " + ", ".join(a.overrides)
    rows = []
    try:
        ours_dir = work / "ours"
        copy_project(a.project, ours_dir)
        edit_params(ours_dir / "params.yaml", {
            "classname": a.classname, "seed": seed, "device": "cpu", "protocol.n_anomalies": a.n_anomalies,
            "backbone.name": a.backbone, "backbone.pretrained": a.pretrained, "backbone.image_size": a.image_size,
            "base.model": a.model, "base.epochs": a.epochs, "base.steps_per_epoch": a.steps,
            "protocol.known_class": a.known_class, "protocol.validation_fraction": 0, "base.batch_size": a.batch, "ahl.epochs": a.ahl_epochs, "ahl.steps_per_epoch": a.ahl_steps,
            "ahl.batch_size": a.batch, **overrides(a.overrides),
        })  # fmt: skip
        with open(work / "ours.log", "w") as log:
            stages = pipeline_stages(ours_dir) if "ours" in a.sides else DATA_STAGES
            if not a.ahl:
                stages = tuple(s for s in stages if s not in ("features", "train_ahl"))
            t = run_ours(ours_dir, stages, env, log)
        split = json.loads((ours_dir / "data" / "split.json").read_text())
        if "ours" in a.sides:
            base_seconds = t["train_base"] + t["evaluate"]
            scores_csv = ours_dir / "results" / "scores.csv"
            rows.append({"side": "ours" + a.tag, "seconds": base_seconds, **scores_metrics(split, read_scores(scores_csv, "score_base"))})
            if a.ahl:
                ahl_seconds = t["features"] + t["train_ahl"]
                ahl_scores = read_scores(scores_csv, "score_ahl")
                rows.append({"side": "ours AHL" + a.tag, "seconds": ahl_seconds, **scores_metrics(split, ahl_scores)})
        if a.official_ahl is not None and "ours" in a.sides and a.ahl and a.model == "dra":
            rows += official_ahl_row(a, seed, ours_dir, work, split, env)
        if "official" in a.sides:
            lists = write_handover(ours_dir / "data" / "split.json", work / "official" / "handover.json")
            cmd = [
                sys.executable, str(HERE / "official_runner.py"), "--kind", a.model, "--official", str(official_root),
                "--handover", str(work / "official" / "handover.json"), "--backbone", a.backbone,
                "--pretrained", a.pretrained, "--seed", str(seed), "--scores", str(work / "official" / "scores.csv"),
                "--", *official_args(a.model, a, ours_dir / "data" / "mvtec", lists["classname"], seed, work / "official" / "exp"),
            ]  # fmt: skip
            start = time.perf_counter()
            with open(work / "official.log", "w") as log:
                proc = subprocess.run(cmd, env=env, stdout=log, stderr=log)
            if proc.returncode:
                raise RuntimeError(f"official {a.model} failed (exit {proc.returncode}); see {work / 'official.log'}")
            seconds = time.perf_counter() - start
            rows.append({"side": "official", "seconds": seconds,
                         **scores_metrics(split, read_scores(work / "official" / "scores.csv", "score"))})  # fmt: skip
    finally:
        if not keep:
            shutil.rmtree(work_parent, ignore_errors=True)
    for r in rows:
        r.update({"class": a.label, "model": a.model, "seed": seed, "budget": budget})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official-dra", help="checkout of https://github.com/Choubo/DRA (for --model dra)")
    p.add_argument("--official-devnet", help="checkout of https://github.com/Choubo/deviation-network-image")
    p.add_argument("--official-ahl", help="checkout of https://github.com/mala-lab/AHL: also run the official AHL "
                   "on our feature cache (--model dra; needs 512-channel maps >= 3x3: resnet18 at >= 192 px)")
    p.add_argument("--class", dest="classname", default="brick", help="classname (params.yaml), e.g. brick, elpv")
    p.add_argument("--model", choices=("dra", "devnet"), default="dra")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--sides", nargs="+", choices=("ours", "official"), default=["ours", "official"])
    p.add_argument("--project", type=Path, default=ROOT, help="the project checkout whose pipeline runs (default: this one)")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--pretrained", default="imagenet")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=24)
    p.add_argument("--n-anomalies", type=int, default=5)
    p.add_argument("--known-class", default=None,
                   help="hard setting: the M seen anomalies come from this anomaly class only (protocol.known_class)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="ours: one more params.yaml value (dotted key, YAML value), e.g. --set base.grad_clip=0; "
                   "repeatable; recorded in the budget column")
    p.add_argument("--ahl-epochs", type=int, default=10)
    p.add_argument("--ahl-steps", type=int, default=5)
    p.add_argument("--no-ahl", dest="ahl", action="store_false", help="ours: skip the features and train_ahl stages")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--keep", action="store_true", help="keep the work folders under OUT/work (feature caches, logs)")
    a = p.parse_args(argv)
    # A stopped harness stops its stage: subprocess.run kills the child when SystemExit interrupts its wait (an
    # orphaned train_base once overwrote models/base.pt of the next run in the same folder).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    a.label = f"{a.classname}-hard-{a.known_class}" if a.known_class else a.classname
    a.tag = f" [{', '.join(a.overrides)}]" if a.overrides else ""
    wanted = {}  # only the official side needs its checkout
    if "official" in a.sides:
        wanted[a.model] = a.official_dra if a.model == "dra" else a.official_devnet
    if a.official_ahl is not None:
        wanted["ahl"] = a.official_ahl
    roots = find_checkouts(wanted)
    if roots is None:
        return 2
    official_root = roots.get(a.model)
    a.out.mkdir(parents=True, exist_ok=True)
    env = thread_env(a.threads)
    rows = []
    existing = a.out / "runs.csv"
    if existing.is_file():  # append to earlier runs of other classes/models; replace the same ones
        with open(existing) as f:
            rows = [r for r in csv.DictReader(f) if not (r["class"] == a.label and r["model"] == a.model
                                                          and int(r["seed"]) in a.seeds)]  # fmt: skip
            for r in rows:
                for k in (*METRICS, "seconds"):
                    r[k] = float(r[k]) if r.get(k) not in (None, "") else None
    for seed in a.seeds:
        new = one_seed(a, seed, official_root, a.out, env)
        rows += new
        for r in new:
            print(f"{a.label} {a.model} seed {seed} {r['side']}: AUC-ROC {r['auc_roc']:.4f} AUC-PR {r['auc_pr']:.4f} "
                  f"({r['seconds']:.0f} s)", flush=True)  # fmt: skip
        write_outputs(a.out, rows)
    print(summarise(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
