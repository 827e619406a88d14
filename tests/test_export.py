"""`ahl export` of the tiny pipeline's trained runs (DRA and DevNet, each with AHL on it) to ONNX and OpenVINO: the
same scores, head scores, maps and decisions as the scoring object on every test image; `ahl infer` (torch, timm and
dvc blocked) writes predict's decisions; the README's Python example runs; broken exports are one line."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import Repo, tiny_params

from ahl.core.errors import UserError
from ahl.data.mvtec import load_images, read_subset
from ahl.deploy import cli
from ahl.deploy.export import export
from ahl.deploy.exported import load_exported
from ahl.evaluation.decision import TOLERANCE
from ahl.evaluation.scorer import Scorer
from ahl.models.heads import HeadsEnsemble

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("torch", "timm", "torchvision", "dvc", "dvclive", "sklearn", "yaml", "tqdm")  # none in .[deploy]


def _test_set(repo: Path, size: int) -> tuple[list[Path], np.ndarray]:
    subset = read_subset(repo / "data/mvtec", "brick")
    files = [*subset.test_good, *[f for c in subset.anomaly_classes for f in subset.anomalies[c]]]
    return [subset.root / f for f in files], load_images(subset.root, files, size)


@pytest.fixture(scope="module")
def devnet(tmp_path_factory):
    """The tiny pipeline with DevNet as the base model, reproduced."""
    repo = Repo(tmp_path_factory.mktemp("devnet") / "repo", tiny_params({"base": {"model": "devnet"}}))
    repo.dvc("repro")
    return repo.path


@pytest.fixture(scope="module")
def runs(reproduced, devnet, tmp_path_factory):
    """{(base model, model, format): (scorer, export folder)} and the test images, for DRA and DevNet."""
    out, exported = tmp_path_factory.mktemp("deploy"), {}
    for name, repo in (("dra", reproduced[0].path), ("devnet", devnet)):
        files = {"base": repo / "models/base.pt", "ahl": repo / "models/ahl.pt"}
        scorer = Scorer.load(files["base"], files["ahl"], thresholds=repo / "models/thresholds.json")
        for model in ("base", "ahl"):
            for fmt in ("onnx", "openvino"):
                folder = out / f"{name}-{model}-{fmt}"
                exported[name, model, fmt] = scorer, export(scorer, folder, fmt=fmt, model=model, checkpoints=files)
    return exported, _test_set(reproduced[0].path, scorer.size)


# The graph computes in float32 as the scorer does, but fuses and reorders ops: the backbone's features agree to
# ~1e-6 relative, and the heads keep that (1e-4 relative holds for the base models, with 1e-6 absolute for scores
# near 0). AHL's heads read the feature cache, float32 by default: the export promises TOLERANCE (2.5e-4) absolute
# on AHL's scores, and decisions are compared exactly. With a float16 cache (features.dtype: float16) the graph
# rounds as the lab does, bit for bit on both runtimes (tests/test_rounding.py), but a 1e-6 difference can still
# carry a feature across a float16 rounding step, which moves an AHL score by up to ~1e-3 absolute whatever its
# size (test_a_float16_cache_exports_within_its_rounding). The measured maxima are in docs/deployment.md.
RTOL = {"base": 1e-4, "ahl": 1e-3}


def assert_scores_close(model: str, got: np.ndarray, want: np.ndarray) -> None:
    if model == "base":
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    else:
        np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
@pytest.mark.parametrize("model", ["base", "ahl"])
@pytest.mark.parametrize("name", ["dra", "devnet"])
def test_exported_scores_maps_and_decisions_equal_the_scorers(runs, name, model, fmt):
    exported, (_, images) = runs
    scorer, path = exported[name, model, fmt]
    ours = scorer.score_images(images, 8, [model])
    line = load_exported(path)
    got = line.score(images, batch_size=5)  # another batch size: the batch is dynamic
    rtol = RTOL[model]
    assert_scores_close(model, got["score"], ours.final[model])
    heads = ours.heads[model]
    np.testing.assert_allclose(got["head_scores"], heads, rtol=rtol, atol=rtol * max(1.0, float(np.abs(heads).max())))
    maps = ours.heatmaps(model, (scorer.size, scorer.size))
    np.testing.assert_allclose(got["anomaly_map"], maps, rtol=rtol, atol=rtol * max(1.0, float(np.abs(maps).max())))
    threshold = scorer.threshold(model)
    assert threshold is not None and line.threshold == threshold
    assert (line.decide(got["score"]) == (ours.final[model] > threshold)).all()
    assert line.head_names == tuple(scorer._heads(model).head_names)


def test_an_ablation_ensemble_exports_too(runs, tmp_path):
    """`ahl.cdl: false` trains T independent heads averaged (HeadsEnsemble): the graph holds all of them."""
    exported, (_, images) = runs
    scorer, _ = exported["dra", "ahl", "onnx"]
    members = [scorer.ahl, scorer.base.model.heads]  # two heads of the same kind stand in for T trained copies
    ensemble = Scorer(scorer.base, HeadsEnsemble(members), dict(scorer.ahl_meta), dict(scorer.thresholds))
    ours = ensemble.score_images(images, 8, ["ahl"])
    got = load_exported(export(ensemble, tmp_path / "ens", model="ahl")).score(images)
    assert_scores_close("ahl", got["score"], ours.final["ahl"])
    assert got["head_scores"].shape[1] == len(ensemble.ahl.head_names) == 2 * len(scorer.ahl.head_names)


def test_a_float16_cache_exports_within_its_rounding(runs, tmp_path):
    """AHL's heads on a float16 cache: the graph rounds the features as the scorer does; the scores agree within
    the float16 steps a 1e-6 difference of a feature can cross (1e-3 absolute), the decisions exactly."""
    exported, (_, images) = runs
    scorer, _ = exported["dra", "ahl", "openvino"]
    half = Scorer(scorer.base, scorer.ahl, dict(scorer.ahl_meta, feature_dtype="float16"), dict(scorer.thresholds))
    ours = half.score_images(images, 8, ["ahl"])
    line = load_exported(export(half, tmp_path / "half", fmt="openvino", model="ahl"))
    got = line.score(images)
    assert json.loads((tmp_path / "half" / "metadata.json").read_text())["feature_dtype"] == "float16"
    np.testing.assert_allclose(got["score"], ours.final["ahl"], rtol=0, atol=1e-3)
    assert (line.decide(got["score"]) == (ours.final["ahl"] > half.threshold("ahl"))).all()


def test_metadata_records_what_the_line_needs(runs, reproduced):
    exported, _ = runs
    scorer, path = exported["dra", "ahl", "openvino"]
    meta = json.loads((path.parent / "metadata.json").read_text())
    assert meta["model"] == "ahl" and meta["model_name"] == scorer.names["ahl"] and meta["image_size"] == scorer.size
    assert meta["classname"] == "brick"  # the subset `ahl serve --labels` writes into
    assert meta["input"] == {"name": "images", "layout": "NHWC", "dtype": "uint8", "channels": "RGB"}
    assert meta["outputs"] == ["score", "head_scores", "anomaly_map"] and meta["threshold"] == scorer.threshold("ahl")
    from ahl.core.provenance import inputs, sha256_file

    repo = reproduced[0].path
    assert meta["inputs"] == inputs(base=repo / "models/base.pt", ahl=repo / "models/ahl.pt")
    assert sorted(meta["files"]) == ["model.bin", "model.xml"]
    assert meta["files"]["model.bin"] == sha256_file(path.parent / "model.bin")
    assert sorted(p.name for p in path.parent.iterdir()) == ["metadata.json", "model.bin", "model.xml"]
    # how the threshold was chosen, under which runtime, on which features, from which preprocessing and exporter
    thresholds = json.loads((repo / "models/thresholds.json").read_text())
    assert meta["decision"] == "score > threshold" and meta["feature_dtype"] == "float32"
    calibration = meta["calibration"]
    assert calibration["rule"] == thresholds["ahl"]["rule"] and calibration["target_fpr"] == thresholds["ahl"]["target_fpr"]
    assert calibration["validation"]["normal"] == thresholds["ahl"]["validation"]["normal"] > 0
    assert calibration["runtime"]["device"] == "cpu" and calibration["runtime"]["dtype"] == "float32"
    assert set(calibration["firmness"]) == {"on_highest_normal", "gap_below", "gap_above"}
    assert meta["backbone"]["name"] == "efficientnet_lite0" and meta["backbone"]["image_size"] == scorer.size
    assert meta["backbone"]["n_scales"] == 2 and meta["backbone"]["resize"] in ("bilinear", "nearest")
    assert meta["preprocessing"]["normalisation"]["mean"] == [0.485, 0.456, 0.406]
    assert meta["exporter"]["opset"] == 18 and meta["exporter"]["torch"] and meta["exporter"]["openvino"]
    assert TOLERANCE <= meta["tolerance"] and 0 <= meta["tolerance_measured"]["max_abs_difference"] < TOLERANCE


def _blocked(code: str) -> str:
    return f"import sys\nfor name in {BLOCKED!r}: sys.modules[name] = None\n{code}"


def test_ahl_infer_without_torch_decides_as_ahl_predict(runs, reproduced, tmp_path):
    """`ahl infer` from each format, with torch, timm, dvc and sklearn unimportable, against `ahl predict`."""
    exported, (paths, _) = runs
    repo = reproduced[0].path
    folder = tmp_path / "images"
    folder.mkdir()
    for i, p in enumerate(paths):
        shutil.copy(p, folder / f"{i:03d}_{p.parent.name}.png")
    cli.main(["predict", str(folder), "--out", str(tmp_path / "predict.csv"), "--base", str(repo / "models/base.pt"),
              "--ahl", str(repo / "models/ahl.pt"), "--thresholds", str(repo / "models/thresholds.json"),
              "--params", str(tmp_path / "none.yaml")])  # fmt: skip
    lab = pd.read_csv(tmp_path / "predict.csv")
    for fmt in ("onnx", "openvino"):
        out, heat = tmp_path / f"{fmt}.csv", tmp_path / f"heat-{fmt}"
        argv = ["infer", str(folder), "--export", str(exported["dra", "ahl", fmt][1].parent), "--out", str(out)]
        code = f"from ahl.deploy import cli\ncli.main({[*argv, '--heatmaps', str(heat)]!r})"
        res = subprocess.run([sys.executable, "-c", _blocked(code)], capture_output=True, text=True, cwd=ROOT)
        assert res.returncode == 0, res.stderr
        line = pd.read_csv(out)
        assert list(line["path"]) == list(lab["path"]) and (line["is_anomaly"] == lab["is_anomaly"]).all()
        assert line["is_anomaly"].any() and not line["is_anomaly"].all()
        assert_scores_close("ahl", line["score"].to_numpy(), lab["score"].to_numpy())
        assert list(line.columns[:5]) == ["path", "score", "is_anomaly", "threshold", "borderline"]
        assert "ahl_composite" in line
        tolerance = json.loads((exported["dra", "ahl", fmt][1].parent / "metadata.json").read_text())["tolerance"]
        near = (line["score"] - line["threshold"]).abs() <= tolerance
        assert (line["borderline"] == near).all() and (lab["borderline"] == ((lab["score"] - lab["threshold"]).abs()
                                                                            <= TOLERANCE)).all()  # fmt: skip
        assert sorted(p.name for p in heat.iterdir()) == sorted(p.name for p in folder.iterdir())


def test_the_readme_python_example_runs(reproduced, tmp_path):
    """The README's example, as printed there, in a project that holds the reproduced run."""
    text = (ROOT / "README.md").read_text()
    example = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    for part in ("models", "data", "params.yaml"):
        (tmp_path / part).symlink_to(reproduced[0].path / part)
    res = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "deploy" / "model.xml").is_file()
    assert "same decisions: True" in res.stdout


