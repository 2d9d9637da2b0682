"""Does the int8 ONNX file's 7-bit weight range cost its flips? The plain int8 file (head in
float, as `--float-head`) made three ways from the run's exports/model_fp32.onnx with the same
activation ranges: uint8 activations x 7-bit int8 weights (U8S8 with reduce_range: what export
writes), x full-range uint8 weights (U8U8, whose x86 kernels do not add pairs of products in
int16, so they cannot saturate without VNNI) and x full-range int8 weights (U8S8, which can
saturate on x86 CPUs without VNNI). Per file: size, flips against Keras on the chosen split and
p50 latency at batch 1, timed in turn in one process through `mri_edge.runtime`.

    python benchmarks/onnx_weight_bits.py artifacts/runs/tumor-128px-from64 --split test
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mri_edge import quiet  # noqa: E402
from mri_edge.export.onnx import onnx_int8, pre_process  # noqa: E402
from mri_edge.onnx_model import OnnxModel  # noqa: E402
from side_by_side import arguments, compare, onnx_meta, onnx_run  # noqa: E402


def main() -> None:
    args = arguments(__doc__).parse_args()
    quiet.set_verbose(args.verbose)
    fp32_path, fp32, x, probs, labels, calib = onnx_run(args)
    with tempfile.TemporaryDirectory() as td, quiet.native_stderr():
        work = Path(td)
        pre = pre_process(fp32_path, work / "pre.onnx")
        variants = {"uint8 x int8, 7-bit (export's file)": ("int8", True, 7),
                    "uint8 x uint8, 8-bit (U8U8)": ("uint8", False, 8),
                    "uint8 x int8, 8-bit (U8S8)": ("int8", False, 8)}
        paths = {}
        for i, (name, (weights, reduce_range, bits)) in enumerate(variants.items()):
            path = work / f"v{i}.onnx"  # export's ranges, computed once and shared
            onnx_int8(pre, path, calib, threads=args.threads, workdir=work, float_head=True,
                      ranges=work / "ranges.json", pre_processed=True, weights=weights, reduce_range=reduce_range)
            paths[name] = (path, {"quantization": "int8", "weight_bits": bits})
        paths["fp32 file"] = (fp32_path, {})
        meta = onnx_meta(fp32)
        nets = {name: OnnxModel(path, {**meta, **extra}, threads=args.threads) for name, (path, extra) in paths.items()}
        compare(nets, {name: path.stat().st_size / 1e6 for name, (path, _) in paths.items()}, x, probs, labels,
                args.rounds, args.threads, args.split, "fp32 file")


if __name__ == "__main__":
    main()
