#!/usr/bin/env bash
# The GPU check: run it first whenever a GPU machine is at hand (<= 5 minutes on one GPU).
#
#   benchmarks/gpu_check.sh            # everything into $OUT (default: ./gpu-check)
#   benchmarks/gpu_check.sh --dry-run  # print what it would run; runs nothing (works on CPU)
#
# 1. nvidia-smi facts and the precision the engine picks;
# 2. engine img/s against a bare PyTorch loop: resnet50@96 and simple_cnn@64, aug 0 and 0.5,
#    batch 256, peak memory against the memory plan's estimate (benchmarks/gpu_check.py);
#    then fold fusion (k = 3 simple_cnn fold models as one grouped model) against separate
#    models on the GPU (benchmarks/fold_fusion.py);
# 3. a 4-trial ResNet-50 search at --gpus-per-trial 0.25 on a synthetic set: each trial's
#    state, device, precision and pool, with GPU utilisation and memory sampled every 0.5 s.
# Uses .venv/bin if it exists, else python3 and pcam-* on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT="${OUT:-$PWD/gpu-check}"
BIN=""
[ -x .venv/bin/python ] && BIN=".venv/bin/"
PY="${BIN}python"
[ -n "$BIN" ] || PY=python3

run() {  # print, then run unless --dry-run
    echo "+ $*"
    [ "$DRY" = 1 ] || "$@"
}

WORK="$OUT/work"
SPACE="$WORK/resnet50.toml"
STEPS=(
    "mkdir -p $WORK"
    "nvidia-smi > $OUT/nvidia-smi.txt; nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv >> $OUT/nvidia-smi.txt"
    "$PY benchmarks/gpu_check.py --out $OUT"
    "$PY benchmarks/fold_fusion.py --device cuda --crops 32 64 --batches 64 256 --steps 20 --repeats 2 > $OUT/fold_fusion.md"
    "${BIN}pcam-data synth --out $WORK/data --n 3000 --seed 0"
    "write $SPACE: arch resnet50, crop 96, batch 256, lr searched"
    "nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -lms 500 > $OUT/gpu_util.csv &"
    "${BIN}pcam-search --data $WORK/data --space $SPACE --studies-dir $WORK/studies --cache-dir $WORK/cache --trials 4 --gpus-per-trial 0.25 --max-epochs 3 --folds 3 --no-asha --no-progress"
    "$PY -c <print each trial's state, device, precision, pool, img/s> > $OUT/search_trials.txt"
)
if [ "$DRY" = 1 ]; then
    echo "gpu_check (dry run): would write into $OUT"
    for s in "${STEPS[@]}"; do echo "+ $s"; done
    "$PY" benchmarks/gpu_check.py --out "$OUT" --dry-run
    exit 0
fi

mkdir -p "$WORK"
{ nvidia-smi; nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv; } \
    > "$OUT/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed" >> "$OUT/nvidia-smi.txt"
cat "$OUT/nvidia-smi.txt"

run "$PY" benchmarks/gpu_check.py --out "$OUT" 2>&1 | tee "$OUT/throughput.log"
run "$PY" benchmarks/fold_fusion.py --device cuda --crops 32 64 --batches 64 256 --steps 20 \
    --repeats 2 2>&1 | tee "$OUT/fold_fusion.md"

run "${BIN}pcam-data" synth --out "$WORK/data" --n 3000 --seed 0
cat > "$SPACE" <<'TOML'
[fixed]
arch = "resnet50"
crop = 96
batch_size = 256
optimizer = "adamw"
aug = 0.5

[params.lr]
type = "float"
low = 1e-4
high = 3e-3
log = true
TOML

nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used,memory.total --format=csv -lms 500 \
    > "$OUT/gpu_util.csv" 2>/dev/null &
SMI=$!
set +e
run "${BIN}pcam-search" --data "$WORK/data" --space "$SPACE" --studies-dir "$WORK/studies" \
    --cache-dir "$WORK/cache" --trials 4 --gpus-per-trial 0.25 --max-epochs 3 --folds 3 \
    --no-asha --no-progress 2>&1 | tee "$OUT/search.log"
echo "pcam-search exit ${PIPESTATUS[0]}" | tee -a "$OUT/search.log"
set -e
kill "$SMI" 2>/dev/null || true

"$PY" - "$WORK/studies/pcam.db" > "$OUT/search_trials.txt" <<'PY'
import sys, optuna
optuna.logging.set_verbosity(optuna.logging.WARNING)
st = optuna.load_study(study_name="pcam", storage=f"sqlite:///{sys.argv[1]}")
for t in st.trials:
    a = t.user_attrs
    print(t.number, t.state.name, t.value, a.get("device"), a.get("precision"), a.get("pool"),
          a.get("images_per_s"), a.get("seconds"), a.get("error_type", ""),
          a.get("error_message", "")[:300], sep=" | ")
PY
cat "$OUT/search_trials.txt"
# peak memory used on the GPU while the 4 trials ran (MiB)
awk -F', ' 'NR > 1 { gsub(/ MiB/, "", $3); if ($3 + 0 > m) m = $3 + 0 } END { print "peak GPU memory used during the search: " m " MiB" }' \
    "$OUT/gpu_util.csv" | tee -a "$OUT/search_trials.txt"
rm -rf "$WORK/cache" "$WORK/data"
