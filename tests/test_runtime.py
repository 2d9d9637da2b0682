import json
import re
import subprocess
import sys

import numpy as np
import pytest

from mri_edge import backends, onnx_model, preprocess, runtime


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


def test_run_calls_the_graph_a_chunk_at_a_time(micro_run):
    """Model.run bounds the images of one graph call (memory grows with the batch: one Keras call
    on 574 images at 128 px took 24 GB), with the answers of one call per image."""
    from mri_edge.preprocess import ImageError
    from mri_edge.backends import open_model

    model = open_model(micro_run / "model.keras")
    x = np.random.default_rng(0).integers(0, 256, (model.chunk * 2 + 3, model.image_size, model.image_size, 3),
                                          dtype=np.uint8)
    calls = []
    run_batch = model.run_batch
    model.run_batch = lambda b, features=False: calls.append(len(b)) or run_batch(b, features)
    probs = model.run(x)
    size = -(-len(x) // 3)  # three calls of one size (the last padded): a new size re-plans TFLite
    assert calls == [size] * 3 and probs.shape == (len(x), len(model.class_names))
    assert np.allclose(probs, np.concatenate([run_batch(x[i:i + 1]) for i in range(len(x))]), atol=1e-5)
    both, feats = model.run(x, features=True)  # the pooled features come through the same chunks
    assert np.array_equal(both, probs) and len(feats) == len(x)
    assert np.allclose(feats, np.concatenate([run_batch(x[i:i + 1], True)[1] for i in range(len(x))]), atol=1e-5)
    # the graph normalises: pixels scaled already, or an image without its batch axis, are refused
    for bad, says in ((x[:2] / 255.0, "raw pixels 0-255"), (x[:2] / 127.5 - 1, "raw pixels 0-255"),
                      (x[:2].astype(np.uint16) * 257, "raw pixels 0-255"), (x[:2] + 256.0, "raw pixels 0-255"),
                      (x[0], f"(N, {model.image_size}, {model.image_size}, 3)")):
        with pytest.raises(ImageError, match=re.escape(says)):
            model.run(bad)
    assert model.run(x[:2].astype(np.float32)).shape == (2, len(model.class_names))  # raw pixels as floats
    lam = np.float32(0.02)  # a mixup blend of two white images (train --teacher): 255 up to float rounding
    white = np.full_like(x[:2], 255, np.float32)
    assert (lam * white + (1 - lam) * white).max() > 255
    assert model.run(lam * white + (1 - lam) * white).shape == (2, len(model.class_names))


def test_an_empty_batch_gives_empty_answers_and_leaves_every_file_usable(micro_run):
    """TFLite cannot plan a batch of 0; asked for one, it stayed unplanned for later calls."""
    from mri_edge.backends import open_model
    from mri_edge.run import RunFolder

    for f in RunFolder(micro_run).export_files() + [micro_run / "model.keras"]:
        model = open_model(f)
        x = np.random.default_rng(0).integers(0, 256, (2, model.image_size, model.image_size, 3), dtype=np.uint8)
        empty = x[:0]
        assert model.run(empty).shape == (0, len(model.class_names)), f.name
        probs, feats = model.run(empty, features=True)
        assert probs.shape == (0, len(model.class_names)) and (feats is None) == (not model.has_features), f.name
        if feats is not None:
            assert feats.shape[0] == 0 and feats.shape[1] == model.run(x, features=True)[1].shape[1], f.name
        assert model.run(x).shape == (2, len(model.class_names)), f.name  # still usable
        assert model.predict_arrays(empty).shape == (0, len(model.class_names)), f.name
        probs, feats = model.predict_arrays(empty, features=True)
        assert probs.shape[0] == 0 and (feats is None) == (not model.has_features), f.name


def test_unsupported_and_foreign_files(tmp_path):
    bad = tmp_path / "m.pt"
    bad.write_bytes(b"x")
    for read in (runtime.read_metadata, backends.read_metadata):
        with pytest.raises(runtime.RuntimeModelError, match="unsupported model type"):
            read(bad)
    plain = tmp_path / "plain.tflite"
    plain.write_bytes(b"\x1c\x00\x00\x00TFL3 not ours")
    with pytest.raises(runtime.RuntimeModelError, match="damaged or truncated TFLite file"):
        runtime.read_metadata(plain)
    with pytest.raises(runtime.RuntimeModelError, match="not found"):
        runtime.load(tmp_path / "missing.tflite")
    xml = tmp_path / "model.xml"
    xml.write_text("<net/>")
    for name in ("model.xml", "model.onnx"):  # the device module opens .tflite files; open_model every kind
        with pytest.raises(runtime.RuntimeModelError, match=f"unsupported model type '{name[5:]}' here"):
            runtime.load(tmp_path / name)
    plain.rename(tmp_path / "model_int8.tflite")
    with pytest.raises(runtime.RuntimeModelError, match="a folder; give one model file in it, e.g. .*model_int8.tflite"):
        runtime.load(tmp_path)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(runtime.RuntimeModelError, match="the file is empty"):
        backends.read_metadata(empty)


def test_every_export_format_has_a_backend():
    import importlib

    for suffix in backends.EXPORT_SUFFIXES:
        module, cls = backends.BACKENDS[suffix]
        m = importlib.import_module(module)
        assert hasattr(m, cls) and hasattr(m, "read_metadata"), suffix
    assert backends.BACKENDS[".tflite"][0] == "mri_edge.runtime"  # the device module


def test_renamed_and_truncated_files_say_so(micro_run, tmp_path):
    ex = micro_run / "exports"
    renamed = tmp_path / "model.tflite"
    renamed.write_bytes((ex / "model_fp32.onnx").read_bytes())
    with pytest.raises(runtime.RuntimeModelError, match="bytes are those of an ONNX file; rename it to model.onnx"):
        runtime.load(renamed)
    renamed = tmp_path / "model.onnx"
    renamed.write_bytes((ex / "model_int8.tflite").read_bytes())
    with pytest.raises(runtime.RuntimeModelError, match="a TFLite file; rename it to model.tflite"):
        backends.open_model(renamed)
    data = (ex / "model_int8.tflite").read_bytes()
    for cut, message in ((len(data) - 40, "truncated"), (len(data) // 3, "truncated")):
        short = tmp_path / f"cut{cut}.tflite"
        short.write_bytes(data[:cut])
        with pytest.raises(runtime.RuntimeModelError, match=message):
            runtime.load(short)
    onnx = (ex / "model_fp32.onnx").read_bytes()
    short = tmp_path / "cut.onnx"
    short.write_bytes(onnx[: len(onnx) // 2])
    with pytest.raises(runtime.RuntimeModelError, match="truncated"):
        backends.open_model(short)


def test_modified_model_bytes_are_refused(micro_run, tmp_path):
    """Export records a hash of each file's model bytes; a changed weight is caught on load."""
    for name in ("model_int8.tflite", "model_fp32.onnx", "model_int8.onnx"):
        src = micro_run / "exports" / name
        meta = backends.read_metadata(src)
        assert len(meta["model_sha256"]) == 64
        backends.open_model(src)  # the untouched file loads
        data = bytearray(src.read_bytes())
        if name.endswith(".onnx"):  # the lowest byte of a float weight: the file still parses and runs
            import onnx

            floats = [t for t in onnx.load(str(src)).graph.initializer if t.data_type == 1 and len(t.raw_data) >= 16]
            i = bytes(data).find(max(floats, key=lambda t: len(t.raw_data)).raw_data)
        else:  # the middle of the flatbuffer, before the metadata
            i = meta["model_bytes"] // 2
        data[i] ^= 0x01
        bad = tmp_path / name
        bad.write_bytes(bytes(data))
        with pytest.raises(runtime.RuntimeModelError, match="differ from what `mri-edge export` recorded"):
            backends.open_model(bad)


def test_runtime_imports_no_training_stack(micro_run, synth_data):
    """The on-device module must not pull TensorFlow, Keras, click or scikit-learn."""
    img = next((synth_data / "Testing" / "glioma").glob("*.jpg"))
    code = f"""
import json, sys
from mri_edge import preprocess, runtime
m = runtime.load({str(micro_run / 'exports' / 'model_int8.tflite')!r})
r = m.predict({str(img)!r})
banned = [mod for mod in ("tensorflow", "keras", "click", "sklearn", "matplotlib", "tf2onnx", "onnx",
                          "onnxruntime", "openvino")
          if mod in sys.modules]
print(json.dumps({{"label": r.label, "banned": banned, "runtime": m.runtime_name}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["banned"] == [] and res["runtime"] in ("ai_edge_litert", "tflite_runtime")
    assert res["label"] in ("Glioma", "Meningioma", "No Tumor", "Pituitary")


def test_predict_accepts_path_bytes_and_array(micro_run, synth_data):
    img = next((synth_data / "Testing" / "pituitary").glob("*.jpg"))
    m = runtime.load(micro_run / "exports" / "model_int8.tflite")
    a = m.predict(img)
    b = m.predict(img.read_bytes())
    from mri_edge.preprocess import load_image

    c = m.predict(load_image(img))
    assert a.probabilities == b.probabilities == c.probabilities
    assert set(a.timing_ms) == {"preprocess", "invoke", "total"}
    assert abs(sum(a.probabilities.values()) - 1) < 0.05


def test_the_runtime_checks_the_preprocessing_contract(micro_run, synth_data, monkeypatch):
    path = micro_run / "exports" / "model_int8.tflite"
    meta = runtime.read_metadata(path)
    assert meta["preprocessing"]["resize_method"] == preprocess.OPENCV
    assert meta["preprocessing"]["contract_version"] == preprocess.CONTRACT_VERSION
    newer = {**meta, "preprocessing": {**meta["preprocessing"], "contract_version": 2}}
    with pytest.raises(runtime.RuntimeModelError, match="preprocessing contract v2, this runtime implements v1"):
        preprocess.check_contract(path, newer)
    with pytest.raises(runtime.RuntimeModelError, match="no preprocessing record"):  # never a guess for a file
        preprocess.check_contract(path, {k: v for k, v in meta.items() if k != "preprocessing"})
    bad_size = {**meta, "preprocessing": {**meta["preprocessing"], "image_size": [64, 64]}}
    with pytest.raises(runtime.RuntimeModelError, match="inconsistent"):
        preprocess.check_contract(path, bad_size)
    # a device without OpenCV would resize differently from what was trained and verified
    monkeypatch.setattr(preprocess, "_cv2", lambda: None)
    with pytest.raises(runtime.RuntimeModelError, match="resizes with opencv-area-linear, this machine only has "
                                                       "pillow-box-bilinear"):
        runtime.load(path)
    m = runtime.load(path, allow_other_resize=True)
    assert m.resize_method == preprocess.PILLOW
    assert m.predict(next(synth_data.rglob("*.jpg"))).label in m.class_names
    # commands that decode images for the run's model.keras have no override: refused before any work
    from click.testing import CliRunner

    from mri_edge.cli import main

    before = sorted(p.name for p in micro_run.rglob("*"))
    for args in (["evaluate", str(micro_run)], ["export", str(micro_run), "--format", "tflite", "--quantize", "none"]):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 1 and "resizes with opencv-area-linear, this machine only has pillow" in res.output
        assert "--allow-other-resize" not in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert sorted(p.name for p in micro_run.rglob("*")) == before


def test_bench_skips_the_rows_of_a_file_whose_runtime_is_missing(micro_run, monkeypatch, tmp_path):
    """bench reads a named file's metadata up front (a damaged file: one line), but a file whose
    runtime is not installed is no error there: its rows are listed as skipped."""
    import sys

    from mri_edge import bench

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails, as on a host without it
    onnx_file = micro_run / "exports" / "model_int8.onnx"
    rows, skipped, _ = bench.plan([str(onnx_file)])
    assert rows == [] and {s["runtime"] for s in skipped} >= {"onnxruntime"}
    (broken := tmp_path / "broken.tflite").write_bytes(b"TFL3" * 8)
    with pytest.raises(runtime.RuntimeModelError):
        bench.plan([str(broken)])


def test_a_device_without_onnxruntime_or_keras_gets_a_clear_message(micro_run, monkeypatch):
    import importlib.util
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails, as on a device without it
    with pytest.raises(runtime.RuntimeModelError, match=r"\.onnx files need onnxruntime \(pip install onnxruntime\)"):
        backends.open_model(micro_run / "exports" / "model_int8.onnx")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "keras" else real(name, *a))
    with pytest.raises(runtime.RuntimeModelError, match=r"need Keras and TensorFlow \(pip install 'mri-edge\[full\]'\)"):
        backends.open_model(micro_run)


def test_int8_onnx_files_have_7_bit_weights_and_older_ones_warn_without_vnni(micro_run, monkeypatch):
    """onnxruntime's U8S8 kernels saturate on x86 CPUs without VNNI: 8-bit weights give other
    answers there, 7-bit ones the same everywhere (the micro model: 18.75% vs 100% agreement)."""
    import warnings
    from pathlib import Path

    path = micro_run / "exports" / "model_int8.onnx"
    meta = onnx_model.read_metadata(path)
    assert meta["weight_bits"] == 7
    monkeypatch.setattr(onnx_model, "cpu_has_vnni", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        onnx_model.OnnxModel(path, meta)  # no warning for a 7-bit file
    old = {k: v for k, v in meta.items() if k != "weight_bits"}
    # opened through a frame of the package (as backends.open_model does): the warning names this line
    inside = compile("def opened(cls, *a):\n    return cls(*a)\n", str(Path(runtime.__file__).parent / "x.py"), "exec")
    scope: dict = {}
    exec(inside, scope)
    with pytest.warns(RuntimeWarning, match="saturate on this CPU") as caught:
        scope["opened"](onnx_model.OnnxModel, path, old)
    assert caught[0].filename == __file__
    monkeypatch.setattr(onnx_model, "cpu_has_vnni", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        onnx_model.OnnxModel(path, old)


def test_progress_in_a_log_writes_a_line_at_most_every_few_seconds(monkeypatch):
    import io

    from mri_edge import progress

    clock = [0.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: clock[0])
    log = io.StringIO()
    with progress.Progress(100, "decoding", stream=log) as bar:
        for _ in range(50):  # half of the work in no time: no line until the end
            bar.update()
        clock[0] = progress.LOG_EVERY_S
        bar.update()  # 51%, LOG_EVERY_S later: one line
        for _ in range(49):
            bar.update()
    lines = log.getvalue().splitlines()
    assert [ln.split(":")[1].split()[0] for ln in lines] == ["0/100", "51/100", "100/100"]


def test_images_the_model_was_not_made_for_are_referred_for_review():
    from tests.conftest import REPO

    model = runtime.load(REPO / "artifacts" / "tumor" / "model_int8.tflite")
    rng = np.random.default_rng(0)
    blank = model.predict(np.zeros((64, 64), np.uint8))
    red = model.predict(np.full((64, 64, 3), (200, 0, 0), np.uint8))  # one colour: blank too
    tiny = model.predict(rng.integers(0, 255, (4, 4), dtype=np.uint8))
    noise = model.predict(rng.integers(0, 255, (64, 64), dtype=np.uint8))

    def unlike(p):  # the familiarity check's reason (the shipped file's trust record has one)
        return [w for w in p.warnings if w.startswith("unlike the training images (feature distance")]

    assert blank.uncertain and blank.warnings[0] == red.warnings[0] == "blank image (no contrast)" and red.uncertain
    assert tiny.uncertain and tiny.warnings[0] == f"small image (4x4 px) enlarged to {model.image_size} px"
    # noise has contrast and size: only its features tell, and they do (so do the others')
    assert noise.uncertain and noise.warnings == unlike(noise) and len(unlike(noise)) == 1
    assert all(unlike(p) and p.distance > model.trust.familiarity["limit"] for p in (blank, red, tiny))


def test_a_missing_tflite_runtime_that_was_asked_for_is_named(monkeypatch):
    """Asking for one interpreter that is not installed names that one, not 'no interpreter'."""
    import sys

    from mri_edge.interpreters import load_interpreter_class
    from mri_edge.runtime import RuntimeModelError

    monkeypatch.setitem(sys.modules, "tflite_runtime", None)  # import fails, whatever is installed
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", None)
    with pytest.raises(RuntimeModelError, match="tflite_runtime is not installed \\(pip install tflite-runtime\\)"):
        load_interpreter_class("tflite_runtime")


def test_an_int8_file_warns_on_tflite_runtime_only():
    """tflite-runtime hands no int8 operation to XNNPACK (static int8: built-in kernels; `export
    --hybrid`'s dynamic-range stages: reference ones): opening an int8 file there says so, and what
    to install; LiteRT, or a float file, says nothing."""
    from mri_edge.runtime import slow_kernels

    meta = {"quantization": "int8", "accuracy_aware": {"hybrid_stages": ["conv2", "conv3"]}}
    why = slow_kernels(meta, "tflite_runtime")
    assert "conv2, conv3" in why and "reference kernels" in why and "pip install 'mri-edge[device]'" in why
    assert slow_kernels(meta, "tflite_runtime[xnnpack=off]")
    assert slow_kernels(meta, "ai_edge_litert") is None
    static = slow_kernels({"quantization": "int8", "accuracy_aware": {"hybrid_stages": []}}, "tflite_runtime")
    assert "built-in kernels, not XNNPACK" in static and "pip install 'mri-edge[device]'" in static
    assert "built-in kernels" in slow_kernels({"quantization": "int8"}, "tflite_runtime")
    for quantization in ("none", "fp16", "dynamic"):
        assert slow_kernels({"quantization": quantization}, "tflite_runtime") is None


def test_a_runtime_warning_names_the_callers_line_and_threads_default_to_the_usable_cores(monkeypatch):
    """Warnings point past mri_edge's own frames (stacklevel from `outside_this_package`); a
    container's CPU quota caps the default thread count."""
    from pathlib import Path

    assert runtime.outside_this_package() == 1  # called from here: this line
    inside = compile("def through_the_package(f):\n    return f()\n", str(Path(runtime.__file__).parent / "x.py"), "exec")
    scope: dict = {}
    exec(inside, scope)
    assert scope["through_the_package"](runtime.outside_this_package) == 2  # one frame of the package skipped
    cores = runtime.usable_cores()
    assert 1 <= cores <= (runtime.os.cpu_count() or 1)
    real = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda p, *a, **k: "100000 100000" if str(p).endswith("cpu.max")
                        else real(p, *a, **k))
    assert runtime.usable_cores() == 1  # a quota of one CPU


def test_the_int8_instruction_set_is_named_from_the_cpu_flags():
    assert onnx_model.int8_isa(["avx", "avx2", "fma"]) == "AVX2, no AVX-512"
    assert onnx_model.int8_isa(["avx2", "avx512f", "avx512bw"]) == "AVX-512, no VNNI"
    assert onnx_model.int8_isa(["avx2", "avx512f", "avx512_vnni"]) == "AVX-512 VNNI"
    assert onnx_model.int8_isa(["avx2", "avx512_vnni", "amx_int8"]) == "AMX, AVX-512 VNNI"
    assert onnx_model.int8_isa(["avx2", "avx_vnni"]) == "AVX-VNNI" and onnx_model.int8_isa([]) is None


@pytest.mark.parametrize("machine, cpuinfo, want", [
    ("x86_64", "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_vnni\n", True),   # AMD EPYC (Zen 4)
    ("x86_64", "flags\t\t: fpu avx2 avx512f amx_int8 amx_tile\n", True),             # Intel Xeon with AMX
    ("AMD64", "flags\t\t: fpu avx2 avx_vnni\n", True),                               # AVX-VNNI without AVX-512
    ("x86_64", "flags\t\t: fpu avx2 fma\n", False),                                  # AVX2 only
    ("x86_64", "flags\t\t: fpu avx512f avx512bw\n", False),                          # AVX-512 without VNNI
    ("x86_64", OSError, None),                                                       # no /proc (a container without it)
    ("arm64", "Features\t: fp asimd asimddp\n", None),                               # an ARM Mac or Pi: not x86
])
def test_vnni_is_read_from_the_cpu_flags_on_every_kind_of_cpu(monkeypatch, machine, cpuinfo, want):
    import platform
    from pathlib import Path

    monkeypatch.setattr(platform, "machine", lambda: machine)
    real = Path.read_text

    def read_text(self, *a, **k):
        if str(self) != "/proc/cpuinfo":
            return real(self, *a, **k)
        if cpuinfo is OSError:
            raise OSError("no such file")
        return cpuinfo

    monkeypatch.setattr(Path, "read_text", read_text)
    assert onnx_model.cpu_has_vnni() is want
