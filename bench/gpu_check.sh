#!/usr/bin/env bash
# Every GPU check of the project in one call, for a machine with an NVIDIA GPU and a CUDA
# build of torch already installed (the project's lent device machine: its python3 holds
# torch, lightning, onnx, onnxscript, typer, rich, h5py, safetensors, pytest; only
# onnxruntime-gpu is missing and arrives as wheel pieces, see bench/gpu_wheel.sh).
#
#   bash bench/gpu_check.sh [RESULTS_DIR]     # default: $OUT if set, else bench/results/gpu-check
#
# Steps (each logged with its exit status and seconds; a failed step does not stop the
# others; the script's exit status is the number of failed steps):
#   1. facts: nvidia-smi, torch and onnxruntime versions and providers
#   2. onnxruntime-gpu from /tmp/ort-gpu/ pieces, if there (joined, sha256-checked,
#      installed in place of the CPU onnxruntime: the two must never be installed together)
#   3. this checkout, installed without dependencies (nothing can be downloaded there)
#   4. pytest -m gpu (the tests that skip without CUDA)
#   5. simulate a 48 x 48 scan, train the default preset on the GPU (Lightning), export all
#      formats with the parity gate
#   6. ptycho-run with --provider cuda (onnxruntime, IO binding) and the TorchScript file on
#      cuda; ptycho-parity (eager vs every artifact on every device)
#   7. ptycho-bench (eager, TorchScript, .pt2, onnxruntime CUDA; fp32 and tf32)
# RESULTS_DIR gets gpu-check.log, summary.md and gpu-check.tar.gz (every report, small
# enough to come back from the device machine, which returns at most 8 files).
set -u -o pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-${OUT:-bench/results/gpu-check}}
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ptycho-gpu-check.XXXXXX")
LOG="$RESULTS/gpu-check.log"
SUMMARY="$RESULTS/summary.md"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
FAILED=0
: >"$LOG"
printf '# GPU check %s\n\n| step | exit | seconds |\n|---|---|---|\n' "$(date -u +%FT%TZ)" >"$SUMMARY"

step() {  # step NAME COMMAND...: run, log, record; never stops the script
    local name=$1 start rc
    shift
    start=$(date +%s.%N)
    printf '\n===== %s: %s\n' "$name" "$*" >>"$LOG"
    "$@" >>"$LOG" 2>&1
    rc=$?
    local secs
    secs=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    printf '===== %s: exit %s after %s s\n' "$name" "$rc" "$secs" >>"$LOG"
    printf '| %s | %s | %s |\n' "$name" "$rc" "$secs" >>"$SUMMARY"
    [ "$rc" -eq 0 ] || FAILED=$((FAILED + 1))
    return 0
}

facts() {
    nvidia-smi -L || true
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
    "$PY" - <<'EOF'
import sys
print("python", sys.version.split()[0])
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0))
try:
    import onnxruntime as ort
    print("onnxruntime", ort.__version__, ort.get_available_providers())
except Exception as err:  # noqa: BLE001
    print("onnxruntime not importable:", err)
EOF
}

install_ort_gpu() {  # pieces: /tmp/ort-gpu/<wheel name>.part-NN, plus <wheel name>.sha256
    local sums wheel
    sums=$(ls /tmp/ort-gpu/*.whl.sha256 2>/dev/null | head -n 1)
    if [ -z "$sums" ]; then
        echo "no /tmp/ort-gpu/*.whl.sha256: onnxruntime-gpu not carried; CUDA-provider steps will say why they cannot run"
        return 0
    fi
    wheel=${sums%.sha256}
    cat "$wheel".part-* >"$wheel" || return 1
    (cd "$(dirname "$wheel")" && sha256sum -c "$(basename "$sums")") || return 1
    "$PY" -m pip uninstall -y -q onnxruntime || true
    "$PY" -m pip install -q --no-index --no-deps --no-cache-dir "$wheel"
}

step facts facts
step onnxruntime-gpu install_ort_gpu
step install "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e .
step facts-after facts
step pytest-gpu "$PY" -m pytest -q -m gpu -p no:cacheprovider
step simulate ptycho-simulate -o "$WORK/scan.npz" --rows 48 --cols 48
step train ptycho-train "$WORK/scan.npz" -o "$WORK/bundle.zip" --preset default --epochs 20 \
    --accelerator gpu --devices 1 --no-progress
step export ptycho-export "$WORK/bundle.zip" --format all -o "$WORK/export" --with-physics
step run-onnx-cuda ptycho-run "$WORK/export" "$WORK/scan.npz" --provider cuda -o "$WORK/run_onnx_cuda"
step run-torchscript-cuda ptycho-run "$WORK/export/model.ts" "$WORK/scan.npz" --provider cuda \
    -o "$WORK/run_ts_cuda"
step run-pt2-cuda ptycho-run "$WORK/export/model.pt2" "$WORK/scan.npz" --provider cuda \
    -o "$WORK/run_pt2_cuda"
step parity ptycho-parity "$WORK/bundle.zip" "$WORK/export" "$WORK/scan.npz" -o "$WORK/parity"
step bench ptycho-bench "$WORK/bundle.zip" --artifacts "$WORK/export" \
    --batch-sizes 64,256,1024 --max-seconds 20 -o "$WORK/bench"

printf '\n%s failed step(s). Full output: gpu-check.log; reports: gpu-check.tar.gz\n' \
    "$FAILED" >>"$SUMMARY"
# Reports only (no model files): run/parity folders' json, md and png, the bench results.
(cd "$WORK" && find . \( -name '*.json' -o -name '*.md' -o -name '*.png' \) -print0 |
    tar --null -czf "$RESULTS/gpu-check.tar.gz" -T -) >>"$LOG" 2>&1
rm -rf "$WORK"
cat "$SUMMARY"
exit "$FAILED"
