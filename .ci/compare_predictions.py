"""Compare `mri-edge predict --json` outputs of the full and a device environment.

Labels must match. The only tolerated difference is a near tie: the full
environment's top two classes within two int8 output steps (2/256), where a
different interpreter build may legitimately round the other way.
"""

import json
import sys


def load(path):
    return [json.loads(line) for line in open(path) if line.strip().startswith("{")]


full, dev, name = load(sys.argv[1]), load(sys.argv[2]), sys.argv[3]
assert len(full) == len(dev) and full, f"{name}: {len(full)} vs {len(dev)} predictions"
mismatch, ties, max_diff = 0, 0, 0.0
for a, b in zip(full, dev):
    assert a["image"] == b["image"] and "error" not in b, b
    max_diff = max(max_diff, max(abs(a["probabilities"][k] - b["probabilities"][k]) for k in a["probabilities"]))
    if a["label"] != b["label"]:
        margin = a["probabilities"][a["label"]] - a["probabilities"][b["label"]]
        if margin <= 2 / 256 + 1e-6:
            ties += 1
        else:
            mismatch += 1
print(f"device check [{name}]: {len(full)} real images, {len(full) - mismatch - ties} identical labels, "
      f"{ties} near-tie flips, {mismatch} real mismatches, max |dp| {max_diff:.4f}")
sys.exit(1 if mismatch else 0)
