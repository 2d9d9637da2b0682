import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from mri_edge import export as export_lib
from mri_edge.errors import MriEdgeError
from mri_edge.export import graph, tflite
from mri_edge.export import onnx as onnx_backend
from mri_edge import backends, ov, runtime
from mri_edge.files import sha256_file
from mri_edge.backends import open_model

SIX = ["model_fp32.tflite", "model_fp16.tflite", "model_dynamic.tflite", "model_int8.tflite",
       "model_fp32.onnx", "model_int8.onnx"]
# `--format all` adds the OpenVINO pair where OpenVINO is installed (it is in the [full] extra).
OPENVINO = ["model_fp32.xml", "model_int8.xml"] if ov.available(for_export=True) else []
ALL = SIX + OPENVINO


def test_plan_rejects_unsupported_combinations():
    with pytest.raises(export_lib.ExportError, match="does not support"):
        export_lib.plan(("onnx",), ("fp16",), "uint8")
    jobs = export_lib.plan(("all",), (), "uint8")
    assert [j.filename for j in jobs] == ALL
    assert [j.filename for j in export_lib.plan(("tflite",), ("int8",), "float32")] == ["model_int8_float32io.tflite"]


def test_all_files_exist_load_and_run(exported_run):
    index = json.loads((exported_run / "exports" / "exports.json").read_text())
    assert sorted(r["file"] for r in index["exports"]) == sorted(ALL)
    human = (exported_run / "exports" / "exports.md").read_text()  # the same files, as a table
    assert all(f"| {name} |" in human for name in ALL)
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    keras_feats = open_model(exported_run / "model.keras").run(x, features=True)[1]
    for name in ALL:
        m = open_model(exported_run / "exports" / name)
        p = m.run(x)
        assert p.shape == (2, 4) and np.allclose(p.sum(1), 1, atol=0.05), name
        # every format hands out the pooled features second (the familiarity check reads them)
        both, feats = m.run(x, features=True)
        assert m.has_features and np.array_equal(both, p) and feats.shape == keras_feats.shape, name
        tol = {"none": 1e-3, "fp16": 0.02}.get(m.meta["quantization"], 0.25)
        assert np.abs(feats - keras_feats).max() <= tol * np.abs(keras_feats).max() + 1e-6, name


def test_fp32_files_match_keras(exported_run):
    from mri_edge.model import load_model

    net = load_model(exported_run / "model.keras")
    x = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3)).astype(np.uint8)
    ref = np.asarray(net(x.astype(np.float32), training=False))
    for name in ["model_fp32.tflite", "model_fp32.onnx"] + OPENVINO[:1]:
        got = open_model(exported_run / "exports" / name).run(x)
        assert np.abs(got - ref).max() < 1e-4, name


def test_int8_tflite_is_full_integer_with_uint8_io(exported_run):
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(exported_run / "exports" / "model_int8.tflite"))
    assert it.get_input_details()[0]["dtype"] == np.uint8
    assert it.get_output_details()[0]["dtype"] == np.uint8
    conv_weights = [t for t in it.get_tensor_details() if len(t["shape"]) == 4 and t["dtype"] == np.int8]
    float_4d = [t for t in it.get_tensor_details() if len(t["shape"]) == 4 and t["dtype"] == np.float32]
    assert len(conv_weights) > 100 and not float_4d


def test_metadata_round_trips(exported_run, tiny_run):
    sha = sha256_file(tiny_run / "model.keras")
    for name in ALL:
        meta = backends.read_metadata(exported_run / "exports" / name)
        assert meta["class_names"] == ["Glioma", "Meningioma", "No Tumor", "Pituitary"]
        assert meta["input_size"] == [32, 32] and meta["task"] == "tumor"
        assert meta["source_model_sha256"] == sha
        assert meta["preprocessing"]["input_range"] == [0, 255]
        assert {"input", "output", "mri_edge_version", "created", "quantization"} <= set(meta)
        if "int8" in name:
            assert meta["calibration_images"] == 16 and len(meta["calibration_manifest_sha256"]) == 64
    q = backends.read_metadata(exported_run / "exports" / "model_int8.tflite")
    assert q["input"]["dtype"] == "uint8" and q["input"]["scale"] > 0


