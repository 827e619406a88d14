"""`ahl predict` on the embedded demo's images with a small real (untrained) DRA model and AHL heads saved as the
pipeline saves them: the scores are the ones the stages compute (base: the model's forward pass; AHL: the feature
cache and score_features), heatmaps are written, unreadable files are listed, bad paths are clear errors.

The match with evaluate's own results/scores.csv after a real `dvc repro` is tested in tests/test_pipeline.py."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import hostile_names, tree_digest
from hypothesis import HealthCheck, given, settings
from PIL import Image

from ahl.core import provenance
from ahl.core.errors import UserError
from ahl.data.mvtec import load_images, read_subset
from ahl.deploy import cli
from ahl.deploy.predict import parser, predict
from ahl.method.cache import CacheConfig, load_cache, write_cache
from ahl.method.forward import score_features
from ahl.models.backbones import to_input
from ahl.models.base import (
    BackboneConfig,
    Checkpoint,
    build_model,
    load_checkpoint,
    load_heads,
    save_checkpoint,
    save_heads,
)

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64


@pytest.fixture(scope="module")
def run_dir(small_dataset, tmp_path_factory) -> Path:
    """models/base.pt and models/ahl.pt of a DRA model (random weights, fixed seed) and a feature cache of the test
    images, written by the library functions the stages use."""
    out = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    backbone = BackboneConfig("efficientnet_lite0", "none", SIZE, 2)
    model = build_model("dra", backbone, topk=0.1, margin=5.0, warn=False).eval()
    subset = read_subset(small_dataset, "brick")
    normals = load_images(subset.root, subset.train_good, SIZE)
    with torch.no_grad():
        normal_mean = [f.mean(0) for f in model.features(torch.from_numpy(normals[:3]).permute(0, 3, 1, 2) / 255.0)]
    meta = {"model": "dra", "backbone": asdict(backbone), "topk": 0.1, "margin": 5.0}
    (out / "models").mkdir()
    save_checkpoint(out / "models/base.pt", Checkpoint(model, normal_mean, meta))
    with torch.no_grad():  # AHL's heads: the base heads moved a little (as training would)
        heads = build_model("dra", backbone, topk=0.1, margin=5.0, warn=False).heads
        heads.load_state_dict(model.heads.state_dict())
        for p in heads.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ahl_meta = {
        "model": "dra", "in_channels": 320, "topk": 0.1, "margin": 5.0, "official_geometry": False, "members": 0,
        "feature_dtype": "float16", "inputs": provenance.inputs(base=out / "models/base.pt"),
    }  # fmt: skip
    save_heads(out / "models/ahl.pt", heads, ahl_meta)
    test = [*subset.test_good, *[f for c in subset.anomaly_classes for f in subset.anomalies[c]]]
    splits = {
        name: (load_images(subset.root, files, SIZE), [0] * len(files), ["good"] * len(files), list(files))
        for name, files in (("train_normal", subset.train_good), ("train_anomaly", test[-2:]), ("test", test))
    }
    # not predict's batch of 32; a float16 cache, as ahl_meta says, so that predict's rounding of fresh features is
    # what the cache holds (the float16 path; the default cache is float32)
    config = CacheConfig(families=("cutpaste", "cutmix"), batch_size=7, pseudo_rotation=0.0, dtype="float16")
    write_cache(out / "cache", model, normal_mean, splits, config, seed=0, device="cpu")
    return out


@pytest.fixture(autouse=True)
def _in_the_run(request, monkeypatch):
    """Tests of a run work in its folder: predict's default paths (models/thresholds.json) are the run's, never
    the checkout's."""
    if "run_dir" in request.fixturenames:
        monkeypatch.chdir(request.getfixturevalue("run_dir"))


def args(run_dir: Path, *inputs, **options) -> argparse.Namespace:
    argv = [str(i) for i in inputs] + [
        "--base",
        str(run_dir / "models/base.pt"),
        "--ahl",
        str(run_dir / "models/ahl.pt"),
    ]
    if (run_dir / "models/thresholds.json").is_file():  # given and missing would be an error
        argv += ["--thresholds", str(run_dir / "models/thresholds.json")]
    argv += ["--out", str(run_dir / "predictions.csv")]
    for key, value in options.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return parser().parse_args(argv)


