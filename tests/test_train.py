import json

import numpy as np
import pytest

from conftest import TINY
from mri_edge.errors import MriEdgeError
from mri_edge.schedule import PhaseClock, lr_at, phase_budgets
from mri_edge.train import TrainConfig, TrainError, resolve_phases, train

OUTPUTS = ["model.keras", "config.json", "labels.json", "split_manifest.json", "history.csv",
           "training_curves.png", "test_report.json", "test_predictions.json", "confusion_matrix.png",
           "examples.png", "train_report.md", "report.md"]


def test_tiny_end_to_end_run_writes_full_report(tiny_run):
    for name in OUTPUTS:
        assert (tiny_run / name).is_file(), name
    assert not (tiny_run / "checkpoint.keras").exists()
    rep = json.loads((tiny_run / "test_report.json").read_text())
    assert rep["n"] == 16
    for key in ("accuracy", "macro", "weighted", "per_class", "confusion_matrix", "accuracy_ci95", "macro_f1_ci95",
                "skipped"):
        assert key in rep
    lo, hi = rep["macro_f1_ci95"]
    assert lo <= rep["macro"]["f1"] <= hi
    assert set(rep["per_class"]) == {"Glioma", "Meningioma", "No Tumor", "Pituitary"}
    assert np.array(rep["confusion_matrix"]).sum() == 16
    cfg = json.loads((tiny_run / "config.json").read_text())
    assert cfg["image_size"] == 32 and cfg["weights"] == "none" and cfg["phases"][0]["name"] == "scratch"
    assert cfg["preprocessing"]["normalization"]["where"] == "inside the model graph"
    md = (tiny_run / "train_report.md").read_text()
    assert "macro avg" in md and "confusion_matrix.png" in md
    assert f"macro-F1 {rep['macro']['f1']:.4f} (95% CI {lo:.4f}-{hi:.4f})" in md
    assert "Validation: 4 images carved from training at random;" in md  # synth data has no validation folder
    assert "(train_report.md)" in (tiny_run / "report.md").read_text()
    assert json.loads((tiny_run / "state.json").read_text())["finished"]
    assert "has not finished" not in (tiny_run / "report.md").read_text()  # the index of a finished run
    assert len((tiny_run / "history.csv").read_text().splitlines()) == 3


def test_phase_plan():
    phases, notes = resolve_phases(TrainConfig("tumor", ".", weights="imagenet", epochs_head=2, epochs_finetune=3,
                                               lr=1e-3))
    assert [p["name"] for p in phases] == ["head", "finetune"]
    assert phases[1]["lr"] == pytest.approx(1e-4) and not notes
    phases, notes = resolve_phases(TrainConfig("tumor", ".", weights="none", epochs_head=2, epochs_finetune=3))
    assert [p["name"] for p in phases] == ["scratch"] and phases[0]["epochs"] == 3  # as --epochs-finetune reads
    assert "phase 1" in notes[0] and "skipped" in notes[0] and "--epochs-head 2 unused" in notes[0]
    with pytest.raises(TrainError, match=r"--epochs-finetune is 0 \(with --weights none"):
        resolve_phases(TrainConfig("tumor", ".", weights="none", epochs_head=2, epochs_finetune=0))
    assert resolve_phases(TrainConfig("tumor", ".", weights="imagenet"))[0][1]["freeze_bn"] is True
    phases, _ = resolve_phases(TrainConfig("tumor", ".", weights="model.keras", train_bn=True))
    assert phases[0]["freeze_bn"] is True and phases[1]["freeze_bn"] is False  # the head phase keeps BN frozen


def test_lr_schedule_warms_up_then_decays():
    lrs = [lr_at(e, 10, 1e-3, 1) for e in range(10)]
    assert lrs[0] < lrs[1] and lrs[1] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:])) and lrs[-1] >= 1e-5


