"""Data-parallel training (`train --devices N`, TF_CONFIG): the cluster description, the
sharded batches, a small network on two devices and `mri-edge train` as two workers, each
training like one device.

The runs happen in subprocesses: logical CPU devices must be made before TensorFlow first
touches its devices, which this test process has long done."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from conftest import SMALL_BACKBONE_CLI

from mri_edge import distribute
from mri_edge.feed import make_batches

# Two epochs of one step (8 images, global batch 8) at 32 px, eager (tracing costs more than
# these few steps), no dropout or augmentation: randomness that differs per replica. The
# backbone is DenseNet121's one-layer-per-block version (`SMALL_BACKBONE_CLI`): the same kinds
# of layers and batch norms to synchronise, in three processes on two cores (with DenseNet121
# itself the test took 226 s of the full suite).
RECIPE = ["--weights", "none", "--image-size", "32", "--epochs-head", "0", "--epochs-finetune", "2",
          "--batch-size", "8", "--limit-per-class", "2", "--dropout", "0", "--no-augment", "--dense-units", "16",
          "--warmup-epochs", "0", "--patience", "10", "--eager",
          "--select-by", "macro_f1"]  # a metric with state of its own, summed across replicas


def test_devices_and_tf_config_are_read(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert distribute.plan(None).workers == 1 and distribute.plan("2").devices == "2"
    for bad in ("0", "two", "-1"):
        with pytest.raises(distribute.DistributeError, match="give a number of devices"):
            distribute.plan(bad)
    cluster = {"worker": ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]}
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 2}}))
    d = distribute.plan(None)
    assert (d.workers, d.worker_index, d.is_chief) == (3, 2, False)
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"chief": ["h:0"], **cluster},
                                                "task": {"type": "chief", "index": 0}}))
    d = distribute.plan(None)
    assert (d.workers, d.worker_index, d.is_chief) == (4, 0, True)
    with pytest.raises(distribute.DistributeError, match="leave out --devices"):
        distribute.plan("2")
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(distribute.DistributeError, match="TF_CONFIG is not a cluster description"):
        distribute.plan(None)
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": "ps", "index": 0}}))
    with pytest.raises(distribute.DistributeError, match="only chief and worker"):
        distribute.plan(None)


@pytest.mark.parametrize(("mixup", "cutmix"), [(0.0, 0.0), (0.4, 0.0), (0.0, 1.0)])
def test_worker_parts_make_up_the_global_batch_in_an_order_set_by_the_epoch(mixup, cutmix):
    images = np.arange(22, dtype=np.uint8)[:, None, None, None].repeat(6, 1).repeat(6, 2).repeat(3, 3)
    labels = np.arange(22) % 4
    weights = {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}
    whole = make_batches(images, labels, 4, 8, shuffle=True, seed=3, sample_weights=weights, mixup=mixup,
                         cutmix=cutmix)
    parts = [make_batches(images, labels, 4, 8, shuffle=True, seed=3, sample_weights=weights, shard=(k, 2),
                          mixup=mixup, cutmix=cutmix) for k in range(2)]
    for epoch in (0, 1, 5):
        for b in (whole, *parts):
            b.set_epoch(epoch)
        for i in range(len(whole)):
            for j in range(3):  # images, labels and sample weights (blended alike)
                joined = np.concatenate([p[i][j] for p in parts])
                assert np.array_equal(joined, whole[i][j])  # the last batch (6 images) too: 3 + 3
    whole.set_epoch(0)
    first = whole[0][0].copy()
    whole.set_epoch(1)
    assert not np.array_equal(whole[0][0], first)
    whole.set_epoch(0)  # an epoch's order does not depend on how often Keras restarted it
    assert np.array_equal(whole[0][0], first)


def _train(tmp_path, name, data_dir, cache, *extra, env=None):
    out = tmp_path / name
    cmd = [sys.executable, *SMALL_BACKBONE_CLI, "train", "--task", "tumor", "--data-dir", str(data_dir),
           "--out", str(out), "--cache-dir", str(cache), *RECIPE, *extra]
    return out, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 env={**os.environ, **(env or {})})


def _finish(proc, timeout=600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def _losses(run) -> list[float]:
    with open(run / "history.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


# A small network with batch norm, trained by the strategy, the training model, the synchronised
# batch norms and the tf.data pipeline of `train --devices N`; prints its losses as JSON.
SMALL = """
import json, sys
import numpy as np
from mri_edge import distribute, feed, quiet
from mri_edge.feed import make_batches
dist = distribute.plan(sys.argv[1]).start(log=lambda *_: None)
quiet.import_tensorflow()
import keras
keras.utils.set_random_seed(0)
with dist.scope():
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Rescaling(1 / 255)(inp)
    for width in (8, 16):
        x = keras.layers.Conv2D(width, 3, strides=2)(x)
        x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    net = keras.Model(inp, keras.layers.Dense(4, activation="softmax")(keras.layers.GlobalAveragePooling2D()(x)))
    if sys.argv[2] == "sync":
        distribute.synchronise_batchnorm(net)
    model = distribute.trainer_class(dist)(inp, net(inp))
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="categorical_crossentropy")
rng = np.random.default_rng(1)
images, labels = rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8), np.arange(16) % 4
batches = make_batches(images, labels, 4, 8, shuffle=True, seed=2, mixup=0.4)  # blended in the graph pipeline
hist = model.fit(feed.for_fit(batches, dist), epochs=3, shuffle=False, verbose=0)
print(json.dumps({"replicas": dist.replicas, "loss": hist.history["loss"]}))
"""


def _small(devices: str, batchnorm: str):
    return subprocess.Popen([sys.executable, "-c", SMALL, devices, batchnorm], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})


@pytest.mark.slow  # three TensorFlow processes at once: about 30 s of the fast tier on 2 cores
def test_two_logical_devices_train_a_small_network_like_one_device():
    """Plain SGD on a small network (no near-zero gradients that Adam would turn into full
    steps): two replicas with synchronised batch norm give the one-device losses to float
    rounding over six steps; with each replica normalising its own half batch they do not."""
    runs = {name: _small(*args) for name, args in
            {"one": ("1", "sync"), "two": ("2", "sync"), "two_local_bn": ("2", "local")}.items()}
    out = {name: json.loads(_finish(p, timeout=300).strip().splitlines()[-1]) for name, p in runs.items()}
    one, two, local = (out[k]["loss"] for k in ("one", "two", "two_local_bn"))
    assert out["one"]["replicas"] == 1 and out["two"]["replicas"] == 2 and len(one) == 3
    assert np.allclose(two, one, rtol=1e-5, atol=0), (one, two)
    assert abs(local[0] - one[0]) > 1e-3 * one[0], (one, local)  # so the check above can fail


@pytest.mark.slow
def test_two_workers_train_like_one_device(synth_data, cache_dir, tmp_path):
    """`mri-edge train` as two workers on 127.0.0.1 (TF_CONFIG) against one device.
    Tolerance: the first epoch's loss is computed before any update, so it must agree to
    rounding (1e-4 relative). After that, float sums in another order (gradients summed over
    replicas, batch-norm statistics as E[x^2] - E[x]^2 over the global batch) move some
    gradients that are at rounding level, and Adam's first steps move each weight by about
    lr * sign(g) whatever the size of g: measured on DenseNet121 at 32 px, 2 of 7 million
    weights (batch-norm offsets) step the other way after one update, and the loss differs by
    0.1-0.6% at the next step and 1-2% after seven; on its one-layer-per-block version, which
    this test trains, by 0.01% at the next step. So the second epoch is held to 1%."""
    env_cpu = {"CUDA_VISIBLE_DEVICES": ""}
    one, p1 = _train(tmp_path, "one", synth_data, cache_dir, env=env_cpu)
    (tmp_path / "tmp").mkdir()  # where the second worker keeps its checkpoints
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    workers = [_train(tmp_path, "multi", synth_data, cache_dir,
                      env={**env_cpu, "TMPDIR": str(tmp_path / "tmp"),
                           "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": k}})})
               for k in range(2)]
    logs = [_finish(p) for _, p in workers]
    _finish(p1)
    multi = workers[0][0]
    assert "multi-worker training on 2 replicas" in logs[0] and "worker 2 of 2: done" in logs[1]
    assert "global batch 8, 4 per replica" in logs[0]
    record = json.loads((multi / "config.json").read_text())["distribution"]
    assert record["workers"] == 2 and record["batch_norm"] == "synchronised across replicas"
    assert (multi / "model.keras").is_file() and (multi / "test_report.json").is_file()
    assert not list(multi.glob("checkpoint*.keras")), "the chief's checkpoint is removed when the run ends"
    assert not list((tmp_path / "tmp").glob("mri-edge-worker*")), "the second worker's folder is removed"

    ref, got = _losses(one), _losses(multi)
    assert len(got) == len(ref) == 2
    assert abs(got[0] - ref[0]) <= 1e-4 * ref[0], (got, ref)
    assert abs(got[1] - ref[1]) <= 0.01 * ref[1], (got, ref)
