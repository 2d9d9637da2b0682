"""How well held-out images predict the test split's int8 flips: counted, and as the
accuracy-aware search estimates them (`mri_edge.export.heldout.flip_estimate`: every held-out
top-1 margin paired with every held-out change, and the 95% bound the budget is held to).

For each set of stages kept in float (the head always with them, as `--float-head`), it builds
the int8 TFLite file as `mri-edge export` does, runs the held-out and the test images through
it and prints one row per set, then the mean and largest distance of the counted and the
estimated held-out rates from the counted test rate, and how many bounds hold test's rate.

    python benchmarks/flip_estimate.py artifacts/runs/tumor-128px-from64 --float-stages "" \\
        --float-stages body,conv1 --float-stages body,conv1,conv2
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from mri_edge import quiet  # noqa: E402
from mri_edge.export.heldout import flip_estimate, margins  # noqa: E402
from mri_edge.backends import open_model  # noqa: E402
from mri_edge.runtime import TFLiteModel  # noqa: E402
from side_by_side import arguments, bare_meta, split_images, tflite_candidates  # noqa: E402


def main() -> None:
    ap = arguments(__doc__)
    ap.add_argument("--float-stages", action="append", required=True,
                    help='Comma-separated stages kept in float besides the head ("" for none; repeatable)')
    args = ap.parse_args()
    quiet.set_verbose(args.verbose)
    started = time.time()
    shipped = open_model(args.run / "exports" / "model_int8.tflite")
    splits = {s: split_images(args.run, s, shipped) for s in ("val", "test")}
    rows = []
    with tempfile.TemporaryDirectory() as td, quiet.native_stderr():  # the converters' log lines
        work = Path(td)
        quantize = tflite_candidates(args.run, shipped, args.calib_size, work)
        for value in args.float_stages:
            kept = ["head"] + [s for s in value.split(",") if s]
            path = work / "candidate.tflite"
            path.write_bytes(quantize(kept))
            net = TFLiteModel(path, bare_meta(shipped), threads=args.threads)
            row = {"set": "+".join(kept)}
            for split, (x, ref, _) in splits.items():
                probs = net.run(x)
                row[split] = (float((probs.argmax(1) != ref.argmax(1)).mean()), *flip_estimate(ref, probs))
            rows.append(row)
            print(f"  {row['set']}: held-out {row['val'][0]:.2%} counted, test {row['test'][0]:.2%}", flush=True)
    n = {s: len(v[0]) for s, v in splits.items()}
    low = {s: float((margins(v[1])[1] < 0.5).mean()) for s, v in splits.items()}
    print(f"\n{args.run.name}: {n['val']} held-out and {n['test']} test images; top-1 margin under 0.5 nats: "
          f"{low['val']:.1%} held-out, {low['test']:.1%} test; {time.time() - started:.0f} s\n")
    print("| kept in float | held-out counted | held-out estimate | its 95% bound | test counted | test estimate |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['set']} | {r['val'][0]:.2%} | {r['val'][1]:.2%} | {r['val'][2]:.2%} | {r['test'][0]:.2%} "
              f"| {r['test'][1]:.2%} |")
    test = np.array([r["test"][0] for r in rows])
    for i, what in ((0, "counted"), (1, "estimated")):
        gap = np.abs(np.array([r["val"][i] for r in rows]) - test) * 100
        print(f"\nheld-out {what} against test counted: mean distance {gap.mean():.2f} points, largest {gap.max():.2f}")
    held = sum(r["val"][2] >= r["test"][0] for r in rows)
    print(f"the 95% bound holds the test rate for {held} of {len(rows)} sets")


if __name__ == "__main__":
    main()
