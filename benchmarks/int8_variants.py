"""Compare int8 TFLite variants of one run on its validation split (the test split is never read).

For a model whose int8 file fails the parity gate: which change to the quantization brings
it closer to Keras? Per variant: decisions that differ from Keras (flips), mean and worst
|dp| against Keras, file size and p50 latency (batch 1, variants timed in turn, same process).

  default         what `mri-edge export --quantize int8` writes: the batch norms after
                  DenseNet's concatenations get one int8 weight scale per tensor
  bn-per-channel  one scale per channel (`mri-edge export --bn-scales per-channel`)
  float-K         the K layers with the largest int8 error kept in float (TFLite's quantization
                  debugger on calibration images, ranked by RMSE / quantization scale)
  bias-corrected  each convolution's int32 bias shifted by its mean output error against the
                  float graph on calibration images (layers corrected in 8 passes, in order)
  16x8            int16 activations, int8 weights (TFLite's experimental mode); timed and
                  scored on the first --int16-images validation images only (it is slow)

    python benchmarks/int8_variants.py --run artifacts/runs/alzheimer-128px-noaug
"""

from __future__ import annotations

import argparse
import io
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mri_edge import export, interpreters, keras_model, preprocess, runtime  # noqa: E402
from mri_edge.backends import open_model  # noqa: E402


def calibrated_model(run: Path, work: Path, calib: np.ndarray):
    """The float graph with activation ranges (before quantization), as `mri-edge export` makes it."""
    import tensorflow as tf

    model, cfg, _ = export.load_run(run)
    size = int(cfg["image_size"])
    export.deployment_graph(model).export(str(work / "sm"), format="tf_saved_model", verbose=False,
                                          input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])
    return export.calibrated_graph(str(work / "sm"), calib), str(work / "sm")


def quantize(calibrated: bytes, denylist=None, per_tensor_bn=True) -> bytes:
    import tensorflow as tf
    from tensorflow.lite.python import convert as tfl_convert

    fb = tfl_convert.mlir_quantize(calibrated, False, input_data_type=tf.uint8, output_data_type=tf.uint8,
                                   denylisted_nodes=denylist or None)
    return export.per_tensor_depthwise(fb) if per_tensor_bn else fb


def ranked_layers(calibrated: bytes, images: np.ndarray) -> list[str]:
    from tensorflow.lite.python import convert as tfl_convert
    from tensorflow.lite.tools.optimize.debugging.python import debugger

    d = debugger.QuantizationDebugger(
        quant_debug_model_content=tfl_convert.mlir_quantize(calibrated, enable_numeric_verify=True),
        debug_dataset=lambda: ([im[None].astype(np.float32)] for im in images))
    d.run()
    buf = io.StringIO()
    d.layer_statistics_dump(buf)
    rows = list(csv.DictReader(io.StringIO(buf.getvalue())))
    rows.sort(key=lambda r: -np.sqrt(float(r["mean_squared_error"])) / float(r["scale"]))
    return [r["tensor_name"] for r in rows]


def _tensors(fb: bytes, x: np.ndarray, names: set[str]) -> dict:
    cls = interpreters.load_interpreter_class()[0]
    it = cls(model_content=fb, experimental_preserve_all_tensors=True, num_threads=os.cpu_count(),
             experimental_op_resolver_type=interpreters.no_delegate_resolver(cls))
    inp = it.get_input_details()[0]
    it.resize_tensor_input(inp["index"], [len(x), *inp["shape"][1:]])
    it.allocate_tensors()
    it.set_tensor(inp["index"], x if inp["dtype"] == np.uint8 else x.astype(np.float32))
    it.invoke()
    out = {}
    for t in it.get_tensor_details():
        if t["name"] in names:
            scale, zp = t["quantization"]
            a = it.get_tensor(t["index"]).astype(np.float32)
            out[t["name"]] = (a - zp) * scale if scale else a
    return out


def bias_corrected(q: bytes, calibrated: bytes, images: np.ndarray, passes: int = 8) -> bytes:
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    def collect(fb, names):
        parts = [_tensors(fb, images[i:i + 25], names) for i in range(0, len(images), 25)]
        return {n: np.concatenate([p[n] for p in parts]) for n in parts[0]}

    m = flatbuffer_utils.convert_bytearray_to_object(q)
    sg = m.subgraphs[0]
    kinds = (schema.BuiltinOperator.CONV_2D, schema.BuiltinOperator.DEPTHWISE_CONV_2D,
             schema.BuiltinOperator.FULLY_CONNECTED)
    layers = []
    for op in sg.operators:
        code = m.operatorCodes[op.opcodeIndex]
        if max(code.builtinCode, code.deprecatedBuiltinCode) in kinds and len(op.inputs) > 2 and op.inputs[2] >= 0:
            layers.append((sg.tensors[op.outputs[0]].name.decode(), op.inputs[0], op.inputs[1], op.inputs[2]))
    ref = collect(calibrated, {n for n, *_ in layers})
    for chunk in np.array_split(np.arange(len(layers)), passes):
        now = collect(bytes(flatbuffer_utils.convert_object_to_bytearray(m)), {layers[i][0] for i in chunk})
        for i in chunk:
            name, x_i, w_i, b_i = layers[i]
            err = (now[name] - ref[name]).reshape(-1, ref[name].shape[-1]).mean(0)
            w_scale = np.asarray(sg.tensors[w_i].quantization.scale, np.float64)
            b_scale = np.broadcast_to(w_scale * sg.tensors[x_i].quantization.scale[0], err.shape)
            b = sg.tensors[b_i]
            bias = np.frombuffer(bytes(m.buffers[b.buffer].data), np.int32).astype(np.int64)
            buf = schema.BufferT()
            buf.data = np.clip(bias - np.round(err / b_scale), -2**31, 2**31 - 1).astype(np.int32).view(np.uint8)
            m.buffers.append(buf)  # a new buffer: the converter may share one between layers
            b.buffer = len(m.buffers) - 1
    return bytes(flatbuffer_utils.convert_object_to_bytearray(m))


