"""Self-supervised pretraining of the backbone on a dataset's own training images
(`mri-edge pretrain`), for when no ImageNet weights can be had: a later `train --weights
FOLDER/encoder.keras` starts from features of these slices instead of from scratch or from
another dataset's model.

SimCLR (Chen et al. 2020): each image gives two random views (affine crop and zoom, flip,
brightness and contrast), the backbone and a small projection head embed both, and the NT-Xent
loss pulls the two views of an image together against the other 2N - 2 views of the batch. No
label is read while training. A k-nearest-neighbour probe on the backbone's pooled features,
before training and after each epoch, says whether the features got better for the held-out
images: the training split's labels vote for each held-out image (labels judge, they do not
train). Batch-norm statistics are re-estimated on the clean training images before each probe
(AdaBN, as `train` does with a weights file), so the probe sees what `train` will start from,
not statistics of augmented views or of the starting model's data.

Only the training split is trained on. Validation is carved exactly as `train` carves it with the
same --val-split, --val-fraction, --seed and --group-threshold; those images are only probed, and
the test split is never decoded: the held-out rule can then still judge the runs that start from
this encoder (tuning pretraining by the probe is itself a choice made on that split).
split_manifest.json lists the images fitted, and `train` warns when its own validation or test
images are among them.

The pretrain folder: config.json, split_manifest.json (training split only), encoder.keras
(normalisation, DenseNet121, pooling, projection), history.csv, pretrain.json, pretrain.md and
pretrain_curves.png.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from . import data, feed, report
from .config import PretrainConfig
from .errors import MriEdgeError
from .progress import Heartbeat
from .run import RunFolder

OUTPUTS = ("config.json", "split_manifest.json", "encoder.keras", "history.csv", "pretrain.json", "pretrain.md",
           "pretrain_curves.png")
PROBE_K = 10


class PretrainError(MriEdgeError, ValueError):
    """Pretraining cannot start with these inputs."""


def nt_xent(z1, z2, temperature: float):
    """NT-Xent of paired embeddings (N, d) each, one value per view (2N,): minus the log-softmax,
    over the other 2N - 1 views, of each view's similarity to its pair (cosine / temperature)."""
    import keras  # noqa: PLC0415

    ops = keras.ops

    def unit(v):
        return v / ops.sqrt(ops.sum(v * v, axis=-1, keepdims=True) + 1e-12)

    z1, z2 = unit(z1), unit(z2)
    z = ops.concatenate([z1, z2], axis=0)
    sim = ops.matmul(z, ops.transpose(z)) / temperature
    n2 = ops.shape(z)[0]
    sim = sim - 1e9 * ops.eye(n2, dtype=sim.dtype)  # a view is not its own pair
    pos = ops.sum(z1 * z2, axis=-1) / temperature
    return ops.logsumexp(sim, axis=1) - ops.concatenate([pos, pos], axis=0)


def contrastive_loss(temperature: float):
    """A Keras loss over the model's (N, 2d) output: both views' projections side by side."""
    import keras  # noqa: PLC0415

    def loss(y_true, y_pred):
        z1, z2 = keras.ops.split(y_pred, 2, axis=-1)
        return keras.ops.mean(nt_xent(z1, z2, temperature))

    return loss


def knn_accuracy(train_f: np.ndarray, train_y: np.ndarray, held_f: np.ndarray, held_y: np.ndarray,
                 k: int = PROBE_K) -> dict:
    """Cosine 1-NN and k-NN (similarity-weighted vote) accuracy of held-out features against the
    training split's."""
    def unit(v):
        return v / (np.linalg.norm(v, axis=1, keepdims=True) + 1e-12)

    sim = unit(held_f.astype(np.float32)) @ unit(train_f.astype(np.float32)).T
    n = min(k, sim.shape[1])  # the key keeps the k asked for: callers read it
    top = np.argpartition(-sim, n - 1, axis=1)[:, :n]
    votes = np.zeros((len(held_f), int(max(train_y.max(), held_y.max())) + 1))
    for j in range(n):
        np.add.at(votes, (np.arange(len(held_f)), train_y[top[:, j]]), sim[np.arange(len(held_f)), top[:, j]])
    nn1 = train_y[sim.argmax(1)]
    return {"nn1": float((nn1 == held_y).mean()), f"knn{k}": float((votes.argmax(1) == held_y).mean())}


