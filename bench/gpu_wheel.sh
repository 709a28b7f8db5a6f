#!/usr/bin/env bash
# Fetch onnxruntime-gpu for the lent GPU machine and cut it into pieces that each fit one
# device call (a call carries at most 64 MiB, the working tree included; the machine cannot
# download anything itself). Run here, in the repository root, where PyPI is reachable:
#
#   bash bench/gpu_wheel.sh [VERSION] [PIECE_MB]     # default: 1.27.0 (first CUDA 13 wheel), 56
#
# Writes .whl/ort-gpu/<wheel>.part-00, -01, ... and <wheel>.sha256 (.whl/ is kept out of git
# through .git/info/exclude). On the device, carry .whl/ort-gpu/<wheel>.sha256 and one piece
# per call into /tmp/ort-gpu/ while the machine stays warm, then run bench/gpu_check.sh: it
# joins the pieces, checks the sha256 and installs the wheel (bench/README.md, "GPU").
# The device's python3 is CPython 3.12 on manylinux x86_64.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${1:-1.27.0}
PIECE_MB=${2:-56}
DEST=.whl/ort-gpu
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
mkdir -p "$DEST"
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" "onnxruntime-gpu==$VERSION"
wheel=$(ls "$DEST"/onnxruntime_gpu-"$VERSION"-*.whl | head -n 1)
name=$(basename "$wheel")
rm -f "$DEST/$name".part-*
split -b "${PIECE_MB}M" -d "$wheel" "$DEST/$name.part-"
(cd "$DEST" && sha256sum "$name" >"$name.sha256")
rm -f "$wheel"
ls -l "$DEST"
