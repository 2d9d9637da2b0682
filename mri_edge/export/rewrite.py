"""Rewrites of a quantized TFLite flatbuffer after conversion: per-tensor scales for the
depthwise convolutions that stand for batch norms, and the storage of the weights of the
operations kept in float. Each edits the flatbuffer's object form and keeps every buffer
index valid."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import numpy as np

from ..files import atomic_write_bytes
from ..runtime import FEATURES
from .formats import ExportError


def per_tensor_depthwise(flatbuffer: bytes) -> bytes:
    """Requantize the 1x1 depthwise convolutions that stand for batch norms per tensor.

    Their weights are one value per channel, so per-channel quantization stores a float32
    scale and an int64 zero point for every single weight: 0.9 MB on DenseNet121, which
    pushed the int8 file from 7.65 to 8.57 MB. One shared scale (the precision the MUL these
    layers replaced had) keeps the file at its old size; the int32 biases stay exact.
    The price is precision where channel scales differ widely: on the 128 px Alzheimer model
    the worst validation |dp| fell from 0.31 to 0.17 with per-channel scales, at the same
    latency, while its 176 px sibling got worse. `--bn-scales auto` writes both and keeps the
    one closer to Keras on the validation split; per tensor stays the default because it
    keeps DenseNet121's int8 file under 8 MB.
    """
    from tensorflow.lite.python import schema_py_generated as schema  # noqa: PLC0415
    from tensorflow.lite.tools import flatbuffer_utils  # noqa: PLC0415

    model = flatbuffer_utils.convert_bytearray_to_object(flatbuffer)
    depthwise = [i for i, c in enumerate(model.operatorCodes)
                 if max(c.builtinCode, c.deprecatedBuiltinCode) == schema.BuiltinOperator.DEPTHWISE_CONV_2D]
    replaced = set()
    for sg in model.subgraphs:
        for op in sg.operators:
            if op.opcodeIndex not in depthwise or len(op.inputs) < 3 or op.inputs[2] < 0:
                continue
            x, w, b = (sg.tensors[i] for i in op.inputs[:3])
            if (list(w.shape[:3]) != [1, 1, 1] or w.type != schema.TensorType.INT8
                    or b.type != schema.TensorType.INT32 or x.quantization is None
                    or w.quantization is None or len(w.quantization.scale) < 2):
                continue
            scales = np.asarray(w.quantization.scale, np.float64)
            weights = np.frombuffer(bytes(model.buffers[w.buffer].data), np.int8) * scales
            bias = np.frombuffer(bytes(model.buffers[b.buffer].data), np.int32) * scales * x.quantization.scale[0]
            scale = max(float(np.abs(weights).max()) / 127.0, 1e-12)
            b_scale = scale * x.quantization.scale[0]
            # New buffers: per channel every weight quantizes to +-127, so the converter
            # deduplicated those buffers and several layers may share one.
            for t, data, sc in ((w, np.clip(np.round(weights / scale), -127, 127).astype(np.int8), scale),
                                (b, np.clip(np.round(bias / b_scale), -2**31, 2**31 - 1).astype(np.int32), b_scale)):
                replaced.add(t.buffer)
                buf = schema.BufferT()
                buf.data = data.view(np.uint8)
                model.buffers.append(buf)
                t.buffer = len(model.buffers) - 1
                t.quantization.scale, t.quantization.zeroPoint = [float(sc)], [0]
                t.quantization.quantizedDimension = 0
    release_unused(model, replaced)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def raise_min_runtime_version(model, version: str) -> None:
    """Raise the file's `min_runtime_version` metadata (set by the converter for the operator
    versions it wrote) to at least `version`, for an operator added after conversion."""
    for entry in model.metadata or []:
        buf = model.buffers[entry.buffer]
        if entry.name != b"min_runtime_version" or buf.data is None:
            continue
        old = bytes(buf.data).rstrip(b"\0").decode()
        if tuple(map(int, version.split("."))) > tuple(int(v) for v in old.split(".") if v.isdigit()):
            buf.data = np.frombuffer(version.encode().ljust(max(len(buf.data), len(version)), b"\0"), np.uint8)


def hybrid_opcode(model, index: int, made: dict[int, int]) -> int:
    """The opcode for a hybrid version of the operation at opcode `index` (float input,
    per-channel int8 weights read directly), added to the model once per opcode: CONV_2D
    version 5, as the converter writes for its own dynamic-range files (op_version.cc), so that
    tools that pick kernels or delegates by version see what the operation is. The same
    operation in static int8 keeps its version (3), hence a second opcode. FULLY_CONNECTED is
    left as it is, though hybrid per-channel would be its version 12: export never makes the head
    hybrid, only benchmarks' "dynamic" files do."""
    from tensorflow.lite.python import schema_py_generated as schema  # noqa: PLC0415

    c = model.operatorCodes[index]
    if max(c.builtinCode, c.deprecatedBuiltinCode) != schema.BuiltinOperator.CONV_2D:
        return index
    if index not in made:
        code = schema.OperatorCodeT()
        code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.CONV_2D
        code.version = max(c.version, 5)
        model.operatorCodes.append(code)
        made[index] = len(model.operatorCodes) - 1
    return made[index]


