#!/usr/bin/env bash
# Train Alzheimer models side by side on a lent GPU machine: the two of the results table
# (RUNS=default), the regularisers compared at equal wall time (RUNS=levers), the shipped
# model's recipe with and without them (RUNS=shipped, with SIZE=128), or three of those and then
# one student distilled from their ensemble (RUNS=distill; RUNS=student when the members are
# already in .gpu/runs from an earlier call on the same machine), or self-supervised pretraining
# of the tumor backbone on the training slices with two recipes started from it, against the same
# recipes from the tumor backbone for as long in all (RUNS=ssl).
#
# That machine has PyTorch but no TensorFlow, so Keras 3 runs with KERAS_BACKEND=torch
# (the training code is backend-neutral); keras, namex and optree travel as wheels in
# .whl/. The data cannot be reached from there: .gpu/ carries a copy of
# ../shared/data/alzheimer-mri (ignored by git, removed afterwards), the Alzheimer audit
# and the tumor model's DenseNet121 backbone (fp16 weights file: an initialisation only).
# The runs share the GPU at once (each is bound by Python dispatch, not by the GPU), each
# fits its training into --time-budget minutes, and all hold out the same grouped split.
#
# Prepare here:  bash benchmarks/gpu_alzheimer.sh --prepare   (.gpu/ is ~50 MB; where at most 64 MiB may
#                travel, move artifacts/ aside for the call: its tracked model files are 72 MB)
# Run there:     bash benchmarks/gpu_alzheimer.sh   (writes $OUT/<run>.tgz and $OUT/logs.tgz)
# Back here:     for f in *px-gpu-*.tgz; do tar xzf $f -C artifacts/runs; done, then
#                mri-edge evaluate artifacts/runs/<run> --data-dir ../shared/data/alzheimer-mri \
#                    --dedup artifacts/audit/alzheimer-mri/audit.json
set -uo pipefail

SIZE=${SIZE:-176}
# ~0.24 GB of GPU memory per image at 176 px (Keras on torch keeps every DenseNet
# activation): two runs of 96 need ~50 GB of an H100's 80, four ~100 GB of an H200's 139.
BATCH=${BATCH:-96}
BUDGET=${BUDGET:-7.5}        # minutes of training per run
LIMIT=${LIMIT:-570}          # seconds before every training is killed (packaging must still run)
EXTRA=${EXTRA:-}             # more train options, e.g. "--limit-per-class 20" for a dry run on a CPU (RUNS=ssl:
                             # pretrain gets them too)
SSL_BUDGET=${SSL_BUDGET:-2}  # RUNS=ssl: minutes of self-supervised pretraining

if [ "${1:-}" = "--prepare" ]; then
    set -e
    mkdir -p .gpu/data
    rm -rf .gpu/data/alzheimer-mri && cp -a ../shared/data/alzheimer-mri .gpu/data/
    cp artifacts/audit/alzheimer-mri/audit.json .gpu/audit.json
    python - <<'EOF'
import h5py, numpy as np
from mri_edge import model as M
base = M.load_model("artifacts/tumor-64px/model.keras").get_layer(M.BASE_NAME)  # the 64 px tumor model the shipped Alzheimer model started from
base.save_weights(".gpu/tumor_backbone.weights.h5")
src, dst = h5py.File(".gpu/tumor_backbone.weights.h5"), h5py.File(".gpu/tumor_backbone_fp16.weights.h5", "w")
for k, v in src.attrs.items():
    dst.attrs[k] = v
def copy(name, obj):
    if isinstance(obj, h5py.Dataset):
        a = obj[()]
        dst.create_dataset(name, data=a.astype(np.float16) if a.dtype == np.float32 else a)
    else:
        for k, v in obj.attrs.items():
            dst.require_group(name).attrs[k] = v
src.visititems(copy)
dst.close()
EOF
    rm .gpu/tumor_backbone.weights.h5
    du -sh .gpu .whl
    exit 0
fi

OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT" .gpu/runs
T0=$(date +%s)
export KERAS_BACKEND=torch PYTHONUNBUFFERED=1
# Runs share the host's cores: each gets a few threads rather than all of them.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
if ! python3 -c "import keras" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
DATA=$PWD/.gpu/data/alzheimer-mri
# The audit names its data folder; point it at the copy (relative paths are the same).
python3 -c "
import json, sys; a = json.load(open('.gpu/audit.json')); a['data_dir'] = sys.argv[1]
json.dump(a, open('.gpu/audit.json', 'w'))" "$DATA"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, keras, numpy; print('torch', torch.__version__, 'keras', keras.__version__, 'numpy', numpy.__version__)" | tee -a "$OUT/gpu.txt"

COMMON="--task alzheimer --data-dir $DATA --image-size $SIZE --batch-size $BATCH --patience 1000 \
  --time-budget $BUDGET --val-split grouped --select-by accuracy --dedup .gpu/audit.json \
  --cache-dir /tmp/mri-edge-cache $EXTRA"
SCRATCH="--weights none --epochs-head 0 --epochs-finetune 200 --lr 1e-3"
TRANSFER="--weights .gpu/tumor_backbone_fp16.weights.h5 --epochs-head 1 --epochs-finetune 200 --unfreeze all --train-bn \
 --lr 1e-3"
