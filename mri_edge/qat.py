"""Quantization-aware fine-tuning (`mri-edge train --quant-aware`): the int8 rounding of
activations is simulated during training, for the weights to learn to tolerate it, and the
saved model.keras stays an ordinary float model that `export` quantizes as usual.

Why not a library: tensorflow-model-optimization does not support Keras 3, NNCF's
quantization-aware training is for PyTorch and OpenVINO models, and Keras 3's own
`model.quantize("int8")` quantizes weights only. What is simulated here is per-tensor
asymmetric 8-bit rounding of every stored activation, zero exactly representable, ranges by
the exporter's robust rule (export/calibration.py: the 99% quantile of per-image extremes)
over the training images export calibrates on; weights are not simulated. Measured before
training, that is the int8 ONNX file's error (97% top-1 agreement with it), not the TFLite
file's, whose converter rounds less; and fine-tuning under it did not bring either file to
99% agreement with the float model (docs/int8.md, "Quantization-aware fine-tuning").

The fake-quant graph shares its layers with the float model (keras clone_model with
`clone_function=lambda layer: layer`), so training it trains the float model in place and
the run's checkpoints, best epoch and test report are those of the float model. The head
after global pooling is left float, as `export --float-head` ships it.
"""

from __future__ import annotations

import numpy as np

# Layers whose output the exporter's int8 graph stores as an int8 tensor. Batch norms are
# left out (each is folded into the convolution before it, or made a depthwise convolution,
# with the ReLU after it fused), so is a Conv2D that feeds its batch norm, and padding and
# max pooling, which keep their input's scale.
QUANTIZED = ("Normalization", "Activation", "ReLU", "Concatenate", "Conv2D", "AveragePooling2D")


def fake_quant_layer():
    import keras  # noqa: PLC0415
    from keras import ops  # noqa: PLC0415

    class FakeQuant(keras.layers.Layer):
        """uint8 rounding of a tensor inside [lo, hi], with the straight-through gradient
        (zero outside the range, as TensorFlow's fake_quant ops give). While `observed` is a
        list, calls pass the tensor through and append it (eager calls, for the ranges)."""

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.observed = None
            self.lo = self.add_weight(shape=(), initializer="zeros", trainable=False, name="lo")
            self.hi = self.add_weight(shape=(), initializer="ones", trainable=False, name="hi")

        def call(self, x):
            if self.observed is not None:
                self.observed.append(ops.convert_to_numpy(x))
                return x
            scale = ops.maximum((self.hi - self.lo) / 255.0, 1e-8)
            zero = ops.round(-self.lo / scale)
            clipped = ops.clip(x, self.lo, self.hi)
            q = (ops.clip(ops.round(clipped / scale) + zero, 0.0, 255.0) - zero) * scale
            return clipped + ops.stop_gradient(q - clipped)

        def compute_output_shape(self, input_shape):
            return input_shape

    return FakeQuant


def quant_aware(net, base_name: str):
    """(the fake-quant model sharing `net`'s layers, its FakeQuant layers in graph order)."""
    import keras  # noqa: PLC0415

    FakeQuant = fake_quant_layer()
    inner = {layer.name for layer in net.get_layer(base_name).layers}
    folded = {name for name in inner if name.endswith("conv") and _bn_of(name) in inner}
    points = []

    def call(layer, *args, **kwargs):
        out = layer(*args, **kwargs)
        kind = type(layer).__name__
        if (layer.name in inner or kind == "Normalization") and kind in QUANTIZED and layer.name not in folded:
            fq = FakeQuant(name=f"fq_{len(points)}")
            points.append(fq)
            out = fq(out)
        return out

    qnet = keras.models.clone_model(net, clone_function=lambda layer: layer, call_function=call, recursive=True)
    return qnet, points


def _bn_of(conv_name: str) -> str:
    """DenseNet121's names: conv2_block1_1_conv -> conv2_block1_1_bn, conv1/conv -> conv1/bn."""
    return conv_name[: -len("conv")] + "bn"


def set_ranges(qnet, points, images: np.ndarray, batch_size: int = 32) -> dict:
    """Each FakeQuant layer's range from `images` by the exporter's rule; returns a summary."""
    from .export.calibration import per_image_extremes, robust_ranges  # noqa: PLC0415

    n = len(images)
    lo = np.zeros((n, len(points)), np.float32)
    hi = np.zeros((n, len(points)), np.float32)
    for start in range(0, n, batch_size):
        for fq in points:
            fq.observed = []
        try:
            qnet(images[start:start + batch_size].astype(np.float32), training=False)
        finally:
            seen = [fq.observed for fq in points]
            for fq in points:
                fq.observed = None
        m = min(batch_size, n - start)
        for j, obs in enumerate(seen):
            lo[start:start + m, j], hi[start:start + m, j] = per_image_extremes(obs[0], m)
    new_lo, new_hi = robust_ranges(lo, hi)
    for fq, a, b in zip(points, new_lo, new_hi):
        fq.lo.assign(float(min(a, 0.0)))  # zero stays representable (padding, ReLU)
        fq.hi.assign(float(b) if b > 0 else 1e-6)  # a tensor that is never positive: a non-empty range
    widths = new_hi - new_lo
    return {"points": len(points), "images": n, "median_range": float(np.median(widths)),
            "max_range": float(widths.max())}


def calibration_images(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The training images export calibrates on by default: its count and its pick
    (export/calibration.py), so the simulated ranges are measured where export measures them
    (the same images: images that do not decode are out of the run's split manifest too)."""
    from .config import ExportConfig  # noqa: PLC0415
    from .export.calibration import calibration_indices  # noqa: PLC0415

    return images[calibration_indices(labels, ExportConfig.__dataclass_fields__["calib_size"].default)]


def phase_setup(base_name: str, train_split, log):
    """For each training phase: net -> (the fake-quant model to train in its place, the
    callback that keeps its ranges)."""
    calib = calibration_images(train_split.images, train_split.labels)

    def setup(net):
        qnet, points = quant_aware(net, base_name)
        log(f"quant-aware: int8 rounding simulated after {len(points)} activations (weights and head float)")
        return qnet, range_callback(qnet, points, calib, log)

    return setup


def range_callback(qnet, points, images: np.ndarray, log):
    """A Keras callback that re-measures the ranges before each epoch: the weights move, and
    the exporter will measure the ranges of the weights it is given."""
    import keras  # noqa: PLC0415

    class Ranges(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            s = set_ranges(qnet, points, images)
            log(f"quant-aware: ranges of {s['points']} activations from {s['images']} training images "
                f"(median width {s['median_range']:.2f})")

    return Ranges()