def test_time_budget_drives_schedule_and_stop():
    assert phase_budgets([{"epochs": 1}, {"epochs": 3}], 400) == [100, 300]
    assert phase_budgets([{"epochs": 2}], None) == [None]
    t = [0.0]
    clock = PhaseClock(100, now=lambda: t[0])
    clock.epoch_started()
    t[0] = 30
    assert not clock.epoch_ended() and clock.progress() == pytest.approx(0.3)
    clock.epoch_started()
    t[0] = 60
    assert not clock.epoch_ended()  # 60 s used + a 30 s epoch fits in 100
    clock.epoch_started()
    t[0] = 75
    assert clock.epoch_ended()  # 75 + 30 would overrun
    assert not PhaseClock(None).epoch_ended()
    assert PhaseClock(100, now=lambda: 500.0, elapsed_s=40).progress() == pytest.approx(0.4)  # resumed
    # Past warm-up the cosine follows the share of the budget used, whatever the epoch count.
    assert lr_at(5, 200, 1e-3, 1, progress=0.0) == pytest.approx(1e-3)
    assert lr_at(5, 200, 1e-3, 1, progress=0.5) == pytest.approx(1e-3 * (0.01 + 0.99 * 0.5))
    assert lr_at(5, 200, 1e-3, 1, progress=1.5) == pytest.approx(1e-5)
    assert lr_at(0, 200, 1e-3, 1, progress=0.9) == pytest.approx(5e-4)  # warm-up epoch first


@pytest.mark.slow
def test_time_budget_stops_a_run_and_it_still_finishes(small_backbone, synth_data, cache_dir, tmp_path):
    logs = []
    cfg = TrainConfig(task="tumor", data_dir=str(synth_data), out=str(tmp_path / "r"), weights="none",
                      image_size=32, batch_size=16, epochs_head=0, epochs_finetune=4, dense_units=8,
                      cache_dir=str(cache_dir), eager=True, limit_per_class=4, time_budget_s=0.01,
                      select_by="macro_f1")
    run = train(cfg, log=logs.append)
    rows = (run / "history.csv").read_text().splitlines()
    assert len(rows) == 2  # header + the one epoch that fitted
    f1 = float(rows[1].split(",")[rows[0].split(",").index("val_macro_f1")])  # the metric that kept the epoch
    assert 0.0 <= f1 <= 1.0
    assert any("time budget of 0 s reached after epoch 1" in m for m in logs), logs
    assert any(f"restored best epoch (val_macro_f1 {f1:.4f})" in m for m in logs), logs
    assert (run / "model.keras").is_file() and (run / "test_report.json").is_file()


@pytest.mark.slow
def test_refit_trains_on_the_held_out_images_keeps_the_last_epoch_and_cannot_be_calibrated(
        small_backbone, synth_data, cache_dir, tmp_path):
    from mri_edge.calibrate import CalibrateError, calibrate_run
    from mri_edge.config import CalibrateConfig

    common = dict(task="tumor", data_dir=str(synth_data), weights="none", image_size=32, batch_size=16,
                  epochs_head=0, epochs_finetune=2, dense_units=8, cache_dir=str(cache_dir), eager=True,
                  limit_per_class=6, val_split="grouped", val_fraction=0.25)
    with pytest.raises(MriEdgeError, match="add --select-by last"):
        TrainConfig(**common, refit=True)
    logs = []
    run = train(TrainConfig(**common, out=str(tmp_path / "r"), refit=True, select_by="last"), log=logs.append)
    manifest = json.loads((run / "split_manifest.json").read_text())
    train_rows, val_rows = manifest["splits"]["train"], manifest["splits"]["val"]
    assert val_rows and all(r in train_rows for r in val_rows) and manifest["val_split"]["refit"] is True
    assert any("trained on as well (--refit)" in m for m in logs), logs
    assert sum("kept its last epoch" in m for m in logs) == 1 and len((run / "history.csv").read_text().split()) == 3
    with pytest.raises(CalibrateError, match="trained on its validation images too"):
        calibrate_run(run, CalibrateConfig())


