"""Keras callbacks of `mri-edge train`: progress lines, and the per-epoch checkpoint, best
weights, history and resumable state. Imported only once training starts (it imports Keras)."""

from __future__ import annotations

import io
import math
import time
import zipfile

import keras
import numpy as np

from .files import atomic_write_bytes
from .progress import Heartbeat, Progress
from .quiet import signals_deferred
from .schedule import PhaseClock, lr_at


class EpochProgress(keras.callbacks.Callback):
    """A progress line per epoch (steps, then loss and accuracy), and a heartbeat while the
    first step traces the graph (about a minute for DenseNet121 on 2 cores, silent otherwise)."""

    def __init__(self, phase: str, epochs: int, steps: int, log, traced: bool):
        super().__init__()
        self.phase, self.epochs, self.steps, self.log = phase, epochs, steps, log
        self.beat = None if traced else Heartbeat("building the training graph (first step)")
        self.bar = None
        self.t0, self.epoch = time.time(), 0

    def on_train_begin(self, logs=None):
        if self.beat:
            self.beat.begin()

    def on_epoch_begin(self, epoch, logs=None):
        self.t0, self.epoch = time.time(), epoch
        if not self.beat:
            self.bar = Progress(self.steps, f"{self.phase} epoch {epoch + 1}/{self.epochs}")

    def on_train_batch_end(self, batch, logs=None):
        if self.beat:
            self.log(f"training graph built in {self.beat.stop():.0f} s")
            self.beat = None
            self.bar = Progress(self.steps, f"{self.phase} epoch {self.epoch + 1}/{self.epochs}")
            self.bar.update(batch + 1)
        elif self.bar:
            self.bar.update()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        shown = ", ".join(f"{k} {logs[k]:.4f}" for k in ("loss", "accuracy", "val_loss", "val_accuracy", "val_macro_f1")
                          if k in logs)
        self.log(f"{self.phase} epoch {epoch + 1}/{self.epochs}: {shown} ({time.time() - self.t0:.0f} s)")

    def on_train_end(self, logs=None):
        if self.beat:
            self.beat.stop()


def monitor_mode(monitor: str) -> str:
    """'min' for a loss, 'max' for accuracy and macro-F1 (TrainConfig.select_by)."""
    return "min" if monitor.endswith("loss") else "max"


def counts(logs: dict, monitor: str) -> bool:
    """Whether an epoch can be kept: missing or NaN never counts, nor does any epoch whose loss
    diverged (the argmax of NaN probabilities is a constant class, which still scores an accuracy)."""
    if monitor == "val_last":  # --select-by last: any epoch that did not diverge
        return all(math.isfinite(logs.get(k, 0.0)) for k in ("loss", "val_loss"))
    value = logs.get(monitor)
    return value is not None and math.isfinite(value) and math.isfinite(logs.get("val_loss", 0.0))


def best_phase(history: list[dict], monitor: str, names: list[str]) -> int | None:
    """Index into `names` of the phase whose kept epoch is the run's best by `monitor` (a tie
    goes to the later phase: more training, and the phase that ran last); None when no epoch
    counts."""
    best, value = None, None
    sign = -1.0 if monitor_mode(monitor) == "min" else 1.0
    for i, name in enumerate(names):
        for row in history:
            if row.get("phase") != name or not counts(row, monitor):
                continue
            v = row.get(monitor, i)  # --select-by last: the later phase
            if value is None or sign * v >= sign * value:  # names in order: equal means a later phase
                best, value = i, v
    return best


class Patience(keras.callbacks.EarlyStopping):
    """Keras' early stopping on the --select-by metric, in the direction Keeper keeps epochs;
    a resumed phase continues its count of epochs without improvement (`saved`, from
    state.json, written by Keeper through `state()`)."""

    def __init__(self, monitor: str, patience: int, saved: dict | None = None):
        super().__init__(monitor=monitor, mode=monitor_mode(monitor), patience=patience)
        self.saved = saved or {}

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self.saved.get("best") is not None:
            self.wait, self.best = int(self.saved["wait"]), float(self.saved["best"])

    def state(self) -> dict:
        return {"wait": int(self.wait), "best": None if self.best is None else float(self.best)}