def test_damaged_metadata_is_one_line(exported_run, tmp_path):
    import onnx

    from mri_edge.onnx_model import METADATA_KEY

    proto = onnx.load(str(exported_run / "exports" / "model_fp32.onnx"))
    next(p for p in proto.metadata_props if p.key == METADATA_KEY).value = "{not json"
    onnx.save(proto, str(tmp_path / "m.onnx"))
    with pytest.raises(runtime.RuntimeModelError, match="metadata is damaged"):
        backends.read_metadata(tmp_path / "m.onnx")
    path = exported_run / "exports" / "model_fp32.tflite"
    flatbuffer = tflite.tflite_flatbuffer(path, backends.read_metadata(path))
    with zipfile.ZipFile(tmp_path / "meta.zip", "w") as z:  # the appended record, with a list for a dict
        z.writestr(runtime.METADATA_NAME, "[]")
    (tmp_path / "m.tflite").write_bytes(flatbuffer + (tmp_path / "meta.zip").read_bytes())
    with pytest.raises(runtime.RuntimeModelError, match="metadata is damaged"):
        backends.read_metadata(tmp_path / "m.tflite")


def test_calibration_reads_training_images_only(exported_run):
    manifest = json.loads((exported_run / "split_manifest.json").read_text())
    calib = json.loads((exported_run / "exports" / "calibration_manifest.json").read_text())
    train = {p for p, _ in manifest["splits"]["train"]}
    others = {p for s in ("val", "test") for p, _ in manifest["splits"][s]}
    assert calib["split"] == "train" and len(calib["files"]) == 16
    assert set(calib["files"]) <= train and not set(calib["files"]) & others


def test_broken_or_missing_model_fails_cleanly(tiny_run, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_run, broken, ignore=shutil.ignore_patterns("exports"))
    (broken / "model.keras").write_bytes(b"garbage")
    with pytest.raises(MriEdgeError, match="not a Keras file"):
        export_lib.export_run(broken, ("tflite",), ("none",), log=lambda *_: None)
    (broken / "model.keras").unlink()
    with pytest.raises(MriEdgeError, match="no model.keras"):
        export_lib.export_run(broken, ("tflite",), ("none",), log=lambda *_: None)
    out = subprocess.run([sys.executable, "-m", "mri_edge.cli", "export", str(broken)], capture_output=True, text=True)
    assert out.returncode == 1 and "Error: " in out.stderr and "Traceback" not in out.stderr


def test_failed_format_leaves_earlier_files_untouched(exported_run, monkeypatch):
    target = exported_run / "exports" / "model_fp32.onnx"
    before = target.read_bytes()

    def boom(*a, **k):
        raise RuntimeError("converter exploded")

    monkeypatch.setattr(onnx_backend, "onnx_fp32", boom)
    results, failures = export_lib.export_run(exported_run, ("onnx",), ("none",), log=lambda *_: None)
    assert not results and failures[0]["file"] == "model_fp32.onnx" and "exploded" in failures[0]["error"]
    assert target.read_bytes() == before
    assert not [p for p in target.parent.iterdir() if p.name.endswith(".tmp")]
    index = json.loads((exported_run / "exports" / "exports.json").read_text())
    assert len(index["exports"]) == len(ALL)