@pytest.mark.slow
def test_interrupt_keeps_checkpoint_and_resume_finishes(small_backbone, synth_data, cache_dir, tmp_path):
    import keras

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            raise KeyboardInterrupt

    out = tmp_path / "run"
    cfg = TrainConfig(task="tumor", data_dir=str(synth_data), out=str(out), weights="none", image_size=32,
                      batch_size=32, epochs_head=0, epochs_finetune=2, dense_units=8, cache_dir=str(cache_dir),
                      eager=True, limit_per_class=6, label_smoothing=0.1, mixup=0.2, weight_decay=1e-4,
                      select_by="accuracy")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, log=lambda *_: None, callbacks=[Interrupt()])
    assert (out / "checkpoint.keras").is_file() and not (out / "model.keras").exists()
    state = json.loads((out / "state.json").read_text())
    assert state["epoch"] == 1 and list(state["best"]) == ["val_accuracy"]
    train(TrainConfig("tumor", ""), resume=str(out), log=lambda *_: None)
    assert (out / "model.keras").is_file()
    hist = (out / "history.csv").read_text().splitlines()
    assert len(hist) == 3  # header + epoch 1 (before the interrupt) + epoch 2 (after resume)
    saved = json.loads((out / "config.json").read_text())  # the regularisers carry over into the resumed phase
    assert (saved["label_smoothing"], saved["mixup"], saved["weight_decay"]) == (0.1, 0.2, 1e-4)


@pytest.mark.parametrize("select_by, kept", [("loss", 3), ("accuracy", 2), ("macro_f1", 1), ("last", 3)])
def test_keeper_keeps_the_epoch_the_rule_selects(tmp_path, select_by, kept):
    from mri_edge.callbacks import Keeper
    from mri_edge.run import RunFolder

    class Net:  # what Keeper's save callback receives; the epoch it carries is what was kept
        epoch = 0

    class Opt:
        learning_rate = 1e-3

    saved = {}
    net, run = Net(), RunFolder(tmp_path)
    keeper = Keeper(run, net, {"name": "finetune", "epochs": 4, "lr": 1e-3}, 0, 0, PhaseClock(None), [],
                    "val_" + select_by, None, lambda *_: 0.0,
                    lambda n, *paths: saved.update({path.name: n.epoch for path in paths}),
                    print)
    keeper.set_model(type("Model", (), {"optimizer": Opt(), "stop_training": False})())
    # loss and accuracy disagree, as on a grouped split of new subjects
    for epoch, logs in enumerate([{"val_loss": 0.9, "val_accuracy": 0.50, "val_macro_f1": 0.45},
                                  {"val_loss": 1.1, "val_accuracy": 0.62, "val_macro_f1": 0.40},
                                  {"val_loss": 0.8, "val_accuracy": 0.55, "val_macro_f1": float("nan")},
                                  # diverged: NaN probabilities still score the accuracy of one class
                                  {"val_loss": float("nan"), "val_accuracy": 0.9, "val_macro_f1": 0.9}]):
        net.epoch = epoch + 1
        keeper.on_epoch_begin(epoch)
        keeper.on_epoch_end(epoch, logs)
    assert saved["best.keras"] == kept and saved["checkpoint.keras"] == 4
    state = json.loads((tmp_path / "state.json").read_text())
    best = [0.8, 0.62, 0.45, 3][["loss", "accuracy", "macro_f1", "last"].index(select_by)]  # last: epochs run
    assert state["best"] == {"val_" + select_by: best}
    assert RunFolder.saved_best(state, "val_" + select_by) == best  # what --resume continues from
    # the checkpoint, state.json and the trainer state are written in one block that holds Ctrl-C back
    # (quiet.signals_deferred; a real signal is not sent here: pytest-xdist workers handle their own)
    import contextlib

    from mri_edge import callbacks

    held, written = [], []

    @contextlib.contextmanager
    def deferred():
        held.append(True)
        yield
        held.append(False)

    class State:
        def write(self, epoch):
            written.append(("checkpoint_state.npz", held[-1]))

    keeper.trainer_state = State()
    keeper.save = lambda n, *paths: written.extend((p.name, held[-1]) for p in paths)
    real_state = keeper.run.write_state
    keeper.run.write_state = lambda **kw: written.append(("state.json", held[-1])) or real_state(**kw)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(callbacks, "signals_deferred", deferred)
        keeper.on_epoch_end(4, {"val_loss": 0.5, "val_accuracy": 0.95, "val_macro_f1": 0.95})
    assert {name for name, _ in written} >= {"checkpoint.keras", "state.json", "checkpoint_state.npz"}
    assert all(inside for _, inside in written) and held == [True, False], written