class TrainerState(keras.callbacks.Callback):
    """What a checkpoint of the network leaves out, so that a resumed phase goes on as an
    uninterrupted one would: the optimizer's variables (step count, moments, --ema's average)
    and the random streams of the training graph (the augmentation's, and dropout's, which
    Keras does not save in .keras files). Saved after each epoch beside the checkpoint
    (RunFolder.trainer_state_path), tagged with the phase and the epochs done; put back when
    a phase resumes at that point. Every phase's start (resume_epoch 0) gets only the network's
    own streams from the end of the phase before (the values it holds already, unless that
    phase was not trained in this process): its optimizer and augmentation start afresh.
    Under --ema the network holds the average and the optimizer the raw weights at the end of
    an epoch, and `averaged` swaps them back before training goes on."""

    def __init__(self, run, net, phase_index: int, resume_epoch: int | None, averaged=None, log=print):
        super().__init__()
        self.run, self.net, self.phase_index, self.resume_epoch = run, net, phase_index, resume_epoch
        self.averaged, self.log = averaged, log

    def groups(self) -> tuple[list, list]:
        """(the network's random streams, the rest: the optimizer's variables and the graph's other streams)."""
        def seeds(variables):
            return [v for v in variables if v.path.endswith("seed_generator_state")]
        own = seeds(self.net.non_trainable_variables)
        return own, list(self.model.optimizer.variables) + [v for v in seeds(self.model.non_trainable_variables)
                                                             if not any(v is o for o in own)]

    def on_train_begin(self, logs=None):
        path = self.run.trainer_state_path
        if self.resume_epoch is None or (self.resume_epoch == 0 and not path.is_file()):
            return  # a new run, or a phase's start with nothing to carry over
        if not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)
        own, rest = self.groups()
        try:
            with np.load(path) as z:
                at = (int(z["phase"]), int(z["epoch"]))
                saved = ([z[f"n{i}"] for i in range(int(z["own"]))],  # a phase's start needs the network's alone
                         [z[f"v{i}"] for i in range(int(z["rest"]))] if self.resume_epoch else [])
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:  # absent, older, damaged
            self.log(f"{path.name}: {'not there' if not path.is_file() else 'unreadable'} ({type(e).__name__}); "
                     "the optimizer and random streams start afresh")
            return

        def fits(values, variables) -> bool:
            # by position: variable paths hold the layers' automatic names, which count up within a process
            return [a.shape for a in values] == [tuple(v.shape) for v in variables]

        if not fits(saved[0], own):
            self.log(f"{path.name} does not match this network: the optimizer and random streams start afresh")
            return
        if self.resume_epoch == 0:  # a phase's start: the network's streams where the phase before left them
            if at[0] == self.phase_index - 1:
                for v, a in zip(own, saved[0]):
                    v.assign(a)
            return
        if at != (self.phase_index, self.resume_epoch) or not fits(saved[1], rest):
            self.log(f"{path.name} is not this phase's epoch {self.resume_epoch}: the optimizer starts afresh")
            return
        for v, a in zip(own + rest, saved[0] + saved[1]):
            v.assign(a)
        if self.averaged is not None:
            self.averaged._ema_weights_in_model = True  # the network holds the average (see the docstring)

    saved_by_keeper = False  # Keeper writes it with the checkpoint, as one step

    def on_epoch_end(self, epoch, logs=None):
        if not self.saved_by_keeper:
            self.write(epoch)

    def write(self, epoch: int) -> None:
        own, rest = self.groups()
        values = {**{f"n{i}": v for i, v in enumerate(own)}, **{f"v{i}": v for i, v in enumerate(rest)}}
        buf = io.BytesIO()
        np.savez(buf, phase=self.phase_index, epoch=epoch + 1, own=len(own), rest=len(rest),
                 **{k: keras.ops.convert_to_numpy(v) for k, v in values.items()})
        atomic_write_bytes(self.run.trainer_state_path, buf.getvalue())


