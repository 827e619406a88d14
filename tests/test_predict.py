"""`ahl predict` on the embedded demo's images with a small real (untrained) DRA model and AHL heads saved as the
pipeline saves them: the scores are the ones the stages compute (base: score_images; AHL: the feature cache and
score_features), heatmaps are written, unreadable files are listed, bad paths are clear errors.

The match with evaluate's own results/scores.csv after a real `dvc repro` is tested in tests/test_pipeline.py."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from ahl import cli, provenance
from ahl.data.mvtec import load_images, read_subset
from ahl.errors import UserError
from ahl.features import CacheConfig, load_cache, write_cache
from ahl.model import BackboneConfig, Checkpoint, build_model, load_checkpoint, load_heads, save_checkpoint, save_heads
from ahl.predict import parser, predict
from ahl.scoring import score_features, score_images

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
        reference = [f.mean(0) for f in model.features(torch.from_numpy(normals[:3]).permute(0, 3, 1, 2) / 255.0)]
    meta = {"model": "dra", "backbone": asdict(backbone), "topk": 0.1, "margin": 5.0}
    (out / "models").mkdir()
    save_checkpoint(out / "models/base.pt", Checkpoint(model, reference, meta))
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
    config = CacheConfig(families=("cutpaste", "cutmix"), batch_size=7, pseudo_rotation=0.0)  # not predict's 32
    write_cache(out / "cache", model, reference, splits, config, seed=0, device="cpu")
    return out


def args(run_dir: Path, *inputs, **options) -> argparse.Namespace:
    argv = [str(i) for i in inputs] + [
        "--base",
        str(run_dir / "models/base.pt"),
        "--ahl",
        str(run_dir / "models/ahl.pt"),
    ]
    argv += ["--thresholds", str(run_dir / "models/thresholds.json"), "--out", str(run_dir / "predictions.csv")]
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
    base = score_images(ckpt.model, images, ckpt.reference, torch.device("cpu"), 32)[0]
    heads, _ = load_heads(run_dir / "models/ahl.pt")
    ahl = score_features(cache.test, heads, cache.reference, "cpu", 32)
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
    (run_dir / "models/thresholds.json").write_text(
        json.dumps({"base": {"threshold": 1e9}, "ahl": {"threshold": -1e9}})
    )
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
        (["{good}"], {"model": "ahl", "ahl": "{tmp}/none.pt"}, "missing checkpoint"),
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


def test_thresholds_file_without_the_model_is_an_error(run_dir, small_dataset):
    (run_dir / "models/thresholds.json").write_text(json.dumps({"base": {"threshold": 0.5}}))
    try:
        good = read_subset(small_dataset, "brick").root / "test/good/000.png"
        with pytest.raises(UserError, match="has no threshold for 'ahl'"):
            predict(args(run_dir, good))
    finally:
        (run_dir / "models/thresholds.json").unlink()


def test_command_line_one_line_errors(tmp_path, capsys):
    """`ahl predict` (the console script's function) and `python -m ahl.predict`: exit 2 with one `error:` line."""
    none = str(tmp_path / "none.png")
    expected = f"error: no such file or folder: {none}; give images, folders of images or a glob pattern"
    for argv in (["predict", none], ["nope"]):
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        assert exit_.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == expected and err[1].startswith("usage: ahl COMMAND") and "predict" in err[3]
    res = subprocess.run(
        [sys.executable, "-m", "ahl.predict", none], check=False, capture_output=True, text=True, cwd=ROOT
    )
    assert res.returncode == 2 and res.stderr.strip() == expected
