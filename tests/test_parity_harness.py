"""The parity harness (benchmarks/parity) against a tiny FAKE official tree: the shims, the hand-over of our
split to the official dataset class, the runner, and the errors for a missing checkout. No network, no real
official code needed."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from benchmarks.parity import run as run_mod
from benchmarks.parity import units
from benchmarks.parity.common import MissingCheckout, check_checkout
from benchmarks.parity.official_runner import handover_lists, install_handover, write_handover
from benchmarks.parity.shims import (
    FeatureBody,
    Patches,
    ScoreRecorder,
    import_official,
    official_path,
    replace_backbone,
    sorted_listdir,
    standard_reference,
    torch2,
)

ROOT = Path(__file__).resolve().parents[1]

FAKE_FILES = {
    "modeling/__init__.py": "",
    "modeling/net.py": '''
        import torch
        from torch import nn

        NET_OUT_DIM = {"resnet18": 512}

        def build_feature_extractor(backbone, cfg=None):
            raise RuntimeError("the fake official backbone builder would download ImageNet weights")

        class Model(nn.Module):
            def __init__(self, backbone="resnet18"):
                super().__init__()
                self.feature_extractor = build_feature_extractor(backbone)
                self.conv = nn.Conv2d(NET_OUT_DIM[backbone], 1, kernel_size=1)

            def forward(self, x):
                return self.conv(self.feature_extractor(x))

        def to_gpu(t):
            return t.cuda()
    ''',
    "modeling/layers/__init__.py": "",
    "modeling/layers/deviation_loss.py": '''
        import torch

        def reference():
            return torch.normal(mean=0.0, std=torch.full([5000], 1.0))
    ''',
    "datasets/__init__.py": "",
    "datasets/mvtecad.py": '''
        import os
        import numpy as np

        class MVTecAD:
            def __init__(self, args, train=True):
                self.args, self.train = args, train
                root = os.path.join(args.dataset_root, args.classname)
                split = "train" if train else "test"
                normal = [split + "/good/" + f for f in os.listdir(os.path.join(root, split, "good"))]
                outlier, _ = self.split_outlier()
                self.images = normal + outlier
                self.labels = np.array([0] * len(normal) + [1] * len(outlier))

            def split_outlier(self):
                root = os.path.join(self.args.dataset_root, self.args.classname, "test")
                files = ["test/" + c + "/" + f for c in os.listdir(root) if c != "good"
                         for f in os.listdir(os.path.join(root, c))]
                np.random.RandomState(42).shuffle(files)
                n = self.args.nAnomaly
                return (files[:n], []) if self.train else (files[n:], [])
    ''',
    "train.py": '''
        import argparse
        import torch
        from sklearn.metrics import roc_auc_score
        from datasets.mvtecad import MVTecAD
        from modeling.net import Model

        class Loader:
            def __init__(self, dataset):
                self.dataset = dataset

        class Trainer:
            def __init__(self, args):
                self.train_set = MVTecAD(args, train=True)
                self.test_loader = Loader(MVTecAD(args, train=False))
                self.model = Model(args.backbone).cuda()

            def eval(self):
                n = len(self.test_loader.dataset.images)
                x = torch.rand(n, 3, 32, 32).cuda()
                with torch.no_grad():
                    scores = self.model(x).mean(dim=(1, 2, 3))
                print("AUC-ROC", roc_auc_score(self.test_loader.dataset.labels, scores.numpy()))

        if __name__ == "__main__":
            parser = argparse.ArgumentParser()
            parser.add_argument("--dataset_root")
            parser.add_argument("--classname")
            parser.add_argument("--backbone", default="resnet18")
            parser.add_argument("--nAnomaly", type=int, default=10)
            args = parser.parse_args()
            trainer = Trainer(args)
            trainer.model = trainer.model.to("cuda")
            trainer.eval()
    ''',
}


@pytest.fixture()
def fake_official(tmp_path) -> Path:
    """A fake checkout with the official DRA repository's module and function names."""
    root = tmp_path / "official-dra"
    for rel, text in FAKE_FILES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


