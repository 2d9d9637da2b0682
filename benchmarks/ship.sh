#!/usr/bin/env bash
# Copy a finished, exported, calibrated, verified and benchmarked run into
# artifacts/<task>/ for shipping: the deployable files, the model they were exported from
# (model.keras, only when stored compact by `evaluate --fp16-weights`, so explain, calibrate
# and card work on the shipped folder), the reports, and a model card of the files shipped. A model file ships only if
# `mri-edge verify` passed it (the run's parity.json), the ONNX int8 file only if under 10 MB.
#   bash benchmarks/ship.sh artifacts/runs/tumor-128px-from64 tumor brain-tumor-mri
set -euo pipefail
run=$1; task=$2; audit=$3
dst="artifacts/$task"
mkdir -p "$dst"
passed() {  # passed FILE: did verify pass this file of the run?
  python3 -c 'import json, sys; r = json.load(open(sys.argv[1]))["files"].get(sys.argv[2]); sys.exit(0 if r and r["passed"] else 1)' \
    "$run/parity.json" "$1"
}
rm -f "$dst"/model_*.tflite "$dst"/model_*.onnx "$dst"/model.keras "$dst"/model_card.* "$dst"/report.md
for f in model_int8.tflite model_fp16.tflite model_int8.onnx; do
  if [ "$f" = model_int8.onnx ] && [ "$(stat -c %s "$run/exports/$f")" -ge 10000000 ]; then continue; fi
  if passed "$f"; then cp "$run/exports/$f" "$dst"/; else echo "not shipped: $f failed its parity gate" >&2; fi
done
if python3 -c 'import json, sys; sys.exit((json.load(open(sys.argv[1])).get("weights_stored") or {}).get("kernels") != "float16")' \
    "$run/config.json"; then
  cp "$run/model.keras" "$dst"/
else
  echo "not shipped: model.keras (run mri-edge evaluate $run --fp16-weights to store it compact)" >&2
fi
cp "$run"/labels.json "$run"/train_report.md "$run"/parity.md "$run"/training_curves.png "$run"/confusion_matrix.png \
   "$run"/examples.png "$run"/test_report.json "$run"/parity.json "$run"/config.json "$run"/split_manifest.json "$dst"/
for f in trust.json reliability.png; do
  if [ -f "$run/$f" ]; then cp "$run/$f" "$dst"/; else echo "not shipped: $f (absent from the run)" >&2; fi
done
rm -rf "$dst/calibration" "$dst/verify"
if [ -d "$run/calibration" ]; then cp -r "$run/calibration" "$dst"/; fi
mkdir -p "$dst/verify"
cp "$run"/verify/confusion_model_int8_*.png "$run"/verify/reliability_model_int8_*.png "$dst/verify/"
cp "artifacts/audit/$audit/audit.md" "artifacts/audit/$audit/duplicate_pairs.png" "artifacts/audit/$audit/duplicates.csv" "$dst"/
if [ -d "$run/bench" ]; then cp "$run"/bench/bench.md "$run"/bench/bench.png "$run"/bench/bench.json "$dst"/; fi
# The model card (its file table: the files shipped here) and the index page of this folder.
python3 -m mri_edge card "$dst"
ls -la "$dst"
