"""The real DVC pipeline in a temporary git repository, on a tiny config of the embedded dataset.

dvc repro; a second repro reruns nothing; an evaluation param reruns only evaluation; another subset of the
same dataset does not download again; dvc metrics diff and dvc exp show see the experiments.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import Repo, tiny_params
from PIL import Image

pytestmark = pytest.mark.pipeline

def scores_of(repo: Repo) -> list[str]:
    """The rows of results/scores.csv (one per test image)."""
    return (repo.path / "results/scores.csv").read_text().splitlines()[1:]


@pytest.fixture(scope="module")
def repo(reproduced, tmp_path_factory) -> Repo:
    """A copy of the reproduced tiny pipeline that this module's tests change in turn."""
    return reproduced[0].copy(tmp_path_factory.mktemp("pipeline") / "repo")


def test_repro_runs_every_stage_then_nothing(reproduced, repo):
    first = reproduced[1]  # the first `dvc repro` of the tiny params (conftest.py), in a copy of which `repo` is
    assert repo.ran(first) == {
        "local_manifest", "selection", "download", "convert", "split", "train_base", "features", "train_ahl",
        "calibrate", "evaluate",
    }  # fmt: skip
    metrics = json.loads((repo.path / "results/metrics.json").read_text())
    assert metrics["classname"] == "brick" and metrics["base"]["model"] == "dra"
    assert 0.0 <= metrics["base"]["auc_roc"] <= 1.0 and "auc_pr" in metrics["base"]
    assert metrics["ahl"]["model"] == "AHL(dra)" and 0.0 <= metrics["ahl"]["auc_roc"] <= 1.0
    thresholds = json.loads((repo.path / "models/thresholds.json").read_text())
    for key in ("base", "ahl"):  # chosen on the validation slice (1 of the 12 train normals), reported on test
        entry, at = thresholds[key], metrics[key]["at_threshold"]
        assert entry["rule"] == "fpr" and entry["target_fpr"] == 0.01 and entry["decision"] == "score > threshold"
        assert entry["validation"]["normal"] == 1 and entry["validation"]["fpr"] == 0.0
        assert at["value"] == entry["threshold"] and at["tp"] + at["fp"] + at["tn"] + at["fn"] == len(scores_of(repo))
        assert {"precision", "recall", "f1", "fpr"} <= set(at) and 0.0 <= at["fpr"] <= 1.0
    split = json.loads((repo.path / "data/split.json").read_text())
    assert len(split["validation"]) == 1 and split["validation"][0]["file"] not in {s["file"] for s in split["train"]}
    epochs = (repo.path / "results/ahl_training/plots/metrics/test_auc_roc.tsv").read_text().splitlines()
    assert epochs[0] == "step\ttest_auc_roc" and [line.split("\t")[0] for line in epochs[1:]] == ["0", "1"]
    assert set(metrics["base"]["per_class_auc_roc"]) <= {"scratch", "hole", "stain", "foreign", "crack"}
    scores = (repo.path / "results/scores.csv").read_text().splitlines()
    assert scores[0] == "file,label,class,seen,score_base,score_ahl" and len(scores) > 10
    plots = repo.path / "results/evaluation/plots"
    assert (plots / "images/curves.png").stat().st_size > 1000
    roc = json.loads((plots / "sklearn/roc/base.json").read_text())["roc"]
    assert (roc[0]["fpr"], roc[0]["tpr"]) == (0.0, 0.0) and (roc[-1]["fpr"], roc[-1]["tpr"]) == (1.0, 1.0)
    assert json.loads((plots / "sklearn/pr/ahl.json").read_text())["precision_recall"]
    shown = json.loads(repo.dvc("plots", "show", "--json").stdout)["data"]
    assert {"ROC", "Precision-Recall", "AHL test AUC-ROC per epoch"} <= set(shown), sorted(shown)
    report_pngs = {f"results/evaluation/plots/images/{n}.png" for n in REPORT_FIGURES}
    assert report_pngs <= set(shown), sorted(shown)  # the report's PNGs are DVC plots
    for key in ("base", "ahl"):  # the demo has masks: pixel metrics of both models' heatmaps
        assert 0.0 <= metrics[key]["pixel_auc_roc"] <= 1.0 and 0.0 <= metrics[key]["pixel_aupro"] <= 1.0
    check_report(repo.path / "results/report.html")
    costs = {f.stem: json.loads(f.read_text()) for f in (repo.path / "results/cost").glob("*.json")}
    assert set(costs) == repo.ran(first) - {"local_manifest"}  # every stage's CPU and wall seconds, as metrics
    assert all(c["cpu_s"] > 0 and c["wall_s"] >= 0 for c in costs.values()), costs  # imports alone take CPU
    assert "results/cost/train_base.json" in repo.dvc("metrics", "show").stdout
    assert '"fpr"' in json.dumps(shown["ROC"]) and '"test_auc_roc"' in json.dumps(shown["AHL test AUC-ROC per epoch"])
    # local_manifest hashes data.local (outside DVC) on every repro; its output, and so everything else, is unchanged
    second = repo.dvc("repro")
    assert repo.ran(second.stdout) == {"local_manifest"}
    # Retraining with the same params and seed gives a byte-identical checkpoint, so nothing after it reruns.
    forced = repo.dvc("repro", "-f", "-s", "train_base")
    assert repo.ran(forced.stdout) == {"train_base"}
    assert repo.ran(repo.dvc("repro").stdout) == {"local_manifest"}
    repo.git("add", "-A")
    repo.git("commit", "-qm", "baseline")