def test_broken_exports_and_bad_images_are_one_line(runs, tmp_path):
    exported, (paths, images) = runs
    scorer, path = exported["dra", "base", "onnx"]
    broken = tmp_path / "broken"
    shutil.copytree(path.parent, broken)
    data = (broken / "model.onnx").read_bytes()
    (broken / "model.onnx").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(UserError, match=r"model.onnx does not match .*metadata.json .*corrupt or truncated"):
        load_exported(broken)
    (broken / "model.onnx").write_bytes(data[:1000] + bytes(256) + data[1256:])  # corrupted, same size
    with pytest.raises(UserError, match="corrupt or truncated"):
        load_exported(broken)
    (broken / "model.onnx").write_bytes(data)
    shutil.copy(exported["dra", "ahl", "onnx"][1].parent / "metadata.json", broken / "metadata.json")
    with pytest.raises(UserError, match="different exports"):  # another export's metadata
        load_exported(broken)
    meta = json.loads((path.parent / "metadata.json").read_text())
    (broken / "metadata.json").write_text(json.dumps(meta | {"image_size": 32}))
    with pytest.raises(UserError, match=r"takes images of shape .* but metadata.json says 32 x 32"):
        load_exported(broken)
    (broken / "metadata.json").write_text("{not json")
    with pytest.raises(UserError, match="metadata.json is corrupt"):
        load_exported(broken)
    with pytest.raises(UserError, match="holds no metadata.json"):
        load_exported(tmp_path)
    line = load_exported(path)
    with pytest.raises(UserError, match=r"images must be RGB \(N, 64, 64, 3\) .* got shape \(\d+, 64, 63, 3\)"):
        line.score(images[:, :, :-1])
    with pytest.raises(UserError, match=r"got shape \(\d+, 64, 64\)"):  # grey images, one channel
        line.score(images[..., 0])
    with pytest.raises(UserError, match=r"float images must lie in \[0, 1\]"):
        line.score(images.astype(np.float32))
    np.testing.assert_allclose(line.score(images / 255.0)["score"], line.score(images)["score"], rtol=1e-6)
    np.testing.assert_allclose(line.score(paths[:3])["score"], line.score(images[:3])["score"], rtol=1e-6)


