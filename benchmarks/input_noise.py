"""How far a run's Keras model moves under input noise of half a grey level.

Each test image gets uniform noise in [-0.5, 0.5] grey levels (what rounding to the nearest
pixel value could change; seeded), and the script prints how many top-1 answers flip and the
mean and largest change of any class probability. A model that moves far under this also
moves under fp16 or int8 rounding, whatever the quantizer does (docs/int8.md).

    python benchmarks/input_noise.py artifacts/runs/alzheimer-128px-gpu-reg-lr2 artifacts/runs/alzheimer-128px-noaug

The test images are read from where the run's split manifest points (`mri-edge evaluate RUN
--data-dir DIR` re-roots a run trained elsewhere).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mri_edge import data, quiet  # noqa: E402
from mri_edge import model as model_lib  # noqa: E402
from mri_edge.run import RunFolder  # noqa: E402
from mri_edge.evaluate import predict_arrays  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run folders with a model.keras and a split manifest")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    quiet.import_tensorflow()
    for path in args.runs:
        run = RunFolder(path)
        run.require_model()
        x = data.decode_split(data.dataset_from_manifest(run.manifest()).splits["test"],
                              int(run.config()["image_size"])).images
        net = model_lib.load_model(run.model_path)
        noise = np.random.default_rng(args.seed).uniform(-0.5, 0.5, x.shape).astype(np.float32)
        before = predict_arrays(net, x)
        after = predict_arrays(net, np.clip(x + noise, 0, 255))
        dp = np.abs(before - after)
        flips = int((before.argmax(1) != after.argmax(1)).sum())
        print(f"{run.path.name}: {flips} of {len(x)} test answers flip; |dp| mean {dp.mean():.2e}, max {dp.max():.3f}")


if __name__ == "__main__":
    main()