def drop_unused_opcodes(model) -> None:
    """Remove the opcodes no operation uses (the DEQUANTIZE added for weights that stayed as they
    were; a static opcode whose operations all became hybrid), in order, renumbering the rest."""
    used = {op.opcodeIndex for sg in model.subgraphs for op in sg.operators}
    keep = [i for i in range(len(model.operatorCodes)) if i in used]
    if len(keep) == len(model.operatorCodes):
        return
    new = {old: n for n, old in enumerate(keep)}
    model.operatorCodes = [model.operatorCodes[i] for i in keep]
    for sg in model.subgraphs:
        for op in sg.operators:
            op.opcodeIndex = new[op.opcodeIndex]


def release_unused(model, replaced: set[int]) -> None:
    """Empty the buffers in `replaced` that no tensor and no metadata entry uses any more (the
    converter may share one buffer between tensors, and `min_runtime_version` lives in one);
    buffer indices stay valid."""
    used = {t.buffer for sg in model.subgraphs for t in sg.tensors} | {m.buffer for m in model.metadata or []}
    for i in replaced - used - {0}:
        model.buffers[i].data = None


def per_channel_int8(values: np.ndarray, axis: int, min_per_channel: int = 16):
    """(int8 weights, float32 scales) of a float weight, symmetric per output channel (`axis`),
    full 8-bit range; None for a weight with fewer than min_per_channel values per channel,
    where a per-channel scale would take more room than the weight. The one rule for the float
    parts' int8 weights of TFLite (`store_float_weights`) and ONNX (`onnx_store_weights`)."""
    channels = np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1)
    if channels.shape[1] < min_per_channel:
        return None
    scale = np.maximum(np.abs(channels).max(1) / 127.0, 1e-12).astype(np.float32)
    shape = [1] * values.ndim
    shape[axis] = -1
    return np.clip(np.round(values / scale.reshape(shape)), -127, 127).astype(np.int8), scale


