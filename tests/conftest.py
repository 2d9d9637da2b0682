"""Shared fixtures.

Fast tier (`-m "not slow"`): `micro_run`, a run folder around a 5-layer Keras model whose
weights are constructed (no SGD), exported to TFLite and ONNX in-process in seconds. The
tests of optional training levers (EMA, stochastic depth, quantization-aware training,
distillation, pretraining) train for 5-40 s each (most on DenseNet121's one-layer-per-block
version, `small_backbone`): full suite only.
Full suite: `tiny_run`, a 32 px DenseNet121 trained from scratch for 2 epochs, and its
exports in every format.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MRI_EDGE_SHARED_DATA", REPO.parent / "shared" / "data"))
TINY = 32


SLOW_FIXTURES = {"tiny_run", "exported_run"}


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the group marks
def pytest_collection_modifyitems(config, items):
    """Every test that needs the trained DenseNet121 run is in the slow tier, and in one
    pytest-xdist group: with `-n 2 --dist loadgroup` one worker trains and exports it once
    while the other runs everything else."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
            item.add_marker(pytest.mark.xdist_group("densenet121_run"))


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    from mri_edge.synth import write_dataset

    return write_dataset(tmp_path_factory.mktemp("synth"), "tumor", n_train=10, n_test=4, size=64, seed=1)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def normalised_input(size: int):
    """(input, its normalised tensor): mri-edge's input layer and ImageNet normalisation, as
    `model.build_model` puts them in front of every model."""
    import keras

    from mri_edge.model import NORM_NAME
    from mri_edge.preprocess import IMAGENET_MEAN, IMAGENET_STD

    inp = keras.Input((size, size, 3), name="image")
    return inp, keras.layers.Normalization(mean=[m * 255 for m in IMAGENET_MEAN],
                                           variance=[(s * 255) ** 2 for s in IMAGENET_STD], name=NORM_NAME)(inp)


def micro_model(test_images: np.ndarray, k: int = 4):
    """A 5-layer classifier whose predictions vary and sit far from every decision boundary.

    Its one feature is the mean normalised brightness s of an image (a 1x1 convolution and
    global pooling). The logits are lines in s with slopes 0, a, 2a, 3a, so class c wins on
    one interval of s; the boundaries are put in the three widest gaps between the test
    images' values of s (each class keeps at least two images), and a makes the smallest
    top-2 logit margin 2. No training, nothing random: the same model on every CPU, and int8
    parity gates that can pass or fail for the right reason.
    """
    import keras

    inp, x = normalised_input(test_images.shape[1])
    conv = keras.layers.Conv2D(1, 1, name="brightness")
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(conv(x))
    head = keras.layers.Dense(k, name="logits")
    net = keras.Model(inp, keras.layers.Softmax(name="probabilities")(head(x)), name="micro")
    conv.set_weights([np.full((1, 1, 3, 1), 1 / 3, np.float32), np.zeros(1, np.float32)])
    s = np.sort(np.asarray(keras.Model(inp, x)(test_images.astype(np.float32)), np.float64)[:, 0])
    gaps = [(s[i + 1] - s[i], i) for i in range(1, len(s) - 2)]  # >= 2 images at each end
    cuts = []
    for gap, i in sorted(gaps, reverse=True):
        if all(abs(i - j) >= 2 for j in cuts):
            cuts.append(i)
        if len(cuts) == k - 1:
            break
    cuts.sort()
    t = [(s[i] + s[i + 1]) / 2 for i in cuts]
    a = 2.0 / (min(s[i + 1] - s[i] for i in cuts) / 2)
    bias = [0.0]
    for c in range(1, k):
        bias.append(bias[-1] - a * t[c - 1])  # lines c-1 and c cross at t[c-1]
    head.set_weights([np.arange(k, dtype=np.float32)[None] * a, np.asarray(bias, np.float32)])
    return net


@pytest.fixture(scope="session")
def micro_run(synth_data, cache_dir, tmp_path_factory):
    """A finished run folder (config, labels, manifest, model.keras, test report) around
    `micro_model` at 32 px, exported to fp32/int8 TFLite and fp32/int8 ONNX in-process."""
    from mri_edge import data
    from mri_edge.export import export_run
    from mri_edge.run import RunFolder
    from mri_edge.evaluate import evaluate_run
    from mri_edge.train import TrainConfig, write_run_header

    out = tmp_path_factory.mktemp("runs") / "micro"
    cfg = TrainConfig(task="tumor", data_dir=str(synth_data), out=str(out), weights="none", image_size=TINY,
                      epochs_head=0, epochs_finetune=1, cache_dir=str(cache_dir))
    ds = data.discover(synth_data, "tumor", seed=cfg.seed)
    run = RunFolder(out)
    write_run_header(run, cfg, ds)
    dec = {s: data.decode_split(ds.splits[s], TINY, cache_dir) for s in ("train", "val", "test")}
    net = micro_model(dec["test"].images)
    net.save(run.model_path)
    evaluate_run(out, net, dec, cfg, 0.0, [])
    results, failures = export_run(out, ("tflite", "onnx"), ("none", "int8"), "uint8", calib_size=16,
                                   log=lambda *_: None, workers=1)
    assert not failures, failures
    return out


