"""How the weights of the operations an int8 TFLite file keeps in float are stored: size,
agreement with Keras and latency, side by side on one run.

From one calibrated graph (as `mri-edge export` makes it) it quantizes the plain int8 file
(the head in float, as `--float-head`) and, for each set of float stages (those of the run's
accuracy-aware export, from its `model_int8.tflite` metadata, or each `--float-stages`), the
file with those stages in float and their weights stored as fp32, fp16 and int8
(`--float-weights`); it also converts the fp32 and fp16 files (no int8 at all). Per
file: size, flips against Keras on the chosen split, and p50 latency at batch 1 (the files
timed in turn, round by round, in one process), as ratios to the plain file and to the fp32
file. A set written S,.../H,... also runs the stages H as dynamic-range int8 (`export
--hybrid`); the run's own int8 file is timed beside them, as exported.

    python benchmarks/float_weights.py artifacts/runs/alzheimer-64px-noaug-29min-ema --split test
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mri_edge import quiet  # noqa: E402
from mri_edge.export.formats import ExportJob  # noqa: E402
from mri_edge.export.rewrite import store_float_weights  # noqa: E402
from mri_edge.export.pool import float_parts  # noqa: E402
from mri_edge.export.tflite import tflite_bytes, tflite_flatbuffer  # noqa: E402
from mri_edge.backends import open_model  # noqa: E402
from mri_edge.runtime import TFLiteModel  # noqa: E402
from side_by_side import arguments, bare_meta, compare, split_images, tflite_candidates  # noqa: E402


def main() -> None:
    ap = arguments(__doc__)
    ap.add_argument("--float-stages", action="append", default=[],
                    help="Comma-separated stages kept in float, instead of the exported recipe's, then "
                         "optionally / and those run as dynamic-range int8 (repeatable: one set of files per value)")
    args = ap.parse_args()
    quiet.set_verbose(args.verbose)

    shipped = open_model(args.run / "exports" / "model_int8.tflite")
    recipe = shipped.meta.get("accuracy_aware")
    if not recipe and not args.float_stages:
        sys.exit(f"{args.run}/exports/model_int8.tflite has no accuracy-aware recipe: export it with --max-drop "
                 "or name --float-stages")
    exported_hybrid = (recipe or {}).get("hybrid_stages") or []
    sets = [tuple([s for s in half.split(",") if s] for half in v.partition("/")[::2]) for v in args.float_stages] or [
        ([s for s in recipe["float_stages"] if s not in exported_hybrid], exported_hybrid)]
    x, probs, labels = split_images(args.run, args.split, shipped)

    with tempfile.TemporaryDirectory() as td, quiet.native_stderr():  # the converters' log lines
        work = Path(td)
        t = time.time()
        quantize = tflite_candidates(args.run, shipped, args.calib_size, work)
        files = {"plain (head in float)": quantize(["head"])}
        for kept, hybrid in sets:
            fp32 = quantize(kept, hybrid)
            what = f"{'+'.join(kept)} in float" + (f", {'+'.join(hybrid)} dynamic-range int8" if hybrid else "")
            # storage is a rewrite of the quantized file, as in export; "dynamic" would make every stage hybrid
            for w in ("fp32", "fp16", "int8") + (() if hybrid else ("dynamic",)):
                files[f"{what}, weights {w}"] = fp32 if w == "fp32" else store_float_weights(fp32, w)
        for q in ("none", "fp16"):  # the float files, timed beside them: what int8 buys over no int8
            files[f"{'fp32' if q == 'none' else q} file"] = tflite_bytes(str(work / "sm"), ExportJob("tflite", q, "float32"),
                                                                          None)
        if recipe:
            files[f"exported: {float_parts(recipe)}"] = tflite_flatbuffer(shipped.path, shipped.meta)
        print(f"built {len(files)} files (graph, calibration, conversions) in {time.time() - t:.0f} s; "
              f"{len(x)} {args.split} images")
        meta = bare_meta(shipped)
        nets = {}
        for name, fb in files.items():
            path = work / f"{len(nets)}.tflite"
            path.write_bytes(fb)
            nets[name] = TFLiteModel(path, meta, threads=args.threads)
        compare(nets, {name: len(fb) / 1e6 for name, fb in files.items()}, x, probs, labels, args.rounds,
                args.threads, args.split, "fp32 file")


if __name__ == "__main__":
    main()
