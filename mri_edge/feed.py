"""How training batches reach Keras' `fit`, and the class weights they carry.

`make_batches` is a keras PyDataset over the uint8 decoded cache, which any backend can train
from. `for_fit` hands it to `fit`. Under TensorFlow it goes as a tf.data pipeline that gathers
(and, with mixup or cutmix, blends) each batch from the cache inside the graph, unless a batch
needs Python (a teacher's answers). The reason is speed: Keras 3's TensorFlow adapter feeds a PyDataset through
`tf.data.Dataset.from_generator`, and any Python generator in the pipeline, even one that
yields only the indices, made each DenseNet121 step 1.3-2.6x as long on a 2-core CPU, with
half the CPU time spent in the kernel (`benchmarks/pipeline_throughput.py` measures both).
"""

from __future__ import annotations

import warnings

import numpy as np

from . import distill
from .config import TrainConfig
from .errors import MriEdgeError
from . import mixup as mixing


def make_batches(images: np.ndarray, labels: np.ndarray, num_classes: int, batch_size: int,
                 shuffle: bool, seed: int = 0, sample_weights: dict[int, float] | None = None,
                 shard: tuple[int, int] = (0, 1), mixup: float = 0.0, cutmix: float = 0.0, teacher=None,
                 distill_weight: float = 0.0, drop_last: bool = False):
    """A keras PyDataset over the uint8 cache: float32 raw pixels, one-hot labels; with
    mixup or cutmix > 0 each global batch blended with a permutation of itself (mixup.py);
    with a teacher, its probabilities on the (blended) batch mixed into the targets (distill.py).

    shard (k, n): worker k of n takes the k-th of n parts of each global batch (all shuffle with
    one seed), so the n parts make up the batch one device would see (distribute.py). drop_last
    leaves out the last partial batch (pretrain's contrastive loss wants full batches)."""
    import keras  # noqa: PLC0415

    if drop_last and len(images) < batch_size:
        raise ValueError(f"{len(images)} images make no full batch of {batch_size}")  # callers check it first
    blends = mixup > 0 or cutmix > 0

    class Batches(keras.utils.PyDataset):
        def __init__(self):
            # Two threads assemble the next batches while the current step runs.
            super().__init__(workers=2, use_multiprocessing=False, max_queue_size=8)
            self.eye, self.images, self.labels = np.eye(num_classes, dtype=np.float32), images, labels
            self.w = None if sample_weights is None else np.array([sample_weights[int(c)] for c in labels], np.float32)
            self.blends = blends
            self.needs_python = teacher is not None  # work a graph pipeline cannot do
            self.on_epoch = None  # for_fit's pipeline: called after each new order
            self.set_epoch(0)

        def set_epoch(self, epoch: int) -> None:
            """The order of an epoch depends on (seed, epoch) alone: the same on every worker, after a
            resume, and however often Keras restarts an iteration (tf.distribute reads a first batch and
            starts over). Set by callbacks.EpochOrder before each epoch."""
            self.order, self.epoch = np.arange(len(images)), epoch
            if shuffle:
                np.random.default_rng([seed, epoch]).shuffle(self.order)
            if self.on_epoch:
                self.on_epoch()

        def __len__(self):
            return len(images) // batch_size if drop_last else int(np.ceil(len(images) / batch_size))

        def indices(self, i):
            """(this worker's images of batch i, their blending partners, the mixing weight, the cutmix box)."""
            idx = self.order[i * batch_size : (i + 1) * batch_size]
            other, lam, box = (mixing.plan(idx, mixup, cutmix, (seed, self.epoch, i), images.shape[1:3])
                               if blends else (idx, 1.0, None))
            if shard[1] > 1:  # the same cut of both: the workers' parts make up the one-device batch
                idx, other = (np.array_split(v, shard[1])[shard[0]] for v in (idx, other))
            return idx, other, lam, box

        def __getitem__(self, i):
            idx, other, lam, box = self.indices(i)
            x, y = images[idx].astype(np.float32), self.eye[labels[idx]]
            w = None if self.w is None else self.w[idx]
            if blends:
                x, y = mixing.blend(x, images[other], lam, box), lam * y + (1 - lam) * self.eye[labels[other]]
                w = None if w is None else lam * w + (1 - lam) * self.w[other]
            y = y if teacher is None else distill.targets(y, teacher(x), distill_weight)
            return (x, y) if w is None else (x, y, w)

    return Batches()


def for_fit(batches, dist=None):
    """The batches as Keras' fit should get them. Other backends: as they are. TensorFlow: a
    tf.data pipeline, which also restarts from the epoch's first batch each time Keras iterates.

    Keras 3's PyDataset adapter does not restart: under tf.distribute its symbolic build reads
    a first batch, and the threads that assemble batches carry on from there, so an epoch ran
    its batches rotated by one or two places, depending on thread timing (measured: 1, 2, 0
    with one replica, 2, 0, 1 with two).

    One host: each element is a global batch, which the strategy splits over the replicas.
    Several workers: each worker already holds its part of every global batch
    (`make_batches(shard=...)`); `experimental_distribute_dataset` would take that part for a
    global batch and split it again (each step then saw half the batch), so the pipeline goes
    through `distribute_datasets_from_function`, whose elements are per-replica batches: the
    worker's part, cut into one piece per local replica.

    Call it outside the strategy's scope (the graph pipeline's variables are this process's
    own); one pipeline at a time follows the batches' epoch order."""
    import keras  # noqa: PLC0415

    strategy = dist.strategy if dist is not None else None
    if keras.backend.backend() != "tensorflow" or (strategy is None and batches.needs_python):
        return batches
    import tensorflow as tf  # noqa: PLC0415

    multi = bool(dist is not None and dist.multi_worker)
    local = dist.replicas // dist.workers if multi else 1
    ds = _from_generator(batches, local) if batches.needs_python else _in_graph(batches, local)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    ds = ds.with_options(options)
    return strategy.distribute_datasets_from_function(lambda _: ds) if multi else ds