def _views(seed: int):
    """The random view of a batch: one affine resample (crop and zoom, rotation, shear, flip,
    always on) and a brightness and contrast change per image; training only."""
    import keras  # noqa: PLC0415

    from .augment import augmentation  # noqa: PLC0415

    ops = keras.ops
    affine = augmentation(seed, rotation=20.0, shift=0.15, zoom=0.35, shear=0.15, flip=True, p=1.0)

    class Jitter(keras.layers.Layer):
        def __init__(self):
            super().__init__(name="jitter")
            self.gen = keras.random.SeedGenerator(seed + 1)

        def call(self, x, training=None):
            if not training:
                return x
            n = ops.shape(x)[0]
            contrast = keras.random.uniform((n, 1, 1, 1), 0.6, 1.4, seed=self.gen)
            bright = keras.random.uniform((n, 1, 1, 1), -40.0, 40.0, seed=self.gen)
            mean = ops.mean(x, axis=(1, 2, 3), keepdims=True)
            return ops.clip((x - mean) * contrast + mean + bright, 0.0, 255.0)

    return affine, Jitter()


def build(image_size: int, weights: str, projection_dim: int, seed: int):
    """(encoder: pixels -> projection, with the backbone as the layer `train --weights` reads;
    features: pixels -> pooled backbone features; the two-view training model)."""
    import keras  # noqa: PLC0415

    from .model import backbone, normalization  # noqa: PLC0415

    keras.utils.set_random_seed(seed)
    L, ops = keras.layers, keras.ops
    inputs = keras.Input((image_size, image_size, 3), name="image")
    pooled = L.GlobalAveragePooling2D(name="avg_pool")(backbone(image_size, weights)(normalization()(inputs)))
    x = L.Dense(512, activation="relu", name="projection_hidden")(pooled)
    out = L.Dense(projection_dim, name="projection", dtype="float32")(x)
    encoder = keras.Model(inputs, out, name="mri_edge_simclr_encoder")
    features = keras.Model(inputs, pooled, name="mri_edge_features")
    affine, jitter = _views(seed)

    class TwoViews(keras.Model):
        """Both views of each image through the encoder as one batch; out: the two projections side by side."""

        def __init__(self):
            super().__init__(name="simclr")
            self.encoder, self.affine, self.jitter = encoder, affine, jitter

        def call(self, x, training=False):
            n = ops.shape(x)[0]
            views = [self.jitter(self.affine(x, training=training), training=training) for _ in range(2)]
            e = self.encoder(ops.concatenate(views, axis=0), training=training)
            return ops.concatenate([e[:n], e[n:]], axis=-1)

    return encoder, features, TwoViews()


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise PretrainError(f"--out {out} is a file, not a folder")
    folder = RunFolder(out)
    if folder.encoder_path.exists():
        raise PretrainError(f"{out} already holds a pretrained encoder; choose another --out")
    if any(p.exists() for p in (folder.model_path, folder.state_path, folder.checkpoint_path)):
        raise PretrainError(f"{out} is a training run folder (its config and split manifest would be overwritten); "
                            "choose another --out")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in OUTPUTS) if out.is_dir() else []
    if foreign and not force:
        raise PretrainError(f"--out {out} is not empty (it holds {', '.join(foreign[:5])}); choose a new folder "
                            "or pass --force")


