"""DenseNet121 transfer-learning model with the normalisation inside the graph."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .config import TrainConfig
from .errors import MriEdgeError, first_line
from .preprocess import IMAGENET_MEAN, IMAGENET_STD

BASE_NAME = "densenet121"
NORM_NAME = "imagenet_normalization"
DROP_PATH = "_drop_path"  # name suffix of --drop-path's Dropout layers inside the backbone


class WeightsError(MriEdgeError):
    """Backbone weights could not be obtained or do not fit."""


class ModelError(MriEdgeError, ValueError):
    """A model file that cannot be loaded, or a layer choice the model does not have."""


# --unfreeze: all, N top base layers, or the start of DenseNet121 layer names (conv5, conv4_block16,
# pool4, bn); set_phase checks the names against the built model, this the form before any work.
UNFREEZE_FORM = re.compile(r"all|0*[1-9]\d*|(conv|pool|zero_padding2d)\w*|bn|relu")


def check_unfreeze(unfreeze: str) -> None:
    if not UNFREEZE_FORM.fullmatch(str(unfreeze)):
        raise ModelError(f"--unfreeze {unfreeze}: expected all, a number N >= 1 of top base layers, or the start "
                         "of DenseNet121 layer names (conv5, conv4_block16)")


def _keras():
    import keras  # noqa: PLC0415

    return keras


def check_weights(weights: str) -> None:
    """A --weights value that can be built from: none, imagenet or an existing file (checked before any
    data is read or anything written; whether the file holds a DenseNet121 shows when it is loaded)."""
    if weights not in ("none", "imagenet") and not Path(weights).is_file():
        raise WeightsError(f"--weights {weights}: no such file (use imagenet, none or a weights file path)")


def backbone(image_size: int, weights: str):
    """DenseNet121 without its top: from scratch, ImageNet's, a weights file's, or the backbone
    (the layer named densenet121) of an mri-edge .keras file: a run's model or a pretrain encoder."""
    keras = _keras()
    shape = (image_size, image_size, 3)
    if weights == "none":
        return keras.applications.DenseNet121(include_top=False, weights=None, input_shape=shape)
    if weights == "imagenet":
        import contextlib  # noqa: PLC0415
        import io  # noqa: PLC0415

        from .quiet import verbose  # noqa: PLC0415

        # Keras announces a download on stdout before it fails; the error below names the URL. A
        # download that works is silent too (29 MB, once: Keras caches it); --verbose shows its bar
        hush = contextlib.nullcontext() if verbose() else contextlib.redirect_stdout(io.StringIO())
        try:
            with hush:
                return keras.applications.DenseNet121(include_top=False, weights="imagenet", input_shape=shape)
        except Exception as e:  # urllib, socket and HTTP errors all mean "no download"
            raise WeightsError(
                f"could not download ImageNet weights ({type(e).__name__}: {first_line(e)}); pass --weights PATH "
                "(a DenseNet121 no-top .h5/.weights.h5 file or an mri-edge model.keras) or --weights none"
            ) from None
    check_weights(weights)
    path = Path(weights)
    import zipfile  # noqa: PLC0415

    if path.suffix == ".keras" and not zipfile.is_zipfile(path):  # Keras would say "File not found"
        raise WeightsError(f"--weights {weights}: not a .keras model file (not a zip archive)")
    base = keras.applications.DenseNet121(include_top=False, weights=None, input_shape=shape)
    try:
        if path.suffix == ".keras":
            # An earlier mri-edge run: reuse its trained DenseNet121 backbone.
            donor = load_model(path)
            donor_base = donor.get_layer(BASE_NAME)
            base.set_weights(donor_base.get_weights())
        else:
            base.load_weights(path, skip_mismatch=False)
    except Exception as e:
        raise WeightsError(f"--weights {weights}: not DenseNet121 backbone weights ({type(e).__name__}: {e})") from None
    return base