def test_best_phase_is_the_phase_whose_kept_epoch_wins_ties_to_the_later():
    from mri_edge.callbacks import best_phase

    nan = float("nan")
    history = [{"phase": "head", "val_loss": 0.7, "val_accuracy": 0.63},
               {"phase": "finetune", "val_loss": 0.9, "val_accuracy": 0.60},
               {"phase": "finetune", "val_loss": 0.8, "val_accuracy": 0.626},
               {"phase": "finetune", "val_loss": nan, "val_accuracy": 0.9}]  # diverged: never counts
    names = ["head", "finetune"]
    assert best_phase(history, "val_accuracy", names) == 0  # the head epoch beat every fine-tune epoch
    assert best_phase(history, "val_loss", names) == 0
    assert best_phase(history[1:], "val_accuracy", names) == 1
    history.append({"phase": "finetune", "val_loss": 0.7, "val_accuracy": 0.63})
    assert best_phase(history, "val_accuracy", names) == 1 and best_phase(history, "val_loss", names) == 1
    assert best_phase(history, "val_accuracy", names[:1]) == 0  # only the phases run so far
    assert best_phase([{"phase": "head", "val_loss": nan, "val_accuracy": 0.5}], "val_accuracy", names) is None
    # --select-by last: the later phase, unless none of its epochs is finite
    assert best_phase(history, "val_last", names) == 1
    assert best_phase(history[:1] + [{"phase": "finetune", "loss": nan, "val_loss": 0.5}], "val_last", names) == 0


def test_a_refit_run_lends_no_carve_to_a_run_that_starts_from_it(tmp_path):
    from mri_edge import data

    root, run = tmp_path / "data", tmp_path / "run"
    run.mkdir()
    train = data.Split("train", [str(root / "a.jpg"), str(root / "b.jpg")], [0, 1])
    for refit in (False, True):
        (run / "split_manifest.json").write_text(json.dumps({
            "root": str(root), "task": "tumor", "val_carved_from_train": True,
            "val_split": {"method": "grouped", **({"refit": True} if refit else {})},
            "splits": {"train": [["a.jpg", 0]] + [["b.jpg", 1]] * refit, "val": [["b.jpg", 1]]}}))
        kept = data.kept_carve(train, root, "tumor", str(run / "model.keras"))
        assert (kept is None) == refit  # a refit run trained on its carve: nothing of it is held out


@pytest.mark.slow
def test_a_run_keeps_an_earlier_phase_when_no_later_epoch_beats_it(small_backbone, synth_data, cache_dir, tmp_path):
    from mri_edge import model

    donor_path = tmp_path / "donor.keras"
    model.build_model(4, 32, "none", dense_units=16, seed=4).save(donor_path)
    logs = []
    # a fine-tune rate this large wrecks the fine-tuned network: the head epoch must be what is kept
    cfg = TrainConfig(task="tumor", data_dir=str(synth_data), out=str(tmp_path / "r"), image_size=32,
                      weights=str(donor_path), batch_size=16, epochs_head=1, epochs_finetune=1,
                      lr_finetune=1e4, unfreeze="all", dense_units=16, cache_dir=str(cache_dir), eager=True,
                      limit_per_class=4)
    run = train(cfg, log=logs.append)
    assert any("kept the best epoch of phase 'head'" in m for m in logs), logs
    assert not (run / "best_of_phases.keras").exists()
    kept = model.load_model(run / "model.keras").get_layer("densenet121").get_layer("conv1_conv").get_weights()
    donor = model.load_model(donor_path).get_layer("densenet121").get_layer("conv1_conv").get_weights()
    np.testing.assert_array_equal(kept[0], donor[0])  # the base was frozen in the head phase