class Keeper(keras.callbacks.Callback):
    """Per epoch: the learning rate from the schedule, a checkpoint, the best weights of the
    phase, the history row and the resumable state (RunFolder.write_state); stops the phase
    when the next epoch would overrun its time budget."""

    def __init__(self, run, net, phase: dict, phase_index: int, warmup: int, clock: PhaseClock, history: list,
                 monitor: str, best: float | None, elapsed, save, log, patience: Patience | None = None,
                 trainer_state: TrainerState | None = None):
        super().__init__()
        self.trainer_state = trainer_state  # written with the checkpoint and state.json, as one step
        if trainer_state is not None:
            trainer_state.saved_by_keeper = True
        self.patience = patience  # its count goes into state.json: it runs before this callback
        self.run, self.net, self.phase, self.phase_index = run, net, phase, phase_index
        self.warmup, self.clock, self.history = warmup, clock, history
        self.monitor, self.best = monitor, best  # best: the monitored value of the kept epoch (None: none yet)
        self.elapsed, self.save, self.log = elapsed, save, log
        self.last_kept = False  # whether the last epoch run is the kept one (the network holds its weights)

    def improved(self, logs: dict) -> bool:
        if self.monitor == "val_last":  # --select-by last: each epoch replaces the one before, unless it diverged
            return counts(logs, self.monitor)
        if not counts(logs, self.monitor):
            return False
        value = logs[self.monitor]
        if self.best is None:
            return True
        return value < self.best if monitor_mode(self.monitor) == "min" else value > self.best

    def on_epoch_begin(self, epoch, logs=None):
        self.clock.epoch_started()
        self.model.optimizer.learning_rate = lr_at(epoch, self.phase["epochs"], self.phase["lr"], self.warmup,
                                                   self.clock.progress())

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        self.history.append({"phase": self.phase["name"], "epoch": epoch + 1,
                             "lr": float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)),
                             **{k: float(v) for k, v in logs.items() if k != "learning_rate"}})
        # an interrupt between these files would leave a checkpoint of one epoch beside the state of
        # another (or the trainer state missing): a resume would then not go on as an uninterrupted run
        with signals_deferred():
            self.last_kept = self.improved(logs)
            if self.last_kept:
                self.best = float(logs.get(self.monitor, len(self.history)))  # last: the epochs run
                self.save(self.net, self.run.best_path, self.run.checkpoint_path)
            else:
                self.save(self.net, self.run.checkpoint_path)
            out_of_time = self.clock.epoch_ended() and epoch + 1 < self.phase["epochs"]
            # stopped (by patience, which runs before this, or by the clock): a resume does not go on with the phase
            self.run.write_state(phase=self.phase_index, epoch=epoch + 1, best={self.monitor: self.best},
                                 history=self.history, elapsed_s=self.elapsed(),
                                 phase_elapsed_s=self.clock.now() - self.clock.start,
                                 patience=self.patience.state() if self.patience else None,
                                 stopped=out_of_time or bool(self.model.stop_training))
            if self.trainer_state is not None:
                self.trainer_state.write(epoch)
        if out_of_time:
            self.log(f"phase '{self.phase['name']}': time budget of {self.clock.budget_s:.0f} s reached after "
                     f"epoch {epoch + 1}")
            self.model.stop_training = True


class EpochOrder(keras.callbacks.Callback):
    """Gives the training batches the epoch number before each epoch (data.make_batches)."""

    def __init__(self, batches):
        super().__init__()
        self.batches = batches

    def on_epoch_begin(self, epoch, logs=None):
        self.batches.set_epoch(epoch)


class AveragedWeights(keras.callbacks.SwapEMAWeights):
    """--ema: validation, the checkpoints and the kept epoch see the optimizer's moving average
    of the weights (`use_ema`), training continues from the raw ones. Keras averages only the
    trainable variables, while the batch-norm statistics followed the raw weights (momentum
    0.9, the last ~10 steps), so before each validation they are re-estimated for the average
    on clean training images (640 of them: a few seconds). Placed before Keeper, which then
    saves the average. When the fit ends, the network holds the last epoch's average."""

    def __init__(self, net, images):
        super().__init__(swap_on_epoch=True)
        self.net, self.images, self.average = net, images, None

    def on_test_begin(self, logs=None):
        from .model import adapt_batchnorm  # noqa: PLC0415

        swapping = not self._ema_weights_in_model
        super().on_test_begin(logs)
        if swapping:
            adapt_batchnorm(self.net, self.images, max_batches=10, training_only=True)

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        self.average = [keras.ops.convert_to_numpy(v) for v in self.model.trainable_weights]

    def on_train_end(self, logs=None):
        # A fit stopped before its last epoch (time budget, patience) ends with Keras' finalize
        # writing the optimizer's copies, the raw weights after the swap, into the network.
        if self.average is not None:
            for v, a in zip(self.model.trainable_weights, self.average):
                v.assign(a)

    def on_predict_end(self, logs=None):  # Keras' own tests the flag the wrong way round
        if self._ema_weights_in_model:
            self._swap_variables()
            self._ema_weights_in_model = False
