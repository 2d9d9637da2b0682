#!/usr/bin/env bash
# Copy a finished, exported, verified and benchmarked run into artifacts/<task>/ for shipping:
# the deployable files and the reports, never model.keras. A model file ships only if
# `mri-edge verify` passed it (the run's parity.json), the ONNX int8 file only if under 10 MB.
#   bash benchmarks/ship.sh artifacts/runs/tumor-64px tumor brain-tumor-mri
set -euo pipefail
run=$1; task=$2; audit=$3
dst="artifacts/$task"
mkdir -p "$dst"
passed() {  # passed FILE: did verify pass this file of the run?
  python3 -c 'import json, sys; r = json.load(open(sys.argv[1]))["files"].get(sys.argv[2]); sys.exit(0 if r and r["passed"] else 1)' \
    "$run/parity.json" "$1"
}
rm -f "$dst"/model_*.tflite "$dst"/model_*.onnx
for f in model_int8.tflite model_fp16.tflite model_int8.onnx; do
  if [ "$f" = model_int8.onnx ] && [ "$(stat -c %s "$run/exports/$f")" -ge 10000000 ]; then continue; fi
  if passed "$f"; then cp "$run/exports/$f" "$dst"/; else echo "not shipped: $f failed its parity gate" >&2; fi
done
cp "$run"/labels.json "$run"/report.md "$run"/parity.md "$run"/training_curves.png "$run"/confusion_matrix.png \
   "$run"/examples.png "$run"/test_report.json "$run"/parity.json "$run"/config.json "$dst"/
mkdir -p "$dst/verify"
rm -f "$dst"/verify/confusion_*.png
cp "$run"/verify/confusion_model_int8_*.png "$dst/verify/"
cp "artifacts/audit/$audit/audit.md" "artifacts/audit/$audit/duplicate_pairs.png" "$dst"/
if [ -d "$run/bench" ]; then cp "$run"/bench/bench.md "$run"/bench/bench.png "$run"/bench/bench.json "$dst"/; fi
ls -la "$dst"