def pretrain(cfg: PretrainConfig, log=print, force: bool = False) -> dict:
    """Pretrain, write the pretrain folder and return pretrain.json's content."""
    t0 = time.time()
    out = Path(cfg.out)
    _check_out(out, force)
    data.check_outside(cfg.data_dir, out)
    from .distill import weights_seen  # noqa: PLC0415
    from .quiet import import_tensorflow  # noqa: PLC0415
    from .data import limit_split  # noqa: PLC0415
    from .evaluate import predict_arrays  # noqa: PLC0415
    from .train import versions  # noqa: PLC0415

    from .model import base_of, check_weights  # noqa: PLC0415

    check_weights(cfg.weights)
    dataset = data.discover(cfg.data_dir, cfg.task, cfg.val_fraction, cfg.seed, cfg.val_split, cfg.group_threshold,
                            cfg.weights)
    notes = weights_seen(cfg.weights, dataset.manifest())  # a start fitted on the held-out images flatters the probe
    for n in notes:
        log(n)
    dataset.splits = {k: limit_split(s, cfg.limit_per_class, cfg.seed) for k, s in dataset.splits.items()}
    cache = Path(cfg.cache_dir) if cfg.cache_dir else None
    train = data.decode_split(dataset.splits["train"], cfg.image_size, cache)
    held = data.decode_split(dataset.splits["val"], cfg.image_size, cache)
    if len(train.images) < 2 * cfg.batch_size:
        raise PretrainError(f"{len(train.images)} training images: fewer than two batches of {cfg.batch_size}; "
                            "lower --batch-size")
    import_tensorflow()
    import keras  # noqa: PLC0415

    from .callbacks import EpochOrder, EpochProgress  # noqa: PLC0415
    from .model import adapt_batchnorm  # noqa: PLC0415
    from .schedule import PhaseClock, lr_at  # noqa: PLC0415

    with Heartbeat(f"building DenseNet121 ({cfg.image_size} px, weights {cfg.weights})", every=10):
        encoder, features, model = build(cfg.image_size, cfg.weights, cfg.projection_dim, cfg.seed)
    for layer in base_of(encoder).layers:
        if layer.__class__.__name__ == "BatchNormalization":
            layer.momentum = 0.9  # as train's from-scratch phases: statistics that keep up with moving weights

    def probe(label: str) -> dict:
        adapt_batchnorm(features, train.images)  # the statistics train starts from (it re-estimates them too)
        f_train = predict_arrays(features, train.images, label=f"probe: {label} (training split)")
        f_held = predict_arrays(features, held.images, label=f"probe: {label} (held-out split)")
        return knn_accuracy(f_train, train.labels, f_held, held.labels)

    out.mkdir(parents=True, exist_ok=True)
    manifest = dataset.manifest()
    # what was fitted; the held-out images, only probed, apart (a train run from encoder.keras keeps them out)
    manifest["splits"], manifest["held_out"] = {"train": manifest["splits"]["train"]}, manifest["splits"]["val"]
    report.write_json(RunFolder(out).manifest_path, manifest)
    report.write_json(RunFolder(out).config_path, {**asdict(cfg), "kind": "pretrain", "versions": versions()})
    history = [{"epoch": 0, "loss": None, **probe("before")}]
    log(f"k-NN probe before: held-out 1-NN {history[0]['nn1']:.2%}, {PROBE_K}-NN {history[0][f'knn{PROBE_K}']:.2%}")
    clock = PhaseClock(cfg.time_budget_s)

    class Epochs(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            clock.epoch_started()
            model.optimizer.learning_rate = lr_at(epoch, cfg.epochs, cfg.lr, cfg.warmup_epochs, clock.progress())

        def on_epoch_end(self, epoch, logs=None):
            row = {"epoch": epoch + 1, "loss": float((logs or {}).get("loss", np.nan)),
                   "lr": float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)), **probe(f"epoch {epoch + 1}")}
            history.append(row)
            log(f"epoch {epoch + 1}: contrastive loss {row['loss']:.4f}; k-NN probe on held-out: 1-NN "
                f"{row['nn1']:.2%}, {PROBE_K}-NN {row[f'knn{PROBE_K}']:.2%}")
            if clock.epoch_ended() and epoch + 1 < cfg.epochs:
                log(f"time budget of {cfg.time_budget_s:.0f} s reached after epoch {epoch + 1}")
                model.stop_training = True

    model.compile(optimizer=keras.optimizers.Adam(cfg.lr), loss=contrastive_loss(cfg.temperature),
                  run_eagerly=cfg.eager, jit_compile=False)  # as train: XLA costs more than it saves here
    # full batches in a new order each epoch; no label goes in: every target is one dummy class
    batches = feed.make_batches(train.images, np.zeros(len(train.images), int), 1, cfg.batch_size, shuffle=True,
                                seed=cfg.seed, drop_last=True)
    model.fit(feed.for_fit(batches), epochs=cfg.epochs, verbose=0, shuffle=False,  # batches keep their own order
              callbacks=[EpochOrder(batches), Epochs(), keras.callbacks.TerminateOnNaN(),
                         EpochProgress("pretrain", cfg.epochs, len(batches), log, traced=cfg.eager)])
    if not all(np.isfinite(r["loss"]) for r in history[1:]):
        raise PretrainError(f"the contrastive loss diverged (not finite) in epoch {len(history) - 1}; no encoder "
                            "saved: lower --lr or raise --temperature")
    from .model import save_model  # noqa: PLC0415

    save_model(encoder, RunFolder(out).encoder_path)
    result = {"images": len(train.images), "held_out_images": len(held.images), "epochs": len(history) - 1,
              "notes": notes,
              "wall_s": time.time() - t0, "raw_pixel_probe": dataset.val_split.get("probe"),
              "before": history[0], "after": history[-1], "history": history}
    write_reports(out, cfg, result)
    log(f"k-NN probe after {result['epochs']} epochs: held-out 1-NN {history[-1]['nn1']:.2%}, "
        f"{PROBE_K}-NN {history[-1][f'knn{PROBE_K}']:.2%}; wall time {result['wall_s']:.0f} s")
    return result


