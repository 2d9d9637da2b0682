"""Training throughput of the ways batches can reach `fit`, side by side in one run.

The train step is that of `mri-edge train`'s fine-tune phase with every layer trainable.

- floor: the same compiled train step (in-graph augmentation included) fed one fixed batch
  from a tf.data pipeline: no data loading and no Python per step.
- for_fit: what `mri-edge train` gives fit (`feed.for_fit`): under TensorFlow, each batch
  gathered from the uint8 cache in the graph, in the epoch's order.
- for_fit+mixup: the same with `--mixup 0.2`: each batch blended with a permutation of itself,
  in the graph too.
- PyDataset: the `feed.make_batches` object given to fit as it is, which Keras' TensorFlow
  adapter wraps in `tf.data.Dataset.from_generator`: what batches that need Python per
  batch (a teacher's answers) still take.

Each path runs in a process of its own, one after the other: a PyDataset's threads keep
assembling batches after its fit returns, which would slow whatever ran next in the same
process. Prints images/s, the CPU time each path spent in user and kernel mode, and the
ratios (of medians, and of each path's best round). Goal: for_fit >= 0.90 of the floor, best
rounds.

    python benchmarks/pipeline_throughput.py --image-size 128 --steps 8
    python benchmarks/pipeline_throughput.py --data-dir ../shared/data/brain-tumor-mri
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402


PATHS = ("floor", "for_fit", "for_fit+mixup", "PyDataset")


def measure(args) -> dict:
    """One path in this process: a warm-up (tracing, first allocations), then `rounds` timed epochs."""
    from mri_edge import quiet

    quiet.import_tensorflow()
    import keras
    import tensorflow as tf

    from mri_edge import data, feed
    from mri_edge.augment import augmentation
    from mri_edge.model import build_model, objective, set_phase

    bs = args.batch_size
    dec = data.decode_split(data.discover(args.data_dir, "tumor").splits["train"], args.image_size)
    n = min(len(dec.labels), bs * args.steps)
    images, labels = dec.images[:n], dec.labels[:n]
    batches = feed.make_batches(images, labels, 4, bs, shuffle=True, sample_weights=feed.class_weights(labels, 4),
                                mixup=0.2 if args.path == "for_fit+mixup" else 0.0)
    net = build_model(4, args.image_size, "none")
    set_phase(net, "finetune", "all", freeze_bn=False)  # the Alzheimer recipe's fine-tune phase, as train compiles it
    inp = keras.Input((args.image_size, args.image_size, 3))
    trainer = keras.Model(inp, net(inp if args.no_augment else augmentation()(inp)))
    trainer.compile(**objective(1e-4), jit_compile=False)
    if args.path == "floor":
        ds = tf.data.Dataset.from_tensors(tuple(tf.constant(a) for a in batches[0])).repeat(len(batches))
    else:
        ds = batches if args.path == "PyDataset" else feed.for_fit(batches)
    trainer.fit(ds, epochs=1, steps_per_epoch=2, shuffle=False, verbose=0)
    out = {"images_per_s": [], "user_s": [], "kernel_s": []}
    for r in range(args.rounds):
        t, c = time.perf_counter(), os.times()
        batches.set_epoch(r + 1)  # a new order (and blending plan) each round, timed, as callbacks.EpochOrder does
        trainer.fit(ds, epochs=1, shuffle=False, verbose=0)
        c2 = os.times()
        out["images_per_s"].append(n / (time.perf_counter() - t))
        out["user_s"].append((c2.user - c.user) / len(batches))
        out["kernel_s"].append((c2.system - c.system) / len(batches))
    return {**out, "steps": len(batches), "backend": keras.backend.backend()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default=None, help="Kaggle-layout folder [default: generated phantoms]")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30, help="steps per timed epoch")
    ap.add_argument("--rounds", type=int, default=3, help="timed epochs of each path")
    ap.add_argument("--no-augment", action="store_true", help="train without the in-graph augmentation")
    ap.add_argument("--path", choices=PATHS, help=argparse.SUPPRESS)  # the child process of one path
    args = ap.parse_args()
    if args.path:
        print(json.dumps(measure(args)))
        return

    from mri_edge.bench import machine_info
    from mri_edge.synth import write_dataset

    bs = args.batch_size
    if args.data_dir is None:
        args.data_dir = str(write_dataset(tempfile.mkdtemp(), "tumor", n_train=max(10, -(-bs * args.steps // 4)),
                                          n_test=2, size=128))
    flags = ["--data-dir", args.data_dir, "--image-size", str(args.image_size), "--batch-size", str(bs),
             "--steps", str(args.steps), "--rounds", str(args.rounds), *(["--no-augment"] if args.no_augment else [])]
    results = {}
    for path in PATHS:
        child = subprocess.run([sys.executable, __file__, *flags, "--path", path],
                               capture_output=True, text=True)
        if child.returncode:
            sys.exit(f"{path}: {child.stderr.strip()[-2000:]}")
        results[path] = json.loads(child.stdout.strip().splitlines()[-1])
    info = machine_info()
    first = results["floor"]
    print(f"{info['cpu']}, {info['cores']} cores; image size {args.image_size}, batch {bs}, {first['steps']} steps x "
          f"{args.rounds} rounds, augmentation {'off' if args.no_augment else 'on'}, backend {first['backend']}")
    # The best round is the path's own cost: on a shared 2-core machine a round can run at about
    # half speed with one core idle, whichever path it falls on (timeit takes the minimum likewise).
    speed = {k: float(np.median(r["images_per_s"])) for k, r in results.items()}
    best = {k: float(np.max(r["images_per_s"])) for k, r in results.items()}
    for name, r in results.items():
        print(f"{name:13s} {speed[name]:6.1f} img/s  {bs / speed[name]:6.2f} s/step (best round {bs / best[name]:.2f})  "
              f"CPU per step: user {np.median(r['user_s']):5.2f} s, kernel {np.median(r['kernel_s']):5.2f} s  "
              f"x floor: best rounds {best[name] / best['floor']:.3f}, medians {speed[name] / speed['floor']:.3f}  "
              f"(rounds: {', '.join(f'{v:.1f}' for v in r['images_per_s'])})")
    print(f"for_fit / PyDataset: {speed['for_fit'] / speed['PyDataset']:.2f}x (best rounds: "
          f"{best['for_fit'] / best['PyDataset']:.2f}x)")
    ratio = best["for_fit"] / best["floor"]
    print(f"for_fit / floor, best rounds: {ratio:.3f} (goal >= 0.90: {'MET' if ratio >= 0.9 else 'MISSED'}); "
          f"medians: {speed['for_fit'] / speed['floor']:.3f}")


if __name__ == "__main__":
    main()
