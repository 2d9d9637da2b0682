"""Make a deliberately broken int8 export to show that `mri-edge verify` catches it.

Copies RUN_DIR (without its exports) to OUT_DIR and exports a full-integer int8 TFLite
file calibrated with the wrong normalisation (pixels scaled to 0-1 instead of raw
0-255), the classic preprocessing-drift bug. The input quantization range then covers
only 0-1, so every real pixel saturates.

    python benchmarks/sabotage_int8.py RUN_DIR /tmp/sabotaged
    mri-edge verify /tmp/sabotaged      # exits 1 and names model_int8.tflite
"""

import shutil
import sys
from pathlib import Path

import numpy as np

from mri_edge import export


def main():
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    if dst.exists():
        sys.exit(f"{dst} exists; choose a new folder")
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("exports", "verify", "bench", "parity.*"))
    real = export.calibration_set

    def wrong_normalisation(*a, **k):
        images, used = real(*a, **k)
        return (images / 255.0).astype(np.float32), used

    export.calibration_set = wrong_normalisation
    results, failures = export.export_run(dst, ("tflite",), ("int8",), calib_size=100)
    print(export.table(results))
    print(f"sabotaged export in {dst / 'exports'}; now run: mri-edge verify {dst}")


if __name__ == "__main__":
    main()