def _epoch_plan(batches, local: int) -> dict[str, np.ndarray]:
    """The epoch's per-replica pieces as arrays: the images (`own`) and their blending partners
    (`other`) end to end, and per piece the weight of its own image and label (`lam`, `keep` = 1 -
    lam, each rounded to float32 from float64 as numpy rounds them in `mixup.blend`), whether it
    pastes a CutMix box instead of blending whole images (`cut`), and the box. `mixup.plan` draws them once
    per global batch, in Python, so the graph blends exactly as the PyDataset does."""
    rows = []
    for i in range(len(batches)):
        idx, other, lam, box = batches.indices(i)
        for own, partner in zip(np.array_split(idx, local), np.array_split(other, local)):
            rows.append((own, partner, lam, box))
    return {"own": np.concatenate([r[0] for r in rows]), "other": np.concatenate([r[1] for r in rows]),
            "lam": np.float32([r[2] for r in rows]), "keep": np.float32([1.0 - r[2] for r in rows]),
            "cut": np.array([r[3] is not None for r in rows]),
            "box": np.int32([r[3] or (0, 0, 0, 0) for r in rows]), "sizes": np.array([len(r[0]) for r in rows])}


def _in_graph(batches, local: int):
    """Each element gathered from the cache, and blended, in the graph: the epoch's plan lives
    in variables that `set_epoch` refreshes, so Python runs once per epoch instead of once per
    batch. The cache itself never changes: a constant."""
    import tensorflow as tf  # noqa: PLC0415

    first = _epoch_plan(batches, local)
    # sizes depend on the batch sizes alone, never on the order: the same in every epoch
    ends = np.cumsum(first.pop("sizes"))
    starts = np.concatenate([[0], ends[:-1]])
    with tf.device("/cpu:0"):
        plan = {k: tf.Variable(v, trainable=False) for k, v in first.items() if batches.blends or k == "own"}
        images = tf.constant(batches.images)
        targets = tf.constant(batches.eye[batches.labels])
        weights = None if batches.w is None else tf.constant(batches.w)
        height, width = batches.images.shape[1:3]
        rows, cols = tf.range(height)[:, None], tf.range(width)[None, :]  # the CutMix box's grid

    def refresh():
        new = _epoch_plan(batches, local)
        for k, v in plan.items():
            v.assign(new[k])

    batches.on_epoch = refresh

    def element(piece, start, end):
        idx = plan["own"][start:end]
        x, y = tf.cast(tf.gather(images, idx), tf.float32), tf.gather(targets, idx)
        w = None if weights is None else tf.gather(weights, idx)
        if batches.blends:
            other, lam, keep = plan["other"][start:end], plan["lam"][piece], plan["keep"][piece]
            cut, (y0, y1, x0, x1) = plan["cut"][piece], tf.unstack(plan["box"][piece])
            xo = tf.cast(tf.gather(images, other), tf.float32)
            inside = ((rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1))[None, :, :, None]
            mixed = lam * x + keep * xo
            x = tf.where(cut, tf.where(inside, xo, x), mixed)
            y = lam * y + keep * tf.gather(targets, other)
            w = None if w is None else lam * w + keep * tf.gather(weights, other)
        return (x, y) if w is None else (x, y, w)

    return tf.data.Dataset.from_tensor_slices((np.arange(len(starts)), starts, ends)).map(element).prefetch(2)


def _from_generator(batches, local: int):
    """The PyDataset's batches (Python per batch), cut into one piece per local replica."""
    import tensorflow as tf  # noqa: PLC0415

    spec = tuple(tf.TensorSpec((None, *np.shape(a)[1:]), tf.float32) for a in batches[0])

    def generate():
        for i in range(len(batches)):
            pieces = [np.array_split(a, local) for a in batches[i]]
            for j in range(local):
                yield tuple(p[j] for p in pieces)

    # Keras cannot count the batches of such a pipeline and says so once, harmlessly, when the
    # first epoch ends ("Your input ran out of data")
    warnings.filterwarnings("ignore", message="Your input ran out of data")
    return tf.data.Dataset.from_generator(generate, output_signature=spec)


CLASS_WEIGHT_MODES = TrainConfig.__dataclass_fields__["class_weight"].metadata["choices"]  # --class-weight


def class_weights(labels: np.ndarray, num_classes: int, mode: str = "balanced") -> dict[int, float]:
    """Class weights from scikit-learn's balanced weights (classes absent from labels get 1.0).

    "sqrt" takes their square root: with a 49:1 imbalance (Alzheimer: 2304 no-dementia,
    47 moderate training images) balanced weights put ~25x on each moderate image, so
    one image dominates the gradient of most batches. "none" weighs every image alike.
    """
    from sklearn.utils.class_weight import compute_class_weight  # noqa: PLC0415

    if mode not in CLASS_WEIGHT_MODES:
        raise MriEdgeError(f"class weights must be one of {', '.join(CLASS_WEIGHT_MODES)}, got {mode!r}")
    present = np.unique(labels)
    w = compute_class_weight("balanced", classes=present, y=labels)
    if mode == "sqrt":
        w = np.sqrt(w)
    elif mode == "none":
        w = np.ones_like(w)
    out = {i: 1.0 for i in range(num_classes)}
    out.update({int(c): float(x) for c, x in zip(present, w)})
    return out