def test_export_lands_files_when_the_temporary_folder_is_on_another_filesystem(micro_run, tmp_path, monkeypatch):
    """A rename out of a tmpfs /tmp into the run folder fails (EXDEV); export must not need one."""
    import errno
    import os
    import shutil
    import tempfile

    run = tmp_path / "run"
    shutil.copytree(micro_run, run, ignore=shutil.ignore_patterns("exports"))
    other_fs = tmp_path / "tmpfs"
    other_fs.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(other_fs))
    rename = os.replace

    def replace_within_one_filesystem(src, dst):
        if Path(src).resolve().is_relative_to(other_fs) != Path(dst).resolve().is_relative_to(other_fs):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        rename(src, dst)

    monkeypatch.setattr(os, "replace", replace_within_one_filesystem)
    for left in (".staging-killed", ".work-killed"):  # what an export killed outright (SIGKILL) left: cleared
        killed = run / "exports" / left
        killed.mkdir(parents=True, exist_ok=True)
        (killed / "model_int8.tflite").write_bytes(b"half")
    results, failures = export_lib.export_run(run, ("tflite", "onnx"), ("none", "int8"), calib_size=8,
                                              log=lambda *_: None, workers=1)
    assert not failures, failures
    landed = sorted(p.name for p in (run / "exports").iterdir())
    assert landed == sorted(["calibration", "calibration_manifest.json", "exports.json", "exports.md",
                             "model_fp32.onnx", "model_fp32.tflite", "model_int8.onnx", "model_int8.tflite"])
    assert not list(other_fs.iterdir())  # nothing in the temporary folder: the work is in exports/, gone too


def test_tflite_metadata_is_an_appended_zip(exported_run):
    path = exported_run / "exports" / "model_int8.tflite"
    with zipfile.ZipFile(path) as z:
        assert runtime.METADATA_NAME in z.namelist()


def test_deployment_graph_is_the_same_function(tiny_run):
    import keras

    from mri_edge.model import load_model

    net = load_model(tiny_run / "model.keras")
    bns = graph.affine_batchnorms(net)
    # DenseNet121: 58 dense layers + 3 transitions + the final BN follow a concatenation or pooling
    assert len(bns) == 62 and "conv2_block1_0_bn" in bns and "conv2_block1_1_bn" not in bns
    dep = export_lib.deployment_graph(net)
    layers = []
    stack = [dep]
    while stack:
        for layer in stack.pop().layers:
            (stack if hasattr(layer, "layers") else layers).append(layer)
    assert sum(isinstance(x, keras.layers.DepthwiseConv2D) for x in layers) == 62
    assert sorted(graph.pooled_linear_convs(net)) == ["pool2_conv", "pool3_conv", "pool4_conv"]
    assert sum(type(x).__name__ == "PoolThenConv" for x in layers) == 3
    x = np.random.default_rng(2).integers(0, 256, (4, 32, 32, 3)).astype(np.float32)
    assert np.abs(np.asarray(dep(x, training=False)) - np.asarray(net(x, training=False))).max() < 1e-5


def test_int8_files_use_the_fast_kernels(exported_run):
    """int8 TFLite: no MUL/ADD pairs left from batch norms; int8 ONNX: uint8 activations (U8S8)."""
    import onnx
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    m = flatbuffer_utils.read_model(str(exported_run / "exports" / "model_int8.tflite"))
    ops = [names[max(m.operatorCodes[o.opcodeIndex].builtinCode, m.operatorCodes[o.opcodeIndex].deprecatedBuiltinCode)]
           for o in m.subgraphs[0].operators]
    # 62 batch norms + 3 transition poolings as depthwise convs; no int8 op XNNPACK lacks
    assert ops.count("DEPTHWISE_CONV_2D") == 65 and ops.count("MUL") <= 1 and ops.count("ADD") == 0
    assert "AVERAGE_POOL_2D" not in ops
    sg = m.subgraphs[0]
    dw_weights = [sg.tensors[o.inputs[1]] for o, name in zip(sg.operators, ops)
                  if name == "DEPTHWISE_CONV_2D" and list(sg.tensors[o.inputs[1]].shape[:3]) == [1, 1, 1]]
    assert len(dw_weights) == 62
    # one scale per tensor (the default, for file size), and no buffer shared between layers
    # (each was rescaled)
    assert all(len(t.quantization.scale) == 1 for t in dw_weights)
    assert len({t.buffer for t in dw_weights}) == len(dw_weights)
    proto = onnx.load(str(exported_run / "exports" / "model_int8.onnx"))
    inits = {t.name: t for t in proto.graph.initializer}
    zps = [inits[n.input[2]] for n in proto.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]
    assert zps and all(z.data_type == onnx.TensorProto.UINT8 for z in zps)