def test_resume_reads_the_best_of_states_saved_before_select_by():
    from mri_edge.run import RunFolder

    assert RunFolder.saved_best({"best_val_loss": 0.41}, "val_loss") == 0.41
    assert RunFolder.saved_best({"best_val_loss": float("inf")}, "val_loss") is None
    assert RunFolder.saved_best({"best_val_loss": 0.41}, "val_accuracy") is None
    assert RunFolder.saved_best({"best": {"val_accuracy": 0.6}}, "val_accuracy") == 0.6
    assert RunFolder.saved_best(None, "val_loss") is None


def test_unknown_select_by_is_refused_before_training(synth_data, tmp_path):
    from mri_edge.errors import MriEdgeError

    with pytest.raises(MriEdgeError, match="--select-by val_accuracy: choose one of loss, accuracy, macro_f1"):
        TrainConfig(task="tumor", data_dir=str(synth_data), out=str(tmp_path / "r"), select_by="val_accuracy")


def test_same_seed_same_split_and_initial_weights(synth_data):
    from mri_edge import data
    from mri_edge.model import build_model

    a = data.discover(synth_data, "tumor", seed=5).splits["val"].paths
    b = data.discover(synth_data, "tumor", seed=5).splits["val"].paths
    assert a == b
    w1 = build_model(4, 32, "none", dense_units=4, seed=9).get_weights()
    w2 = build_model(4, 32, "none", dense_units=4, seed=9).get_weights()
    assert all(np.array_equal(x, y) for x, y in zip(w1, w2))


def test_split_seed_gives_members_one_carve_and_their_own_seed(synth_data, tmp_path):
    """--split-seed fixes the validation carve alone: two runs with other --seed values hold out
    the same images (what `mri-edge ensemble` and rank_runs.py require); without it they differ."""
    from mri_edge.train import _open_run

    def val(seed, split_seed=None):
        cfg = TrainConfig(task="tumor", data_dir=str(synth_data), out=str(tmp_path / f"r{seed}-{split_seed}"),
                          weights="none", seed=seed, split_seed=split_seed)
        return _open_run(cfg, None, False, lambda *_: None, chief=False)[2].splits["val"].paths

    assert val(1, 5) == val(2, 5) == val(5)
    assert val(1) != val(2)


@pytest.mark.realdata
@pytest.mark.slow
def test_real_tumor_subset_trains(shared_data, tmp_path, cache_dir):
    cfg = TrainConfig(task="tumor", data_dir=str(shared_data / "brain-tumor-mri"), out=str(tmp_path / "r"),
                      weights="none", image_size=32, batch_size=32, epochs_head=0, epochs_finetune=1,
                      dense_units=16, limit_per_class=8, cache_dir=str(cache_dir), eager=True)
    run = train(cfg, log=lambda *_: None)
    rep = json.loads((run / "test_report.json").read_text())
    assert rep["n"] == 32 and 0 <= rep["accuracy"] <= 1
    manifest = json.loads((run / "split_manifest.json").read_text())
    assert manifest["val_carved_from_train"] and len(manifest["splits"]["val"]) == 32


def test_evaluate_fp16_weights_halves_the_stored_model_and_reports_on_it(micro_run, tmp_path):
    """`evaluate --fp16-weights`: model.keras with float16 kernels (what a repository can
    hold), the trained file kept, the test report made on the rounded model."""
    import json
    import shutil

    import numpy as np
    from click.testing import CliRunner

    from mri_edge.cli import main
    from mri_edge.model import load_model

    from mri_edge import evaluate

    run = tmp_path / "run"
    shutil.copytree(micro_run, run)
    before = load_model(run / "model.keras")
    # interrupted before its reports are written: nothing changes (model.keras goes with the reports)
    files = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evaluate, "predict_arrays", interrupted)
        assert CliRunner().invoke(main, ["evaluate", str(run), "--fp16-weights"]).exit_code == 130
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == files
    res = CliRunner().invoke(main, ["evaluate", str(run), "--fp16-weights"])
    assert res.exit_code == 0, res.output
    after = load_model(run / "model.keras")  # a plain Keras load: float32 variables
    trained = load_model(run / "model_fp32.keras")
    for b, a, t in zip(before.weights, after.weights, trained.weights):
        b, a, t = (np.asarray(v.numpy()) for v in (b, a, t))
        assert a.dtype == np.float32 and np.array_equal(b, t)
        assert np.array_equal(a, b.astype(np.float16).astype(np.float32) if b.ndim >= 2 else b)
    stored = json.loads((run / "config.json").read_text())["weights_stored"]
    assert stored["kernels"] == "float16" and stored["from"]["file"] == "model_fp32.keras"
    assert stored["rounded_values"] > 0
    # again: rounds from the trained file (a rounded one would round no value), which stays as it was
    trained_bytes = (run / "model_fp32.keras").read_bytes()
    assert CliRunner().invoke(main, ["evaluate", str(run), "--fp16-weights"]).exit_code == 0
    again = json.loads((run / "config.json").read_text())["weights_stored"]
    assert again["rounded_values"] == stored["rounded_values"] and again["from"] == stored["from"]
    assert (run / "model_fp32.keras").read_bytes() == trained_bytes
    for a, b in zip(load_model(run / "model.keras").weights, after.weights, strict=True):
        assert np.array_equal(np.asarray(a.numpy()), np.asarray(b.numpy()))


