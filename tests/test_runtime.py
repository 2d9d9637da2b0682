import json
import subprocess
import sys

import numpy as np
import pytest

from mri_edge import runtime


def test_quantize_round_trip():
    x = np.arange(0, 256, dtype=np.float32)
    q = runtime.quantize(x, "uint8", 1.0, 0)
    assert q.dtype == np.uint8 and np.array_equal(q, x.astype(np.uint8))
    q = runtime.quantize(x, "int8", 1.0, -128)
    assert q.dtype == np.int8 and q.min() == -128 and q.max() == 127
    assert np.allclose(runtime.dequantize(q, 1.0, -128), x)
    q = runtime.quantize(np.array([0.0, 0.6, 1.0]), "uint8", 1 / 255, 0)
    assert q.tolist() == [0, 153, 255]
    assert np.allclose(runtime.dequantize(q, 1 / 255, 0), [0, 153 / 255, 1])
    f = runtime.quantize(x, "float32", 0.0, 0)
    assert f.dtype == np.float32


def test_unsupported_and_foreign_files(tmp_path):
    bad = tmp_path / "m.pt"
    bad.write_bytes(b"x")
    with pytest.raises(runtime.RuntimeModelError, match="unsupported model type"):
        runtime.read_metadata(bad)
    plain = tmp_path / "plain.tflite"
    plain.write_bytes(b"TFL3 not ours")
    with pytest.raises(runtime.RuntimeModelError, match="no mri-edge metadata"):
        runtime.read_metadata(plain)
    with pytest.raises(runtime.RuntimeModelError, match="not found"):
        runtime.load(tmp_path / "missing.tflite")


@pytest.mark.slow
def test_runtime_imports_no_training_stack(exported_run, synth_data):
    """The on-device module must not pull TensorFlow, Keras, click or scikit-learn."""
    img = next((synth_data / "Testing" / "glioma").glob("*.jpg"))
    code = f"""
import json, sys
from mri_edge import runtime
m = runtime.load({str(exported_run / 'exports' / 'model_int8.tflite')!r})
r = m.predict({str(img)!r})
banned = [mod for mod in ("tensorflow", "keras", "click", "sklearn", "matplotlib", "tf2onnx", "onnx")
          if mod in sys.modules]
print(json.dumps({{"label": r.label, "banned": banned, "runtime": m.runtime_name}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["banned"] == [] and res["runtime"] in ("ai_edge_litert", "tflite_runtime")
    assert res["label"] in ("Glioma", "Meningioma", "No Tumor", "Pituitary")


@pytest.mark.slow
def test_predict_accepts_path_bytes_and_array(exported_run, synth_data):
    img = next((synth_data / "Testing" / "pituitary").glob("*.jpg"))
    m = runtime.load(exported_run / "exports" / "model_int8.tflite")
    a = m.predict(img)
    b = m.predict(img.read_bytes())
    from mri_edge.preprocess import load_image

    c = m.predict(load_image(img))
    assert a.probabilities == b.probabilities == c.probabilities
    assert set(a.timing_ms) == {"preprocess", "invoke", "total"}
    assert abs(sum(a.probabilities.values()) - 1) < 0.05
