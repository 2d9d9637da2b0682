"""A run's model.keras behind the runtime interface (workstation only: needs Keras)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from . import quiet, runtime
from .integrity import sniff
from .run import RunFolder


class KerasModel(runtime.Model):
    def __init__(self, path: Path, threads: int | None = None, allow_other_resize: bool = False):
        path = Path(path)
        if importlib.util.find_spec("keras") is None:
            raise runtime.RuntimeModelError(f"{path}: .keras files need Keras and TensorFlow "
                                            "(pip install 'mri-edge[full]'); on a device, use an exported file")
        labels_path = path.parent / "labels.json"
        if not labels_path.is_file():
            raise runtime.RuntimeModelError(f"{path}: no labels.json beside it (a model.keras is read from its run "
                                            "folder)")
        labels = RunFolder(path.parent).labels()
        quiet.import_tensorflow()
        from .model import load_model  # noqa: PLC0415

        if sniff(path) != "keras":
            raise runtime.RuntimeModelError(f"{path}: not a Keras model file (damaged, truncated or renamed)")
        try:
            with quiet.native_stderr():
                self.net = load_model(path)
        except Exception as e:
            raise runtime.RuntimeModelError(f"{path}: not a loadable Keras model, damaged or truncated "
                                            f"({type(e).__name__}: {runtime.first_line(e)})") from None
        size = int(self.net.input_shape[1])
        contract = RunFolder(path.parent).config().get("preprocessing") if (path.parent / "config.json").is_file() \
            else None
        meta = {"class_names": labels["class_names"], "input_size": [size, size], "format": "keras",
                **({"preprocessing": contract} if contract else {}),
                "quantization": "none", "input": {"dtype": "float32"}, "output": {"dtype": "float32"}}
        super().__init__(path, meta, allow_other_resize)
        self.runtime_name = "keras"

    def run(self, batch_uint8: np.ndarray) -> np.ndarray:
        import keras  # noqa: PLC0415

        from .model import no_grad  # noqa: PLC0415

        with no_grad():  # torch: no autograd graph (np.asarray refuses a tensor that needs grad)
            return keras.ops.convert_to_numpy(self.net(batch_uint8.astype(np.float32), training=False))