# One run per line, "name options": all share the GPU at once, at the same --time-budget, and
# hold out the same grouped validation split, so their held-out accuracies rank them; each
# keeps its epoch of best held-out accuracy (on this split the lowest loss comes early).
# RUNS=levers compares the regularisers (--label-smoothing, --mixup, --weight-decay) from scratch;
# RUNS=shipped the shipped model's recipe (two-phase, batch norms training, no augmentation)
# on the tumor backbone, alone, with mixup and label smoothing (also at half the rate), and
# with augmentation; RUNS=batch the same recipe at the CPU's batch of 32 (the shipped model was
# fine-tuned at 32 and moves ~5x less under input noise than these runs at 128) and with
# decoupled weight decay, against a control at 128.
# RUNS=distill trains the three members of the best GPU ensemble (reg-lr2, reg, noaug), averages
# them (`mri-edge ensemble`) and trains a student with reg-lr2's recipe and the ensemble as its
# --teacher for as long as each member trained: the members are its equal-time controls.
MEMBERS="reg-lr2 $TRANSFER --lr-finetune 2e-4 --no-augment --mixup 0.2 --label-smoothing 0.1
reg $TRANSFER --lr-finetune 4e-4 --no-augment --mixup 0.2 --label-smoothing 0.1
noaug $TRANSFER --lr-finetune 4e-4 --no-augment"
TEACHER=.gpu/runs/alzheimer-${SIZE}px-gpu-teacher
STUDENT="student $TRANSFER --lr-finetune 2e-4 --no-augment --mixup 0.2 --label-smoothing 0.1 --teacher $TEACHER"
# RUNS=ssl: `mri-edge pretrain` (SimCLR, SSL_BUDGET minutes) from the tumor backbone, then noaug's and
# reg-lr2's recipes from its encoder for BUDGET minutes; the same recipes from the tumor backbone
# train for BUDGET + SSL_BUDGET minutes beside them, the equal-time controls.
SSL=.gpu/runs/alzheimer-${SIZE}px-gpu-ssl
SSL_TRANSFER="--weights $SSL/encoder.keras --epochs-head 1 --epochs-finetune 200 --unfreeze all --train-bn --lr 1e-3"
SSL_RUNS="ssl-noaug $SSL_TRANSFER --lr-finetune 4e-4 --no-augment
ssl-reg-lr2 $SSL_TRANSFER --lr-finetune 2e-4 --no-augment --mixup 0.2 --label-smoothing 0.1"
LONG=$(python3 -c "print(float('$BUDGET') + float('$SSL_BUDGET'))")
PRESET=${RUNS:-default}
case "$PRESET" in
distill) RUNS="$MEMBERS" ;;
student) RUNS="$STUDENT" ;;
ssl) RUNS="noaug-long $TRANSFER --lr-finetune 4e-4 --no-augment --time-budget $LONG
reg-lr2-long $TRANSFER --lr-finetune 2e-4 --no-augment --mixup 0.2 --label-smoothing 0.1 --time-budget $LONG" ;;
default) RUNS="scratch $SCRATCH
transfer $TRANSFER --lr-finetune 5e-4" ;;
levers) RUNS="scratch $SCRATCH
smooth $SCRATCH --label-smoothing 0.1
mixup $SCRATCH --mixup 0.4
decay $SCRATCH --weight-decay 0.05" ;;
shipped) RUNS="noaug $TRANSFER --lr-finetune 4e-4 --no-augment
reg $TRANSFER --lr-finetune 4e-4 --no-augment --mixup 0.2 --label-smoothing 0.1
aug $TRANSFER --lr-finetune 4e-4 --label-smoothing 0.1
reg-lr2 $TRANSFER --lr-finetune 2e-4 --no-augment --mixup 0.2 --label-smoothing 0.1" ;;
batch) RUNS="reg-lr2-b128 $TRANSFER --lr-finetune 2e-4 --no-augment --mixup 0.2 --label-smoothing 0.1
reg-lr2-b32 $TRANSFER --lr-finetune 2e-4 --no-augment --mixup 0.2 --label-smoothing 0.1 --batch-size 32
noaug-b32 $TRANSFER --lr-finetune 4e-4 --no-augment --batch-size 32
reg-lr2-wd $TRANSFER --lr-finetune 2e-4 --no-augment --mixup 0.2 --label-smoothing 0.1 --weight-decay 0.05" ;;
esac
train_all() {  # one run per line of $1, all at once; returns when every one has ended
    while read -r name opts; do
        [ -n "$name" ] || continue
        # shellcheck disable=SC2086  # options are words
        timeout "$LIMIT" python3 -m mri_edge.cli train $COMMON $opts --out ".gpu/runs/alzheimer-${SIZE}px-gpu-$name" \
            > "$OUT/run-$name.log" 2>&1 &
    done <<< "$1"
    while sleep 30; do
        jobs -r | grep -q . || break
        echo "$(( $(date +%s) - T0 )) s: $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader)"
    done
    wait
    echo "training done after $(( $(date +%s) - T0 )) s"
}
make_teacher() {  # the members' ensemble, made afresh (not sent back: it is rebuilt here from the members)
    local members
    members=$(while read -r name _; do echo ".gpu/runs/alzheimer-${SIZE}px-gpu-$name"; done <<< "$MEMBERS")
    rm -rf "$TEACHER"
    # shellcheck disable=SC2086  # one folder per line
    python3 -m mri_edge.cli ensemble $members --out "$TEACHER" > "$OUT/run-teacher.log" 2>&1 \
        || { echo "ensemble failed: $(tail -n 1 "$OUT/run-teacher.log")"; return 1; }
    tail -n 1 "$OUT/run-teacher.log"
}
if [ "$PRESET" = student ]; then  # a student cut short by an earlier call left a folder train refuses
    rm -rf ".gpu/runs/alzheimer-${SIZE}px-gpu-student"
    make_teacher || exit 1