def int16x8(saved_model: str, calib: np.ndarray) -> bytes:
    import tensorflow as tf

    conv = tf.lite.TFLiteConverter.from_saved_model(saved_model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: ([im[None].astype(np.float32)] for im in calib)
    conv.target_spec.supported_ops = [tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
    return conv.convert()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, type=Path)
    ap.add_argument("--float-layers", default="1,5,10,20")
    ap.add_argument("--int16-images", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--out", type=Path, help="Also write the table to this Markdown file.")
    args = ap.parse_args()
    t0 = time.time()
    run = args.run
    _, cfg, _ = export.load_run(run)
    calib, _ = export.calibration_set(run, cfg, 300)
    manifest = json.loads((run / "split_manifest.json").read_text())
    ref = keras_model.validation_reference(run)[0]
    keras = np.asarray(ref["probs"], np.float32)
    reader = open_model(run / "model.keras")
    root = Path(manifest["root"])
    x_val = np.stack([reader.preprocess(root / p) for p in ref["paths"]])
    meta = runtime.read_metadata(run / "exports" / "model_int8.tflite") if (run / "exports" / "model_int8.tflite").is_file() \
        else {"class_names": ref["class_names"], "input_size": [int(cfg["image_size"])] * 2,
              "preprocessing": cfg.get("preprocessing") or preprocess.contract(int(cfg["image_size"]))}
    rows = []
    with tempfile.TemporaryDirectory() as td:
        work = Path(td)
        calibrated, saved_model = calibrated_model(run, work, calib)
        print(f"calibrated graph ready ({time.time() - t0:.0f} s)", flush=True)
        variants = {"default": quantize(calibrated), "bn-per-channel": quantize(calibrated, per_tensor_bn=False)}
        ranked = ranked_layers(calibrated, calib[np.random.default_rng(1).permutation(len(calib))[:64]])
        for k in (int(v) for v in args.float_layers.split(",") if v):
            variants[f"float-{k}"] = quantize(calibrated, denylist=ranked[:k])
        variants["bias-corrected"] = bias_corrected(variants["default"], calibrated, calib[::3][:100])
        variants["16x8"] = int16x8(saved_model, calib[:60])
        print(f"{len(variants)} variants converted ({time.time() - t0:.0f} s)", flush=True)
        models = {}
        for name, fb in variants.items():
            path = work / f"{name}.tflite"
            m = {k: v for k, v in meta.items() if k not in ("input", "output")}
            m.update(export.tflite_io(fb))
            path.write_bytes(export.append_tflite_metadata(fb, m))
            models[name] = runtime.load(path, threads=args.threads)
        for name, net in models.items():
            n = args.int16_images if name == "16x8" else len(x_val)
            probs = net.run(x_val[:n])
            dp = np.abs(probs - keras[:n])
            rows.append({"variant": name, "images": n, "flips": int((probs.argmax(1) != keras[:n].argmax(1)).sum()),
                         "mean_dp": float(dp.mean()), "max_dp": float(dp.max()), "size_mb": len(variants[name]) / 1e6})
        times = {name: [] for name in models}
        one = x_val[:1]
        for name, net in models.items():
            net.run(one)  # warm-up
        for r in range(args.runs):
            for name, net in models.items():
                if name == "16x8" and r >= 5:
                    continue
                t = time.perf_counter()
                net.run(one)
                times[name].append((time.perf_counter() - t) * 1000)
        for row in rows:
            row["p50_ms"] = float(np.median(times[row["variant"]]))
    lines = [f"`python benchmarks/int8_variants.py --run {run}`: int8 TFLite variants against Keras on the "
             f"validation split ({len(x_val)} images), batch 1, {args.threads} threads, "
             f"{time.time() - t0:.0f} s in all.", "",
             "| variant | images | flips | mean abs dp | max abs dp | size MB | p50 ms |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['images']} | {r['flips']} | {r['mean_dp']:.2e} | {r['max_dp']:.3f} | "
              f"{r['size_mb']:.2f} | {r['p50_ms']:.2f} |" for r in rows]
    print("\n" + "\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
