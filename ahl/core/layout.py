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
