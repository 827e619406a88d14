"""The one scoring path on the real tiny pipeline: evaluate runs the backbone once per test image and scale, and
`ahl predict` gives evaluate's results/scores.csv rows under the CPU stand-ins of the CUDA defaults (bfloat16
autocast with channels_last); float32 is tests/test_pipeline.py's test_predict_gives_evaluates_scores."""

from __future__ import annotations

import json
import sys

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.pipeline

# evaluate with the backbone's forward counted (images per call), as a plain `python stages/evaluate.py` run
COUNTED = """
import runpy, sys
sys.path.insert(0, "stages")
from ahl.models.backbones import Backbone
calls, forward = [], Backbone.forward
def counted(self, images):
    calls.append(len(images))
    return forward(self, images)
Backbone.forward = counted
sys.argv = ["stages/evaluate.py"]
runpy.run_path("stages/evaluate.py", run_name="__main__")
print("BACKBONE", sum(calls), len(calls))
"""


@pytest.fixture(scope="module")
def repo(reproduced, tmp_path_factory):
    return reproduced[0].copy(tmp_path_factory.mktemp("scorer") / "repo")


def test_evaluate_runs_the_backbone_once_per_image_and_scale(repo):
    """Scores, head scores and heatmaps of the test set come from one pass: the base model's backbone sees each
    test image once at each scale (AHL scores the cached features and runs no backbone)."""
    params = __import__("yaml").safe_load((repo.path / "params.yaml").read_text())
    n_test = len(json.loads((repo.path / "data/split.json").read_text())["test"])
    out = repo.run(sys.executable, "-c", COUNTED).stdout
    images, calls = map(int, out.split("BACKBONE")[1].split())
    assert images == n_test * params["backbone"]["n_scales"], out
    batches = -(-n_test // params["evaluate"]["batch_size"])
    assert calls == batches * params["backbone"]["n_scales"]


def test_predict_gives_evaluates_scores_in_bfloat16_with_channels_last(repo, tmp_path):
    """The whole pipeline and `ahl predict` under runtime.autocast bfloat16 and channels_last on the CPU (what
    `auto` means on CUDA): predict reads the runtime from params.yaml, so each test image gets its scores.csv row
    to the 6 digits both files print. The batches line up (one batch of the test set everywhere), so the same
    bfloat16 kernels see the same images."""
    res = repo.dvc(
        "exp", "run", "-S", "runtime.autocast=bfloat16", "-S", "runtime.channels_last=true",
        "-S", "features.batch_size=64", "-S", "evaluate.batch_size=64",
    )  # fmt: skip
    assert "Running stage 'evaluate'" in res.stdout
    out = tmp_path / "predictions.csv"
    repo.run(sys.executable, "-m", "ahl.deploy.predict", "data/mvtec/brick/test", "--out", str(out), "--batch-size", "64")
    predicted = pd.read_csv(out).assign(file=lambda t: t["path"].str.removeprefix("data/mvtec/brick/"))
    scores = pd.read_csv(repo.path / "results/scores.csv").merge(predicted, on="file", suffixes=("", "_predict"))
    assert len(scores) == len(pd.read_csv(repo.path / "results/scores.csv")) > 0 and predicted["error"].isna().all()
    for model in ("base", "ahl"):
        np.testing.assert_allclose(scores[f"score_{model}_predict"], scores[f"score_{model}"], rtol=1e-5, atol=1e-6)
