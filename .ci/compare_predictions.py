"""Compare `mri-edge predict --json` outputs of a device environment with the full one's.

usage: compare_predictions.py NAME DEVICE.jsonl FULL.jsonl [FULL_OTHER_KERNELS.jsonl ...]

The full environment runs the file once per kernel path of its interpreter (XNNPACK, and the
built-in kernels with --xnnpack off). Those paths round int8 differently (up to 0.04 in a
probability on a barely trained model), and which one an interpreter uses by default depends
on its version: tflite-runtime 2.14 runs full-integer files on its built-in kernels, LiteRT 2.x
on XNNPACK. So the device run is compared with the full run nearest to it, and there labels
must match. The only tolerated difference is a near tie: that run's top two classes within two
int8 output steps (2/256), where a different build may legitimately round the other way.
"""

import json
import sys


def load(path):
    return [json.loads(line) for line in open(path) if line.strip().startswith("{")]


def max_diff(ref, dev):
    return max(abs(a["probabilities"][k] - b["probabilities"][k]) for a, b in zip(ref, dev) for k in a["probabilities"])


name, dev, refs = sys.argv[1], load(sys.argv[2]), {p: load(p) for p in sys.argv[3:]}
for path, ref in refs.items():
    assert len(ref) == len(dev) and ref, f"{name}: {len(ref)} predictions in {path}, {len(dev)} on the device"
    assert all(a["image"] == b["image"] and "error" not in b for a, b in zip(ref, dev)), f"{name}: other images"
nearest = min(refs, key=lambda p: max_diff(refs[p], dev))
mismatch = ties = 0
for a, b in zip(refs[nearest], dev):
    if a["label"] != b["label"]:
        margin = a["probabilities"][a["label"]] - a["probabilities"][b["label"]]
        if margin <= 2 / 256 + 1e-6:
            ties += 1
        else:
            mismatch += 1
print(f"device check [{name}]: {len(dev)} real images against {nearest} (nearest of {len(refs)} kernel paths, "
      f"max |dp| {max_diff(refs[nearest], dev):.4f}): {len(dev) - mismatch - ties} identical labels, "
      f"{ties} near-tie flips, {mismatch} real mismatches")
sys.exit(1 if mismatch else 0)
