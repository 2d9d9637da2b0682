#!/usr/bin/env bash
# Copy a finished, exported, verified and benchmarked run into artifacts/<task>/ for shipping:
# the deployable files and the reports, never model.keras.
#   bash benchmarks/ship.sh artifacts/runs/tumor-64px tumor brain-tumor-mri
set -euo pipefail
run=$1; task=$2; audit=$3
dst="artifacts/$task"
mkdir -p "$dst"
cp "$run"/exports/model_int8.tflite "$run"/exports/model_fp16.tflite "$dst"/
size=$(stat -c %s "$run"/exports/model_int8.onnx)
if [ "$size" -lt 10000000 ]; then cp "$run"/exports/model_int8.onnx "$dst"/; fi
cp "$run"/labels.json "$run"/report.md "$run"/parity.md "$run"/training_curves.png "$run"/confusion_matrix.png \
   "$run"/examples.png "$run"/test_report.json "$run"/parity.json "$run"/config.json "$dst"/
mkdir -p "$dst/verify"
rm -f "$dst"/verify/confusion_*.png
cp "$run"/verify/confusion_model_int8_*.png "$dst/verify/"
cp "artifacts/audit/$audit/audit.md" "artifacts/audit/$audit/duplicate_pairs.png" "$dst"/
sed -i 's#(duplicate_pairs.png)#(duplicate_pairs.png)#' "$dst/audit.md"
if [ -d "$run/bench" ]; then cp "$run"/bench/bench.md "$run"/bench/bench.png "$run"/bench/bench.json "$dst"/; fi
ls -la "$dst"