REPORT_FIGURES = ("curves", "histograms", "per_class_auc", "worst_base", "worst_ahl")


def check_report(path: Path) -> None:
    """The report opens offline: every image is inline and decodes as a PNG, or a file that exists beside it; no
    script, stylesheet or link to anything outside."""

    class Refs(HTMLParser):
        def __init__(self):
            super().__init__()
            self.refs: list[tuple[str, str]] = []

        def handle_starttag(self, tag, attrs):
            self.refs += [(tag, v) for k, v in attrs if k in ("src", "href") and v]

    parser = Refs()
    parser.feed(path.read_text())
    images = [ref for tag, ref in parser.refs if tag == "img"]
    assert len(images) == len(REPORT_FIGURES) and all(tag == "img" for tag, _ in parser.refs), parser.refs
    for ref in images:
        if ref.startswith("data:"):
            assert ref.startswith("data:image/png;base64,")
            with Image.open(io.BytesIO(base64.b64decode(ref.split(",", 1)[1], validate=True))) as im:
                im.verify()
        else:
            assert "://" not in ref and (path.parent / ref).is_file(), ref


def test_predict_gives_evaluates_scores(repo, tmp_path):
    """`python -m ahl.deploy.predict` on the demo's test images: evaluate's scores (results/scores.csv) for the same images.
    Both files print 6 significant digits (rtol 1e-5); AHL also allows a float16 rounding of the cache flipped by a
    batch of another size (atol 5e-4 in score units, see tests/test_predict.py)."""
    out, heat = tmp_path / "predictions.csv", tmp_path / "heat"
    res = repo.run(
        sys.executable, "-m", "ahl.deploy.predict", "data/mvtec/brick/test", "--out", str(out), "--heatmaps", str(heat)
    )
    assert "files ->" in res.stdout
    predicted = pd.read_csv(out).assign(file=lambda t: t["path"].str.removeprefix("data/mvtec/brick/"))
    scores = pd.read_csv(repo.path / "results/scores.csv").merge(predicted, on="file", suffixes=("", "_predict"))
    assert len(scores) == len(pd.read_csv(repo.path / "results/scores.csv")) and predicted["error"].isna().all()
    np.testing.assert_allclose(scores["score_base_predict"], scores["score_base"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(scores["score_ahl_predict"], scores["score_ahl"], rtol=1e-5, atol=5e-4)
    assert all((heat / Path(f).with_suffix(".png")).is_file() for f in scores["file"].str.removeprefix("test/"))


# `selection` checks every section of params.yaml, so it reruns on any param change; its output (dataset and source)
# stays the same, so nothing after it reruns because of it.


def test_evaluation_param_reruns_only_evaluation(repo):
    before = json.loads((repo.path / "results/metrics.json").read_text())
    res = repo.dvc("exp", "run", "-S", "evaluate.batch_size=5")
    assert repo.ran(res.stdout) == {"local_manifest", "selection", "evaluate"}
    after = json.loads((repo.path / "results/metrics.json").read_text())
    # the batch size changes no image metric; the pixel metrics move by float rounding only (the convolutions'
    # kernels depend on the batch size, and pixel AUCs rank thousands of near-tied upsampled heatmap values)
    pixel = {"pixel_auc_roc", "pixel_aupro"}
    for key in ("base", "ahl"):
        assert {k: v for k, v in after[key].items() if k not in pixel} == {
            k: v for k, v in before[key].items() if k not in pixel
        }
        for k in pixel:
            assert after[key][k] == pytest.approx(before[key][k], rel=1e-5, abs=1e-6), (key, k)
    assert {k: v for k, v in after.items() if k not in ("base", "ahl")} == {
        k: v for k, v in before.items() if k not in ("base", "ahl")
    }


def test_ahl_param_reruns_only_ahl_and_evaluation(repo):
    res = repo.dvc("exp", "run", "-S", "ahl.weighting=uniform", "-S", "evaluate.batch_size=32")
    assert repo.ran(res.stdout) == {"local_manifest", "selection", "train_ahl", "calibrate", "evaluate"}


def test_a_typo_in_params_stops_the_pipeline_at_its_first_stage(repo, tmp_path):
    params = repo.path / "params.yaml"
    good = params.read_text()
    params.write_text(good.replace("  batch_size: 32\n", "  batch_sise: 32\n", 1))
    try:
        res = repo.dvc("repro", check=False)
    finally:
        params.write_text(good)
    assert res.returncode != 0 and repo.ran(res.stdout) <= {"local_manifest", "selection"}
    assert "error: params.yaml: unknown key evaluate.batch_sise (did you mean 'batch_size'?)" in res.stderr + res.stdout


def test_other_subset_reuses_the_download_and_metrics_diff_shows_it(repo):
    res = repo.dvc("exp", "run", "-S", "classname=grass", "-S", "evaluate.batch_size=32")
    ran = repo.ran(res.stdout)
    assert "download" not in ran and "convert" not in ran
    assert {"selection", "split", "train_base", "evaluate"} <= ran
    assert json.loads((repo.path / "results/metrics.json").read_text())["classname"] == "grass"
    diff = repo.dvc("metrics", "diff", "--json").stdout
    changed = json.loads(diff)["results/metrics.json"]
    assert "base.auc_roc" in changed and changed["base.auc_roc"]["old"] is not None
    shown = repo.dvc("exp", "show", "--json").stdout
    assert shown.count('"classname": "grass"') >= 1 and shown.count('"classname": "brick"') >= 1
    table = repo.run(sys.executable, "scripts/table.py").stdout
    assert "| brick | general | 2 |" in table and "| grass | general | 2 |" in table and "AHL(DRA)" in table


def test_the_table_pairs_ahl_with_its_base_model_per_seed(repo, tmp_path):
    """Two seeds of the tiny run (the committed one and an experiment): scripts/table.py's paired column is AHL -
    base of the same run per seed, as computed here from each run's metrics."""
    # the workspace holds what earlier tests set (classname=grass, ahl.weighting=uniform): the commit's params again
    repo.dvc("exp", "run", "-n", "seed1", "-S", "seed=1", "-S", "classname=brick", "-S", "ahl.weighting=psi")
    per_seed, cpu = {}, {}
    for commit in json.loads(repo.dvc("exp", "show", "--json").stdout):
        for rev in [commit, *(r for e in commit.get("experiments") or [] for r in e.get("revs") or [])]:
            data = rev.get("data") or {}
            params = ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}
            metrics = ((data.get("metrics") or {}).get("results/metrics.json") or {}).get("data") or {}
            if params.get("classname") == "brick" and params["ahl"]["weighting"] == "psi" and "ahl" in metrics:
                per_seed.setdefault(params["seed"], metrics["ahl"]["auc_roc"] - metrics["base"]["auc_roc"])
                cost = [f["data"]["cpu_s"] for name, f in data["metrics"].items() if name.startswith("results/cost/")]
                cpu.setdefault(params["seed"], sum(cost) / 3600)
    assert sorted(per_seed) == [0, 1]
    out = tmp_path / "table.csv"
    repo.run(sys.executable, "scripts/table.py", "--csv", str(out))
    table = pd.read_csv(out)
    row = table[(table["model"] == "AHL(DRA)") & (table["classname"] == "brick") & (table["ahl.weighting"] == "psi")
                & (table["seeds"] == "[0, 1]")].iloc[0]  # fmt: skip
    edges = list(per_seed.values())
    assert row["edge_mean"] == pytest.approx(np.mean(edges)) and row["edge_std"] == pytest.approx(np.std(edges))
    assert row["edge_wins"] == sum(e > 0 for e in edges) and row["edge_count"] == 2
    assert row["cpu_h"] == pytest.approx(np.mean(list(cpu.values()))) and all(c > 0 for c in cpu.values())


def test_bad_classname_is_one_line_and_leaves_nothing(repo):
    res = repo.dvc("exp", "run", "-S", "classname=nope", check=False)
    assert res.returncode != 0
    assert "error: unknown classname 'nope'; known classnames: AITEX" in res.stderr + res.stdout


def _tree_digest(root: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}  # fmt: skip


def test_a_classname_that_is_a_path_is_refused_and_nothing_outside_changes(repo, small_dataset, tmp_path):
    """classname=/elsewhere/tiles (or ../.., or a lookalike slash) used to make convert read that folder and write
    into it; now every stage refuses it in one line, and the folder outside the project is byte for byte as before."""
    outside = tmp_path / "other" / "tiles"
    shutil.copytree(small_dataset / "brick", outside)
    before = _tree_digest(tmp_path / "other")
    depth = len(repo.path.resolve().parts) - 1
    paths = [str(outside), "../" * depth + str(outside).lstrip("/")]
    for name in paths:  # through DVC, as a shared params.yaml or experiment would bring them
        res = repo.dvc("exp", "run", "-S", f"classname={name}", check=False)
        assert res.returncode != 0, name
        assert f"error: params.yaml: classname = {name!r}" in res.stderr + res.stdout, (name, res.stderr[-500:])
    # by hand (names DVC's -S grammar itself rejects: lookalike slash, backslash, .., NUL), each stage run plainly
    odd = ["other\u2215tiles", "tiles\\..", "..", "a\x00b"]
    for name, stage in [(n, "selection") for n in paths + odd] + [(paths[0], "convert"), (paths[1], "split")]:
        (tmp_path / "p.yaml").write_text(yaml.safe_dump(tiny_params({"classname": name})))
        res = repo.run(sys.executable, f"stages/{stage}.py", "--params", str(tmp_path / "p.yaml"), check=False)
        assert res.returncode == 2 and res.stderr.startswith("error: params.yaml: classname = "), res.stderr[-500:]
        assert res.stderr.count("\n") == 1
    assert _tree_digest(tmp_path / "other") == before


def test_stage_runs_as_plain_python_without_dvc(repo, tmp_path):
    params = tiny_params({"protocol": {"n_anomalies": 99, "test_set_m": 2}})
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(params))
    before = (repo.path / "data/split.json").read_text()
    res = repo.run(sys.executable, "stages/split.py", "--params", str(bad), check=False)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "n_anomalies=99" in lines[0]
    assert (repo.path / "data/split.json").read_text() == before  # no partial output


