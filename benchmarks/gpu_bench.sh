#!/usr/bin/env bash
# GPU rows of `mri-edge bench` on a lent GPU machine: Keras 3 on torch/CUDA.
#
# That machine has PyTorch but no TensorFlow, LiteRT or a CUDA onnxruntime, so the GPU
# runtime there is Keras with KERAS_BACKEND=torch (keras, namex and optree travel as
# wheels in .whl/). Rows: the 64 px tumor model (.gpu/tumor-64px.keras, a copy
# of artifacts/tumor-64px/model.keras) and DenseNet121 at 224 px built there with untrained
# weights (latency does not depend on the weight values).
#
# Prepare here:  mkdir -p .gpu && cp artifacts/tumor-64px/model.keras .gpu/tumor-64px.keras
# Run there:     bash benchmarks/gpu_bench.sh      (writes $OUT/bench/bench.{json,md,png})
set -uo pipefail
OUT=${OUT:-/tmp/gpu_bench}
BATCHES=${BATCHES:-1,8,32}
export KERAS_BACKEND=torch PYTHONUNBUFFERED=1
if ! python3 -c "import keras" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
python3 -c "
from mri_edge.model import build_model
build_model(4, 224, 'none').save('.gpu/densenet121-224px-untrained.keras')"
python3 -m mri_edge.cli bench .gpu/tumor-64px.keras .gpu/densenet121-224px-untrained.keras --device "${DEVICE:-gpu}" \
    --threads 2 --batch "$BATCHES" --warmup 10 --runs 50 --out "$OUT/bench"