def with_stochastic_depth(base, rate: float):
    """The backbone with each dense layer's new feature maps dropped per image while training
    (stochastic depth, Huang et al. 2016: a dense layer's output is its residual branch), at a
    rate rising linearly with depth to `rate`. Dropout layers with one draw per image do it, so
    inference and every export are the plain DenseNet121."""
    keras = _keras()
    convs = [layer.name for layer in base.layers if layer.name.endswith("_2_conv") and "_block" in layer.name]
    rates = {name: rate * (i + 1) / len(convs) for i, name in enumerate(convs)}

    def call(layer, *args, **kwargs):
        out = layer(*args, **kwargs)
        if layer.name not in rates:
            return out
        drop = keras.layers.Dropout(rates[layer.name], noise_shape=(None, 1, 1, 1),
                                    name=layer.name.replace("_2_conv", DROP_PATH))
        return drop(out)

    deep = keras.models.clone_model(base, call_function=call)
    deep.set_weights(base.get_weights())  # no weights added: the donor's list fits as it is
    return deep


def normalization():
    """Raw 0-255 pixels to DenseNet's ImageNet mean/std: the first layer of every mri-edge model."""
    mean = [m * 255.0 for m in IMAGENET_MEAN]
    var = [(s * 255.0) ** 2 for s in IMAGENET_STD]
    return _keras().layers.Normalization(mean=mean, variance=var, name=NORM_NAME)


def build_model(num_classes: int, image_size: int = TrainConfig.image_size, weights: str = TrainConfig.weights,
                dense_units: int = TrainConfig.dense_units, dropout: float = TrainConfig.dropout,
                seed: int = TrainConfig.seed, drop_path: float = TrainConfig.drop_path):
    """Raw 0-255 RGB in, class probabilities out.

    Normalisation (DenseNet's ImageNet mean/std) is a layer of the model, so the
    saved model and every export share one preprocessing contract.
    """
    keras = _keras()
    keras.utils.set_random_seed(seed)
    L = keras.layers
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = normalization()(inputs)
    base = backbone(image_size, weights)
    if drop_path:
        base = with_stochastic_depth(base, drop_path)
    x = base(x)
    x = L.GlobalAveragePooling2D(name="avg_pool")(x)
    x = L.Dense(dense_units, activation="relu", name="head_dense")(x)
    x = L.Dropout(dropout, name="head_dropout")(x)
    outputs = L.Dense(num_classes, activation="softmax", name="probabilities", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="mri_edge_densenet121")


def base_of(model):
    return model.get_layer(BASE_NAME)


def objective(lr: float, weight_decay: float = 0.0, label_smoothing: float = 0.0, select_by: str = "loss",
              ema: float = 0.0) -> dict:
    """compile() arguments of a training phase: Adam, or AdamW with decoupled weight decay (either
    keeping a moving average of the weights with momentum `ema` > 0), cross-entropy on the
    (optionally smoothed) one-hot targets, and the metrics: accuracy, and macro-F1 when it
    selects the kept epoch (named macro_f1: history's val_macro_f1)."""
    import keras  # noqa: PLC0415

    averaging = {"use_ema": True, "ema_momentum": ema} if ema else {}
    opt = (keras.optimizers.AdamW(lr, weight_decay=weight_decay, **averaging) if weight_decay
           else keras.optimizers.Adam(lr, **averaging))
    metrics = ["accuracy"]
    if select_by == "macro_f1":
        metrics.append(keras.metrics.F1Score(average="macro", name="macro_f1"))
    return {"optimizer": opt, "loss": keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing),
            "metrics": metrics}


def unfreeze_cut(model, unfreeze: str) -> tuple[list, int]:
    """(the base's own layers, the index of the first one that `--unfreeze` trains); a name
    that matches no layer is a ModelError, which train raises once the model is built, before
    the images are decoded."""
    # --drop-path's Dropout layers hold no weights: "the top N layers" counts DenseNet121's own.
    layers = [layer for layer in base_of(model).layers if not layer.name.endswith(DROP_PATH)]
    if unfreeze == "all":
        return layers, 0
    if str(unfreeze).isdigit():
        if int(unfreeze) < 1:
            raise ModelError("--unfreeze N needs N >= 1")
        return layers, max(0, len(layers) - int(unfreeze))
    idx = [i for i, layer in enumerate(layers) if layer.name.startswith(str(unfreeze))]
    if not idx:
        raise ModelError(f"--unfreeze {unfreeze!r} matches no DenseNet121 layer (try conv5, conv4_block16, a number or all)")
    return layers, idx[0]


