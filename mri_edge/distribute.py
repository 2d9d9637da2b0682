"""Data-parallel training on tf.distribute (`train --devices N|all`, and several hosts through
TF_CONFIG): one Distribution object says which strategy runs, how many replicas and workers
there are, which worker this process is, and where it may write.

- One host: MirroredStrategy over its GPUs (`--devices all` or N); on a machine without a GPU,
  `--devices N` splits the CPU into N logical devices. That runs the same synchronous
  algorithm, which is what the tests check (one process, two CPU devices); it is not faster.
- Several hosts: MultiWorkerMirroredStrategy, one process per host, each started with the
  same command and its own TF_CONFIG (docs/distributed.md). Worker 0 is the chief: it writes
  the run folder; the others write their checkpoints to a temporary folder, because saving
  reads synchronised variables, which takes every worker.

The rules that make N devices train like one:
- `--batch-size` is the global batch. Each step sees the same images as on one device, split
  over the replicas, and the gradients are summed over them: the same update, so the learning
  rate stays as given. (Raising --batch-size with the device count is the user's choice; the
  usual rule then is to scale --lr by the same factor, with warm-up.)
- Batch normalisation is synchronised across replicas: statistics over the global batch, as on
  one device (unsynchronised, each replica normalises with its own few images).
- Every worker draws the same split and the same shuffled order (same seed); worker k takes the
  k-th part of each global batch (`feed.make_batches(shard=...)`), so the workers' parts make up
  exactly the batch one device would see.

Keras 3 (3.15) `fit` fails under MultiWorkerMirroredStrategy in two places (`multi_worker_model`
below works around both): its symbolic build reduces the first input batch across workers with
a MEAN over axis None, which CollectiveAllReduce cannot do eagerly (ValueError: Attempt to
convert a value (PerReplica...)); and every step reduces the scalar logs with MEAN over axis 0
(ValueError: Invalid reduction dimension 0 for input with 0 dimensions).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass, field

from .errors import MriEdgeError


class DistributeError(MriEdgeError):
    pass


@dataclass
class Distribution:
    """What `plan` read from --devices and TF_CONFIG; `start` makes the strategy."""

    devices: str | None = None  # --devices as given
    workers: int = 1
    worker_index: int = 0
    cluster: dict = field(default_factory=dict)
    strategy: object | None = None
    replicas: int = 1
    kind: str = "single"  # single | mirrored | multi-worker
    device_names: list[str] = field(default_factory=list)

    @property
    def is_chief(self) -> bool:
        return self.worker_index == 0

    @property
    def multi_worker(self) -> bool:
        return self.workers > 1

    def scope(self):
        return self.strategy.scope() if self.strategy is not None else contextlib.nullcontext()

    def record(self) -> dict:
        """What config.json keeps of it."""
        return {"kind": self.kind, "replicas": self.replicas, "workers": self.workers,
                "devices": self.device_names, "batch": "global (--batch-size), split over the replicas",
                "learning_rate": "as given (same global batch, same update)",
                "batch_norm": "synchronised across replicas" if self.replicas > 1 else "local"}

    def start(self, log=print) -> "Distribution":
        """Create the strategy (TensorFlow must not have touched its devices yet, for logical
        CPU devices to be made)."""
        if self.devices in (None, "1") and not self.multi_worker:
            return self
        import keras  # noqa: PLC0415

        if keras.backend.backend() != "tensorflow":
            raise DistributeError(f"--devices and TF_CONFIG use tf.distribute, which needs KERAS_BACKEND=tensorflow "
                                  f"(this is {keras.backend.backend()})")
        import tensorflow as tf  # noqa: PLC0415

        gpus = tf.config.list_physical_devices("GPU")
        if self.multi_worker:
            self.strategy = tf.distribute.MultiWorkerMirroredStrategy()
            self.kind = "multi-worker"
            self.device_names = [d.name for d in (gpus or tf.config.list_physical_devices("CPU")[:1])]
        else:
            want = len(gpus) if self.devices == "all" else int(self.devices)
            if self.devices == "all" and not gpus:
                log("--devices all: no GPU here, training on the CPU as one device")
                return self
            if gpus:
                if want > len(gpus):
                    raise DistributeError(f"--devices {want}: this machine has {len(gpus)} GPU(s)")
                names = [f"/gpu:{i}" for i in range(want)]
            else:
                cpu = tf.config.list_physical_devices("CPU")[0]
                try:
                    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * want)
                except RuntimeError:
                    raise DistributeError("--devices: TensorFlow's devices were already in use; split the CPU "
                                          "before anything runs (a fresh process)") from None
                names = [f"/cpu:{i}" for i in range(want)]
                log(f"--devices {want}: no GPU here, so the CPU is split into {want} logical devices (the same "
                    "algorithm as on GPUs, for checking; not faster)")
            self.strategy = tf.distribute.MirroredStrategy(names)
            self.kind = "mirrored"
            self.device_names = names
        self.replicas = int(self.strategy.num_replicas_in_sync)
        return self

    def barrier(self) -> None:
        """Wait until every worker gets here (the others wait while the chief writes its reports:
        a worker that left earlier made the chief's coordination service report it as crashed)."""
        if not self.multi_worker:
            return
        import tensorflow as tf  # noqa: PLC0415

        strategy = self.strategy
        tf.function(lambda: strategy.run(
            lambda: tf.distribute.get_replica_context().all_reduce("SUM", tf.constant(1.0))))()

    def leave_quietly(self) -> None:
        """A worker that is done: the chief may stop first, and this process's coordination agent
        would then log failed heartbeats from its threads as it exits (hidden unless --verbose)."""
        from . import quiet  # noqa: PLC0415

        if self.multi_worker and not self.is_chief and not quiet.verbose():
            sys.stderr.flush()
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 2)
            os.close(null)

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.replicas:
            raise DistributeError(f"--batch-size {batch_size} is the global batch: it must split evenly over "
                                  f"{self.replicas} replicas")