@pytest.mark.slow  # an optional training lever: 17-24 s on 2 cores, so in the full suite
def test_ema_validates_keeps_and_ships_the_averaged_weights(small_backbone, synth_data, cache_dir, tmp_path):
    """--ema: each validation, the kept checkpoint and model.keras are one model, the optimizer's
    average of the weights (training continues from the raw ones), with batch-norm statistics
    re-estimated for it; a run its time budget stops early keeps the average too."""
    import keras

    from mri_edge import data
    from mri_edge.model import adapt_batchnorm, load_model

    ds = data.discover(synth_data, "tumor", seed=42)
    dec = {s: data.decode_split(ds.splits[s], TINY, cache_dir) for s in ("train", "val", "test")}
    seen, resumed = [], {}

    def kernels(ws):
        return [keras.ops.convert_to_numpy(w) for w in ws if len(w.shape) == 4]

    class Record(keras.callbacks.Callback):  # runs after Keeper: sees what it saved
        def on_epoch_end(self, epoch, logs=None):
            probs = keras.ops.convert_to_numpy(self.model.layers[-1](dec["val"].images, training=False))
            onehot = np.eye(4)[dec["val"].labels]
            loss = float(-np.mean(np.sum(onehot * np.log(np.clip(probs, 1e-7, 1)), axis=1)))
            seen.append((logs["val_loss"], loss, self.model.layers[-1].get_weights()))

        def on_epoch_begin(self, epoch, logs=None):  # after the swap back: (raw weights, the optimizer's average)
            if epoch:  # the optimizer is built by the first step
                resumed[epoch] = (kernels(self.model.trainable_weights),
                                  kernels(self.model.optimizer._model_variables_moving_average))

    cfg = TrainConfig(task="tumor", data_dir=str(synth_data), out=str(tmp_path / "r"), weights="none",
                      image_size=TINY, batch_size=8, epochs_head=0, epochs_finetune=3, dense_units=8, lr=3e-3,
                      cache_dir=str(cache_dir), eager=True, ema=0.6, select_by="loss", patience=5)
    run = train(cfg, log=lambda *_: None, callbacks=[Record()])
    assert len(seen) == 3 and sorted(resumed) == [1, 2]
    for val_loss, recomputed, _ in seen:  # validation saw the model the callbacks after it see
        assert recomputed == pytest.approx(val_loss, rel=1e-3)
    for epoch in (0, 1):  # what was validated and saved is the optimizer's average, not what training resumed
        saved = [w for w in seen[epoch][2] if w.ndim == 4]
        raw, average = resumed[epoch + 1]
        assert all(np.array_equal(a, b) for a, b in zip(saved, average))
        assert not all(np.allclose(a, b) for a, b in zip(saved, raw))
    kept = int(np.argmin([s[0] for s in seen]))
    shipped = load_model(run / "model.keras")
    assert all(np.array_equal(a, b) for a, b in zip(shipped.get_weights(), seen[kept][2]))
    stats = [w.copy() for w in shipped.get_weights()]
    adapt_batchnorm(shipped, dec["train"].images, max_batches=10)  # the same images, the same order
    assert all(np.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(stats, shipped.get_weights()))
    assert json.loads((run / "config.json").read_text())["ema"] == 0.6

    # stopped by its time budget after one of three epochs: the test report is model.keras's, the average
    stopped = train(TrainConfig(**{**cfg.__dict__, "out": str(tmp_path / "s"), "time_budget_s": 0.01,
                                   "class_names": [], "phases": []}), log=lambda *_: None)
    assert len((stopped / "history.csv").read_text().splitlines()) == 2
    reported = np.array(json.loads((stopped / "test_predictions.json").read_text())["probs"])
    probs = keras.ops.convert_to_numpy(load_model(stopped / "model.keras")(dec["test"].images, training=False))
    np.testing.assert_allclose(probs, reported, atol=1e-4)
    with pytest.raises(MriEdgeError, match="--ema with several devices"):
        TrainConfig(task="tumor", data_dir=".", ema=0.9, devices="2")


