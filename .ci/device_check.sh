#!/usr/bin/env bash
# Train a tiny model on real MRI data, export full-integer int8 TFLite in the full
# environment, then classify the same real images in two environments that have no
# TensorFlow: tflite-runtime 2.14 on numpy<2, and ai-edge-litert on numpy 2.
set -euo pipefail
cd "$(dirname "$0")/.."
FULL="${FULL_VENV:-.venv-ci}"
WORK="${CI_WORK:-$(mktemp -d)}"
DATA="../shared/data/brain-tumor-mri"
if [ ! -d "$DATA" ]; then
    echo "device check: $DATA absent, using synthetic phantoms instead"
    "$FULL"/bin/mri-edge data synth --out "$WORK/synth" --n-train 30 --n-test 10 --size 96
    DATA="$WORK/synth"
fi

"$FULL"/bin/mri-edge train --task tumor --data-dir "$DATA" --weights none --image-size 32 \
    --epochs-head 0 --epochs-finetune 2 --limit-per-class 40 --batch-size 16 --dense-units 32 \
    --eager --out "$WORK/run"
"$FULL"/bin/mri-edge export "$WORK/run" --format tflite --quantize int8 --calib-size 64
MODEL="$WORK/run/exports/model_int8.tflite"
IMAGES=$(find "$DATA"/Testing -name '*.jpg' | sort | awk 'NR % 25 == 1' | head -n 40)
# Both kernel paths of the full environment's interpreter (compare_predictions.py says why).
"$FULL"/bin/mri-edge predict "$MODEL" $IMAGES --json > "$WORK/full.jsonl"
"$FULL"/bin/mri-edge predict "$MODEL" $IMAGES --json --xnnpack off > "$WORK/full-builtin.jsonl"

check_env() {  # name, pip requirement(s) for the device extra
    local name=$1; shift
    python3 -m venv "$WORK/venv-$name"
    "$WORK/venv-$name/bin/python" -m pip install -q --upgrade pip
    "$WORK/venv-$name/bin/python" -m pip install -q "$@"
    if "$WORK/venv-$name/bin/python" -c "import tensorflow" 2>/dev/null || \
       "$WORK/venv-$name/bin/python" -c "import keras" 2>/dev/null; then
        echo "device check [$name]: TensorFlow or Keras was installed by the device extra"; exit 1
    fi
    "$WORK/venv-$name/bin/python" -c "import numpy; print('device check [$name]: numpy', numpy.__version__)"
    "$WORK/venv-$name/bin/mri-edge" predict "$MODEL" $IMAGES --json > "$WORK/$name.jsonl"
    "$FULL"/bin/python .ci/compare_predictions.py "$name" "$WORK/$name.jsonl" "$WORK/full.jsonl" \
        "$WORK/full-builtin.jsonl"
}

check_env tflite-runtime -e ".[device-tflite]"
check_env litert -e ".[device]"
echo "device check: OK"
