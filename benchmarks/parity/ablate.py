"""One difference at a time: rerun our pipeline from kept parity runs with one params change each, paired by seed.

    python benchmarks/parity/run.py ... --sides ours --seeds 0 1 2 --keep --out results/parity
    python benchmarks/parity/ablate.py results/parity/work/brick-dra-s*/ours \
        --variant uniform ahl.weighting=uniform --variant nearest backbone.resize=nearest \
        --out results/parity/ablations

Each RUN is the ``ours`` folder of a seed that ``run.py --keep`` left (its data, split, models and cache). For each
run and variant, this project's ahl/, stages/ and dvc.yaml are copied to OUT/work/<run>/<variant>, the run's
params.yaml is copied with the variant's values set, the run's outputs are copied next to them, and the stages
rerun as plain commands from the first one whose params (dvc.yaml) a changed key belongs to, to the end: a psi
change reruns train_ahl, calibrate and evaluate; a backbone change reruns from train_base (``selection``, which
checks every param, runs first each time). Data and split are
the run's, so every variant sees the same images, seen anomalies and test set as the run it is paired with.

The baseline is the run's own results/scores.csv: run ``run.py`` with the same project commit as this script,
or pass ``--rerun-baseline`` to recompute it here from the earliest stage any variant reruns. Writes OUT/runs.csv
(one row per run, variant and model) and OUT/summary.md: mean ± std over the runs and the paired difference to the
baseline (mean ± std of the per-run differences, and how many runs moved up).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: this folder is on sys.path instead

from benchmarks.parity.common import ROOT  # noqa: E402
from benchmarks.parity.run import (  # noqa: E402
    METRICS,
    copy_project,
    edit_params,
    overrides,
    pipeline_stages,
    read_scores,
    run_ours,
    scores_metrics,
    thread_env,
)  # fmt: skip

CODE_PARTS = ("ahl", "stages", "dvc.yaml")
AHL_STAGES = ("features", "train_ahl")
BASELINE = "baseline"


def stage_params(project: Path) -> dict[str, list[str]]:
    """Each stage's params as dvc.yaml lists them (dotted keys or whole sections)."""
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    return {name: [str(p) for p in (spec.get("params") or []) if not isinstance(p, dict)] for name, spec in stages.items()}


def first_affected(project: Path, keys: list[str]) -> str:
    """The first stage (in dvc.yaml's order) whose params include one of the dotted ``keys``; ``selection``
    (which checks every param, and always runs first here) does not count."""
    params = stage_params(project)
    for stage in pipeline_stages(project)[1:]:
        for key in keys:
            if any(key == p or key.startswith(p + ".") or p.startswith(key + ".") for p in params.get(stage, [])):
                return stage
    raise SystemExit(f"error: no stage of {project / 'dvc.yaml'} reads {', '.join(keys)}; check the key's spelling")


def stages_from(project: Path, first: str, with_ahl: bool) -> tuple[str, ...]:
    """``selection`` (it checks the changed params before anything runs), then ``first`` and every stage after it."""
    stages = pipeline_stages(project)
    out = stages[:1] + stages[max(1, stages.index(first)):]
    return tuple(s for s in out if with_ahl or s not in AHL_STAGES)


def has_ahl(run: Path) -> bool:
    return (run / "models" / "ahl.pt").is_file()


def merged_params(project: dict, run: dict) -> dict:
    """The project's params.yaml with the run's value of every key both have: a key the project added since the
    run keeps its default, a key it removed is dropped."""
    out = {}
    for key, value in project.items():
        if key in run and isinstance(value, dict) and isinstance(run[key], dict):
            out[key] = merged_params(value, run[key])
        else:
            out[key] = run.get(key, value)
    return out


def prepare(run: Path, project: Path, work: Path, changes: dict[str, object], link_data: bool) -> None:
    """work = run's outputs + this project's code + run's params (merged_params) with ``changes`` set.
    ``link_data``: hard-link data/ (no stage that writes there reruns) instead of copying it."""
    if work.exists():
        shutil.rmtree(work)
    skip = shutil.ignore_patterns(*CODE_PARTS, "data", "__pycache__", "*.tmp*")
    shutil.copytree(run, work, ignore=skip)
    shutil.copytree(run / "data", work / "data", copy_function=os.link if link_data else shutil.copy2)
    copy_project(project, work, CODE_PARTS)
    params = merged_params(yaml.safe_load((project / "params.yaml").read_text()),
                           yaml.safe_load((run / "params.yaml").read_text()))  # fmt: skip
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    edit_params(work / "params.yaml", changes)


def metrics_of(work: Path, with_ahl: bool) -> dict[str, dict[str, float]]:
    """{'base': metrics, 'ahl': metrics} from a folder's results/scores.csv, against its split's test set."""
    split = json.loads((work / "data" / "split.json").read_text())
    scores = work / "results" / "scores.csv"
    out = {"base": scores_metrics(split, read_scores(scores, "score_base"))}
    if with_ahl:
        out["ahl"] = scores_metrics(split, read_scores(scores, "score_ahl"))
    return out


