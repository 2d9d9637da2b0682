"""Keras inference as export, verify, calibrate and evaluate run it (`keras_model.forward`:
Keras' compiled predict step once 8 images of a batch size have run) against plain eager calls,
side by side in one process on the same images, after warm-up batches (for forward, until its
batch size compiles).

    python benchmarks/keras_inference.py RUN_DIR [--images 256] [--batch 32]

Prints ms per image for each way, their ratio, the largest difference in probability (the
two should agree to the bit) and the CPU it ran on. Random images at the model's input size:
the time does not depend on what they show.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from mri_edge import bench, quiet
from mri_edge.keras_model import COMPILED_FROM, forward


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    args.images -= args.images % args.batch  # equal batches: no second trace inside the timed loop
    quiet.import_tensorflow()
    from mri_edge.model import load_model, no_grad

    net = load_model(f"{args.run_dir}/model.keras")
    size = int(net.input_shape[1])
    x = np.random.default_rng(0).integers(0, 256, (args.images, size, size, 3)).astype(np.float32)

    def eager(b):
        with no_grad():
            return np.asarray(net(b, training=False))

    ways = {"eager calls": (eager, 1),
            "compiled (forward)": (lambda b: np.asarray(forward(net, b)), -(-COMPILED_FROM // args.batch))}
    ms, outs = {}, {}
    for name, (fn, warm_ups) in ways.items():
        for _ in range(warm_ups):  # tracing, first allocations; forward compiles on the last
            fn(x[: args.batch])
        t = time.perf_counter()
        outs[name] = np.concatenate([fn(x[i : i + args.batch]) for i in range(0, len(x), args.batch)])
        ms[name] = (time.perf_counter() - t) * 1000 / len(x)
    cpu = bench.machine_info().get("cpu", "?")
    print(f"{size} px, {args.images} images, batch {args.batch}, CPU {cpu}")
    for name, v in ms.items():
        print(f"  {name:20s} {v:7.1f} ms/image")
    a, b = outs.values()
    print(f"  eager / compiled: {ms['eager calls'] / ms['compiled (forward)']:.2f}x; "
          f"largest |difference| in probability {np.abs(a - b).max():.2e}")


if __name__ == "__main__":
    main()
