"""What a weight-only int8 ONNX file costs and buys, side by side on one run: the plain int8
file (the head in float, as `--float-head`), the weight-only file (`export --max-drop
--float-weights int8`'s last resort: every operation float, every weight int8) and the fp32
file, all made from the run's exports/model_fp32.onnx. Per file: size, flips against Keras on
the chosen split and p50 latency at batch 1 (timed in turn, in one process, through
`mri_edge.runtime` as verify and bench run them), as ratios to the plain file and the fp32 one.

With --stored, the run's accuracy-aware exports/model_int8.onnx joins them as exported and
with the weights of the operations it keeps in float stored as fp16 (Casts folded at load)
and as int8 per channel (a DequantizeLinear that onnxruntime runs on every call in a file
with int8 operations, so export stores fp16 where int8 is asked): what each storage costs in
size, flips and latency.

With --dynamic, onnxruntime's dynamic quantization (`quantize_dynamic`: every convolution a
ConvInteger whose input is quantized per call, weights uint8 or int8) joins them: the ONNX
counterpart of TFLite's dynamic-range stages (`export --hybrid`).

    python benchmarks/onnx_weight_only.py artifacts/runs/alzheimer-128px-noaug-72min-ema --split test
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mri_edge import quiet  # noqa: E402
from mri_edge.export.onnx import onnx_int8, pre_process  # noqa: E402
from mri_edge.export.rewrite import onnx_store_weights  # noqa: E402
from mri_edge.backends import read_metadata  # noqa: E402
from mri_edge.onnx_model import OnnxModel  # noqa: E402
from side_by_side import arguments, compare, onnx_meta, onnx_run  # noqa: E402


def main() -> None:
    ap = arguments(__doc__)
    ap.add_argument("--stored", action="store_true",
                    help="Also exports/model_int8.onnx with its float parts' weights as fp32, fp16 and int8")
    ap.add_argument("--dynamic", action="store_true",
                    help="Also onnxruntime's dynamic quantization of every convolution (ConvInteger)")
    args = ap.parse_args()
    quiet.set_verbose(args.verbose)

    fp32_path, fp32, x, probs, labels, calib = onnx_run(args)
    with tempfile.TemporaryDirectory() as td, quiet.native_stderr():
        work = Path(td)
        t = time.time()
        onnx_int8(fp32_path, work / "plain.onnx", calib, threads=args.threads, workdir=work, float_head=True)
        onnx_store_weights(pre_process(fp32_path, work / "pre.onnx"), work / "weight_only.onnx", "int8")  # as export makes it
        print(f"made the plain and weight-only files in {time.time() - t:.0f} s; {len(x)} {args.split} images")
        meta = onnx_meta(fp32)
        paths = {"plain int8 (head in float)": (work / "plain.onnx", {"quantization": "int8", "weight_bits": 7}),
                 "weight-only int8": (work / "weight_only.onnx", {"quantization": "int8", "weight_only": True}),
                 "fp32 file": (fp32_path, {})}
        if args.stored:
            chosen = args.run / "exports" / "model_int8.onnx"
            recipe = read_metadata(chosen).get("accuracy_aware") or {}
            if recipe.get("weight_only") or not recipe.get("float_stages"):
                sys.exit(f"{chosen}: no accuracy-aware file with float parts (export it with --max-drop)")
            kept = "+".join(recipe["float_stages"])
            paths[f"{kept} in float, weights as exported ({recipe.get('float_weights')})"] = (chosen, {"weight_bits": 7})
            for w in ("fp16", "int8"):
                onnx_store_weights(chosen, work / f"stored_{w}.onnx", w)
                paths[f"{kept} in float, weights {w}"] = (work / f"stored_{w}.onnx", {"weight_bits": 7})
        if args.dynamic:
            from onnxruntime.quantization import QuantType, quantize_dynamic  # noqa: PLC0415

            for w in (QuantType.QUInt8, QuantType.QInt8):
                out = work / f"dynamic_{w.name}.onnx"
                quantize_dynamic(str(fp32_path), str(out), op_types_to_quantize=["Conv"], weight_type=w)
                paths[f"dynamic int8 (ConvInteger), weights {w.name}"] = (out, {"quantization": "int8"})
        nets = {name: OnnxModel(path, {**meta, **extra}, threads=args.threads) for name, (path, extra) in paths.items()}
        compare(nets, {name: path.stat().st_size / 1e6 for name, (path, _) in paths.items()}, x, probs, labels,
                args.rounds, args.threads, args.split, "fp32 file")


if __name__ == "__main__":
    main()
