"""Export a trained run to TFLite (fp32, fp16, dynamic-range, full-integer int8), ONNX (fp32,
int8) and, where OpenVINO and NNCF are installed, OpenVINO IR (fp32, int8).

Every file carries its own metadata (class names, preprocessing contract, quantization
parameters, source model hash, calibration manifest hash, the hash of its own model bytes):
TFLite files get a ZIP appended after the flatbuffer (the interpreter ignores trailing bytes,
the same mechanism TFLite's "associated files" use); ONNX files get `metadata_props`,
OpenVINO files an `rt_info` entry.

    formats      the format table, jobs, up-front option checks
    calibration  calibration images, manifest, validation reference, robust ranges
    graph        the Keras graph rearranged for integer inference
    tflite, onnx, openvino   one module per backend: convert, I/O details, metadata
    pool         units of work and the worker processes (typed WorkerContext)
    pipeline     export_run: plan -> calibrate -> run units -> land files + exports.json
    recover      the inverse: a Keras model back from a float TFLite file of the deployment graph
"""

import importlib

# The public names and their modules, imported on first use (PEP 562): the command line reads
# the format table without loading numpy or any converter.
_WHERE = {
    "calibration": ("CALIB_QUANTILE", "calibration_set", "robust_ranges"),
    "formats": ("BN_SCALES", "CALIB_RANGES", "FLOAT_WEIGHTS", "FORMATS", "FORMAT_OPTIONS", "IO_DTYPES", "QUANTIZATIONS",
                "ExportError", "ExportJob", "plan"),
    "graph": ("deployment_graph",),
    "onnx": ("onnx_fp32", "onnx_int8", "set_onnx_metadata"),
    "pipeline": ("add_features", "add_features_run", "export_run", "load_run", "rewrite_metadata", "table"),
    "pool": ("default_workers",),
    "rewrite": ("per_tensor_depthwise", "store_float_weights"),
    "tflite": ("append_tflite_metadata", "calibrated_graph", "tflite_io"),
}
_MODULE_OF = {name: mod for mod, names in _WHERE.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name in _MODULE_OF:
        return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
