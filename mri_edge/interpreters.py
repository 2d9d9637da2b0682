"""Which TFLite interpreter this device has (on-device: the standard library and the
interpreter's own module only)."""

from __future__ import annotations

from .errors import PIP_NAMES
from .integrity import RuntimeModelError


def load_interpreter_class(prefer: str | None = None):
    """(Interpreter class, module name): ai_edge_litert, then tflite_runtime, then tensorflow.lite."""
    order = ["ai_edge_litert", "tflite_runtime", "tensorflow"]
    if prefer:
        if prefer not in order:
            raise RuntimeModelError(f"unknown TFLite runtime {prefer!r}; choose one of {', '.join(order)}")
        order = [prefer]
    for name in order:
        try:
            if name == "ai_edge_litert":
                from ai_edge_litert.interpreter import Interpreter  # noqa: PLC0415
            elif name == "tflite_runtime":
                from tflite_runtime.interpreter import Interpreter  # noqa: PLC0415
            else:
                from tensorflow.lite import Interpreter  # noqa: PLC0415
            return Interpreter, name
        except ImportError:
            continue
    if prefer:  # the one asked for is missing; another may be there
        package = PIP_NAMES.get(prefer, prefer)
        raise RuntimeModelError(f"the TFLite runtime {prefer} is not installed (pip install {package}); leave the "
                                "runtime unset to use any installed one")
    raise RuntimeModelError("no TFLite interpreter installed: pip install ai-edge-litert (or tflite-runtime)")


def no_delegate_resolver(interpreter_cls):
    """The op-resolver value that runs built-in kernels only (no XNNPACK), for this interpreter's module."""
    mod = __import__(interpreter_cls.__module__, fromlist=["OpResolverType"])
    return mod.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