def train_options(cfg: PretrainConfig) -> str:
    """The train options for the encoder: its input size (train from encoder.keras keeps this carve, data.kept_carve)."""
    return f"--image-size {cfg.image_size}"


def write_reports(out: Path, cfg: PretrainConfig, result: dict) -> None:
    """pretrain.json, history.csv, pretrain.md and pretrain_curves.png."""
    report.write_json(out / "pretrain.json", result)
    rows = result["history"]
    report.write_csv(RunFolder(out).history_path, rows, list(rows[-1]))
    plt = report._plt()  # noqa: SLF001
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot([r["epoch"] for r in rows[1:]], [r["loss"] for r in rows[1:]], "o-")
    a.set(xlabel="epoch", title="contrastive loss (NT-Xent)")
    for ax in (a, b):
        ax.xaxis.get_major_locator().set_params(integer=True)
    for key in ("nn1", f"knn{PROBE_K}"):
        b.plot([r["epoch"] for r in rows], [r[key] for r in rows], "o-", label=key)
    b.set(xlabel="epoch (0: before)", title="k-NN probe, held-out accuracy")
    b.legend()
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    report.save_figure(fig, out / "pretrain_curves.png")
    k = f"knn{PROBE_K}"
    raw = result.get("raw_pixel_probe") or {}
    table = report.md_table(["epoch", "contrastive loss", "held-out 1-NN", f"held-out {PROBE_K}-NN"],
                            [[r["epoch"], "-" if r["epoch"] == 0 else f"{r['loss']:.4f}", f"{r['nn1']:.2%}",
                              f"{r[k]:.2%}"] for r in rows])
    lines = ["# Self-supervised pretraining", "",
             f"SimCLR on {result['images']} training images of `{cfg.data_dir}` ({cfg.image_size} px, batch "
             f"{cfg.batch_size}, temperature {cfg.temperature}), starting from `{cfg.weights}`; "
             f"{result['epochs']} epochs in {result['wall_s']:.0f} s. The {result['held_out_images']} held-out images "
             f"(`--val-split {cfg.val_split}`) were only probed, never trained on; the test split was not decoded.",
             *[f"**{n}**" for n in result.get("notes", [])], "",
             "The probe: each held-out image gets the label of its most similar training image (1-NN) or a "
             f"similarity-weighted vote of the {PROBE_K} most similar (cosine of the pooled backbone features).",
             *([f"A raw-pixel 1-NN over all training thumbnails gets {raw['nn_accuracy']:.2%} of the carve's "
                f"{raw.get('n', '?')} held-out images (measured when the split was carved, before any "
                "--limit-per-class)."]
               if raw.get("nn_accuracy") is not None else []), "",
             table, "", "![curves](pretrain_curves.png)", "",
             f"Next: `mri-edge train ... --weights {RunFolder(out).encoder_path} {train_options(cfg)}` (it keeps the carve "
             "of this pretraining, so that its held-out images stay untrained on).", ""]
    report.write_text(out / "pretrain.md", "\n".join(lines))
