"""Where a run keeps its files, relative to the project root: the one list of the paths that dvc.yaml declares as
the stages' deps and outs. The stages, the scorer (``load_run``, ``ahl predict``) and the tables take them from
here; tests/test_structure.py checks each stage's against dvc.yaml."""

LOCAL = "data/local.json"  # what data.local holds (stage local_manifest)
SELECTION = "data/selection.json"  # the dataset and subset chosen (stage selection)
RAW = "data/raw"  # the downloaded or copied raw data (stage download)
DATA = "data/mvtec"  # the data in MVTec layout (stage convert)
SPLIT = "data/split.json"  # the protocol's train / validation / test split (stage split)
BASE = "models/base.pt"  # the base model (stage train_base)
CACHE = "cache/features"  # the base model's features (stage features)
AHL = "models/ahl.pt"  # AHL's heads (stage train_ahl)
AHL_LOG = "results/ahl_training"  # train_ahl's per-epoch log and plots
THRESHOLDS = "models/thresholds.json"  # the deployment thresholds (stage calibrate)
METRICS = "results/metrics.json"  # the test metrics (stage evaluate)
SCORES = "results/scores.csv"  # every test image's scores
PLOTS = "results/evaluation"  # evaluate's plots
REPORT = "results/report.html"  # evaluate's report
# What each stage cost to run (cpu_s: user + system seconds of the stage's process and the children it waited
# for; wall_s), one metrics file per stage, written by stages/common.py when the stage succeeds. A stage restored
# from DVC's run cache brings the cost of the run that made its outputs. local_manifest has none: it runs on
# every `dvc repro` (always_changed) and a new file each time would change dvc.lock each time.
COST_DIR = "results/cost"
UNCOSTED = ("local_manifest",)


def cost(stage: str) -> str:
    """The metrics file of ``stage``'s cost (see COST_DIR)."""
    return f"{COST_DIR}/{stage}.json"
