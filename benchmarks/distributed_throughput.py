"""Training throughput of DenseNet121 on one device against several, side by side in one run.

Each device count runs in its own process (logical CPU devices must be made before
TensorFlow starts), with the strategy, synchronised batch norms and the training model of
`mri-edge train --devices N`, on random images: the first epoch (graph tracing) is left out,
the next ones are timed. On a CPU the logical devices share the same cores, so this shows the
cost of synchronisation, not a speed-up; on a GPU machine pass --devices 1,all.

    python benchmarks/distributed_throughput.py                      # 1 and 2 devices, 64 px, batch 32
    python benchmarks/distributed_throughput.py --devices 1,all --size 224 --batch 64
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def worker(devices: str, size: int, batch: int, steps: int, epochs: int) -> dict:
    import numpy as np

    from mri_edge import distribute, quiet

    dist = distribute.plan(devices)
    quiet.import_tensorflow()
    import keras

    from mri_edge.model import build_model

    dist.start(log=lambda *_: None)
    with dist.scope():
        net = build_model(4, size, "none", 256, 0.5, 0)
        if dist.replicas > 1:
            distribute.synchronise_batchnorm(net)
        inp = keras.Input((size, size, 3))
        model = distribute.trainer_class(dist)(inp, net(inp))
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = (rng.random((batch * steps, size, size, 3)) * 255).astype(np.float32)
    y = np.eye(4, dtype=np.float32)[rng.integers(0, 4, len(x))]
    times = []

    class Clock(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.t)

    model.fit(x, y, batch_size=batch, epochs=epochs, verbose=0, shuffle=False, callbacks=[Clock()])
    timed = times[1:]
    return {"devices": devices, "replicas": dist.replicas, "names": dist.device_names or ["default"],
            "first_epoch_s": times[0], "step_s": sum(timed) / (len(timed) * steps),
            "images_per_s": batch * steps * len(timed) / sum(timed)}


def main() -> None:
    from mri_edge.bench import machine_info

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", default="1,2", help="comma list of device counts (or all)")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32, help="global batch")
    ap.add_argument("--steps", type=int, default=8, help="steps per epoch")
    ap.add_argument("--epochs", type=int, default=3, help="epochs (the first is not timed)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.size, a.batch, a.steps, a.epochs)))
        return
    rows = []
    for d in a.devices.split(","):
        out = subprocess.run([sys.executable, __file__, "--worker", d, "--size", str(a.size), "--batch",
                              str(a.batch), "--steps", str(a.steps), "--epochs", str(a.epochs)],
                             capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        if out.returncode:
            sys.exit(f"--devices {d} failed:\n{out.stderr[-2000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]["images_per_s"]
    print(f"DenseNet121 training, {a.size} px, global batch {a.batch}, {a.steps} steps x {a.epochs - 1} timed epochs; "
          f"{machine_info()['cpu']}, {os.cpu_count()} cores")
    print("| devices | replicas | step s | images/s | vs first row | first epoch s (tracing) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['devices']} ({', '.join(r['names'])}) | {r['replicas']} | {r['step_s']:.2f} | "
              f"{r['images_per_s']:.1f} | {r['images_per_s'] / base:.2f}x | {r['first_epoch_s']:.0f} |")


if __name__ == "__main__":
    main()