def test_base_model_alone_is_calibrated_and_evaluated_by_plain_python(repo):
    """Without AHL's stages (e.g. plain `python stages/...` runs of the base model on a machine without dvc, or
    the parity harness's --no-ahl): calibrate and evaluate work on the base model alone; AHL's heads appearing
    afterwards make evaluate refuse the base-only thresholds until calibrate reruns."""
    (repo.path / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    repo.dvc("repro")
    heads = repo.path / "models/ahl.pt"
    kept = heads.read_bytes()
    heads.unlink()
    try:
        assert repo.run(sys.executable, "stages/calibrate.py").returncode == 0
        thresholds = json.loads((repo.path / "models/thresholds.json").read_text())
        assert thresholds["ahl"] is None and thresholds["base"]["threshold"] is not None
        assert set(thresholds["inputs"]) == {"split", "base"}
        assert repo.run(sys.executable, "stages/evaluate.py").returncode == 0
        metrics = json.loads((repo.path / "results/metrics.json").read_text())
        assert "ahl" not in metrics and "at_threshold" in metrics["base"]
        heads.write_bytes(kept)
        res = repo.run(sys.executable, "stages/evaluate.py", check=False)
        assert res.returncode == 2 and "thresholds.json was made with no record of " in res.stderr
        assert "models/ahl.pt" in res.stderr.split("no record of ")[1].split(":")[0]
    finally:
        heads.write_bytes(kept)
        repo.dvc("checkout", "-f")

def test_a_stage_run_by_hand_on_another_split_is_refused(repo, tmp_path):
    """split.py by hand with another M, then evaluate.py: the models were trained on the old split, so evaluate
    refuses instead of writing metrics that claim the new M; `dvc repro` brings everything back in line."""
    (repo.path / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    repo.dvc("repro")  # the baseline again (from the run cache), whatever earlier tests left in the workspace
    other = tmp_path / "params.yaml"
    other.write_text(yaml.safe_dump(tiny_params({"protocol": {"n_anomalies": 1, "test_set_m": 2}})))
    before = (repo.path / "results/metrics.json").read_text()
    split = (repo.path / "data/split.json").read_text()
    assert repo.run(sys.executable, "stages/split.py", "--params", str(other)).returncode == 0
    res = repo.run(sys.executable, "stages/evaluate.py", "--params", str(other), check=False)
    assert res.returncode == 2
    assert "error: models/base.pt was made from another " in res.stderr and "dvc repro" in res.stderr
    assert (repo.path / "results/metrics.json").read_text() == before
    again = repo.dvc("repro").stdout  # the split comes back from DVC's cache (a cached output now), nothing runs
    assert repo.ran(again) == {"local_manifest"} and "Stage 'split' is cached - skipping run" in again, again
    assert (repo.path / "data/split.json").read_text() == split


def test_editing_the_data_local_folder_reruns_its_checks_and_download_and_nothing_else_does(tmp_path_factory):
    """data.local lives outside DVC: the local_manifest stage hashes it on every repro, so an edit in place reruns
    selection (the folder's checks, before anything else) and download (and what follows), while an unchanged
    folder reruns nothing."""
    from test_converters import make_headct

    raw = make_headct(tmp_path_factory.mktemp("headct-raw"))
    repo = Repo(tmp_path_factory.mktemp("local"), tiny_params({"classname": "headct", "data": {"local": str(raw)}}))
    first = repo.dvc("repro", "download")
    assert repo.ran(first.stdout) == {"local_manifest", "selection", "download"}
    assert repo.ran(repo.dvc("repro", "download").stdout) == {"local_manifest"}  # always runs; same output
    image = raw / "head_ct" / "head_ct" / "000.png"
    image.write_bytes((raw / "head_ct" / "head_ct" / "001.png").read_bytes())  # an edit in place
    again = repo.dvc("repro", "download")
    assert repo.ran(again.stdout) == {"local_manifest", "selection", "download"}
    manifest = json.loads((repo.path / "data/local.json").read_text())
    assert manifest["kind"] == "folder" and any(f["path"].endswith("000.png") for f in manifest["files"])


def test_two_queued_experiments_run_in_parallel_and_leave_the_workspace_alone(repo):
    """The advice for parallel runs (README, docs/reliability.md): `dvc exp run --queue` then
    `dvc queue start -j 2`; each experiment runs in its own temporary copy, so both are saved and the
    workspace's params.yaml is untouched (two `dvc exp run` at once in one workspace fail on DVC's lock).
    The two differ in an evaluation param not run before (so not in the run cache): each reruns evaluate."""
    import time

    params = (repo.path / "params.yaml").read_text()
    for size in ("7", "9"):
        repo.dvc("exp", "run", "--queue", "-S", f"evaluate.batch_size={size}")
    repo.dvc("queue", "start", "-j", "2")
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        status = repo.dvc("queue", "status").stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(5)
    repo.dvc("queue", "stop", "--kill", check=False)
    assert "Failed" not in status, status
    assert status.count("Success") >= 2, status
    assert (repo.path / "params.yaml").read_text() == params
    shown = json.loads(repo.dvc("exp", "show", "--json").stdout)
    sizes = set()
    for commit in shown:
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs") or []:
                data = rev.get("data") or {}
                params = ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}
                metrics = ((data.get("metrics") or {}).get("results/metrics.json") or {}).get("data") or {}
                if params.get("evaluate", {}).get("batch_size") in (7, 9) and "base" in metrics:
                    sizes.add(params["evaluate"]["batch_size"])
    assert sizes == {7, 9}, json.dumps(shown)[:2000]