def test_an_unreadable_image_leaves_the_run_and_stays_named(small_backbone, synth_data, tmp_path):
    """An image train cannot decode is out of the split manifest (so calibrate and verify find the
    test rows of test_predictions.json there) and named in the training report, after an
    evaluate too."""
    import shutil

    from mri_edge.run import RunFolder
    from mri_edge.evaluate import evaluate

    root = tmp_path / "data"
    shutil.copytree(synth_data, root)
    broken = sorted((root / "Testing").rglob("*.jpg"))[0]
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    cfg = TrainConfig(task="tumor", data_dir=str(root), out=str(tmp_path / "r"), weights="none", image_size=TINY,
                      batch_size=16, epochs_head=0, epochs_finetune=1, dense_units=8, eager=True)
    run = RunFolder(train(cfg, log=lambda *_: None))
    rel = broken.relative_to(root).as_posix()
    for _ in range(2):  # after train, then after evaluate
        m = run.manifest()
        assert m["unreadable"] == {"test": [rel]} and rel not in [r for r, _ in m["splits"]["test"]]
        assert run.test_predictions()["paths"] == [r for r, _ in m["splits"]["test"]]
        assert f"- test: {rel}" in (run.path / "train_report.md").read_text()
        evaluate(run.path, log=lambda *_: None)


