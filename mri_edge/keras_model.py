"""A run's model.keras behind the runtime interface (workstation only: needs Keras)."""

from __future__ import annotations

import weakref
from pathlib import Path

import numpy as np

from . import quiet, runtime, trust
from .errors import installed
from .files import sha256_file
from .run import RunFolder

COMPILED_FROM = 8  # images of one batch size: until then, eager calls are quicker than tracing its graph
_EAGER_IMAGES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # net -> {batch size: images run}


class KerasModel(runtime.Model):
    def __init__(self, path: Path, threads: int | None = None, allow_other_resize: bool = False):
        path = Path(path)
        if not installed("keras"):
            raise runtime.RuntimeModelError(f"{path}: .keras files need Keras and TensorFlow "
                                            "(pip install 'mri-edge[full]'); on a device, use an exported file")
        folder = RunFolder(path.parent)
        if not folder.labels_path.is_file():
            raise runtime.RuntimeModelError(f"{path}: no labels.json beside it (a model.keras is read from its run "
                                            "folder)")
        labels = folder.labels()
        quiet.import_tensorflow()
        from .model import load_model  # noqa: PLC0415

        with quiet.native_stderr():
            self.net = load_model(path)  # a damaged file: one line (RuntimeModelError)
        size = int(self.net.input_shape[1])
        contract = folder.config().get("preprocessing") if folder.config_path.is_file() else None
        record = folder.trust()  # what `mri-edge calibrate` fitted for this run
        if record and not trust.fitted_for(record, sha256_file(path)):
            record = None  # fitted for another model.keras (retrained since): not applied
        meta = {"class_names": labels["class_names"], "input_size": [size, size], "format": "keras",
                **({"preprocessing": contract} if contract else {}), **({"trust": record} if record else {}),
                "quantization": "none", "input": {"dtype": "float32"}, "output": {"dtype": "float32"}}
        super().__init__(path, meta, allow_other_resize)
        self.runtime_name = "keras"
        import keras  # noqa: PLC0415

        # the layer whose output the exported files hand out second (`export.rewrite.*_add_features`)
        pools = [layer for layer in self.net.layers if isinstance(layer, keras.layers.GlobalAveragePooling2D)]
        self._pool = pools[0] if len(pools) == 1 else None
        self.has_features = self._pool is not None
        self._with_features = None  # the model with its pooled features as a second output, built when asked

    def run_batch(self, batch_uint8: np.ndarray, features: bool = False):
        import keras  # noqa: PLC0415

        x = batch_uint8.astype(np.float32)
        if features and self.has_features and self._with_features is None:
            self._with_features = keras.Model(self.net.inputs[0], [self.net.outputs[0], self._pool.output])
        net = self._with_features if features and self.has_features else self.net
        out = forward(net, x)
        if not features:
            return out
        if not self.has_features:
            return out, None
        return out[0], out[1].reshape(len(x), -1)


def forward(net, x: np.ndarray):
    """net's output(s) for x, as numpy, through Keras' compiled predict step (a graph on
    TensorFlow: 1.5-2.2x faster than eager calls at batch 32 on 2 CPU cores, 8x at batch 1; the
    same probabilities: docs/benchmarks.md#keras-inference) once COMPILED_FROM images of this
    batch size have been run, this batch included. The first batch of each size pays for tracing
    its graph (1-4 s, about 8 eager images at batch 1), so a size that has run fewer runs eagerly:
    a batch of 8 or more compiles at once, single images from the eighth on (`predict` on a folder)."""
    import keras  # noqa: PLC0415

    from .model import no_grad  # noqa: PLC0415

    seen = _EAGER_IMAGES.setdefault(net, {})
    seen[len(x)] = seen.get(len(x), 0) + len(x)
    if seen[len(x)] >= COMPILED_FROM:
        return net.predict_on_batch(x)
    with no_grad():  # torch: no autograd graph (np.asarray refuses a tensor that needs grad)
        out = net(x, training=False)
    return [keras.ops.convert_to_numpy(o) for o in out] if isinstance(out, (list, tuple)) else \
        keras.ops.convert_to_numpy(out)


def validation_reference(run_dir, log=print, with_images: bool = False) -> tuple[dict, np.ndarray | None]:
    """Keras probabilities on the run's whole validation split, computed once per model.keras
    and cached in verify/val/keras_predictions.json; with the decoded images when asked.

    The one Keras reference outside the test split: verify --split val gates on it, and
    export --bn-scales auto chooses between int8 variants with it, so the test split is
    never read to choose anything.
    """
    from .data import decode_images  # noqa: PLC0415
    from .files import read_json  # noqa: PLC0415
    from .report import write_json  # noqa: PLC0415

    run = RunFolder(run_dir)
    manifest = run.manifest()
    rows = manifest["splits"].get("val") or []
    if not rows:
        raise runtime.RuntimeModelError(f"{run.path}: the split manifest has no validation split")
    sha = sha256_file(run.model_path)
    cache = run.verify_dir("val") / "keras_predictions.json"
    ref = read_json(cache) if cache.is_file() else {}
    if ref.get("source_model_sha256") == sha and not with_images:
        return ref, None
    net = KerasModel(run.model_path)
    images = decode_images(net, Path(manifest["root"]), [rel for rel, _ in rows], "validation images")
    if ref.get("source_model_sha256") != sha:
        probs = net.predict_arrays(images, 32, calibrated=False, label="Keras reference on the validation split")
        ref = {"class_names": manifest["class_names"], "paths": [rel for rel, _ in rows],
               "labels": [int(k) for _, k in rows], "probs": probs.tolist(), "source_model_sha256": sha}
        write_json(cache, ref)
        log(f"Keras reference on {len(rows)} validation images written to {cache}")
    return ref, images
