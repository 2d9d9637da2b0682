"""Which activation ranges suit which int8 runtime: the plain int8 TFLite and ONNX files of a run
(the head in float, as `--float-head`), each quantized with both of export's range rules
(`--calib-range percentile`, the default: the 99th percentile of the per-image extremes;
`minmax`: the extremes over all calibration images), from the same calibration images. Per
file: size, flips against Keras on the chosen split, accuracy and p50 latency at batch 1 (the
files timed in turn in one process), beside the fp32 ONNX file.

The run needs exports/model_fp32.onnx (`mri-edge export RUN --format onnx --quantize none`).

    python benchmarks/range_rules.py artifacts/runs/alzheimer-128px-noaug-72min-ema --split test
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mri_edge import export, quiet  # noqa: E402
from mri_edge.export.formats import ExportJob  # noqa: E402
from mri_edge.export.onnx import onnx_int8, pre_process  # noqa: E402
from mri_edge.export.tflite import calibrated_for, quantize_calibrated, write_saved_model  # noqa: E402
from mri_edge.onnx_model import OnnxModel  # noqa: E402
from mri_edge.runtime import TFLiteModel  # noqa: E402
from side_by_side import arguments, compare, onnx_meta, onnx_run  # noqa: E402

RULES = ("percentile", "minmax")


def main() -> None:
    args = arguments(__doc__).parse_args()
    quiet.set_verbose(args.verbose)
    fp32_path, fp32, x, probs, labels, calib = onnx_run(args)
    model, cfg, _ = export.load_run(args.run)
    meta = onnx_meta(fp32)
    t = time.time()
    with tempfile.TemporaryDirectory() as td, quiet.native_stderr():
        work = Path(td)
        write_saved_model(export.deployment_graph(model), str(work / "sm"), int(cfg["image_size"]))
        pre = pre_process(fp32_path, work / "pre.onnx")
        nets, sizes = {}, {}
        for rule in RULES:
            fb = quantize_calibrated(calibrated_for(str(work / "sm"), calib, rule, "uint8"),
                                     ExportJob("tflite", "int8", "uint8", True, float_weights="fp32"), "per-tensor")
            path = work / f"{rule}.tflite"
            path.write_bytes(fb)
            name = f"TFLite int8, {rule} ranges"
            # its input and output ports from the file itself (as side_by_side.bare_meta)
            nets[name] = TFLiteModel(path, {**meta, "quantization": "int8", "input": {}, "output": {}},
                                     threads=args.threads)
            sizes[name] = len(fb) / 1e6
        for rule in RULES:
            path = work / f"{rule}.onnx"
            onnx_int8(pre, path, calib, rule, threads=args.threads, workdir=work, float_head=True, pre_processed=True)
            name = f"ONNX int8, {rule} ranges"
            nets[name] = OnnxModel(path, {**meta, "quantization": "int8", "weight_bits": 7}, threads=args.threads)
            sizes[name] = path.stat().st_size / 1e6
        nets["fp32 ONNX file"], sizes["fp32 ONNX file"] = fp32, fp32_path.stat().st_size / 1e6
        print(f"built {len(nets) - 1} int8 files in {time.time() - t:.0f} s")
        compare(nets, sizes, x, probs, labels, args.rounds, args.threads, args.split, "fp32 ONNX file")


if __name__ == "__main__":
    main()