def small_densenet(size: int = TINY, k: int = 4, seed: int = 3):
    """A DenseNet with one layer per dense block (Keras' DenseNet builder, blocks [1, 1, 1, 1]),
    behind mri-edge's input normalisation: every kind of layer DenseNet121 has (8 batch
    norms after a concatenation or pooling instead of 62), untrained, converted in seconds."""
    import keras

    keras.utils.set_random_seed(seed)
    inp, x = normalised_input(size)
    x = small_densenet121(input_shape=(size, size, 3))(x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    return keras.Model(inp, keras.layers.Dense(k, activation="softmax", name="probabilities")(x), name="small")


@pytest.fixture(scope="session")
def small_densenet_run(micro_run, tmp_path_factory):
    """micro_run's folder (splits, labels, config) around `small_densenet` instead."""
    import shutil

    out = tmp_path_factory.mktemp("runs") / "small_densenet"
    shutil.copytree(micro_run, out, ignore=shutil.ignore_patterns("exports", "verify", "bench"))
    small_densenet().save(out / "model.keras")
    return out


@pytest.fixture(scope="session")
def tiny_run(synth_data, cache_dir, tmp_path_factory):
    """A finished run folder: 32 px DenseNet121 trained from scratch for 2 epochs. One batch
    holds the whole training split: an eager DenseNet121 step costs about 4 s on 2 cores
    whatever its size, so each step left out is time the full suite saves."""
    from mri_edge.train import TrainConfig, train

    out = tmp_path_factory.mktemp("runs") / "tiny"
    cfg = TrainConfig(task="tumor", data_dir=str(synth_data), out=str(out), weights="none", image_size=TINY,
                      batch_size=64, epochs_head=0, epochs_finetune=2, dense_units=16, patience=5,
                      cache_dir=str(cache_dir), eager=True)
    return train(cfg, log=lambda *_: None)


@pytest.fixture(scope="session")
def exported_run(tiny_run):
    """tiny_run with every export (`--format all`), converted by two worker processes."""
    from mri_edge.export import export_run

    results, failures = export_run(tiny_run, ("all",), (), "uint8", calib_size=16, log=lambda *_: None, workers=2)
    assert not failures, failures
    return tiny_run


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not present at {SHARED_DATA}")
    return SHARED_DATA


def small_densenet121(include_top=False, weights=None, input_shape=None):
    """What `small_backbone` puts in DenseNet121's place: Keras' DenseNet builder with one layer
    per dense block (every kind of layer DenseNet121 has, built in a second), named as
    DenseNet121 is."""
    from keras.src.applications.densenet import DenseNet  # the public API has only DenseNet121/169/201

    assert weights is None
    return DenseNet([1, 1, 1, 1], include_top=include_top, weights=None, input_shape=input_shape, name="densenet121")


# `mri-edge ARGS` in a subprocess ([sys.executable, *SMALL_BACKBONE_CLI, *ARGS]) with
# `small_densenet121` in DenseNet121's place, as the `small_backbone` fixture does in-process.
SMALL_BACKBONE_CLI = ["-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import keras, conftest; "
                            "keras.applications.DenseNet121 = conftest.small_densenet121; "
                            "from mri_edge.cli import main; main(prog_name='mri-edge')"]


@pytest.fixture
def small_backbone(monkeypatch):
    """DenseNet121's place taken by `small_densenet121`, so pretraining and training run in the
    fast tier."""
    import keras

    monkeypatch.setattr(keras.applications, "DenseNet121", small_densenet121)


def strip_features(path: Path) -> None:
    """Make an exported .tflite, .onnx or .xml file as mri-edge made it before the features
    output (one output, no `features` record), its other metadata kept."""
    from mri_edge import backends, runtime
    from mri_edge.export import onnx as onnx_backend
    from mri_edge.export import tflite

    meta = backends.read_metadata(path)
    meta.pop(runtime.FEATURES)
    if path.suffix == ".tflite":
        from tensorflow.lite.tools import flatbuffer_utils

        m = flatbuffer_utils.convert_bytearray_to_object(path.read_bytes()[: meta["model_bytes"]])
        m.subgraphs[0].outputs = m.subgraphs[0].outputs[:1]
        for sig in m.signatureDefs or []:
            sig.outputs = [t for t in sig.outputs if t.name != runtime.FEATURES.encode()]
        path.write_bytes(tflite.append_tflite_metadata(bytes(flatbuffer_utils.convert_object_to_bytearray(m)), meta))
    elif path.suffix == ".xml":
        from mri_edge.export import openvino
        from mri_edge.ov import core

        model = core()[1].read_model(str(path))
        model.remove_result(model.get_results()[1])
        openvino.save(model, path, meta)
    else:
        import onnx

        proto = onnx.load(str(path))
        del proto.graph.output[1]
        proto.graph.node.remove(next(n for n in proto.graph.node if n.name == runtime.FEATURES))
        onnx_backend.set_onnx_metadata(proto, meta)
        path.write_bytes(onnx_backend.onnx_bytes(proto))


@pytest.fixture(autouse=True)
def keep_the_warning_format():
    """The command line prints warnings as one line (`clitools.one_line_warnings`); pytest's own
    summary keeps their file and line."""
    import warnings

    kept = warnings.formatwarning
    yield
    warnings.formatwarning = kept