def plan(devices: str | None) -> Distribution:
    """Parse --devices and TF_CONFIG (no TensorFlow yet): the cluster and this process's place."""
    if devices not in (None, "all") and (not str(devices).isdigit() or int(devices) < 1):
        raise DistributeError(f"--devices {devices}: give a number of devices (1, 2, ...) or all")
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return Distribution(devices=devices)
    try:
        conf = json.loads(raw)
        workers = list(conf["cluster"]["worker"]) + list(conf["cluster"].get("chief", []))
        task = conf["task"]
        if task["type"] not in ("worker", "chief"):
            raise ValueError(f"task type {task['type']!r} (only chief and worker run training)")
        # With a "chief" entry it is worker 0; without, worker 0 is the chief (TensorFlow's rule).
        has_chief = bool(conf["cluster"].get("chief"))
        index = 0 if task["type"] == "chief" else int(task["index"]) + (1 if has_chief else 0)
    except (ValueError, KeyError, TypeError) as e:
        raise DistributeError(f"TF_CONFIG is not a cluster description this can use ({e}); see "
                              "docs/distributed.md") from None
    if devices not in (None, "1", "all"):
        raise DistributeError("with TF_CONFIG each worker trains on all of its devices; leave out --devices")
    return Distribution(devices=devices, workers=len(workers), worker_index=index, cluster=conf["cluster"])


def synchronise_batchnorm(model) -> int:
    """Make every batch-norm layer of the model compute its statistics over the global batch."""
    n = 0
    from .model import nested_layers  # noqa: PLC0415

    for layer in nested_layers(model):
        if layer.__class__.__name__ == "BatchNormalization":
            layer.synchronized = True
            n += 1
    return n


def trainer_class(dist: Distribution):
    """keras.Model, or under several workers a subclass that works around Keras 3's two
    multi-worker failures (module docstring)."""
    import keras  # noqa: PLC0415

    if not dist.multi_worker:
        return keras.Model
    import tensorflow as tf  # noqa: PLC0415

    strategy = dist.strategy

    def local(v):
        return strategy.experimental_local_results(v)[0] if isinstance(v, tf.distribute.DistributedValues) else v

    class MultiWorkerModel(keras.Model):
        def _maybe_symbolic_build(self, iterator=None, data_batch=None):
            # the build needs shapes and dtypes only: this worker's first batch has them
            if iterator is not None and data_batch is None:
                for _, _, it in iterator:
                    data_batch = tf.nest.map_structure(local, next(it))
                    break
            with self.distribute_strategy.scope():
                self._symbolic_build(data_batch=data_batch)

        # logs of rank 1, so that Keras' per-step MEAN over axis 0 across workers applies
        def train_step(self, data):
            return {k: tf.reshape(v, [1]) for k, v in super().train_step(data).items()}

        def test_step(self, data):
            return {k: tf.reshape(v, [1]) for k, v in super().test_step(data).items()}

    return MultiWorkerModel


def worker_folder(run, dist: Distribution):
    """A worker's own folder for its checkpoints (a worker other than the chief). A resumed run
    starts it from the chief's checkpoints (the run folder must be readable on every host)."""
    import atexit  # noqa: PLC0415
    import shutil  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    from .run import RunFolder  # noqa: PLC0415

    work = RunFolder(tempfile.mkdtemp(prefix=f"mri-edge-worker{dist.worker_index}-"))
    atexit.register(shutil.rmtree, work.path, True)  # also when training is interrupted
    for p in (run.best_path, run.checkpoint_path, run.trainer_state_path):
        if p.is_file():
            shutil.copy2(p, work.path / p.name)
    return work


def remove_worker_folder(work) -> None:
    import shutil  # noqa: PLC0415

    shutil.rmtree(work.path, ignore_errors=True)