def _bn_depthwise_weights(path):
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    m = flatbuffer_utils.read_model(str(path))
    sg = m.subgraphs[0]
    dw = [o for o in sg.operators if max(m.operatorCodes[o.opcodeIndex].builtinCode,
                                         m.operatorCodes[o.opcodeIndex].deprecatedBuiltinCode)
          == schema.BuiltinOperator.DEPTHWISE_CONV_2D]
    return [sg.tensors[o.inputs[1]] for o in dw if list(sg.tensors[o.inputs[1]].shape[:3]) == [1, 1, 1]]


def _export_copy(run_dir, dest, **kw):
    import shutil

    shutil.copytree(run_dir, dest)
    lines = []
    results, failures = export_lib.export_run(dest, ("tflite",), ("int8",), "uint8", calib_size=16, log=lines.append,
                                              **kw)
    assert not failures and [r["file"] for r in results] == ["model_int8.tflite"]
    return dest / "exports" / "model_int8.tflite", results[0], lines


@pytest.mark.slow
def test_bn_scales_per_channel_keeps_one_scale_per_channel(small_densenet_run, tmp_path):
    per_channel, _, _ = _export_copy(small_densenet_run, tmp_path / "pc", bn_scales="per-channel")
    per_tensor, _, _ = _export_copy(small_densenet_run, tmp_path / "pt")
    weights = _bn_depthwise_weights(per_channel)
    assert len(weights) == 8 and all(len(t.quantization.scale) == t.shape[3] > 1 for t in weights)
    assert all(len(t.quantization.scale) == 1 for t in _bn_depthwise_weights(per_tensor))
    assert backends.read_metadata(per_channel)["bn_scales"] == "per-channel"
    assert backends.read_metadata(per_tensor)["bn_scales"] == "per-tensor"  # the default
    assert per_channel.stat().st_size > per_tensor.stat().st_size  # a float scale and zero point per channel
    x = np.random.default_rng(4).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    assert open_model(per_channel).run(x).shape == (2, 4)
    with pytest.raises(export_lib.ExportError, match="--bn-scales"):
        export_lib.export_run(small_densenet_run, ("tflite",), ("int8",), "uint8", log=lambda *_: None,
                              bn_scales="per-layer")


@pytest.mark.slow
def test_bn_scales_auto_keeps_the_variant_closer_to_keras_on_validation(small_densenet_run, tmp_path):
    path, result, lines = _export_copy(small_densenet_run, tmp_path / "run", bn_scales="auto")
    assert any("validation images" in line for line in lines)
    meta = backends.read_metadata(path)
    choice = meta["bn_scales_choice"]
    n_val = len(json.loads((small_densenet_run / "split_manifest.json").read_text())["splits"]["val"])
    assert choice["images"] == n_val and {"per-tensor", "per-channel"} <= set(choice)
    assert meta["bn_scales"] == min(("per-tensor", "per-channel"), key=lambda k: choice[k]["mean_abs_dp"])
    assert result["bn_scales"] == meta["bn_scales"]
    # the score it kept is the file's own, measured here against Keras on the validation images
    from mri_edge.keras_model import validation_reference

    ref, x = validation_reference(tmp_path / "run", lambda *_: None, with_images=True)
    got = np.abs(open_model(path).run(x) - np.asarray(ref["probs"])).mean()
    assert abs(got - choice[meta["bn_scales"]]["mean_abs_dp"]) < 1e-5
    # the file is the variant it names
    scales = [len(t.quantization.scale) for t in _bn_depthwise_weights(path)]
    assert len(scales) == 8 and all(n == 1 for n in scales) == (meta["bn_scales"] == "per-tensor")


def test_robust_ranges_ignore_one_outlier_image_and_keep_zero():
    rng = np.random.default_rng(0)
    hi = rng.uniform(5, 6, (300, 2)).astype(np.float32)
    lo = np.zeros((300, 2), np.float32)
    lo[:, 1] = rng.uniform(-2, -1, 300)
    hi[7, 0] = 500.0  # one unusual calibration image
    new_lo, new_hi = export_lib.robust_ranges(lo, hi, 0.99)
    assert 5 < new_hi[0] < 6.1  # min/max would have given 500
    assert new_lo[0] == 0.0 and -2 <= new_lo[1] < -1.9
    assert np.all(new_hi > new_lo)