@pytest.mark.parametrize("ema", [None, pytest.param(0.6, marks=pytest.mark.slow)])
def test_a_resumed_phase_goes_on_as_an_uninterrupted_one(small_backbone, synth_data, cache_dir, tmp_path, ema):
    """A checkpoint with the optimizer's variables, the random streams and early stopping's
    count (callbacks.TrainerState, Patience): interrupted after epoch 2 of 4 and resumed, the
    run computes the losses and weights of the run that was never interrupted, and the state
    file goes once the run ends."""
    import keras

    from mri_edge.model import load_model

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise KeyboardInterrupt

    def config(out):
        return TrainConfig(task="tumor", data_dir=str(synth_data), out=str(out), weights="none", image_size=TINY,
                           batch_size=8, epochs_head=0, epochs_finetune=4, dense_units=8, lr=3e-3, dropout=0.3,
                           cache_dir=str(cache_dir), eager=True, mixup=0.2, ema=ema, select_by="loss", patience=3,
                           limit_per_class=4)  # two steps an epoch: each eager step costs about 0.4 s

    whole = train(config(tmp_path / "whole"), log=lambda *_: None)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train(config(cut), log=lambda *_: None, callbacks=[Interrupt()])
    state = json.loads((cut / "state.json").read_text())
    assert state["epoch"] == 2 and set(state["patience"]) == {"wait", "best"}
    assert (cut / "checkpoint_state.npz").is_file()
    train(TrainConfig("tumor", ""), resume=str(cut), log=lambda *_: None)
    assert not (cut / "checkpoint_state.npz").exists() and not (cut / "checkpoint.keras").exists()
    losses = [(cut / "history.csv").read_text(), (whole / "history.csv").read_text()]
    rows = [[[float(v or "nan") for v in line.split(",")[2:]] for line in h.splitlines()[1:]] for h in losses]
    assert losses[0].splitlines()[0] == losses[1].splitlines()[0] and len(rows[0]) == 4
    np.testing.assert_allclose(rows[0], rows[1], rtol=1e-5)
    for a, b in zip(load_model(cut / "model.keras").get_weights(), load_model(whole / "model.keras").get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_early_stopping_counts_on_across_a_resume_and_a_stopped_phase_is_not_resumed(tmp_path):
    """Patience carries its count in state.json; a phase that patience (or the clock) stopped
    is marked so, and a resume only restores its best epoch instead of training on."""
    from mri_edge.callbacks import Keeper, Patience
    from mri_edge.run import RunFolder

    patience = Patience("val_loss", 2, saved={"wait": 1, "best": 0.5})
    model = type("Model", (), {"stop_training": False, "optimizer": type("Opt", (), {"learning_rate": 1e-3})()})()
    patience.set_model(model)
    patience.on_train_begin()
    assert (patience.wait, patience.best) == (1, 0.5)
    keeper = Keeper(RunFolder(tmp_path), object(), {"name": "finetune", "epochs": 9, "lr": 1e-3}, 0, 0,
                    PhaseClock(None), [], "val_loss", 0.5, lambda: 0.0, lambda *_: None, print, patience)
    keeper.set_model(model)
    patience.on_epoch_end(3, {"val_loss": 0.6})  # a second epoch without improvement: patience 2 is spent
    assert model.stop_training
    keeper.on_epoch_end(3, {"val_loss": 0.6})
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["patience"] == {"wait": 2, "best": 0.5} and state["stopped"] and state["epoch"] == 4
    fresh = Patience("val_loss", 2)
    fresh.set_model(model)
    fresh.on_train_begin()
    assert (fresh.wait, fresh.best) == (0, None)


def test_a_phase_resumed_at_its_start_gets_the_networks_random_streams_only(tmp_path):
    """Keras does not save dropout's random stream in .keras files: a resume at the start of a
    phase takes it from the end of the phase before, and leaves the optimizer fresh."""
    import keras

    from mri_edge.callbacks import TrainerState
    from mri_edge.run import RunFolder

    def build():
        net = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), keras.layers.Dropout(0.5),
                                keras.layers.Dense(2, activation="softmax")])
        net.compile(optimizer="adam", loss="categorical_crossentropy")
        return net

    x, y = np.random.default_rng(0).normal(size=(16, 4)), np.eye(2)[np.arange(16) % 2]
    run, net = RunFolder(tmp_path), build()
    net.fit(x, y, epochs=1, verbose=0, callbacks=[TrainerState(run, net, 0, None)])
    streams = [keras.ops.convert_to_numpy(v) for v in net.non_trainable_variables]
    again = build()
    again.optimizer.build(again.trainable_variables)
    saved = TrainerState(run, again, 1, 0)
    saved.set_model(again)
    saved.on_train_begin()
    assert all(np.array_equal(a, keras.ops.convert_to_numpy(b)) for a, b in zip(streams, again.non_trainable_variables))
    assert int(keras.ops.convert_to_numpy(again.optimizer.iterations)) == 0  # a new phase: a fresh optimizer
    resumed = build()
    resumed.optimizer.build(resumed.trainable_variables)
    inside = TrainerState(run, resumed, 0, 1)  # the same phase, after its epoch 1: everything
    inside.set_model(resumed)
    inside.on_train_begin()
    steps = int(keras.ops.convert_to_numpy(net.optimizer.iterations))
    assert steps > 0 and int(keras.ops.convert_to_numpy(resumed.optimizer.iterations)) == steps
    for damage in (b"", b"PK\x03\x04 not a zip", run.trainer_state_path.read_bytes()[:-100]):  # said, then afresh
        run.trainer_state_path.write_bytes(damage)
        lines, fresh = [], build()
        fresh.optimizer.build(fresh.trainable_variables)
        broken = TrainerState(run, fresh, 0, 1, log=lines.append)
        broken.set_model(fresh)
        broken.on_train_begin()
        assert "unreadable" in lines[0] and int(keras.ops.convert_to_numpy(fresh.optimizer.iterations)) == 0