def test_ahl_export_and_infer_commands(reproduced, tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.chdir(reproduced[0].path)
    blob = torch.load("models/base.pt", weights_only=True)
    torch.save(blob | {"format": 2}, tmp_path / "future.pt")  # a checkpoint of another version of this project
    cli.main(["export", "--format", "openvino", "--out", str(tmp_path / "deploy")])
    assert capsys.readouterr().out.strip() == str(tmp_path / "deploy" / "model.xml")
    meta = json.loads((tmp_path / "deploy" / "metadata.json").read_text())
    assert meta["model"] == "ahl" and sorted(meta["inputs"]) == ["ahl", "base", "thresholds"]
    from ahl.core.provenance import sha256_file

    assert meta["inputs"]["thresholds"] == sha256_file("models/thresholds.json")
    # the tolerance measured on the run's own images (was: 8 images of noise only)
    split = json.loads(Path("data/split.json").read_text())
    n_run = min(32, len(split["validation"]) + len(split["test"]))
    measured = meta["tolerance_measured"]
    assert measured["images"] == f"{n_run} of data/split.json's validation and test images and 8 seeded noise images"
    assert 0 <= measured["max_abs_difference"] < TOLERANCE <= meta["tolerance"]
    failures = [
        (["export", "--out", "data"], "--out data is a folder that holds other files"),
        (["export", "--base", str(tmp_path / "future.pt"), "--out", str(tmp_path / "f")], "is not a checkpoint of"),
        (["export", "--ahl", "typo.pt", "--out", str(tmp_path / "f")], "--ahl typo.pt: no such file"),
        (["export", "--thresholds", "typo.json", "--out", str(tmp_path / "f")], "--thresholds typo.json: no such file"),
        (["infer", str(tmp_path / "empty"), "--export", str(tmp_path / "deploy")], "no such file or folder"),
        (["infer", "models", "--export", str(tmp_path / "deploy")], "folder models holds no images"),
        (["infer", "data/mvtec", "--export", "models"], "models holds no metadata.json"),
    ]
    for argv, message in failures:
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "other").exists() and not (tmp_path / "f").exists()
    with pytest.raises(SystemExit) as exit_:  # argparse's choices: usage and the error
        cli.main(["export", "--format", "tflite", "--out", str(tmp_path / "other")])
    assert exit_.value.code == 2 and "invalid choice: 'tflite'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        cli.main(["export", "--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("ahl export ")
    cli.main(["--version"])
    assert capsys.readouterr().out.startswith("ahl ")


