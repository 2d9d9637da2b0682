"""A Keras model back from a float TFLite file that mri-edge exported: the inverse of export.

For a run whose model.keras is lost but whose fp32 or fp16 TFLite file is kept (a shipped
folder), so that export, verify, calibrate and explain can work on it again. The file holds
the deployment graph (`graph.deployment_graph`) with every batch norm folded away:

- a BN after a concatenation is a 1x1 depthwise convolution (scale, bias): it becomes a BN
  with gamma = scale, beta = bias, mean 0 and variance 1 - epsilon, the same function;
- a BN after a convolution is folded into that convolution's kernel and bias: the kernel
  goes back as it is and the BN becomes the identity plus the bias;
- a transition's 1x1 convolution runs after its 2x2 average pooling (both linear): the
  pooling's fixed 1/4 weights are checked and dropped;
- dense layers keep their kernel (transposed) and bias.

Every weighted layer of the Keras model must be set exactly once, or none is set.
The weights are those of the file (float16 in an fp16 file), so the model is the file's
function in float32, not the trained model's; it differs from it by the fp16 rounding.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..model import nested_layers
from .formats import ExportError
from .graph import CONV_SUFFIX, folded_batchnorms

_TF_SUFFIX = re.compile(r"_\d+$")  # TensorFlow's tracing suffix: conv1_conv_1 -> conv1_conv


def _weighted_layers(net) -> dict:
    """{name: layer} of the layers that hold weights, nested models walked."""
    return {layer.name: layer for layer in nested_layers(net) if layer.weights and not hasattr(layer, "layers")}


def _tflite_weighted_ops(path: Path):
    """[(op name, layer name in the tensor's name, kernel, bias or None)] of a float TFLite file."""
    from ..interpreters import load_interpreter_class  # noqa: PLC0415

    interpreter_cls, _ = load_interpreter_class()
    it = interpreter_cls(model_path=str(path))
    it.allocate_tensors()
    details = {t["index"]: t for t in it.get_tensor_details()}
    ops = it._get_ops_details()  # noqa: SLF001 (the only way to walk the graph from Python)
    dequantized = {o["outputs"][0]: o["inputs"][0] for o in ops if o["op_name"] == "DEQUANTIZE"}

    def const(i):
        src = dequantized.get(i, i)
        if details[src]["dtype"] not in (np.float32, np.float16):
            raise ExportError(f"{path.name}: weights of type {details[src]['dtype'].__name__}; "
                              "recover needs a float (fp32 or fp16) TFLite file")
        return src, np.asarray(it.get_tensor(src), np.float32)

    out = []
    for o in ops:
        if o["op_name"] not in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
            continue
        src, kernel = const(o["inputs"][1])
        bias = const(o["inputs"][2])[1] if len(o["inputs"]) > 2 and o["inputs"][2] >= 0 else None
        parts = details[src]["name"].split(";")[0].split("/")
        layer = _TF_SUFFIX.sub("", parts[-2]) if len(parts) > 1 else parts[0]
        out.append((o["op_name"], layer, kernel, bias))
    return out


def keras_from_tflite(path, net) -> int:
    """Set the weights of `net` (built by `model.build_model` with the run's config) from the
    float TFLite file at `path`; returns the number of layers set. On any mismatch it raises
    ExportError before a single layer is set."""
    import keras  # noqa: PLC0415

    path = Path(path)
    layers = _weighted_layers(net)
    bn_after = folded_batchnorms(net)
    weights: dict[str, list[np.ndarray]] = {}

    def layer(name, kind):
        found = layers.get(name)
        if not isinstance(found, kind):
            raise ExportError(f"{path.name}: no {kind.__name__} layer {name!r} in the model built from the run's "
                              "config; not an mri-edge export of it")
        return found

    def put(name, values):
        if name in weights:
            raise ExportError(f"{path.name}: layer {name!r} appears twice")
        weights[name] = values

    def zeros(n):
        return np.zeros(n, np.float32)

    def bn_weights(bn, scale, bias):  # a BN computing scale * x + bias
        c = scale.shape[0]
        return [scale, zeros(c) if bias is None else bias, zeros(c), np.full(c, 1.0 - bn.epsilon, np.float32)]

    for op, name, kernel, bias in _tflite_weighted_ops(path):
        if op == "DEPTHWISE_CONV_2D" and kernel.shape[1:3] != (1, 1):  # a transition's average pooling
            if not np.allclose(kernel, 1.0 / (kernel.shape[1] * kernel.shape[2])) or (bias is not None and bias.any()):
                raise ExportError(f"{path.name}: {name} is not an average pooling; not an mri-edge export")
        elif op == "DEPTHWISE_CONV_2D":
            put(name, bn_weights(layer(name, keras.layers.BatchNormalization), kernel.reshape(-1), bias))
        elif op == "CONV_2D":
            name = name.removesuffix(CONV_SUFFIX)  # a transition's convolution, run after its pooling
            conv = layer(name, keras.layers.Conv2D)
            n = kernel.shape[0]
            if name in bn_after:  # the file's bias is the folded BN's: it goes there, once
                bn = bn_after[name]
                put(bn.name, bn_weights(bn, np.ones(n, np.float32), bias))
                bias = None
            elif not conv.use_bias and bias is not None and bias.any():
                raise ExportError(f"{path.name}: {name} has a bias that the model's layer cannot hold")
            put(name, [kernel.transpose(1, 2, 3, 0)] + ([zeros(n) if bias is None else bias] if conv.use_bias else []))
        else:
            dense = layer(name, keras.layers.Dense)
            put(name, [kernel.T] + ([zeros(kernel.shape[0]) if bias is None else bias] if dense.use_bias else []))
    missing = sorted(set(layers) - set(weights))
    if missing:
        raise ExportError(f"{path.name}: no weights for {len(missing)} layer(s) of the model, e.g. {missing[0]}")
    for name, values in weights.items():
        shapes = [tuple(w.shape) for w in layers[name].get_weights()]
        if [v.shape for v in values] != shapes:
            raise ExportError(f"{path.name}: {name} holds {[v.shape for v in values]}, the model's layer {shapes}; "
                              "built with another config?")
    for name, values in weights.items():
        layers[name].set_weights(values)
    return len(weights)