def set_phase(model, phase: str, unfreeze: str = TrainConfig.unfreeze, freeze_bn: bool = True, bn_momentum: float = 0.9) -> int:
    """Set trainable flags for a phase; returns the number of trainable base layers.

    phase "head": the whole base is frozen.
    phase "finetune": `unfreeze` is "all", a number N (the top N base layers) or a
    DenseNet block prefix such as "conv5" or "conv4_block16" (that block and above).
    With pretrained weights, batch-norm layers stay frozen (inference mode) so the
    small fine-tuning batches do not wreck their ImageNet statistics. Batch-norm
    layers that do train get momentum `bn_momentum`: with Keras' default 0.99 the
    moving statistics of a fast-changing from-scratch network lag ~100 steps behind
    its weights, and validation accuracy swung wildly (measured here on the tumor
    set at 64 px: 49% with the lagging statistics, 84% after re-estimating them).
    """
    base = base_of(model)
    if phase == "head":
        base.trainable = False
        return 0
    base.trainable = True
    layers, cut = unfreeze_cut(model, unfreeze)
    count = 0
    for i, layer in enumerate(layers):
        trainable = i >= cut
        if layer.__class__.__name__ == "BatchNormalization":
            if freeze_bn:
                trainable = False
            else:
                layer.momentum = bn_momentum
        layer.trainable = trainable
        count += int(trainable and bool(layer.weights))
    return count