@pytest.fixture()
def mvtec(tmp_path) -> Path:
    """A data folder in MVTec layout (empty files: the fake official code never reads pixels)."""
    base = tmp_path / "mvtec" / "cls"
    files = {"train/good": ["c.png", "a.png", "b.png"], "test/good": ["n2.png", "n1.png"],
             "test/hole": ["h2.png", "h1.png", "h3.png"], "test/stain": ["s1.png", "s2.png"]}  # fmt: skip
    for folder, names in files.items():
        (base / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            (base / folder / name).write_bytes(b"")
    return tmp_path / "mvtec"


SPLIT = {
    "classname": "cls",
    "setting": "general",
    "train": [{"file": f"train/good/{n}.png", "label": 0, "cls": "good", "seen": False, "contaminated": False}
              for n in "abc"] + [{"file": "test/hole/h2.png", "label": 1, "cls": "hole", "seen": False,
                                  "contaminated": False}],
    "test": [{"file": "test/good/n1.png", "label": 0, "cls": "good", "seen": False, "contaminated": False},
             {"file": "test/good/n2.png", "label": 0, "cls": "good", "seen": False, "contaminated": False},
             {"file": "test/hole/h1.png", "label": 1, "cls": "hole", "seen": True, "contaminated": False},
             {"file": "test/stain/s1.png", "label": 1, "cls": "stain", "seen": False, "contaminated": False}],
    "seen_classes": ["hole"],
    "config": {},
}  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# missing checkouts


def test_missing_checkout_names_the_flag_and_where_to_get_it(tmp_path):
    with pytest.raises(MissingCheckout) as err:
        check_checkout("ahl", tmp_path / "nowhere")
    msg = str(err.value)
    assert "--official-ahl" in msg and "does not exist" in msg and "git clone https://github.com/mala-lab/AHL" in msg
    with pytest.raises(MissingCheckout, match=r"--official-devnet is required.*deviation-network-image"):
        check_checkout("devnet", None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingCheckout, match=r"not a checkout of https://github.com/Choubo/DRA \(no modeling/net.py\)"):
        check_checkout("dra", tmp_path / "empty")


def test_units_and_run_print_a_clear_error_for_a_missing_checkout(tmp_path, fake_official, capsys):
    code = units.main(["--official-dra", str(fake_official), "--official-devnet", str(tmp_path / "devnet"),
                       "--official-ahl", str(tmp_path / "ahl")])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --official-devnet") and "git clone https://github.com/Choubo/deviation-network-image" in err
    code = run_mod.main(["--official-dra", str(tmp_path / "x"), "--model", "dra", "--out", str(tmp_path / "o")])
    assert code == 2
    assert "git clone https://github.com/Choubo/DRA" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing started


def test_check_checkout_accepts_a_tree_with_the_marker(fake_official):
    assert check_checkout("dra", fake_official) == fake_official.resolve()


# --------------------------------------------------------------------------------------------------------------
# the shims


def test_cuda_calls_go_to_the_cpu_and_are_restored(fake_official):
    original = torch.Tensor.cuda, nn.Module.cuda, nn.Module.to
    (net,) = import_official(fake_official, "modeling.net")
    with Patches() as p:
        torch2(p)
        assert net.to_gpu(torch.ones(2)).device.type == "cpu"
        layer = nn.Linear(2, 2).cuda().to("cuda")
        assert layer.weight.device.type == "cpu"
        assert nn.Linear(2, 2).to(torch.float64).weight.dtype == torch.float64  # other uses of .to untouched
    assert (torch.Tensor.cuda, nn.Module.cuda, nn.Module.to) == original
    if not torch.cuda.is_available():
        with pytest.raises((AssertionError, RuntimeError)):
            net.to_gpu(torch.ones(2))


def test_backbone_builder_replaced_in_the_official_module(fake_official):
    (net,) = import_official(fake_official, "modeling.net")
    with pytest.raises(RuntimeError, match="download"):
        net.Model("resnet18")
    with Patches() as p:
        replace_backbone(p, net, "tiny", lambda: (nn.Conv2d(3, 7, 1), 7))
        model = net.Model("tiny")
        assert isinstance(model.feature_extractor, FeatureBody) and model.conv.in_channels == 7
        assert model(torch.rand(2, 3, 8, 8)).shape == (2, 1, 8, 8)
        with pytest.raises(ValueError, match="tiny"):
            net.build_feature_extractor("resnet18")
    assert "tiny" not in net.NET_OUT_DIM
    with pytest.raises(RuntimeError, match="download"):
        net.build_feature_extractor("resnet18")


def test_listing_sorted(fake_official, mvtec):
    (mvtecad,) = import_official(fake_official, "datasets.mvtecad")
    args = type("A", (), {"dataset_root": str(mvtec), "classname": "cls", "nAnomaly": 2})()
    listdir = os.listdir
    with Patches() as p:
        sorted_listdir(p)
        assert os.listdir(mvtec / "cls" / "train" / "good") == ["a.png", "b.png", "c.png"]
        assert mvtecad.MVTecAD(args, train=True).images[:3] == ["train/good/a.png", "train/good/b.png", "train/good/c.png"]
    assert os.listdir is listdir


def test_official_modules_of_two_checkouts_do_not_collide(tmp_path, fake_official):
    other = tmp_path / "other"
    (other / "modeling").mkdir(parents=True)
    (other / "modeling" / "__init__.py").write_text("")
    (other / "modeling" / "net.py").write_text("WHO = 'other'\n")
    (a,) = import_official(fake_official, "modeling.net")
    (b,) = import_official(other, "modeling.net")
    assert hasattr(a, "Model") and b.WHO == "other"
    assert "modeling" not in sys.modules
    with official_path(fake_official):
        einops = __import__("einops")
        x = torch.zeros(2, 3, 4)
        assert einops.rearrange(x, "e k n -> k n e").shape == (3, 4, 2)


def test_standard_reference_makes_the_official_draw_exact(fake_official):
    (layers,) = import_official(fake_official, "modeling.layers.deviation_loss")
    torch.manual_seed(0)
    assert abs(float(layers.reference().std()) - 1.0) > 1e-4  # a real draw
    with standard_reference(layers):
        r = layers.reference()
        assert r.numel() == 5000 and abs(float(r.mean())) < 1e-6 and abs(float(r.std()) - 1.0) < 1e-6
    assert layers.torch is torch


def test_score_recorder_keeps_per_image_scores():
    import sklearn.metrics

    with Patches() as p:
        rec = ScoreRecorder()
        rec.install(p)
        from sklearn.metrics import roc_auc_score  # what a script does after the patch

        assert roc_auc_score([0, 1, 1], [0.1, 0.9, 0.4]) == 1.0
    assert rec.calls == [([0.0, 1.0, 1.0], [0.1, 0.9, 0.4])]
    assert sklearn.metrics.roc_auc_score is not roc_auc_score


# --------------------------------------------------------------------------------------------------------------
# the hand-over of our split


def test_handover_lists_from_split_json(tmp_path):
    (tmp_path / "split.json").write_text(json.dumps(SPLIT))
    lists = write_handover(tmp_path / "split.json", tmp_path / "official" / "handover.json")
    assert json.loads((tmp_path / "official" / "handover.json").read_text()) == lists == handover_lists(SPLIT)
    assert lists["train_normal"] == ["train/good/a.png", "train/good/b.png", "train/good/c.png"]
    assert lists["train_anomaly"] == ["test/hole/h2.png"]
    assert lists["test_normal"] == ["test/good/n1.png", "test/good/n2.png"]
    assert lists["test_anomaly"] == ["test/hole/h1.png", "test/stain/s1.png"]


def test_official_dataset_gets_exactly_our_files(fake_official, mvtec):
    (mvtecad,) = import_official(fake_official, "datasets.mvtecad")
    args = type("A", (), {"dataset_root": str(mvtec), "classname": "cls", "nAnomaly": 1})()
    own = mvtecad.MVTecAD(args, train=True).images
    lists = handover_lists(SPLIT)
    with Patches() as p:
        install_handover(p, mvtecad, lists, "dra")
        train = mvtecad.MVTecAD(args, train=True)
        test = mvtecad.MVTecAD(args, train=False)
        args.nAnomaly = 0  # DRA's reference loader: normals only
        ref = mvtecad.MVTecAD(args, train=True)
    assert train.images == lists["train_normal"] + lists["train_anomaly"] and train.labels.tolist() == [0, 0, 0, 1]
    assert test.images == lists["test_normal"] + lists["test_anomaly"] and test.outlier_idx.tolist() == [2, 3]
    assert ref.images == lists["train_normal"]
    assert own != train.images  # without the hand-over it would have chosen its own anomaly
    assert mvtecad.MVTecAD(args, train=True).images != train.images  # restored


def test_runner_runs_the_fake_train_script_with_all_shims(tmp_path, fake_official, mvtec):
    (tmp_path / "split.json").write_text(json.dumps(SPLIT))
    write_handover(tmp_path / "split.json", tmp_path / "handover.json")
    out = tmp_path / "scores.csv"
    cmd = [sys.executable, str(ROOT / "benchmarks/parity/official_runner.py"), "--kind", "dra", "--official",
           str(fake_official), "--handover", str(tmp_path / "handover.json"), "--backbone", "resnet18",
           "--pretrained", "none", "--seed", "0", "--scores", str(out), "--", "--dataset_root", str(mvtec),
           "--classname", "cls", "--backbone", "resnet18", "--nAnomaly", "1"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [r["file"] for r in rows] == ["test/good/n1.png", "test/good/n2.png", "test/hole/h1.png", "test/stain/s1.png"]
    assert [r["label"] for r in rows] == ["0", "0", "1", "1"]
    assert all(np.isfinite(float(r["score"])) for r in rows)


# --------------------------------------------------------------------------------------------------------------
# run.py helpers


def test_edit_params_and_metrics(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("seed: 0\nbase:\n  epochs: 10\n")
    run_mod.edit_params(params, {"seed": 2, "base.epochs": 3})
    assert params.read_text().split() == ["seed:", "2", "base:", "epochs:", "3"]
    with pytest.raises(KeyError, match="base.nope"):
        run_mod.edit_params(params, {"base.nope": 1})
    scores = {"test/good/n1.png": 0.1, "test/good/n2.png": 0.5, "test/hole/h1.png": 0.9, "test/stain/s1.png": 0.3}
    m = run_mod.scores_metrics(SPLIT, scores)
    assert m["auc_roc"] == pytest.approx(0.75) and m["seen_auc_roc"] == 1.0 and m["unseen_auc_roc"] == 0.5
    with pytest.raises(ValueError, match="no score"):
        run_mod.scores_metrics(SPLIT, {"test/good/n1.png": 0.0})
    table = run_mod.summarise([{"class": "c", "model": "dra", "side": "ours", "seed": s, "auc_roc": v, "auc_pr": v,
                                "seconds": 10.0} for s, v in ((0, 0.8), (1, 0.9))])  # fmt: skip
    assert "| c | dra | ours | 0,1 | 0.850 ± 0.050 | 0.850 ± 0.050 | - | - | 10 ± 0 |" in table


# --------------------------------------------------------------------------------------------------------------
# official AHL on our feature cache


def _fake_cache(channels: int, size: int):
    from types import SimpleNamespace

    def fs(files):
        return SimpleNamespace(files=files, scales=[np.ones((len(files), channels, size, size), np.float16),
                                                    np.ones((len(files), channels, size // 2, size // 2), np.float16)])  # fmt: skip

    normals = [s["file"] for s in SPLIT["train"] if s["label"] == 0]
    return SimpleNamespace(
        train_normal=fs(normals), train_anomaly=fs(["test/hole/h2.png"]), test=fs([s["file"] for s in SPLIT["test"]]),
        pseudo={f: fs([""] * len(normals)) for f in ("draem", "cutpaste", "cutmix")},
    )


def test_official_ahl_needs_512_channels_and_3x3_maps():
    from benchmarks.parity.official_ahl import Unsupported, check_cache

    check_cache(_fake_cache(512, 6))
    with pytest.raises(Unsupported, match=r"512-channel.*scale 0 of the cache is 320x8x8.*resnet18"):
        check_cache(_fake_cache(320, 8))
    with pytest.raises(Unsupported, match="512x2x2"):
        check_cache(_fake_cache(512, 4))


def test_our_cache_written_in_the_official_ahl_layout(tmp_path, mvtec):
    from benchmarks.parity.official_ahl import write_feature_tree

    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    (work / "data" / "mvtec").symlink_to(mvtec)
    cache = _fake_cache(512, 6)
    lists = write_feature_tree(work, cache, SPLIT, tmp_path / "handover")
    base = tmp_path / "handover" / "cls"
    assert sorted(os.listdir(base / "train" / "good")) == ["a.png", "b.png", "c.png"]
    assert sorted(os.listdir(base / "test")) == ["good", "hole", "stain"]
    assert sorted(os.listdir(base / "test" / "hole")) == ["h1.png", "h2.png"]  # seen + test anomaly; h3 not in split
    assert np.load(base / "feature" / "test" / "stain" / "s1.npy").shape == (512, 6, 6)
    assert np.load(base / "feature_scale" / "train" / "good" / "a.npy").shape == (512, 3, 3)
    for folder in ("aug_dream", "aug_paste", "aug_mix", "aug_dream_scale", "aug_paste_scale", "aug_mix_scale"):
        assert sorted(os.listdir(base / folder / "train" / "good")) == ["a.npy", "b.npy", "c.npy"]
    assert lists == handover_lists(SPLIT)


def test_ours_runs_every_stage_of_dvc_yaml_in_its_order(tmp_path):
    """The harness runs this project's stage scripts in dvc.yaml's order; a renamed or missing script fails
    before any work instead of in the middle of a parity run."""
    stages = run_mod.pipeline_stages(ROOT)
    assert stages[0] == "selection" and stages[-1] == "evaluate" and set(run_mod.DATA_STAGES) <= set(stages)
    assert all((ROOT / "stages" / f"{s}.py").is_file() for s in stages)
    copy = tmp_path / "copy"
    run_mod.copy_project(ROOT, copy)  # the copy the harness runs holds what pipeline_stages reads
    assert run_mod.pipeline_stages(copy) == stages
    fake = tmp_path / "project"
    (fake / "stages").mkdir(parents=True)
    (fake / "dvc.yaml").write_text("stages:\n  resolve: {cmd: python stages/resolve.py}\n")
    with pytest.raises(RuntimeError, match="no script"):
        run_mod.pipeline_stages(fake)


def test_units_uses_only_what_the_adapter_exports():
    """The harness (units.py's checks in unit_checks/, the scripts) reaches our library only through
    benchmarks/parity/ours.py; every name a module that imports it uses must exist there (a library rename once
    broke the image-level rows in the middle of a run)."""
    import re

    from benchmarks.parity import ours

    texts = {f: f.read_text() for f in sorted((ROOT / "benchmarks/parity").rglob("*.py"))}
    users = [f for f, text in texts.items() if "from benchmarks.parity import ours" in text]
    assert ROOT / "benchmarks/parity/unit_checks/dra.py" in users and ROOT / "benchmarks/parity/reference_effect.py" in users
    source = "".join(texts[f] for f in users)
    used = set(re.findall(r"\bours\.([A-Za-z_][A-Za-z_0-9]*)", source))
    assert used and not [name for name in sorted(used) if not hasattr(ours, name)]


def test_kmeans_shim_restores_scikit_learn_s_old_default_and_undoes_itself():
    """The official AHL code was written for KMeans(n_init=10) (scikit-learn < 1.4); the shim gives it that
    default in sklearn.cluster and in an already imported module, and restores both afterwards."""
    import types

    import sklearn.cluster

    from benchmarks.parity.shims import kmeans_n_init_10

    original = sklearn.cluster.KMeans
    fake = types.SimpleNamespace(KMeans=original)
    with Patches() as p:
        kmeans_n_init_10(p, fake)
        assert fake.KMeans(n_clusters=3).n_init == 10 and sklearn.cluster.KMeans(n_clusters=3).n_init == 10
    assert sklearn.cluster.KMeans is original and fake.KMeans is original


def test_set_overrides_parse_yaml_values_and_refuse_malformed_pairs():
    assert run_mod.overrides(["base.grad_clip=0", "ahl.hadg.features=pooled", "protocol.known_class=null"]) == {
        "base.grad_clip": 0, "ahl.hadg.features": "pooled", "protocol.known_class": None
    }
    with pytest.raises(SystemExit, match="expected KEY=VALUE"):
        run_mod.overrides(["base.grad_clip"])


# --------------------------------------------------------------------------------------------------------------
# ablate.py: one params change at a time on kept runs


def test_ablation_reruns_from_the_first_stage_that_reads_the_key_and_merges_new_params():
    from benchmarks.parity import ablate

    assert ablate.first_affected(ROOT, ["ahl.weighting"]) == "train_ahl"
    assert ablate.first_affected(ROOT, ["features.pseudo_rotation", "threshold.target_fpr"]) == "features"
    assert ablate.first_affected(ROOT, ["backbone.resize"]) == "train_base"
    assert ablate.first_affected(ROOT, ["threshold.target_fpr"]) == "calibrate"
    with pytest.raises(SystemExit, match="no stage .* reads nope.ahl.nope"):
        ablate.first_affected(ROOT, ["nope.ahl.nope"])
    assert ablate.stages_from(ROOT, "train_base", with_ahl=False) == ("selection", "train_base", "calibrate", "evaluate")
    merged = ablate.merged_params({"seed": 0, "base": {"epochs": 10, "resize": "bilinear"}, "new": 1},
                                  {"seed": 3, "base": {"epochs": 2}, "gone": 5})  # fmt: skip
    assert merged == {"seed": 3, "base": {"epochs": 2, "resize": "bilinear"}, "new": 1}
    assert ablate.parse_variants([["u", "ahl.weighting=uniform", "ahl.cdl=false"]]) == {
        "u": {"ahl.weighting": "uniform", "ahl.cdl": False}}
    for bad in (["u"], ["a=b", "c=d"], ["baseline", "seed=1"]):
        with pytest.raises(SystemExit, match="--variant"):
            ablate.parse_variants([bad])


def _tree_digest(folder: Path) -> dict[str, bytes]:
    import hashlib

    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).digest() for p in sorted(folder.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}  # fmt: skip


def test_ablation_of_a_kept_run_is_paired_and_leaves_the_run_untouched(tmp_path):
    """A real (tiny) kept run of run.py, then ablate.py on it: an evaluation-only variant reruns evaluate alone on
    the same data and model (the same AUC), and the kept run's files are unchanged. (A retraining variant runs
    the same code from train_base: stages_from above; it is left out here for the suite's time.)"""
    from benchmarks.parity import ablate

    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the test workers share the cores (conftest.py)
    tiny = ["--set", "embedded.n_train=12", "--set", "embedded.n_test_good=6", "--set", "embedded.n_per_defect=3",
            "--set", "embedded.image_size=64", "--set", "base.n_ref=2", "--set", "features.batch_size=8"]  # fmt: skip
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/parity/run.py"), "--sides", "ours", "--no-ahl", "--seeds", "0",
         "--keep", "--pretrained", "none", "--image-size", "64", "--epochs", "1", "--steps", "1", "--batch", "6",
         "--n-anomalies", "2", "--threads", "1", "--out", str(tmp_path / "parity"), *tiny],
        check=True, env=env, capture_output=True,
    )  # fmt: skip
    run = tmp_path / "parity" / "work" / "brick-dra-s0" / "ours"
    before = _tree_digest(run)
    out = tmp_path / "ablations"
    code = ablate.main([str(run), "--variant", "batch", "evaluate.batch_size=5", "--no-ahl", "--threads", "2",
                        "--out", str(out)])  # fmt: skip
    assert code == 0
    rows = {r["variant"]: r for r in csv.DictReader(open(out / "runs.csv")) if r["model"] == "base"}
    kept = ablate.metrics_of(run, with_ahl=False)["base"]
    assert float(rows["baseline"]["auc_roc"]) == kept["auc_roc"] and rows["baseline"]["stages"] == ""
    assert rows["batch"]["stages"] == "selection evaluate"
    assert float(rows["batch"]["auc_roc"]) == kept["auc_roc"]
    batch = out / "work" / "brick-dra-s0" / "batch"
    assert yaml_load(batch / "params.yaml")["evaluate"]["batch_size"] == 5
    assert os.stat(batch / "data" / "split.json").st_ino == os.stat(run / "data" / "split.json").st_ino  # linked
    assert "| batch | base | 1 |" in (out / "summary.md").read_text()
    assert _tree_digest(run) == before
    assert ablate.main([str(tmp_path), "--variant", "x", "seed=1", "--out", str(out)]) == 2  # not a kept run


def yaml_load(path: Path):
    import yaml

    return yaml.safe_load(path.read_text())
