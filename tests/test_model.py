import numpy as np
import pytest

from mri_edge import model as model_lib
from mri_edge.errors import MriEdgeError
from mri_edge.preprocess import IMAGENET_MEAN, IMAGENET_STD

SIZE = 32


@pytest.fixture(scope="module")
def net():
    return model_lib.build_model(4, SIZE, "none", dense_units=8, seed=3)


def test_raw_pixel_contract(net):
    """The saved model takes raw 0-255 pixels: same output as manual normalisation + base + head."""
    import keras

    x = np.random.default_rng(0).uniform(0, 255, (3, SIZE, SIZE, 3)).astype(np.float32)
    manual = (x / 255.0 - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    # keras.applications.densenet.preprocess_input is the reference normalisation for DenseNet121.
    ref = keras.applications.densenet.preprocess_input(x.copy())
    assert np.allclose(manual, ref, atol=1e-4)
    feats = model_lib.base_of(net)(manual, training=False)
    h = net.get_layer("avg_pool")(feats)
    h = net.get_layer("head_dense")(h)
    expected = net.get_layer("probabilities")(h)
    got = net(x, training=False)
    assert np.allclose(np.asarray(got), np.asarray(expected), atol=1e-5)
    assert np.allclose(np.asarray(got).sum(1), 1, atol=1e-5)


def test_trainable_layers_per_phase(net):
    base = model_lib.base_of(net)
    with_weights = [layer for layer in base.layers if layer.weights]
    assert model_lib.set_phase(net, "head") == 0
    assert not any(w.trainable for w in base.weights)
    n_conv5 = model_lib.set_phase(net, "finetune", "conv5", freeze_bn=True)
    conv5 = [layer for layer in with_weights if layer.name.startswith("conv5") and
             layer.__class__.__name__ != "BatchNormalization"]
    # conv5 blocks plus the final batch norm ("bn") which is frozen as a BN layer
    assert n_conv5 == len(conv5)
    assert model_lib.set_phase(net, "finetune", "10", freeze_bn=False) == sum(
        1 for layer in base.layers[-10:] if layer.weights)
    assert model_lib.set_phase(net, "finetune", "all", freeze_bn=False) == len(with_weights)
    bns = [layer for layer in base.layers if layer.__class__.__name__ == "BatchNormalization"]
    assert all(b.trainable and b.momentum == 0.9 for b in bns)  # from-scratch BN tracks fast-moving weights
    with pytest.raises(MriEdgeError, match="matches no DenseNet121 layer"):
        model_lib.set_phase(net, "finetune", "conv9")
    # The head stays trainable throughout.
    assert net.get_layer("head_dense").trainable


def test_imagenet_without_network_is_a_clear_error(monkeypatch, capsys):
    import keras

    def offline(*a, **k):
        print("Downloading data from https://storage.googleapis.com/x.h5")  # as Keras' get_file does
        raise OSError("URL fetch failure: no network")

    monkeypatch.setattr(keras.applications, "DenseNet121", lambda *a, weights=None, **k:
                        offline() if weights == "imagenet" else None)
    with pytest.raises(model_lib.WeightsError, match="--weights PATH") as e:
        model_lib.backbone(SIZE, "imagenet")
    assert "--weights none" in str(e.value) and "\n" not in str(e.value)
    assert "Downloading" not in capsys.readouterr().out  # only the error, which names the URL, is shown


def test_weights_path_errors(tmp_path):
    with pytest.raises(model_lib.WeightsError, match="no such file"):
        model_lib.build_model(4, SIZE, str(tmp_path / "missing.h5"))
    bad = tmp_path / "bad.weights.h5"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(model_lib.WeightsError, match="not DenseNet121 backbone weights"):
        model_lib.build_model(4, SIZE, str(bad))
    text = tmp_path / "notes.keras"
    text.write_text("not a model")
    with pytest.raises(model_lib.WeightsError, match="not a .keras model file"):
        model_lib.build_model(4, SIZE, str(text))


def test_backbone_from_an_earlier_model_and_weights_file(net, tmp_path):
    path = tmp_path / "donor.keras"
    net.save(path)
    child = model_lib.build_model(3, SIZE, str(path), dense_units=8)
    a = model_lib.base_of(net).get_weights()
    b = model_lib.base_of(child).get_weights()
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    wfile = tmp_path / "densenet.weights.h5"
    model_lib.base_of(net).save_weights(wfile)
    child2 = model_lib.build_model(2, SIZE, str(wfile), dense_units=8)
    assert all(np.array_equal(x, y) for x, y in zip(model_lib.base_of(child2).get_weights(), a, strict=True))


@pytest.mark.slow  # an optional training lever: 17-24 s on 2 cores, so in the full suite
def test_stochastic_depth_drops_whole_dense_layers_in_training_only(tmp_path):
    import keras

    net = model_lib.build_model(4, SIZE, "none", dense_units=8, seed=5)  # its own: phases and AdaBN change it
    path = tmp_path / "donor.keras"
    net.save(path)
    deep = model_lib.build_model(4, SIZE, str(path), dense_units=8, dropout=0.0, drop_path=0.2)
    base = model_lib.base_of(deep)
    drops = [layer for layer in base.layers if isinstance(layer, keras.layers.Dropout)]
    assert len(drops) == 58 and drops[-1].rate == pytest.approx(0.2)  # one per dense layer of DenseNet121
    assert np.allclose(np.diff([d.rate for d in drops]), 0.2 / 58)  # rising linearly with depth
    assert all(d.noise_shape == (None, 1, 1, 1) for d in drops)  # one draw per image: the whole layer
    assert all(np.array_equal(a, b) for a, b in zip(model_lib.base_of(net).get_weights(), base.get_weights()))
    deep.set_weights(net.get_weights())  # same weights, so inference is the plain network's
    x = np.random.default_rng(1).uniform(0, 255, (8, SIZE, SIZE, 3)).astype(np.float32)
    assert np.allclose(np.asarray(deep(x, training=False)), np.asarray(net(x, training=False)), atol=1e-5)
    assert model_lib.set_phase(deep, "finetune", "20", freeze_bn=False) == model_lib.set_phase(
        net, "finetune", "20", freeze_bn=False)  # --unfreeze N counts DenseNet121's layers, not the Dropouts
    model_lib.adapt_batchnorm(deep, x, batch_size=4)  # AdaBN sees what inference sees: no layer dropped
    model_lib.adapt_batchnorm(net, x, batch_size=4)
    assert all(np.allclose(a, b, atol=1e-5) for a, b in zip(model_lib.base_of(net).get_weights(), base.get_weights()))
    assert [d.rate for d in drops][-1] == pytest.approx(0.2)  # and the rates are back
    deep.save(tmp_path / "deep.keras")
    again = model_lib.load_model(tmp_path / "deep.keras")
    assert np.allclose(np.asarray(again(x, training=False)), np.asarray(net(x, training=False)), atol=1e-5)
    keras.utils.set_random_seed(0)
    a, b = (np.asarray(again(x, training=True)) for _ in range(2))  # (updates its batch-norm statistics)
    assert not np.allclose(a, b, atol=1e-4)  # a fresh draw per step; head dropout is off here


def test_adapt_batchnorm_re_estimates_statistics_without_touching_weights(net):
    base = model_lib.base_of(net)
    bn = next(layer for layer in base.layers if layer.__class__.__name__ == "BatchNormalization")
    conv_before = [np.array(w) for w in base.get_layer("conv1_conv").get_weights()]
    model_lib.set_phase(net, "head")
    momentum = bn.momentum
    x = np.random.default_rng(0).uniform(0, 255, (128, SIZE, SIZE, 3)).astype(np.float32)
    before = np.array(bn.moving_mean)
    assert model_lib.adapt_batchnorm(net, x, batch_size=32, max_batches=4) == 128
    assert not np.allclose(np.array(bn.moving_mean), before)
    assert bn.momentum == momentum and not bn.trainable  # restored
    assert all(np.array_equal(a, b) for a, b in zip(conv_before, base.get_layer("conv1_conv").get_weights()))


def test_train_refuses_an_unfreeze_name_no_layer_has_before_it_decodes_or_writes(net, synth_data, tmp_path,
                                                                                monkeypatch):
    """--unfreeze conv9 has the form of a block name but names no layer: train says so once the
    model is built, before minutes of decoding and before the run folder is written."""
    from click.testing import CliRunner

    from mri_edge import data
    from mri_edge.cli import main

    weights = tmp_path / "start.keras"
    net.save(weights)

    def no_decoding(*a, **k):
        raise AssertionError("decoded the images first")

    monkeypatch.setattr(data, "decode_split", no_decoding)
    out = tmp_path / "new" / "run"  # made, and held, by train before it builds: removed with its parent
    res = CliRunner().invoke(main, ["train", "--task", "tumor", "--data-dir", str(synth_data), "--image-size", str(SIZE),
                                    "--weights", str(weights), "--unfreeze", "conv9", "--out", str(out)])
    assert res.exit_code == 1 and "--unfreeze 'conv9' matches no DenseNet121 layer" in res.output, res.output
    assert not (tmp_path / "new").exists()


def test_forward_compiled_and_eager_agree_with_features(net, tmp_path):
    """Batches of COMPILED_FROM images or more take Keras' compiled predict step, smaller ones
    eager calls until COMPILED_FROM images of their size have run: the same probabilities (and
    pooled features) either way."""
    import json

    from mri_edge.keras_model import COMPILED_FROM, KerasModel, forward

    x = np.random.default_rng(1).integers(0, 256, (COMPILED_FROM + 2, SIZE, SIZE, 3)).astype(np.uint8)
    eager = np.asarray(net(x.astype(np.float32), training=False))
    compiled = []  # which batches took the compiled step
    real = type(net).predict_on_batch
    net.predict_on_batch = lambda b: (compiled.append(len(b)), real(net, b))[1]
    try:
        assert np.allclose(forward(net, x.astype(np.float32)), eager, atol=1e-6)
        assert np.allclose(forward(net, x[:2].astype(np.float32)), eager[:2], atol=1e-6)
        assert compiled == [len(x)]  # the small batch ran eagerly
        for _ in range(COMPILED_FROM // 2 - 1):  # until COMPILED_FROM images of size 2 have run
            assert np.allclose(forward(net, x[:2].astype(np.float32)), eager[:2], atol=1e-6)
    finally:
        del net.predict_on_batch
    assert compiled == [len(x), 2]  # the last of them compiled
    net.save(tmp_path / "model.keras")
    (tmp_path / "labels.json").write_text(json.dumps({"class_names": list("abcd")}))
    m = KerasModel(tmp_path / "model.keras")
    big, f_big = m.run_batch(x, features=True)
    small, f_small = m.run_batch(x[:2], features=True)
    assert np.allclose(big, eager, atol=1e-6) and np.allclose(small, eager[:2], atol=1e-6)
    assert f_big.shape == (len(x), f_small.shape[1]) and np.allclose(f_big[:2], f_small, atol=1e-5)


def test_train_says_before_it_trains_when_validation_is_too_small_to_calibrate(net, synth_data, tmp_path, monkeypatch):
    """A validation split under calibrate's --min-images default is said before any epoch (it
    would otherwise be found out after training, and cost a retraining)."""
    from click.testing import CliRunner

    from mri_edge import data
    from mri_edge.cli import main

    weights = tmp_path / "start.keras"
    net.save(weights)

    def stop(*a, **k):
        raise data.DataError("stopped here by the test")

    monkeypatch.setattr(data, "decode_split", stop)
    res = CliRunner().invoke(main, ["train", "--task", "tumor", "--data-dir", str(synth_data), "--image-size", str(SIZE),
                                    "--weights", str(weights), "--out", str(tmp_path / "run")])
    assert "stopped here by the test" in res.output, res.output
    assert "validation images, fewer than the 50 `mri-edge calibrate` fits on by default" in res.output