def adapt_batchnorm(model, images, batch_size: int = 64, max_batches: int = 40, training_only: bool = False) -> int:
    """Re-estimate every batch-norm layer's moving statistics on new-domain images (AdaBN), or
    with `training_only` those of the layers that train (for averaged weights, --ema).

    A backbone trained on one dataset carries that dataset's activation statistics; on
    another (tumor -> Alzheimer slices) the frozen statistics are off and the frozen
    features degrade. Running the model in training mode with momentum k/(k+1) at batch k
    makes the moving mean/variance the plain average over the batches. No weight changes.
    Returns the number of images used.
    """
    import numpy as np  # noqa: PLC0415

    bns = [layer for layer in base_of(model).layers if layer.__class__.__name__ == "BatchNormalization"
           and (layer.trainable or not training_only)]
    if not bns:
        return 0
    drops = [layer for layer in base_of(model).layers if layer.name.endswith(DROP_PATH)]
    saved, rates = [(b.momentum, b.trainable) for b in bns], [d.rate for d in drops]
    order = np.random.default_rng(0).permutation(len(images))
    n_batches = min(max_batches, max(1, len(images) // batch_size))
    try:
        for b in bns:
            if not b.trainable:
                b.trainable = True  # a frozen BN layer runs in inference mode and would not update
        for d in drops:  # stochastic depth (--drop-path) off: the statistics are those inference sees
            d.rate = 0.0
        with no_grad():
            for k in range(n_batches):
                for b in bns:
                    b.momentum = k / (k + 1)
                idx = order[k * batch_size : (k + 1) * batch_size]
                base_of(model)(model.get_layer(NORM_NAME)(images[idx].astype("float32")), training=True)
    finally:
        for b, (m, t) in zip(bns, saved):
            b.momentum, b.trainable = m, t
        for d, r in zip(drops, rates):
            d.rate = r
    return int(n_batches * batch_size)


def no_grad():
    """No autograd graph for forward-only passes in training mode.

    TensorFlow and JAX record nothing outside a tape/grad; torch records every op whose
    weights require gradients. Measured on an 80 GB H100: AdaBN's 40 batches at 176 px
    kept 59 GB of activations alive (out of memory), and a bare inference call of
    DenseNet121 at 224 px held 26 GB at batch 8 and ran out of memory at batch 32.
    """
    import contextlib  # noqa: PLC0415

    if _keras().backend.backend() == "torch":
        import torch  # noqa: PLC0415

        return torch.no_grad()
    return contextlib.nullcontext()


def nested_layers(net):
    """Every layer inside `net`, nested models and sublayers walked depth-first (Keras's own
    walk, which has no public name)."""
    return net._flatten_layers(include_self=False, recursive=True)  # noqa: SLF001


def load_model(path):
    """Load an mri-edge model.keras safely (no arbitrary code from lambda layers). A missing,
    damaged, truncated or renamed file is a one-line error (Keras itself says "File not found" for a
    file that is there but not a whole archive)."""
    from .integrity import check_kind  # noqa: PLC0415

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    check_kind(path)  # empty, renamed or not a zip archive: said so
    keras = _keras()
    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as e:
        raise ModelError(f"{path}: cannot be loaded as a Keras model ({type(e).__name__}: {first_line(e)})") from None


def save_model(model, path, *copies) -> None:
    """model.save to `path` atomically: a reader never sees half a file. `copies` get the same
    file by copying it (serialising DenseNet121 takes about 3 s on 2 cores, copying it none)."""
    from .files import atomic_copy, atomic_path  # noqa: PLC0415

    with atomic_path(path, suffix=".keras") as tmp:  # Keras insists on the extension
        model.save(tmp)
    for other in copies:
        atomic_copy(path, other)


def round_kernels_fp16(model) -> int:
    """Round every kernel (weights of rank 2 and more: convolutions, dense layers) to the
    nearest float16 value, in place; returns how many values changed. Vectors (biases,
    batch-norm scales and statistics, the normalisation layer) keep float32."""
    changed = 0
    for w in model.weights:
        if len(w.shape) < 2:
            continue
        v = np.asarray(w.numpy() if hasattr(w, "numpy") else w, np.float32)
        r = v.astype(np.float16).astype(np.float32)
        changed += int((r != v).sum())
        w.assign(r)
    return changed


def save_compact(model, path) -> None:
    """Save a .keras file whose kernels are stored as float16 (half the size of DenseNet121's
    28 MB): call `round_kernels_fp16` first, so that storing them loses nothing. Keras loads
    the file as it is (float32 variables), with keras.saving.load_model or `load_model`."""
    import io  # noqa: PLC0415
    import tempfile  # noqa: PLC0415
    import zipfile  # noqa: PLC0415

    import h5py  # noqa: PLC0415

    from .files import atomic_path  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as td:
        plain = Path(td) / "model.keras"
        model.save(plain)
        with zipfile.ZipFile(plain) as z:
            members = {n: z.read(n) for n in z.namelist()}
    buf = io.BytesIO()
    with h5py.File(io.BytesIO(members["model.weights.h5"]), "r") as src, h5py.File(buf, "w") as dst:
        def copy(name, obj):
            if isinstance(obj, h5py.Dataset):
                a = obj[()]
                if isinstance(a, np.ndarray) and a.dtype == np.float32 and a.ndim >= 2:
                    half = a.astype(np.float16)
                    if not np.array_equal(half.astype(np.float32), a):
                        raise WeightsError(f"{name}: not rounded to float16 (call round_kernels_fp16 first)")
                    a = half
                dst.create_dataset(name, data=a)
            else:
                dst.require_group(name)
            for k, v in obj.attrs.items():
                dst[name].attrs[k] = v

        src.visititems(copy)
        for k, v in src.attrs.items():
            dst.attrs[k] = v
    members["model.weights.h5"] = buf.getvalue()
    with atomic_path(Path(path), suffix=".keras") as tmp, zipfile.ZipFile(tmp, "w") as z:  # stored, as Keras writes it
        for name, data in members.items():
            z.writestr(name, data)