@pytest.mark.slow
def test_range_pass_through_xnnpack_matches_builtin_kernels(tmp_path):
    """The range pass marks every calibrated tensor as an output so XNNPACK must write it;
    its ranges must be those of TFLite's built-in kernels (which keep all intermediates)."""
    import tensorflow as tf
    from tensorflow.lite.tools import flatbuffer_utils

    from conftest import small_densenet

    model = export_lib.deployment_graph(small_densenet())
    model.export(str(tmp_path / "sm"), format="tf_saved_model", verbose=False,
                 input_signature=[tf.TensorSpec([None, 32, 32, 3], tf.float32)])
    images = np.random.default_rng(3).integers(0, 256, (23, 32, 32, 3)).astype(np.float32)
    conv = tf.lite.TFLiteConverter.from_saved_model(str(tmp_path / "sm"))
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: ([im[None]] for im in images[:2])
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv._experimental_calibrate_only = True
    calibrated = conv.convert()

    def ranges(blob):
        m = flatbuffer_utils.convert_bytearray_to_object(blob)
        return m.subgraphs[0].outputs.tolist(), np.array(
            [[t.quantization.min[0], t.quantization.max[0]] for t in m.subgraphs[0].tensors
             if t.quantization is not None and t.quantization.min is not None and len(t.quantization.min) == 1])

    fast_outputs, fast = ranges(tflite.tighten_ranges(calibrated, images, 0.99))
    slow_outputs, slow = ranges(tflite.tighten_ranges(calibrated, images, 0.99, delegate=False))
    assert len(fast) > 30 and fast_outputs == slow_outputs == ranges(calibrated)[0]  # outputs left as they were
    np.testing.assert_allclose(fast, slow, rtol=1e-4, atol=1e-5)
    assert not np.allclose(fast, ranges(calibrated)[1])  # ranges were recomputed from all 23 images


@pytest.mark.skipif(not OPENVINO, reason="OpenVINO or NNCF not installed")
def test_openvino_int8_is_quantized_and_a_missing_weights_file_fails_cleanly(exported_run, tmp_path):
    import shutil

    import openvino

    net = openvino.Core().read_model(str(exported_run / "exports" / "model_int8.xml"))
    fake_quant = [op for op in net.get_ops() if op.get_type_name() == "FakeQuantize"]
    assert len(fake_quant) > 100  # every convolution's input and weights
    # fp32 for what is not int8, whatever the CPU: on AMX Xeons and bf16 AMD EPYCs OpenVINO's default is bf16
    m = open_model(exported_run / "exports" / "model_int8.xml")
    m.run(np.zeros((1, m.image_size, m.image_size, 3), np.uint8))
    compiled = next(iter(m._requests.values())).get_compiled_model()
    assert compiled.get_property("INFERENCE_PRECISION_HINT") == openvino.Type.f32
    lone = tmp_path / "model_int8.xml"
    shutil.copy(exported_run / "exports" / "model_int8.xml", lone)
    with pytest.raises(runtime.RuntimeModelError, match="weights file model_int8.bin is missing"):
        open_model(lone)
    (tmp_path / "model_int8.bin").write_bytes(b"garbage")
    with pytest.raises(runtime.RuntimeModelError, match="not a loadable OpenVINO IR"):
        open_model(lone)


