"""The format table: every export format, its suffix, its quantizations and the options it
accepts (which runtime opens a file, and what installs it, is the back-end registry's:
`mri_edge.backends`, each back end's own error naming its package). Planning expands
--format/--quantize into jobs and rejects, up front, combinations and options that no
planned file would use.

Standard library only: the command line reads this table for its choices.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import MriEdgeError


class ExportError(MriEdgeError):
    pass


@dataclass(frozen=True)
class Format:
    name: str
    suffix: str
    quantizations: tuple[str, ...]
    options: tuple[str, ...]  # export options that apply to the format's files


# Options that shape only int8 files (the others apply to every file of the format).
INT8_OPTIONS = ("io_dtype", "calib_size", "calib_range", "bn_scales", "max_drop", "max_size", "float_head",
                "float_weights", "hybrid", "openvino_int8")

FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("tflite", ".tflite", ("none", "fp16", "dynamic", "int8"), ("io_dtype", "calib_size", "calib_range",
                                                                       "bn_scales", "max_drop", "max_size",
                                                                       "float_head", "float_weights", "hybrid")),
    Format("onnx", ".onnx", ("none", "int8"), ("opset", "calib_size", "calib_range", "max_drop", "max_size",
                                                "float_head", "float_weights")),
    Format("openvino", ".xml", ("none", "int8"), ("opset", "calib_size", "max_drop", "openvino_int8")),
)}
FORMAT_OPTIONS = tuple(dict.fromkeys(o for f in FORMATS.values() for o in f.options))  # refused where no file uses them
QUANTIZATIONS = ("none", "fp16", "dynamic", "int8")  # most precise first (calibrate's reference file)
IO_DTYPES = ("uint8", "int8", "float32")
OPENVINO_INT8 = ("auto", "nncf", "onnx")
CALIB_RANGES = ("percentile", "minmax")
BN_SCALES = ("per-tensor", "per-channel", "auto")
FLOAT_WEIGHTS = ("fp16", "int8", "fp32")


@dataclass
class ExportJob:
    fmt: str
    quantize: str
    io_dtype: str
    float_head: bool = False  # int8: global pooling, dense layers and softmax stay in float
    float_weights: str = "fp16"  # int8: how the weights of operations kept in float are stored (config.py)
    from_onnx: bool = False  # OpenVINO int8: converted from this export's int8 ONNX file, not quantized by NNCF
    max_size: float | None = None  # int8 with --max-drop: MB the written file may take (accuracy.within_size)
    hybrid: bool = False  # int8 TFLite with --max-drop: float stages as dynamic-range int8 where the budget holds

    @property
    def filename(self) -> str:
        return file_name(self.fmt, self.quantize, self.io_dtype)


def file_name(fmt: str, quantize: str, io_dtype: str = "uint8") -> str:
    """The name export gives a file: model_int8.tflite, model_fp32.onnx, model_int8_int8io.tflite..."""
    q = {"none": "fp32"}.get(quantize, quantize)
    tail = f"_{io_dtype}io" if quantize == "int8" and fmt == "tflite" and io_dtype != "uint8" else ""
    return f"model_{q}{tail}{FORMATS[fmt].suffix}"


def plan(formats: tuple[str, ...], quantize: tuple[str, ...], io_dtype: str, openvino_available: bool = True,
         given: tuple[str, ...] = (), float_head: bool = False, openvino_int8: str = "auto",
         float_weights: str = "fp16", max_size: float | None = None, hybrid: bool = False) -> list[ExportJob]:
    """Expand --format/--quantize into jobs; unsupported combinations are refused up front, and
    so is an option in `given` (the ones the user set) that no planned file accepts."""
    if io_dtype not in IO_DTYPES:
        raise ExportError(f"--io-dtype must be one of {', '.join(IO_DTYPES)}")
    if float_weights not in FLOAT_WEIGHTS:
        raise ExportError(f"--float-weights must be one of {', '.join(FLOAT_WEIGHTS)}")
    if openvino_int8 not in OPENVINO_INT8:
        raise ExportError(f"--openvino-int8 must be one of {', '.join(OPENVINO_INT8)}")
    if not formats or "all" in formats:  # "all" means every format whose converter is installed
        fmts = [f for f in FORMATS if f != "openvino" or openvino_available]
    else:
        fmts = list(dict.fromkeys(formats))
    for f in fmts:
        if f not in FORMATS:
            raise ExportError(f"unknown --format {f!r}; choose {', '.join(FORMATS)} or all")
        if f == "openvino" and not openvino_available:
            raise ExportError("--format openvino needs OpenVINO and NNCF (pip install 'mri-edge[full]')")
    jobs = []
    for f in fmts:
        supported = FORMATS[f].quantizations
        for q in dict.fromkeys(quantize or supported):
            if q not in supported:
                if quantize and len(fmts) > 1:
                    continue  # e.g. --format all --quantize fp16 means "wherever fp16 exists"
                raise ExportError(f"--format {f} does not support --quantize {q} (supported: {', '.join(supported)})")
            jobs.append(ExportJob(f, q, io_dtype if q == "int8" else "float32",
                                  float_head and q == "int8" and "float_head" in FORMATS[f].options,
                                  float_weights=float_weights,
                                  max_size=max_size if q == "int8" and "max_size" in FORMATS[f].options else None,
                                  hybrid=hybrid and q == "int8" and "hybrid" in FORMATS[f].options))
    if not jobs:
        raise ExportError("nothing to export for that --format/--quantize combination")
    # auto: the OpenVINO int8 file from the int8 ONNX file when this export makes one, else NNCF
    onnx_int8 = any(j.fmt == "onnx" and j.quantize == "int8" for j in jobs)
    if openvino_int8 == "onnx" and not onnx_int8:
        raise ExportError("--openvino-int8 onnx converts this export's int8 ONNX file: plan it too "
                          "(--format onnx --quantize int8)")
    for j in jobs:
        j.from_onnx = j.fmt == "openvino" and j.quantize == "int8" and (
            openvino_int8 == "onnx" or (openvino_int8 == "auto" and onnx_int8))
    for opt in given:
        users = [j for j in jobs if opt in FORMATS[j.fmt].options and (opt not in INT8_OPTIONS or j.quantize == "int8")]
        if not users:
            takers = [f.name for f in FORMATS.values() if opt in f.options]
            kind = "int8 " if opt in INT8_OPTIONS else ""
            raise ExportError(f"--{opt.replace('_', '-')} applies to {kind}{'/'.join(takers)} files, and none is "
                              f"planned ({', '.join(j.filename for j in jobs)})")
    return jobs