def store_float_weights(flatbuffer: bytes, dtype: str, min_per_channel: int = 16,
                        hybrid: Collection[str] = ()) -> bytes:
    """Store the weights of the operations left in float (by --float-head or --max-drop) as
    float16 (fp16) or as int8 per output channel, each behind a DEQUANTIZE that turns it back into
    float32 once, when the interpreter is prepared (XNNPACK unpacks such constants into static
    weights, as in an fp16 file). Their activations stay float32.

    The float32 weights of the float stages are what make an accuracy-aware file large (the
    64 px Alzheimer model: 6.8 of 12.8 MB, for stages holding 23% of the weights). The MLIR
    quantizer has no weight-only mode for denylisted operations, and the LiteRT quantizer
    would redo the static quantization that the range pass tunes, hence this rewrite of the
    flatbuffer. int8 weights with fewer than min_per_channel values per channel (the 1x1
    depthwise convolutions that stand for batch norms, the 2x2 average pooling of DenseNet's
    transitions, depthwise kernels up to 3x3) stay float32: a per-channel scale and zero point
    would take more room than the weight. So does a weight outside float16's range.

    hybrid (output tensor names; `export --hybrid`): the int8 weights of those convolutions and
    dense layers are read directly, without a DEQUANTIZE, so LiteRT runs them as hybrid
    operations that quantize each input on the fly; the other weights are stored as dtype says
    (fp32: left as they are). "dynamic" (for benchmarks/float_weights.py) does that for every
    convolution and dense layer, the other weights stored as fp16. On the shipped Alzheimer model
    every float stage hybrid flips 12 more test answers than float; hybrid kernels are 2.2x faster
    than float ones on a CPU with VNNI, no faster on AVX2 alone (docs/int8.md).
    """
    from tensorflow.lite.python import schema_py_generated as schema  # noqa: PLC0415
    from tensorflow.lite.tools import flatbuffer_utils  # noqa: PLC0415

    if dtype not in ("fp16", "int8", "dynamic") and not (dtype == "fp32" and hybrid):
        raise ExportError(f"float weights are stored as fp16, int8 or dynamic, not {dtype!r}")
    hybrid = {n.encode() if isinstance(n, str) else n for n in hybrid}  # tensor names are bytes in the flatbuffer
    op_ = schema.BuiltinOperator
    model = flatbuffer_utils.convert_bytearray_to_object(flatbuffer)
    axis = {}  # opcode index -> the weight's output-channel axis
    for i, c in enumerate(model.operatorCodes):
        code = max(c.builtinCode, c.deprecatedBuiltinCode)
        if code in (op_.CONV_2D, op_.FULLY_CONNECTED):
            axis[i] = 0
        elif code == op_.DEPTHWISE_CONV_2D:
            axis[i] = 3
    kernels = {i for i, a in axis.items() if a == 0}  # CONV_2D and FULLY_CONNECTED: LiteRT has hybrid kernels for them
    hybrid_codes: dict[int, int] = {}  # a convolution's opcode -> its hybrid version's (`hybrid_opcode`)
    code = schema.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = op_.DEQUANTIZE
    code.version = 5 if dtype == "int8" else 3  # per-channel int8, or float16 input
    model.operatorCodes.append(code)
    dequantize = len(model.operatorCodes) - 1
    replaced = set()
    for sg in model.subgraphs:
        added, done = [], set()
        for op in sg.operators:
            if op.opcodeIndex not in axis or len(op.inputs) < 2 or op.inputs[1] in done:
                continue
            w = sg.tensors[op.inputs[1]]
            data = model.buffers[w.buffer].data if w.buffer else None
            if (w.type != schema.TensorType.FLOAT32 or data is None or not len(data)
                    or sg.tensors[op.inputs[0]].type != schema.TensorType.FLOAT32):
                continue
            values = np.frombuffer(bytes(data), np.float32).reshape(w.shape)
            read_directly = op.opcodeIndex in kernels and (dtype == "dynamic"
                                                           or sg.tensors[op.outputs[0]].name in hybrid)
            if dtype == "fp32" and not read_directly:
                continue
            t = schema.TensorT()
            t.name, t.shape = w.name + f"/{'dynamic' if read_directly else dtype}".encode(), np.array(w.shape)
            if dtype == "fp16" and not read_directly or dtype == "dynamic" and op.opcodeIndex not in kernels:
                t.type, stored = schema.TensorType.FLOAT16, values.astype(np.float16)
                if not np.isfinite(stored).all():
                    continue
            else:
                q = per_channel_int8(values, axis[op.opcodeIndex], min_per_channel)
                if q is None:
                    continue
                stored, scale = q
                t.type, t.quantization = schema.TensorType.INT8, schema.QuantizationParametersT()
                t.quantization.scale, t.quantization.zeroPoint = [float(v) for v in scale], [0] * len(scale)
                t.quantization.quantizedDimension = axis[op.opcodeIndex]
            buf = schema.BufferT()
            buf.data = np.ascontiguousarray(stored).view(np.uint8).ravel()
            model.buffers.append(buf)
            t.buffer = len(model.buffers) - 1
            sg.tensors.append(t)
            replaced.add(w.buffer)  # the float32 copy goes, unless another tensor shares it
            w.buffer = 0
            done.add(op.inputs[1])
            if read_directly:  # a hybrid operation reads it as it is
                for o in sg.operators:
                    o.inputs = [len(sg.tensors) - 1 if i == op.inputs[1] else i for i in o.inputs]
                    if o.inputs[1:2] == [len(sg.tensors) - 1]:
                        o.opcodeIndex = hybrid_opcode(model, o.opcodeIndex, hybrid_codes)
                continue
            deq = schema.OperatorT()
            deq.opcodeIndex, deq.inputs, deq.outputs = dequantize, [len(sg.tensors) - 1], [op.inputs[1]]
            added.append(deq)
        sg.operators = added + list(sg.operators)  # they read constants only, so they may run first
    # the converter's runtime_version.cc table: DEQUANTIZE 3 needs 1.15.0, 5 needs 2.7.0; CONV_2D 5 2.4.0
    if any(op.opcodeIndex == dequantize for sg in model.subgraphs for op in sg.operators):
        raise_min_runtime_version(model, "2.7.0" if dtype == "int8" else "1.15.0")
    if hybrid_codes:
        raise_min_runtime_version(model, "2.4.0")
    drop_unused_opcodes(model)
    release_unused(model, replaced)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def onnx_store_weights(src: Path, dst: Path, dtype: str = "int8") -> int:
    """Each float32 Conv/Gemm/MatMul weight of the file (in a quantized file, those of the
    operations kept in float) stored as int8 per output channel (`rewrite.per_channel_int8`, as
    the TFLite files' float parts) behind a DequantizeLinear, or as float16 behind a Cast to
    float32; activations and compute stay float32. Returns how many weights were stored so.

    int8 on a float file is the weight-only int8 file, written here because onnxruntime's
    quantizers quantize the activations of every operation they touch, and its weight-only tool
    (MatMulNBits) covers MatMul alone. Full 8-bit range: no int8 kernel sees these weights (the
    runtime folds them back to float32 at load, see `onnx_model.OnnxModel`), so the saturation that
    `onnx_int8`'s reduce_range avoids cannot happen. In a file with int8 operations onnxruntime
    keeps a DequantizeLinear (its QDQ fusions need them) and runs it on every call, so the float
    parts of such a file store float16 weights: their Casts fold into float32 weights at load."""
    import onnx  # noqa: PLC0415
    from onnx import helper, numpy_helper  # noqa: PLC0415

    if dtype not in ("fp16", "int8"):
        raise ExportError(f"float weights are stored as fp16 or int8, not {dtype!r}")
    proto = onnx.load(str(src))
    inputs = {i.name for i in proto.graph.input}  # an initializer listed as an input can be overridden: left as it is
    init = {t.name: t for t in proto.graph.initializer if t.name not in inputs and t.data_type == onnx.TensorProto.FLOAT}
    made = {}
    for node in proto.graph.node:
        name = node.input[1] if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1 else None
        if name not in init or name in made:
            continue
        w = numpy_helper.to_array(init[name])
        if dtype == "fp16":
            half = w.astype(np.float16)
            if not np.isfinite(half).all():
                continue  # outside float16's range: stays float32
            stored = [numpy_helper.from_array(half, f"{name}_fp16")]
            made[name] = helper.make_node("Cast", [f"{name}_fp16"], [name], name=f"{name}_cast",
                                          to=onnx.TensorProto.FLOAT)
        else:
            trans_b = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
            axis = 0 if node.op_type == "Conv" or trans_b else w.ndim - 1  # the output channels
            # every weight: a channel's scale and one-byte zero point cost 5 bytes here (TFLite: 12)
            q = per_channel_int8(w, axis, min_per_channel=1)
            stored = [numpy_helper.from_array(q[0], f"{name}_int8"), numpy_helper.from_array(q[1], f"{name}_scale"),
                      numpy_helper.from_array(np.zeros(len(q[1]), np.int8), f"{name}_zero")]
            made[name] = helper.make_node("DequantizeLinear", [f"{name}_int8", f"{name}_scale", f"{name}_zero"],
                                          [name], name=f"{name}_dequantize", axis=axis)
        proto.graph.initializer.remove(init[name])
        proto.graph.initializer.extend(stored)
    # first in the graph: they read initializers only, and any node may use the weights they make
    nodes = list(made.values()) + list(proto.graph.node)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    onnx.checker.check_model(proto)
    atomic_write_bytes(dst, proto.SerializeToString())
    return len(made)