@pytest.mark.skipif(not OPENVINO, reason="OpenVINO is not installed")
def test_add_features_gives_an_older_openvino_file_the_output(exported_run, tmp_path):
    """An IR made before the features output existed gets it from `export --add-features`:
    its probabilities unchanged, its features those a new export hands out."""
    import shutil

    from tests.conftest import strip_features

    x = np.random.default_rng(2).integers(0, 256, (3, 32, 32, 3)).astype(np.uint8)
    for name in OPENVINO:
        src = exported_run / "exports" / name
        f = tmp_path / name
        shutil.copy(src, f)
        shutil.copy(src.with_suffix(".bin"), f.with_suffix(".bin"))
        want_probs, want_feats = open_model(src).run(x, features=True)
        strip_features(f)
        assert not open_model(f).has_features
        assert export_lib.add_features(f) == "added"
        m = open_model(f)
        probs, feats = m.run(x, features=True)
        # OpenVINO's CPU plugin picks its int8 kernels and fusions by instruction set (AVX2, AVX-512,
        # AMX), so the rebuilt graph may land one output step away from the original on some CPUs
        assert m.has_features and np.array_equal(probs.argmax(1), want_probs.argmax(1)), name
        assert np.abs(probs - want_probs).max() <= (0 if m.meta["quantization"] == "none" else 1 / 256), name
        # int8: the export's features pass one more fake quantization (the ONNX Identity's) than these
        tol = 0 if m.meta["quantization"] == "none" else 0.05 * np.abs(want_feats).max()
        assert np.abs(feats - want_feats).max() <= tol, name
        assert export_lib.add_features(f) == "has one"