def test_only_the_default_inputs_may_be_absent(reproduced, tmp_path, monkeypatch, capsys, caplog):
    """Without models/ahl.pt and models/thresholds.json (a base model trained alone) the export says what it
    exported; the base model alone, with no threshold."""
    for name in ("base.pt",):
        (tmp_path / "models").mkdir(exist_ok=True)
        shutil.copy(reproduced[0].path / "models" / name, tmp_path / "models" / name)
    monkeypatch.chdir(tmp_path)
    cli.main(["export", "--out", "deploy"])
    said = capsys.readouterr().err + caplog.text
    assert "exported the base model alone" in said and "the export has no threshold" in said
    meta = json.loads((tmp_path / "deploy/metadata.json").read_text())
    assert meta["model"] == "base" and meta["threshold"] is None and sorted(meta["inputs"]) == ["base"]


def test_an_image_size_the_graph_cannot_resize_exactly_is_refused(runs, tmp_path):
    from ahl.models.base import BackboneConfig, Checkpoint

    exported, _ = runs
    scorer, _ = exported["dra", "base", "onnx"]
    meta = dict(scorer.base.meta, backbone=dict(scorer.base.meta["backbone"], image_size=65))
    odd = Scorer(Checkpoint(scorer.base.model, scorer.base.normal_mean, meta), None, {}, dict(scorer.thresholds))
    with pytest.raises(UserError, match="image size 65 is not a multiple of 2") as caught:
        export(odd, tmp_path / "odd")
    assert "\n" not in str(caught.value) and not (tmp_path / "odd").exists()
    with pytest.raises(UserError, match="backbone.image_size = 65 is not a multiple of 2"):
        BackboneConfig(name="efficientnet_lite0", image_size=65, n_scales=2)


def test_the_tolerance_is_measured_on_the_runs_own_images_only(runs, reproduced, tmp_path, monkeypatch):
    """The run's split and images where `ahl export` runs; another split (another sha256 than the one the base
    model records) is not the run's: then the noise images alone."""
    from ahl.deploy.export import run_images

    exported, _ = runs
    scorer, _ = exported["dra", "ahl", "onnx"]
    monkeypatch.chdir(reproduced[0].path)
    images, what = run_images(scorer)
    split = json.loads(Path("data/split.json").read_text())
    n = min(32, len(split["validation"]) + len(split["test"]))
    assert images.shape == (n, scorer.size, scorer.size, 3) and images.dtype == np.uint8
    assert what == f"{n} of data/split.json's validation and test images"
    other = tmp_path / "other"
    (other / "data").mkdir(parents=True)
    (other / "data" / "split.json").write_text(json.dumps(split) + "\n")  # the same samples, another file
    monkeypatch.chdir(other)
    assert run_images(scorer) is None
