import json

import numpy as np
import pytest
from PIL import Image

from mri_edge import qat

TINY = 32


@pytest.fixture(scope="module")
def net():
    from mri_edge import model

    return model.build_model(4, TINY, "none", dense_units=8)


def test_fake_quant_rounds_to_a_uint8_grid_with_zero_exact_and_clips():
    import keras

    fq = qat.fake_quant_layer()()
    fq.lo.assign(-1.0)
    fq.hi.assign(3.0)
    x = np.array([-2.0, -1.0, -0.013, 0.0, 0.007, 1.234, 2.99, 3.0, 9.0], np.float32)
    y = keras.ops.convert_to_numpy(fq(x))
    scale = 4.0 / 255
    zero = round(1.0 / scale)
    assert y[0] == pytest.approx(y[1]) and y[-1] == pytest.approx(y[-2])  # clipped to the range's ends
    assert y[3] == 0.0  # zero is a grid point (padding and ReLU zeros stay exact)
    steps = y / scale + zero
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)  # every value on the 256-step grid
    assert np.abs(y[1:-1] - np.clip(x[1:-1], -1, 3)).max() <= scale / 2 + 1e-6


def test_fake_quant_passes_gradients_inside_its_range_only():
    import tensorflow as tf

    fq = qat.fake_quant_layer()()
    fq.lo.assign(-1.0)
    fq.hi.assign(1.0)
    x = tf.constant([-3.0, -0.5, 0.2, 0.9, 4.0])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = tf.reduce_sum(fq(x))
    np.testing.assert_allclose(tape.gradient(y, x).numpy(), [0, 1, 1, 1, 0])


@pytest.mark.slow  # an optional training lever: 17-24 s on 2 cores, so in the full suite
def test_quant_aware_model_trains_the_float_model_in_place(net):
    import keras

    qnet, points = qat.quant_aware(net, "densenet121")
    inner = {layer.name for layer in net.get_layer("densenet121").layers}
    assert "conv1_conv" in inner and "conv1_bn" in inner
    # one rounding point per stored int8 tensor: conv outputs folded into their batch norm are not
    assert len(points) == len({p.name for p in points}) > 100
    assert len(qnet.weights) == len(net.weights) + 2 * len(points)

    x = np.random.default_rng(0).integers(0, 256, (12, TINY, TINY, 3)).astype(np.float32)
    summary = qat.set_ranges(qnet, points, x, batch_size=5)
    assert summary["points"] == len(points) and summary["images"] == 12
    lo = np.array([float(p.lo.numpy()) for p in points])
    hi = np.array([float(p.hi.numpy()) for p in points])
    assert (lo <= 0).all() and (hi > 0).all() and (hi > lo).all()

    # eager calls and an eager fit: tracing DenseNet121's graph would cost a minute on 2 cores
    a = np.asarray(net(x, training=False))
    b = np.asarray(qnet(x, training=False))
    assert not np.array_equal(a, b)  # the rounding is in the graph
    assert np.abs(a - b).max() < 0.1  # and it is small

    before = [w.copy() for w in net.get_weights()]
    inp = keras.Input((TINY, TINY, 3))
    trainer = keras.Model(inp, qnet(inp))
    trainer.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy", run_eagerly=True)
    trainer.fit(x, np.eye(4, dtype=np.float32)[np.arange(12) % 4], batch_size=6, epochs=1, verbose=0)
    changed = sum(not np.array_equal(p, q) for p, q in zip(before, net.get_weights()))
    assert changed > 0.9 * len(before)  # the float model's own weights moved


def test_calibration_images_are_the_ones_export_calibrates_on(tmp_path):
    from mri_edge.config import ExportConfig
    from mri_edge.export.calibration import calibration_set

    n = ExportConfig.__dataclass_fields__["calib_size"].default
    labels = np.repeat(np.arange(4), [150, 150, 150, 40])
    rows = []
    for i, y in enumerate(labels):
        rel = f"c{y}/{i}.png"
        (tmp_path / f"c{y}").mkdir(exist_ok=True)
        Image.fromarray(np.full((8, 8), i % 256, np.uint8)).save(tmp_path / rel)
        rows.append([rel, int(y)])
    (tmp_path / "split_manifest.json").write_text(json.dumps({"root": str(tmp_path), "class_names": list("abcd"),
                                                                       "splits": {"train": rows}}))
    _, used = calibration_set(tmp_path, {"image_size": 8}, n)
    picked = qat.calibration_images(np.array([r for r, _ in rows]), labels)
    assert picked.tolist() == used
    counts = np.bincount(labels[np.isin([r for r, _ in rows], used)], minlength=4)
    assert counts.sum() == n and counts[3] == 40 and min(counts[:3]) >= (n - 40) // 4  # stratified, topped up


@pytest.mark.slow
def test_train_quant_aware_keeps_ranges_each_epoch_and_saves_a_float_model(small_backbone, synth_data, cache_dir,
                                                                           tmp_path):
    from mri_edge import model
    from mri_edge.train import TrainConfig, train

    logs = []
    cfg = TrainConfig(task="tumor", data_dir=str(synth_data), out=str(tmp_path / "q"), weights="none",
                      image_size=TINY, batch_size=16, epochs_head=0, epochs_finetune=2, dense_units=8,
                      cache_dir=str(cache_dir), eager=True, limit_per_class=4, quant_aware=True)
    run = train(cfg, log=logs.append)
    assert sum("quant-aware: ranges of" in m for m in logs) == 2, logs  # before each epoch
    assert json.loads((run / "config.json").read_text())["quant_aware"] is True
    saved = model.load_model(run / "model.keras")
    assert not [layer for layer in saved.get_layer("densenet121").layers if "fake" in type(layer).__name__.lower()]