def summarise(rows: list[dict]) -> str:
    """Mean ± std per variant and model, and the paired difference of AUC-ROC to the baseline of the same run."""
    base = {(r["run"], r["model"]): r for r in rows if r["variant"] == BASELINE}
    lines = [
        "| variant | model | runs | AUC-ROC | AUC-PR | seen AUC-ROC | unseen AUC-ROC | AUC-ROC - baseline (paired) | up |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["variant"], r["model"]), []).append(r)
    for (variant, model), rs in groups.items():
        def ms(values, digits=3):
            v = [float(x) for x in values if x not in (None, "")]
            return f"{np.mean(v):.{digits}f} ± {np.std(v):.{digits}f}" if v else "-"

        diffs = [float(r["auc_roc"]) - float(base[(r["run"], model)]["auc_roc"]) for r in rs if (r["run"], model) in base]
        paired = "-" if variant == BASELINE or not diffs else f"{np.mean(diffs):+.3f} ± {np.std(diffs):.3f}"
        up = "-" if variant == BASELINE or not diffs else f"{sum(d > 0 for d in diffs)}/{len(diffs)}"
        lines.append(
            f"| {variant} | {model} | {len(rs)} | {ms(r['auc_roc'] for r in rs)} | {ms(r['auc_pr'] for r in rs)} "
            f"| {ms(r.get('seen_auc_roc') for r in rs)} | {ms(r.get('unseen_auc_roc') for r in rs)} | {paired} | {up} |"
        )
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, rows: list[dict], variants: dict[str, dict]) -> None:
    fields = ["run", "variant", "changes", "model", *METRICS, "seconds", "stages"]
    tmp = out / "runs.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    tmp.replace(out / "runs.csv")
    legend = "\n".join(f"- {name}: {', '.join(f'{k}={v}' for k, v in ch.items()) or 'the run as kept'}"
                       for name, ch in variants.items())  # fmt: skip
    (out / "summary.md.tmp").write_text(summarise(rows) + "\n" + legend + "\n")
    (out / "summary.md.tmp").replace(out / "summary.md")


def parse_variants(specs: list[list[str]]) -> dict[str, dict[str, object]]:
    variants: dict[str, dict[str, object]] = {}
    for spec in specs:
        name, pairs = spec[0], spec[1:]
        if "=" in name or not pairs:
            raise SystemExit(f"error: --variant {' '.join(spec)}: expected NAME KEY=VALUE [KEY=VALUE ...]")
        if name == BASELINE or name in variants:
            raise SystemExit(f"error: --variant {name}: the name is taken; give each variant its own name")
        variants[name] = overrides(pairs)
    return variants


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="kept `ours` folders of run.py --keep (one per seed)")
    p.add_argument("--variant", nargs="+", action="append", required=True, metavar="NAME KEY=VALUE",
                   help="a name and the params.yaml values it sets (dotted keys, YAML values); repeatable")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--project", type=Path, default=ROOT, help="the project checkout whose code runs (default: this one)")
    p.add_argument("--no-ahl", dest="ahl", action="store_false",
                   help="skip the features and train_ahl stages: base-model variants only, faster")
    p.add_argument("--rerun-baseline", action="store_true",
                   help="recompute the baseline with this project's code instead of reading the run's results")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    variants = parse_variants(a.variant)
    for run in a.runs:
        missing = [x for x in ("params.yaml", "data/split.json", "results/scores.csv", "models/base.pt")
                   if not (run / x).exists()]  # fmt: skip
        if missing:
            print(f"error: {run} is not a kept run (no {', '.join(missing)}); make it with run.py --keep", file=sys.stderr)
            return 2
    firsts = {name: first_affected(a.project, list(ch)) for name, ch in variants.items()}
    order = pipeline_stages(a.project)
    if a.rerun_baseline:
        variants = {BASELINE: {}, **variants}
        firsts[BASELINE] = min(firsts.values(), key=order.index)
    a.out.mkdir(parents=True, exist_ok=True)
    env = thread_env(a.threads)
    rows: list[dict] = []
    for run in a.runs:
        label = run.parent.name if run.name == "ours" else run.name
        with_ahl = a.ahl and has_ahl(run)
        if not a.rerun_baseline:
            for model, m in metrics_of(run, with_ahl).items():
                rows.append({"run": label, "variant": BASELINE, "changes": "", "model": model, **m, "stages": ""})
        for name, changes in variants.items():
            work = a.out / "work" / label / name
            prepare(run, a.project, work, changes, link_data=order.index(firsts[name]) > order.index("split"))
            if not with_ahl:
                (work / "models" / "ahl.pt").unlink(missing_ok=True)
            stages = stages_from(a.project, firsts[name], with_ahl)
            start = time.perf_counter()
            with open(work.parent / f"{name}.log", "w") as log:
                run_ours(work, stages, env, log)
            seconds = time.perf_counter() - start
            for model, m in metrics_of(work, with_ahl).items():
                rows.append({"run": label, "variant": name, "changes": " ".join(f"{k}={v}" for k, v in changes.items()),
                             "model": model, **m, "seconds": seconds, "stages": " ".join(stages)})  # fmt: skip
                print(f"{label} {name} {model}: AUC-ROC {m['auc_roc']:.4f} AUC-PR {m['auc_pr']:.4f} ({seconds:.0f} s)",
                      flush=True)  # fmt: skip
            write_outputs(a.out, rows, {BASELINE: {}, **variants})
            shutil.rmtree(work / "cache", ignore_errors=True)  # the largest output; the scores stay
    write_outputs(a.out, rows, {BASELINE: {}, **variants})
    print(summarise(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