fi
if [ "$PRESET" = ssl ]; then  # pretraining, then its two runs, beside the controls (train_all waits for all)
    NEED=$(python3 -c "print(int(float('$LONG') * 60) + 90)")  # the controls' training, decoding and test report
    [ "$LIMIT" -ge "$NEED" ] || { echo "RUNS=ssl: the controls need (BUDGET + SSL_BUDGET) min + 90 s = $NEED s, more \
than LIMIT ($LIMIT s): lower BUDGET or SSL_BUDGET"; exit 1; }
    NEED=$(python3 -c "print(int(float('$BUDGET') * 60) + 90)")  # each run from the encoder
    rm -rf "$SSL"
    # shellcheck disable=SC2086  # options are words
    (timeout "$LIMIT" python3 -m mri_edge.cli pretrain --task alzheimer --data-dir "$DATA" --image-size "$SIZE" \
        --batch-size "$BATCH" --val-split grouped --weights .gpu/tumor_backbone_fp16.weights.h5 --lr 3e-4 \
        --epochs 1000 --time-budget "$SSL_BUDGET" --cache-dir /tmp/mri-edge-cache $EXTRA --out "$SSL" \
        > "$OUT/run-pretrain.log" 2>&1 || { echo "pretrain failed: $(tail -n 1 "$OUT/run-pretrain.log")"; exit 1; }
     LEFT=$(( LIMIT - ($(date +%s) - T0) ))
     if [ "$LEFT" -ge "$NEED" ]; then LIMIT=$LEFT train_all "$SSL_RUNS"
     else echo "no runs from the encoder: $LEFT s left of LIMIT, each needs $NEED s (lower SSL_BUDGET)"; fi) &
fi
train_all "$RUNS"
if [ "$PRESET" = ssl ]; then  # what goes back: the pretrain folder (reports; not its encoder) and both pairs of runs
    RUNS="$RUNS
$SSL_RUNS
ssl"
fi
if [ "$PRESET" = distill ] && make_teacher; then
    LIMIT=$(( LIMIT - ($(date +%s) - T0) ))  # what is left of the call for the student
    NEED=$(python3 -c "print(int(float('$BUDGET') * 60) + 90)")  # its training, decoding and test report
    if [ "$LIMIT" -ge "$NEED" ]; then
        train_all "$STUDENT" && RUNS="$RUNS
$STUDENT"
    else
        echo "no student: ${LIMIT} s left of LIMIT, it needs ${NEED} s (lower BUDGET, or RUNS=student in a second call)"
    fi
fi
tail -n 3 "$OUT"/run-*.log
MADE=$(while read -r name _; do [ -n "$name" ] && echo ".gpu/runs/alzheimer-${SIZE}px-gpu-$name"; done <<< "$RUNS")
# model.keras is ~31 MB a run: its kernels are stored as float16 (16 MB; `evaluate` here then
# reports the stored model), and each run goes back as one archive (~14 MB, under the 16 MiB a
# file may have; at most 8 files come back, so the logs go in one archive too). A run killed at
# LIMIT comes back without model.keras and without its checkpoint (31 MB): it cannot be resumed here.
# shellcheck disable=SC2086  # one folder per line
python3 - $MADE <<'EOF' || echo "float16 storage failed: the archives hold the float32 files (~30 MB, over 16 MiB)"
import sys
from pathlib import Path
from mri_edge import model as M
for run in map(Path, sys.argv[1:]):
    if (run / "model.keras").is_file():
        net = M.load_model(run / "model.keras")
        print(run.name, M.round_kernels_fp16(net), "values rounded to float16")
        M.save_compact(net, run / "model.keras")
EOF
for run in $MADE; do  # this call's runs only (a dry run here may have left others in .gpu/runs)
    [ -d "$run" ] || continue
    tar czf "$OUT/$(basename "$run").tgz" --exclude best.keras --exclude checkpoint.keras \
        --exclude best_of_phases.keras --exclude encoder.keras --exclude checkpoint_state.npz -C .gpu/runs "$(basename "$run")"
done
(cd "$OUT" && tar czf logs.tgz run-*.log gpu.txt && rm run-*.log gpu.txt)
ls -la "$OUT"