def tflite_add_features(flatbuffer: bytes) -> bytes:
    """The flatbuffer with the global pooling's output (MEAN) as a second output named
    `FEATURES`, after the probabilities. Nothing is computed differently: the tensor existed,
    now the interpreter hands it out. Unchanged without exactly one MEAN (an ensemble has one
    per member) or when the graph already has more than one output."""
    from tensorflow.lite.python import schema_py_generated as schema  # noqa: PLC0415
    from tensorflow.lite.tools import flatbuffer_utils  # noqa: PLC0415

    model = flatbuffer_utils.convert_bytearray_to_object(flatbuffer)
    graph = model.subgraphs[0]
    named = [i for i in graph.outputs[1:] if graph.tensors[i].name == FEATURES.encode()]
    if named:  # added before the signature got it: only the signature entry is missing
        out = int(named[0])
    else:
        mean = {i for i, c in enumerate(model.operatorCodes)
                if max(c.builtinCode, c.deprecatedBuiltinCode) == schema.BuiltinOperator.MEAN}
        pools = [op for op in graph.operators if op.opcodeIndex in mean]
        if len(pools) != 1 or len(graph.outputs) != 1:
            return flatbuffer
        out = int(pools[0].outputs[0])
        graph.tensors[out].name = FEATURES.encode()
        graph.outputs = np.array([int(graph.outputs[0]), out], dtype=np.int32)
    # the signature (interpreter.get_signature_runner()) names its outputs itself
    entry_added = False
    for sig in model.signatureDefs or []:
        if sig.subgraphIndex == 0 and all(t.tensorIndex != out for t in sig.outputs or []):
            entry = schema.TensorMapT()
            entry.name, entry.tensorIndex = FEATURES.encode(), out
            sig.outputs = [*(sig.outputs or []), entry]
            entry_added = True
    if named and not entry_added:  # nothing to do: the bytes as they were, not a re-serialisation
        return flatbuffer
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def onnx_add_features(proto) -> bool:
    """Add the global pooling's output, squeezed to (N, C), to an ONNX graph as a second output
    named `FEATURES` (through an Identity); False where there is no single pooling to take it
    from. The same graph otherwise: the int8 and OpenVINO files made from it inherit it."""
    import onnx  # noqa: PLC0415

    graph = proto.graph
    pools = [n for n in graph.node if n.op_type in ("GlobalAveragePool", "ReduceMean")]
    if len(pools) != 1 or len(graph.output) != 1:
        return False
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    tensor = pools[0].output[0]
    while len(c := consumers.get(tensor, [])) == 1 and c[0].op_type in ("Squeeze", "Reshape", "Flatten"):
        tensor = c[0].output[0]
    inferred = onnx.shape_inference.infer_shapes(proto).graph
    dims = next(([d.dim_value or None for d in v.type.tensor_type.shape.dim] for v in inferred.value_info
                 if v.name == tensor), [None, None])
    graph.node.append(onnx.helper.make_node("Identity", [tensor], [FEATURES], name=FEATURES))
    graph.output.append(onnx.helper.make_tensor_value_info(FEATURES, onnx.TensorProto.FLOAT, [None, *dims[1:]]))
    return True