def test_recover_rebuilds_the_keras_model_from_a_float_tflite_file(exported_run, tmp_path, monkeypatch):
    """benchmarks/recover_run.py: a shipped folder that lost its model.keras gets it back from
    its float TFLite file (every batch norm folded or turned into a depthwise convolution; with
    random statistics: the next test)."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import recover_run

    with pytest.raises(MriEdgeError, match="recover needs a float"):
        recover_run.recover(exported_run, tmp_path / "refused", "exports/model_int8.tflite")
    r = recover_run.recover(exported_run, tmp_path / "fp16", "exports/model_fp16.tflite")
    assert r["max_abs_diff"] < 1e-4 and r["kernels"] == "float16"
    cfg = json.loads((tmp_path / "fp16" / "config.json").read_text())
    assert cfg["weights_stored"]["from"]["sha256"] == sha256_file(exported_run / "exports" / "model_fp16.tflite")
    with pytest.raises(MriEdgeError, match="already holds a trained model"):
        recover_run.recover(exported_run, tmp_path / "fp16", "exports/model_fp16.tflite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp16"]  # nothing half-written beside it


@pytest.mark.slow  # a DenseNet export and recover: seconds, beside the trained DenseNet121 run's group
def test_recover_maps_every_batch_norm_back(small_backbone, micro_run, tmp_path, monkeypatch):
    """Trained briefly, batch norms stay near identity, which would hide a wrong mapping of their
    scale and offset: every batch norm of DenseNet121's one-layer-per-block version (each kind
    DenseNet121 has: folded into a convolution, or turned into a 1x1 depthwise convolution after
    a concatenation or pooling) gets random statistics; export fp32, recover, compare."""
    import shutil

    import keras

    from mri_edge.config import TrainConfig
    from mri_edge.model import base_of, build_model, load_model

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import recover_run

    shipped = tmp_path / "shipped"
    shipped.mkdir()
    for f in ("config.json", "labels.json", "split_manifest.json"):
        shutil.copy(micro_run / f, shipped / f)
    cfg = TrainConfig.from_saved(json.loads((shipped / "config.json").read_text()))
    net = build_model(4, cfg.image_size, "none", cfg.dense_units, cfg.dropout, drop_path=cfg.drop_path)
    rng = np.random.default_rng(3)
    for layer in base_of(net).layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, c), rng.normal(0, 0.3, c), rng.normal(0, 0.3, c),
                               rng.uniform(0.5, 2.0, c)])
    net.save(shipped / "model.keras")
    _, failures = export_lib.export_run(shipped, ("tflite",), ("none",), "uint8", calib_size=4, log=lambda *_: None,
                                        workers=1)
    assert not failures
    r = recover_run.recover(shipped, tmp_path / "fp32", "exports/model_fp32.tflite")
    assert r["kernels"] == "float32"
    recovered = load_model(tmp_path / "fp32" / "model.keras")
    x = np.random.default_rng(5).integers(0, 256, (4, 32, 32, 3)).astype(np.float32)
    normalised = net.get_layer("imagenet_normalization")(x)
    want = np.asarray(base_of(net)(normalised, training=False))
    got = np.asarray(base_of(recovered)(normalised, training=False))
    assert np.abs(got - want).max() < 1e-4 * max(1.0, np.abs(want).max())


def test_add_features_gives_older_files_the_output_without_changing_their_answers(micro_run, tmp_path):
    """Files exported before the features output existed get it in place (`export --add-features`):
    same probabilities bit for bit, the pooled features as a second output, and only once."""
    import shutil

    from click.testing import CliRunner

    from mri_edge.cli import main
    from tests.conftest import strip_features
    from mri_edge.run import RunFolder

    run = tmp_path / "run"
    shutil.copytree(micro_run, run)
    x = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3)).astype(np.uint8)
    before = {}
    for f in RunFolder(run).export_files():  # made as mri-edge made them before: one output
        before[f.name] = open_model(f).run(x)
        width = backends.read_metadata(f)[runtime.FEATURES]["shape"][-1]
        strip_features(f)
        old = open_model(f)
        assert not old.has_features and old.run(x, features=True)[1] is None
    res = CliRunner().invoke(main, ["export", str(run), "--add-features", "--format", "onnx", "--opset", "13"])
    assert res.exit_code == 1 and "drop --format, --opset" in res.output, res.output  # it would use neither
    res = CliRunner().invoke(main, ["export", str(run), "--add-features"])
    assert res.exit_code == 0, res.output
    index = {r["file"]: r["sha256"] for r in RunFolder(run).exports_index()["exports"]}
    for f in RunFolder(run).export_files():
        assert f"{f.name}: added" in res.output
        assert index[f.name] == sha256_file(f.with_suffix(".bin") if f.suffix == ".xml" else f)  # the index follows
        probs, feats = open_model(f).run(x, features=True)
        assert np.array_equal(probs, before[f.name]) and feats.shape == (5, width), f.name
        assert export_lib.add_features(f) == "has one"  # once
        if f.suffix == ".tflite":  # the signature names both outputs
            from ai_edge_litert.interpreter import Interpreter
            from tensorflow.lite.tools import flatbuffer_utils

            sig = Interpreter(str(f)).get_signature_list()
            assert runtime.FEATURES in next(iter(sig.values()))["outputs"], sig
            # a file that has the output but not the signature entry (as shipped before it) gets the entry
            meta = backends.read_metadata(f)
            m = flatbuffer_utils.convert_bytearray_to_object(f.read_bytes()[: meta["model_bytes"]])
            for entry in m.signatureDefs:
                entry.outputs = [t for t in entry.outputs if t.name != runtime.FEATURES.encode()]
            f.write_bytes(tflite.append_tflite_metadata(bytes(flatbuffer_utils.convert_object_to_bytearray(m)), meta))
            assert export_lib.add_features(f) == "named in its signature"
            assert runtime.FEATURES in next(iter(Interpreter(str(f)).get_signature_list().values()))["outputs"]
            assert np.array_equal(open_model(f).run(x), before[f.name])


def test_hybrid_stages_of_a_densenet121_read_their_int8_weights_directly(tiny_run, tmp_path):
    """On a real DenseNet121 graph the stage nodes the search names are the ones the rewrite
    matches (`export --hybrid`): with conv1 and conv2 out of static int8 and conv2 hybrid, every
    convolution of conv2 takes float input and int8 weights without a DEQUANTIZE, conv1's stay
    float behind one, and the file runs."""
    from mri_edge.export.formats import ExportJob
    from mri_edge.export.rewrite import store_float_weights
    from mri_edge.interpreters import load_interpreter_class

    model, cfg, _ = export_lib.load_run(tiny_run)
    size = int(cfg["image_size"])
    tflite.write_saved_model(export_lib.deployment_graph(model), str(tmp_path / "sm"), size)
    calib = np.random.default_rng(0).integers(0, 256, (8, size, size, 3), dtype=np.uint8)
    calibrated = tflite.calibrated_for(str(tmp_path / "sm"), calib, "percentile", "uint8")
    stages = tflite.tflite_stages(calibrated)
    cls = load_interpreter_class()[0]

    def conv_ops(fb: bytes) -> list[tuple[str, str, str]]:  # (output name, input dtype, weight dtype) per CONV_2D
        interp = cls(model_content=fb)
        tensors = {t["index"]: t for t in interp.get_tensor_details()}
        return [(tensors[op["outputs"][0]]["name"], tensors[op["inputs"][0]]["dtype"].__name__,
                 tensors[op["inputs"][1]]["dtype"].__name__)
                for op in interp._get_ops_details() if op["op_name"] == "CONV_2D"]

    conv2 = {name for name, _, _ in conv_ops(calibrated) if name in set(stages["conv2"]["nodes"])}
    assert len(conv2) >= 12  # six dense layers of two convolutions each
    fb = tflite.quantize_calibrated(calibrated, ExportJob("tflite", "int8", "uint8", True, float_weights="fp32"),
                                    "per-tensor", stages["conv1"]["nodes"] + stages["conv2"]["nodes"])
    hybrid = store_float_weights(fb, "int8", hybrid=stages["conv2"]["nodes"])
    ops = conv_ops(hybrid)
    direct = {name for name, x, w in ops if x == "float32" and w == "int8"}
    assert direct == conv2
    conv1 = [w for name, x, w in ops if name in set(stages["conv1"]["nodes"])]
    assert conv1 and set(conv1) == {"float32"}  # dequantized once, run in float
    from tensorflow.lite.tools import flatbuffer_utils  # the hybrid ones as CONV_2D 5, the static int8 ones 3

    m = flatbuffer_utils.convert_bytearray_to_object(hybrid)
    sg = m.subgraphs[0]
    versions = {sg.tensors[op.outputs[0]].name.decode(): m.operatorCodes[op.opcodeIndex].version
                for op in sg.operators if m.operatorCodes[op.opcodeIndex].builtinCode == 3}
    assert {v for n, v in versions.items() if n in conv2} == {5}
    assert {v for n, v in versions.items() if n not in conv2} == {3}
    interp = cls(model_content=hybrid)
    interp.allocate_tensors()
    interp.set_tensor(interp.get_input_details()[0]["index"], calib[:1])
    interp.invoke()
    probs = interp.get_tensor(interp.get_output_details()[0]["index"])
    assert np.isfinite(probs).all() and abs(float(probs.sum()) - 1) < 1e-3


def test_a_worker_left_alone_takes_the_cores_the_other_units_gave_back():
    """Side by side, each worker's sessions get its share of the cores; once the parent counts
    one unit still running (the ONNX search after the TFLite files), that worker takes them all."""
    import multiprocessing as mp

    from mri_edge.export import pool
    from mri_edge.runtime import usable_cores

    assert pool.threads_now(3) == 3 and pool.threads_now(None) is None  # in-process: as asked
    cores = usable_cores()  # what every session of export counts on
    running = mp.get_context("spawn").Value("i", 2, lock=False)  # as export_run makes it
    executor = pool.start_pool(1, None, running)
    try:
        assert executor.submit(pool.threads_now, 1).result(timeout=60) == max(1, cores // 2)
        running.value = 1
        assert executor.submit(pool.threads_now, 1).result(timeout=60) == cores
    finally:
        pool.kill_pool(executor)


@pytest.mark.slow  # a fresh process that imports TensorFlow
def test_the_same_model_converts_to_the_same_onnx_bytes(micro_run):
    """Exported again with the same options, a file keeps its bytes, so its parity and calibration
    stay current (tf2onnx numbers its nodes from a counter of the process, and some of its modules
    take a number when first imported: so in a fresh process, the first conversion included)."""
    import subprocess
    import sys

    code = ("import sys; from mri_edge.config import ExportConfig; from mri_edge.export.onnx import onnx_fp32; "
            "from mri_edge.model import load_model; m = load_model(sys.argv[1]); "
            "a, b = (onnx_fp32(m, 32, ExportConfig.opset).SerializeToString() for _ in range(2)); print(a == b)")
    out = subprocess.run([sys.executable, "-c", code, str(micro_run / "model.keras")], capture_output=True, text=True)
    assert out.stdout.strip().splitlines()[-1:] == ["True"], out.stderr[-2000:]