def test_scores_are_the_stages_scores(run_dir, small_dataset):
    """Base scores as evaluate computes them from images; AHL scores as evaluate computes them from the feature
    cache (float16). The same computation on the same inputs. Tolerances: the CPU's convolution kernels round
    differently for another batch size or grouping (here up to 2e-6 relative: base rtol 1e-5); a feature that sits
    on a float16 rounding boundary can then round to the neighbouring float16, which moves an AHL score by a small
    absolute amount whatever the score's size (measured up to 1.6e-4 here with the cache written in batches of 7,
    1e-4 in the pipeline test): AHL atol 5e-4 (scores range over about +-10)."""
    subset = read_subset(small_dataset, "brick")
    table = predict(args(run_dir, subset.root / "test"))
    cache = load_cache(run_dir / "cache")
    rel = [str(Path(p).relative_to(subset.root)) for p in table["path"]]
    assert sorted(rel) == sorted(cache.test.files) and table["error"].eq("").all()
    order = [rel.index(f) for f in cache.test.files]
    ckpt = load_checkpoint(run_dir / "models/base.pt")
    images = load_images(subset.root, cache.test.files, SIZE)
    with torch.no_grad():  # the base model's own forward pass, not the scorer's
        base = ckpt.model.heads.final_score(ckpt.model(to_input(images, "cpu"), ckpt.normal_mean)).numpy()
    heads, _ = load_heads(run_dir / "models/ahl.pt")
    ahl = score_features(cache.test, heads, cache.normal_mean, "cpu", 32)
    np.testing.assert_allclose(table["score_base"].to_numpy()[order], base, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(table["score_ahl"].to_numpy()[order], ahl, rtol=1e-5, atol=5e-4)
    assert (table["score"] == table["score_ahl"]).all()  # AHL decides when its heads are there
    heads_sum = -table["ahl_holistic"] + table["ahl_seen"] + table["ahl_pseudo"] + table["ahl_composite"]
    np.testing.assert_allclose(heads_sum, table["score_ahl"], rtol=1e-5, atol=1e-5)
    assert table["is_anomaly"].isna().all()  # no thresholds.json and no --threshold: no decision
    # the batch size does not change the scores (beyond float32 rounding)
    again = predict(args(run_dir, subset.root / "test", batch_size=5))
    np.testing.assert_allclose(again["score_base"], table["score_base"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(again["score_ahl"], table["score_ahl"], rtol=1e-5, atol=5e-4)


def test_heatmaps_thresholds_and_unreadable_files(run_dir, small_dataset, tmp_path):
    subset = read_subset(small_dataset, "brick")
    folder = tmp_path / "line"
    (folder / "a").mkdir(parents=True)
    for k, f in enumerate([subset.test_good[0], subset.anomalies["crack"][0]]):
        Image.open(subset.root / f).save(folder / "a" / f"{k}.png")
    Image.open(subset.root / subset.anomalies["hole"][0]).resize((80, 60)).save(folder / "b.jpg")
    (folder / "broken.png").write_bytes(b"not an image")
    write_thresholds(run_dir, {"base": {"threshold": 1e9}, "ahl": {"threshold": -1e9}})
    try:
        table = predict(args(run_dir, folder, heatmaps=tmp_path / "heat"))
        assert table["is_anomaly"].iloc[:3].tolist() == [True, True, True] and (table["threshold"][:3] == -1e9).all()
        base = predict(args(run_dir, folder, model="base", threshold=1e9))  # --threshold overrides the file
        assert not base["is_anomaly"].iloc[:3].any() and (base["score"] == base["score_base"]).iloc[:3].all()
    finally:
        (run_dir / "models/thresholds.json").unlink()
    written = pd.read_csv(run_dir / "predictions.csv", keep_default_na=False)
    assert written["path"].tolist() == [str(folder / n) for n in ("a/0.png", "a/1.png", "b.jpg", "broken.png")]
    broken = written.iloc[3]
    assert broken["score"] == "" and "cannot read image" in broken["error"] and "broken.png" in broken["error"]
    heat = {p.relative_to(tmp_path / "heat").as_posix() for p in (tmp_path / "heat").rglob("*.png")}
    assert heat == {"a/0.png", "a/1.png", "b.png"}
    assert Image.open(tmp_path / "heat/b.png").size == (80, 60)  # drawn at the image's own size
    assert table["heatmap"].iloc[0] == str(tmp_path / "heat/a/0.png")


def test_glob_and_duplicates(run_dir, small_dataset):
    subset = read_subset(small_dataset, "brick")
    pattern = str(subset.root / "test/*/00[01].png")
    table = predict(args(run_dir, pattern, subset.root / "test/good/000.png"))
    expected = sorted((subset.root / "test").glob("*/00[01].png"))
    assert table["path"].tolist() == [str(p) for p in expected]  # the explicit file was already matched


@pytest.mark.parametrize(
    "inputs, options, message",
    [
        (["nope/missing.png"], {}, "no such file or folder: nope/missing.png"),
        (["{tmp}/*.png"], {}, "matches no files"),
        (["{tmp}/empty"], {}, "holds no images"),
        (["{good}"], {"base": "{tmp}/none.pt"}, "missing checkpoint"),
        (["{good}"], {"model": "ahl", "ahl": "{tmp}/none.pt"}, "none.pt: no such file; give an existing file"),
        (["{good}"], {"thresholds": "{tmp}/typo.json"}, "typo.json: no such file; give an existing file"),
        (["{good}"], {"device": "tpu"}, "--device = 'tpu' is not a device"),
        (["{broken}"], {}, "none of the 1 files could be read as an image"),
    ],
)
def test_bad_inputs_are_clear_errors(run_dir, small_dataset, tmp_path, inputs, options, message):
    good = read_subset(small_dataset, "brick").root / "test/good/000.png"
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty/notes.txt").write_text("no images here")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub/broken.png").write_bytes(b"\x89PNG broken")
    names = {"tmp": tmp_path, "good": good, "broken": tmp_path / "sub/broken.png"}
    a = args(run_dir, *[i.format(**names) for i in inputs])
    for key, value in options.items():
        setattr(a, key, value.format(**names))
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        predict(a)


def write_thresholds(run_dir: Path, entries: dict, **made_from: Path) -> None:
    """models/thresholds.json as calibrate writes it: the entries and the sha256 of the models they were made for."""
    made_from = made_from or {"base": run_dir / "models/base.pt", "ahl": run_dir / "models/ahl.pt"}
    (run_dir / "models/thresholds.json").write_text(json.dumps({**entries, "inputs": provenance.inputs(**made_from)}))


def test_thresholds_file_without_the_model_is_an_error(run_dir, small_dataset):
    write_thresholds(run_dir, {"base": {"threshold": 0.5}})
    try:
        good = read_subset(small_dataset, "brick").root / "test/good/000.png"
        with pytest.raises(UserError, match="has no threshold for 'ahl'"):
            predict(args(run_dir, good))
    finally:
        (run_dir / "models/thresholds.json").unlink()


def test_thresholds_of_another_run_are_refused(run_dir, small_dataset, tmp_path):
    """A thresholds file made for other models (a copied run, an older calibrate) never decides: predict refuses
    it, as evaluate does, and names the file and the fix."""
    other = tmp_path / "other.pt"
    other.write_bytes(b"another base model")
    write_thresholds(run_dir, {"base": {"threshold": 0.5}, "ahl": {"threshold": 0.5}}, base=other)
    try:
        good = read_subset(small_dataset, "brick").root / "test/good/000.png"
        with pytest.raises(UserError, match=r"thresholds.json was made from another .*base.pt.*calibrate"):
            predict(args(run_dir, good))
        assert predict(args(run_dir, good, threshold=0.5))["threshold"].eq(0.5).all()  # --threshold: no file read
    finally:
        (run_dir / "models/thresholds.json").unlink()


def test_command_line_one_line_errors(tmp_path, capsys):
    """`ahl predict` (the console script's function) and `python -m ahl.deploy.predict`: exit 2, one `error:` line."""
    none = str(tmp_path / "none.png")
    expected = f"error: no such file or folder: {none}; give images, folders of images or a glob pattern"
    for argv in (["predict", none], ["nope"]):
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        assert exit_.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == expected and err[1].startswith("usage: ahl COMMAND") and "predict" in err[3]
    res = subprocess.run(
        [sys.executable, "-m", "ahl.deploy.predict", none], check=False, capture_output=True, text=True, cwd=ROOT
    )
    assert res.returncode == 2 and res.stderr.strip() == expected


def _tree_digest(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "inputs, options, message",
    [
        (["imgs/000.png"], {"out": "imgs/000.png"}, "is an input image or inside an input folder"),
        (["imgs"], {"out": "imgs/predictions.csv"}, "is an input image or inside an input folder"),
        (["imgs"], {"out": "imgs"}, "is a folder; name the CSV"),
        (["imgs"], {"out": "nowhere/p.csv"}, "the folder nowhere does not exist"),
        (["imgs"], {"heatmaps": "imgs"}, "overlaps the inputs"),
        (["imgs"], {"heatmaps": "imgs/heat"}, "overlaps the inputs"),
        (["imgs/sub"], {"heatmaps": "imgs"}, "overlaps the inputs"),
        (["imgs/000.png"], {"heatmaps": "imgs"}, "overlaps the inputs"),
        (["imgs/*.png"], {"heatmaps": "imgs"}, "overlaps the inputs"),
        (["imgs"], {"heatmaps": "note.txt"}, "is a file; name a folder"),
        (["imgs/link.png"], {"out": "imgs/000.png"}, "is an input image"),  # through a link: the same file
    ],
)
def test_outputs_that_would_overwrite_or_feed_inputs_are_refused_before_scoring(
    run_dir, small_dataset, tmp_path, monkeypatch, inputs, options, message
):
    """--out and --heatmaps are checked against the inputs (links resolved) before anything is scored or
    written: no input is replaced and no overlay can be scored as an input on the next run."""
    good = read_subset(small_dataset, "brick").root / "test/good"
    (tmp_path / "imgs/sub").mkdir(parents=True)
    for name in ("000.png", "001.png", "sub/002.png"):
        (tmp_path / "imgs" / name).write_bytes((good / Path(name).name).read_bytes())
    (tmp_path / "imgs/link.png").symlink_to(tmp_path / "imgs/000.png")
    (tmp_path / "note.txt").write_text("not a folder")
    monkeypatch.chdir(tmp_path)
    before = _tree_digest(tmp_path)
    a = args(run_dir, *inputs)
    for key, value in options.items():
        setattr(a, key, value)
    with pytest.raises(UserError, match=message):
        predict(a)
    assert _tree_digest(tmp_path) == before


def test_csv_cells_that_a_spreadsheet_would_run_are_neutralised(run_dir, small_dataset, tmp_path, monkeypatch):
    """An image named like a formula is written as text ('=...), scores stay numbers."""
    good = read_subset(small_dataset, "brick").root / "test/good/000.png"
    names = ['=HYPERLINK("evil.example","y").png', "+1.png", "-2.png", "@3.png", "plain.png"]
    for name in names:
        (tmp_path / name).write_bytes(good.read_bytes())
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out" / "p.csv"
    out.parent.mkdir()
    predict(args(run_dir, *(f"./{n}" for n in names), out=out))  # ./-2.png: not an option to argparse
    written = pd.read_csv(out)
    assert sorted(written["path"]) == sorted(["'" + n for n in names[:4]] + ["plain.png"])
    assert written["score"].dtype.kind == "f" and written["score"].notna().all()  # numbers stay numbers


def test_images_above_the_pixel_limit_are_skipped_and_the_batch_is_scored(run_dir, small_dataset, tmp_path):
    """A huge image (a few KB of PNG, gigabytes decoded) is refused from its header with a warning, and the good
    images of its batch are still scored; a decompression bomb past PIL's own limit is skipped the same way."""
    subset = read_subset(small_dataset, "brick")
    folder = tmp_path / "line"
    folder.mkdir()
    Image.open(subset.root / subset.test_good[0]).save(folder / "a.png")
    Image.new("L", (3000, 2000)).save(folder / "big.png")  # 6,000,000 pixels
    Image.new("L", (15000, 13000)).save(folder / "bomb.png")  # 195 M pixels: above 2 x PIL's MAX_IMAGE_PIXELS
    table = predict(args(run_dir, folder, threshold=0.0, max_pixels=5_000_000))
    rows = dict(zip(table["path"].map(lambda p: Path(p).name), table["error"]))
    assert rows["a.png"] == "" and table.loc[table["path"].str.endswith("a.png"), "score"].notna().all()
    assert "big.png is 3000 x 2000 = 6,000,000 pixels, above the limit of 5,000,000 (--max-pixels)" in rows["big.png"]
    assert "cannot read image" in rows["bomb.png"] and "decompression bomb" in rows["bomb.png"]  # PIL refuses it


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(image=hostile_names(on_disk=True), folder=hostile_names(on_disk=True), out=hostile_names(on_disk=True))
def test_fuzzed_file_names_are_scored_or_one_line_and_nothing_outside_changes(
    run_dir, small_dataset, image, folder, out
):
    """Images, their folder and the CSV and heatmap outputs with hostile names: `ahl predict` scores them or stops
    with a one-line UserError; nothing outside the temporary project changes; no CSV cell starts a formula."""
    good = read_subset(small_dataset, "brick").root / "test/good/000.png"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "outside").mkdir()
        (root / "outside" / "keep.png").write_bytes(good.read_bytes())
        project = root / "project"
        (project / folder).mkdir(parents=True)
        (project / folder / f"{image}.png").write_bytes(good.read_bytes())
        (project / folder / "plain.png").write_bytes(good.read_bytes())
        before = tree_digest(root / "outside")
        a = args(run_dir, project / folder, threshold=0.0)
        a.out, a.heatmaps = project / f"{out}.csv", project / f"heat{out}"
        try:
            table = predict(a)
        except UserError as err:
            assert "\n" not in str(err), repr(str(err))
        else:
            assert len(table) == (2 if image != "plain" else 1) and table["score"].notna().all()
            cells = pd.read_csv(a.out, keep_default_na=False, dtype=str)["path"]
            assert not cells.str.match(r"[=+\-@\t\r]").any(), cells.tolist()
        assert tree_digest(root / "outside") == before
        assert sorted(p.name for p in root.iterdir()) == ["outside", "project"]


def test_a_checkpoint_of_the_other_kind_is_named_as_such(run_dir, small_dataset):
    """ahl.pt given as base.pt (and the reverse) is one line saying what the file holds, not a KeyError."""
    with pytest.raises(UserError, match=r"ahl.pt holds AHL's heads \(models/ahl.pt\), not the base model"):
        load_checkpoint(run_dir / "models/ahl.pt")
    with pytest.raises(UserError, match=r"base.pt holds the base model \(models/base.pt\), not AHL's heads"):
        load_heads(run_dir / "models/base.pt")
    swapped = args(run_dir, read_subset(small_dataset, "brick").root / "test/good")
    swapped.base, swapped.ahl = swapped.ahl, swapped.base
    with pytest.raises(UserError, match="not the base model"):
        predict(swapped)


@pytest.mark.parametrize("damage", ["nan", "random bytes"])
def test_a_cache_array_with_non_finite_values_is_one_line_naming_it(run_dir, tmp_path, damage):
    """Bytes replaced in a cached array (NaN or inf among them) are refused on load, not met later by k-means."""
    cache = tmp_path / "cache"
    shutil.copytree(run_dir / "cache", cache)
    victim = cache / "train_normal.s0.npy"
    if damage == "nan":
        x = np.load(victim)
        x.flat[7] = np.nan
        np.save(victim, x)
    else:
        header = len(victim.read_bytes()) - np.load(victim).nbytes
        body = np.random.default_rng(0).integers(0, 256, len(victim.read_bytes()) - header, dtype=np.uint8)
        victim.write_bytes(victim.read_bytes()[:header] + body.tobytes())
    with pytest.raises(UserError, match=r"train_normal.s0.npy holds non-finite values .*`dvc repro -f features`"):
        load_cache(cache)
