"""The typed configs: each field's default and help live here once; the command line's
options are generated from them (`cli.options_from`), and run folders save them as JSON.

Field metadata: `help` makes a field a command-line option; `flag` overrides its name, `choices`
limits its values, `minimum`/`maximum` bound it, `negate` turns a default-True boolean into a
`--no-...` switch, `scale` converts the option's unit (minutes -> seconds), `metavar` names the value.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields

from .errors import MriEdgeError
from .export.formats import BN_SCALES, CALIB_RANGES, FLOAT_WEIGHTS, FORMATS, IO_DTYPES, OPENVINO_INT8, QUANTIZATIONS

SELECT_BY = ("loss", "accuracy", "macro_f1", "last")  # what keeps an epoch (loss: lowest; last: no choice)
# Thumbnail correlation at or above which two images are near twins (one group): the grouped
# validation split, calibrate's twin check and the audit's grouped probe (docs/data.md).
GROUP_THRESHOLD = 0.99
# Defaults that the command line and the library functions share (one place each).
HASH_MAX_DISTANCE = 10  # data audit: dHash Hamming distance of a near-duplicate candidate
PIXEL_MAD_THRESHOLD = 3.0  # data audit: grey levels (0-255) on 64x64 thumbnails, after contrast normalisation
OCCLUSION_GRID = 8  # explain / verify: cells per side of the occlusion map
EXPLAIN_IMAGES = 64  # verify: test images whose explanations are compared across files
BENCH_DEFAULTS = {"threads": (2,), "batches": (1, 8), "warmup": 5, "runs": 30}  # bench: the settings of each row
BENCH_QUICK = {"batches": (1,), "warmup": 2, "runs": 10}  # bench --quick and the demo's bench: a smoke test
# TrainConfig fields that regularise one run's training: model cards list them, ensembles drop them.
REGULARISERS = ("label_smoothing", "mixup", "cutmix", "drop_path", "weight_decay", "ema", "quant_aware", "teacher")


def option(default, help: str, **cli):
    return field(default=default, metadata={"help": help, **cli})


def flag(f) -> str:
    """The command-line option of a config field (its `flag`, else --field-name)."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def check_fields(cfg, bounds: bool = True) -> None:
    """The command line's choices and bounds (`bounds` False: finite only), for a config made in Python too."""
    for f in fields(cfg):
        m, value = f.metadata, getattr(cfg, f.name)
        if "help" not in m or value is None or value is f.default:
            continue
        name = flag(f)
        if "choices" in m and value not in m["choices"]:
            raise MriEdgeError(f"{name} {value}: choose one of {', '.join(map(str, m['choices']))}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if isinstance(value, float) and not math.isfinite(value):  # nan passes every comparison below
            raise MriEdgeError(f"{name} {value}: must be a finite number")
        low, high = (m.get("minimum"), m.get("maximum")) if bounds else (None, None)
        if low is not None and (value <= low if m.get("min_open") else value < low):
            raise MriEdgeError(f"{name} {value}: must be {'above' if m.get('min_open') else 'at least'} {low}")
        if high is not None and (value >= high if m.get("max_open") else value > high):
            raise MriEdgeError(f"{name} {value}: must be {'below' if m.get('max_open') else 'at most'} {high}")


@dataclass
class TrainConfig:
    task: str
    data_dir: str
    out: str | None = None
    weights: str = option("imagenet", "imagenet, none, or a path (DenseNet121 no-top weights file, or an mri-edge "
                                      "model.keras).")
    image_size: int = option(224, "Square input size in pixels.", minimum=32, maximum=1024)
    batch_size: int = option(32, "Training batch size.", minimum=1, maximum=4096)
    epochs_head: int = option(5, "Phase 1: base frozen, head trained (skipped with --weights none).", minimum=0)
    epochs_finetune: int = option(10, "Phase 2: top of the base unfrozen (with --weights none: the epochs from "
                                      "scratch).", minimum=0)
    lr: float = option(1e-3, "Phase 1 learning rate (and the from-scratch rate with --weights none).",
                       minimum=0, min_open=True)
    lr_finetune: float | None = option(None, "Phase 2 learning rate [default: --lr / 10; --lr with --weights none].",
                                       minimum=0, min_open=True, type=float)
    unfreeze: str = option("conv5", "Phase 2: 'all', a number N of top base layers, or a block prefix (conv5, "
                                    "conv4_block16).")
    warmup_epochs: int = option(1, "Epochs of linear learning-rate warm-up.", minimum=0)
    patience: int = option(5, "Early stopping patience (epochs without improvement of --select-by).", minimum=1)
    # On a random split loss and accuracy usually agree; on a grouped one (new subjects) they can
    # part: Alzheimer at 96 px had its lowest held-out loss at fine-tune epoch 1 (47% right)
    # and its best held-out accuracy at epoch 9 (62%), so the rule is a choice.
    select_by: str = option("loss", "Validation metric that keeps each phase's best epoch, then the best of "
                                    "the phases, and drives early stopping: lowest loss, highest accuracy, or highest macro-F1 (imbalanced "
                                    "classes); or last: every epoch runs and the last is kept (no choice, no early "
                                    "stopping).", choices=SELECT_BY)
    # The held-out split chooses a recipe and its epochs; the final model can then learn from the
    # held-out subjects too (Alzheimer: test slices whose nearest training slice is a held-out one).
    refit: bool = option(False, "Train on the validation images too (with --select-by last and the epochs the "
                                "held-out run chose). Its validation numbers are then on training images, and "
                                "calibrate refuses the run.")
    val_fraction: float = option(0.1, "Share of training carved out (stratified) when there is no validation "
                                      "folder.", minimum=0, maximum=1, min_open=True, max_open=True)
    val_split: str = option("random", "How validation is carved from training when there is no validation "
                                      "folder: random images (stratified), or grouped: whole groups of near-identical "
                                      "images, so no validation image has a twin in training (docs/data.md). "
                                      "With --weights RUN/model.keras of these images, RUN's carve is kept.",
                            choices=("random", "grouped"))
    group_threshold: float = option(GROUP_THRESHOLD, "--val-split grouped: thumbnail correlation that makes two images "
                                          "near twins (one group).", minimum=0, maximum=1)
    seed: int = option(42, "Seed of the initial weights, the batches and the augmentation, and of the split "
                           "unless --split-seed is given.")
    split_seed: int | None = option(None, "Seed of the split alone [default: --seed]: members of an ensemble "
                                          "share one validation carve and differ in --seed.", type=int)
    dense_units: int = option(256, "Units of the head's hidden layer.", minimum=1)
    dropout: float = option(0.5, "Dropout before the output layer.", minimum=0, maximum=1, max_open=True)
    augment: bool = option(True, "Disable training augmentation.", negate=True)
    class_weight: str = option("balanced", "Loss weight per class: scikit-learn's balanced weights, their square "
                                           "root (milder, for a heavy imbalance), or none.",
                               choices=("balanced", "sqrt", "none"))
    # Regularisers against memorising subjects (Alzheimer: several slices of one brain in
    # training, other slices of it in test); all off by default, the recipe of the seed.
    label_smoothing: float = option(0.0, "Share of each one-hot target spread evenly over all classes (0: off).",
                                    minimum=0, maximum=1, max_open=True)
    mixup: float = option(0.0, "Mixup: each training batch blended with a shuffled copy of itself, the weight "
                               "drawn from Beta(a, a) per batch (0: off; 0.2-0.4 is usual).", minimum=0, metavar="A")
    cutmix: float = option(0.0, "CutMix: a box of a shuffled copy of each training batch pasted into it, its share "
                                "of the area min(l, 1 - l) for l drawn from Beta(a, a) per batch (0: off; 1.0 is "
                                "usual). With --mixup, each batch takes one of the two.", minimum=0, metavar="A")
    drop_path: float = option(0.0, "Stochastic depth: each dense layer's new features dropped per image while "
                                   "training, at a rate rising with depth to this one (0: off; 0.1-0.2 is usual).",
                              minimum=0, maximum=1, max_open=True)
    weight_decay: float = option(0.0, "Decoupled weight decay (AdamW; 0: plain Adam).", minimum=0)
    # A short, noisy fine-tune ends wherever its last steps threw it; the average of the recent
    # weights sits nearer the middle of that region (Polyak averaging, timm's --model-ema).
    ema: float = option(0.0, "Validate, keep and ship an exponential moving average of the weights, updated each "
                             "step with this momentum (0: off; 0.99-0.999 is usual). Batch-norm statistics are "
                             "re-estimated for the averaged weights.", minimum=0, maximum=1, max_open=True,
                        metavar="MOMENTUM")
    # An ensemble is more accurate than its members and costs as many times the compute to run:
    # distilled, one network carries much of it (distill.py).
    teacher: str | None = option(None, "Knowledge distillation: a finished run folder (an ensemble's too) whose "
                                       "probabilities on each training batch, blends included, become part of the "
                                       "target. It must hold out the same images as this run.", path="dir", type=str,
                                 metavar="RUN")
    distill_weight: float = option(0.8, "--teacher: share of each target that is the teacher's probabilities (the "
                                        "rest is the label).", minimum=0, maximum=1, min_open=True)
    # int8 files of weak, narrow-margin models flip answers however the quantizer is tuned
    # (docs/int8.md): train them to tolerate the rounding instead (qat.py).
    quant_aware: bool = option(False, "Simulate int8 rounding of the activations while training (quantization-aware "
                                      "fine-tuning), so the int8 exports keep the float model's answers.")
    # Phase 2 with pretrained weights: let batch-norm layers train too. Frozen statistics
    # suit a strong backbone; a weak from-scratch one whose features must still move
    # collapsed with them frozen (Alzheimer, measured: validation accuracy 47% -> 1-15%).
    train_bn: bool = option(False, "Phase 2 with pretrained weights: batch-norm layers train too (for a weak or "
                                   "from-scratch backbone; frozen is right for ImageNet-quality weights).")
    # Wall-clock budget for all training phases: the cosine schedule runs over time instead
    # of epochs and a phase stops when its next epoch would overrun its share. For a fixed
    # session (a lent GPU machine, a CI job) whose speed is not known in advance.
    time_budget_s: float | None = option(None, "Fit all phases into this wall time: the cosine schedule runs over "
                                               "time, epochs become upper bounds (split over phases by their "
                                               "epochs; --resume continues the schedule).",
                                         flag="--time-budget", scale=60, metavar="MINUTES", minimum=0,
                                         min_open=True, type=float)
    devices: str | None = option(None, "Data-parallel training: N devices or all (GPUs; without a GPU, N logical CPU "
                                       "devices). --batch-size stays the global batch. Several hosts: TF_CONFIG "
                                       "(docs/distributed.md).", metavar="N|all", type=str)
    strict: bool = option(False, "Fail on unreadable images instead of skipping them.")
    limit_per_class: int | None = option(None, "Use at most N images per class in each split (quick runs).",
                                         minimum=1, type=int)
    cache_dir: str | None = option(None, "Where decoded image arrays are cached [default: ~/.cache/mri-edge].",
                                   path="dir", type=str)
    eager: bool = option(False, "Run Keras eagerly: faster for tiny smoke runs (tracing DenseNet121 takes ~1 min).")
    dedup: str | None = option(None, "An audit.json from `mri-edge data audit`: also report the leakage-free test "
                                     "subset.", path="file", type=str)
    # XLA compilation of DenseNet121 costs over a minute on 2 cores and barely speeds up
    # a CPU step, so it is off (and not an option).
    jit_compile: bool = False
    # Re-estimate batch-norm statistics of a backbone from another dataset (--weights PATH).
    adapt_bn: bool = True
    # Filled in when resolved.
    class_names: list[str] = field(default_factory=list)
    phases: list[dict] = field(default_factory=list)

    def __post_init__(self):
        check_fields(self)  # the command line checks them; Python callers get the same message
        if self.refit and self.select_by != "last":
            raise MriEdgeError("--refit leaves no held-out images to choose an epoch on: add --select-by last (and "
                               "give the epochs that the run without --refit chose)")
        # --ema re-estimates batch-norm statistics in one eager pass on one device
        if self.ema and ((self.devices or "1") != "1" or os.environ.get("TF_CONFIG")):
            raise MriEdgeError("--ema with several devices (--devices, TF_CONFIG) is not supported: train on "
                               "one device, or drop --ema")

    @property
    def monitor(self) -> str:
        """The Keras log key of --select-by (val_loss, val_accuracy, val_macro_f1)."""
        return "val_" + self.select_by

    @classmethod
    def from_saved(cls, saved: dict) -> "TrainConfig":
        """The config of a run folder's config.json (which also holds versions and the like)."""
        return cls(**{k: v for k, v in saved.items() if k in cls.__dataclass_fields__})


def carve_seed(cfg) -> int:
    """The seed of a run's validation carve: --split-seed, else --seed (a TrainConfig or its config.json)."""
    get = cfg.get if isinstance(cfg, dict) else lambda key, default=None: getattr(cfg, key, default)
    return int(get("seed", TrainConfig.seed) if (seed := get("split_seed")) is None else seed)


def like(name: str, **override):
    """A TrainConfig field's default and help for another config: one definition where the two must agree
    (pretrain reads the training split that train will carve with the same values)."""
    f = TrainConfig.__dataclass_fields__[name]
    return field(default=override.pop("default", f.default), metadata={**f.metadata, **override})


@dataclass
class PretrainConfig:
    """What `mri-edge pretrain` does: SimCLR on the training split's images, no labels (pretrain.py)."""

    task: str
    data_dir: str
    out: str
    weights: str = like("weights", default="none",
                        help="Backbone to start from: none, imagenet, or a path (as train --weights).")
    image_size: int = like("image_size")
    batch_size: int = like("batch_size", default=64, minimum=2, help="Images per step; each gives two views, so "
                                                                     "the loss compares 2 x this many.")
    epochs: int = option(20, "Epochs over the training split (upper bound with --time-budget).", minimum=1)
    lr: float = like("lr", help="Peak learning rate (Adam; warm-up, then cosine).")
    warmup_epochs: int = like("warmup_epochs")
    temperature: float = option(0.2, "NT-Xent temperature of the contrastive loss.", minimum=0, min_open=True)
    projection_dim: int = option(128, "Output size of the projection head (dropped after pretraining).", minimum=2)
    time_budget_s: float | None = like("time_budget_s", help="Fit the epochs, probes included, into this wall "
                                                             "time (cosine over time; epochs become an upper bound; "
                                                             "decoding and building come on top).")
    # train's carve with the same four values holds out the same images: they stay unseen here too.
    val_fraction: float = like("val_fraction")
    val_split: str = like("val_split")
    group_threshold: float = like("group_threshold")
    seed: int = like("seed")
    limit_per_class: int | None = like("limit_per_class")
    cache_dir: str | None = like("cache_dir")
    eager: bool = like("eager")

    def __post_init__(self):
        check_fields(self)


@dataclass
class ExportConfig:
    """What `mri-edge export` makes; the format table (export/formats.py) says which option
    applies to which format."""

    formats: tuple[str, ...] = option(("all",), "Repeatable. all = tflite, onnx, and openvino where OpenVINO "
                                                "and NNCF are installed.", flag="--format", multiple=True,
                                      choices=(*FORMATS, "all"))
    quantize: tuple[str, ...] = option((), "Repeatable [default: every quantization the format supports].",
                                       multiple=True, choices=QUANTIZATIONS)
    io_dtype: str = option("uint8", "Input/output type of int8 TFLite files (uint8 = feed decoded pixels directly).",
                           choices=IO_DTYPES)
    calib_size: int = option(300, "Training images (stratified) used to calibrate int8.", minimum=1)
    calib_range: str = option("percentile", "int8 activation ranges: robust percentile or plain min/max over the "
                                            "calibration images.", choices=CALIB_RANGES)
    bn_scales: str = option("per-tensor", "int8 TFLite: weights of the batch norms after DenseNet's concatenations "
                                          "get one scale (smaller file) or one per channel (+0.8 MB on DenseNet121; "
                                          "less int8 error on some models); auto keeps whichever is closer to Keras "
                                          "on the validation split.", choices=BN_SCALES)
    max_drop: float | None = option(None, "int8 files: accuracy-aware quantization; keep the parts that move "
                                          "decisions most in float until, on the validation split, the share of "
                                          "answers int8 changes (its 95% bound) and the accuracy drop are each at "
                                          "most this many points (docs/int8.md).",
                                    minimum=0, maximum=100, type=float, metavar="PTS")
    max_size: float | None = option(None, "int8 TFLite and ONNX with --max-drop: the largest model, in MB (10^6 "
                                          "bytes, before the metadata: calibrate's record adds about 0.2 MB), the "
                                          "search may write. A file over it gives way to the weight-only int8 file "
                                          "(every weight int8, every operation float: the smallest, no faster than "
                                          "fp32) where that one holds the budget; else it is written and marked over "
                                          "the limit (docs/int8.md).", minimum=0, min_open=True, type=float,
                                    metavar="MB")
    float_head: bool = option(False, "int8 TFLite and ONNX: keep the head (global pooling, dense layers, softmax) in "
                                     "float with float32 probabilities out, so calibrated probabilities and "
                                     "explanations keep their resolution (docs/int8.md).")
    float_weights: str = option("fp16", "int8 TFLite and ONNX: how the weights of operations kept in float "
                                        "(--float-head, --max-drop) are stored: fp16 (half of fp32), int8 per "
                                        "channel (a quarter; moves more low-margin answers) or fp32. Activations "
                                        "stay float32; with --max-drop the smaller storage is kept only if the file "
                                        "stays within budget (int8 weights that would leave it give way to fp16 "
                                        "first). ONNX files with int8 operations store int8 as fp16 (onnxruntime "
                                        "would dequantize int8 weights on every call). int8 with --max-drop: when "
                                        "no file with int8 compute holds the budget, a weight-only int8 file (all "
                                        "compute float) is tried last (docs/int8.md).", choices=FLOAT_WEIGHTS)
    hybrid: bool = option(False, "int8 TFLite with --max-drop: each stage the search keeps in float that holds "
                                 "convolutions, the most multiply-adds first, runs as dynamic-range int8 (int8 "
                                 "weights, activations quantized per image at run time) where the budget still "
                                 "holds. 2.2x faster than float on an x86 CPU with VNNI, level on AVX2 alone; slow "
                                 "on tflite-runtime; answers can differ between XNNPACK and LiteRT's built-in "
                                 "kernels (docs/int8.md).")
    openvino_int8: str = option("auto", "int8 OpenVINO file: converted from this export's int8 ONNX file (its ranges, "
                                        "--max-drop and --float-head choices and weights), or quantized by "
                                        "NNCF from the fp32 graph; auto = from the ONNX file when this export makes "
                                        "one (docs/int8.md).", choices=OPENVINO_INT8)
    opset: int = option(17, "ONNX opset.", minimum=13, maximum=21)
    workers: int | None = option(None, "Conversions run side by side in this many processes [default: cores, at "
                                       "most 2].", minimum=1, type=int)


@dataclass
class CalibrateConfig:
    """What `mri-edge calibrate` fits on held-out data (docs/trust.md)."""

    max_risk: float | None = option(None, "Abstain below the confidence whose accepted answers have at most this "
                                          "error on held-out data [default: 0.05 unless --coverage].",
                                    minimum=0, maximum=1, type=float)
    coverage: float | None = option(None, "Abstain below the confidence that answers this share of held-out "
                                          "images instead.", minimum=0, maximum=1, min_open=True, type=float)
    risk_confidence: float | None = option(None, "With --max-risk: pick the threshold by a test, not an estimate: "
                                                 "its error is at most --max-risk with this confidence (e.g. 0.95; "
                                                 "exact binomial tests in fixed sequence, docs/trust.md).",
                                           minimum=0, maximum=1, min_open=True, max_open=True, type=float)
    alpha: float = option(0.05, "Conformal prediction sets miss the true class at most this often (0.05: sets "
                                "at 95% coverage).", minimum=0, maximum=1, min_open=True, max_open=True)
    group_threshold: float = option(GROUP_THRESHOLD, "Thumbnail correlation that makes a validation image a near "
                                                     "twin of a training image (such images are not held out like "
                                                     "new subjects).", minimum=0, maximum=1)
    # A temperature fitted on twins of training images stays overconfident on new subjects
    # (Alzheimer: 97% accurate and confident on its random validation split, 70% on test).
    allow_twins: bool = option(False, "Fit on validation images that are not new to the model: all of them when too few "
                               "have no near twin in training, or those whose raw-pixel 1-NN probe beats the test "
                               "split's (the fit is marked as such; it will be overconfident).")
    min_images: int = option(50, "Fewest held-out images to fit on.", minimum=10)
    # Correlation under the threshold is not enough on a dataset of slice stacks: the random
    # carve's twin-free Alzheimer images still have a same-subject neighbour (1-NN 100%, test
    # 73%). The probe gap is the measured test of "looks like new subjects".
    max_probe_gap: float = option(0.1, "Refuse held-out images whose raw-pixel 1-NN accuracy against training beats "
                                       "the test split's by more than this (they are not new to the model).", minimum=0, maximum=1)
    # An MRI of another kind gets answers as confident as the model's own (Alzheimer model on
    # tumor scans): only its features tell (docs/trust.md, "Familiarity").
    unfamiliar_rate: float = option(0.01, "Share of held-out images the familiarity check refers for review: the "
                                          "feature distance above which an image counts as unlike the training "
                                          "images.", minimum=0, maximum=1, min_open=True, max_open=True)
    familiar_images: int = option(2000, "Training images (a class-stratified sample) the familiarity check is "
                                        "fitted on.", minimum=20)
    familiar_dims: int = option(64, "Main directions of the training features' spread the distance is measured "
                                    "in.", minimum=1, maximum=4096)
    foreign: str | None = option(None, "A folder of images of another kind (any depth): report the share the "
                                       "familiarity check refers (nothing is fitted on them).")
    foreign_limit: int = option(500, "At most this many --foreign images, chosen at random.", minimum=1)
    # A run trained with --refit has no held-out images left; its recipe's run on the same carve has.
    from_run: str | None = option(None, "For a run trained with --refit (no held-out images left): store the "
                                        "record of this run instead, its recipe's run without --refit on the same "
                                        "carve, calibrated first; nothing is fitted.", metavar="RUN_DIR")

    def __post_init__(self):
        check_fields(self, bounds=False)  # (in Python, --min-images may go under the command line's 10)
        fitting = [flag(f) for f in fields(self)
                   if f.name != "from_run" and getattr(self, f.name) != f.default]
        if self.from_run and fitting:
            raise MriEdgeError(f"--from-run stores another run's record, nothing is fitted: {', '.join(fitting)} "
                               "would not be used")
        if self.max_risk is not None and self.coverage is not None:
            raise MriEdgeError("give --max-risk or --coverage, not both")
        if self.risk_confidence is not None and self.coverage is not None:
            raise MriEdgeError("--risk-confidence goes with --max-risk, not --coverage")
        if self.max_risk is None and self.coverage is None:
            self.max_risk = 0.05


@dataclass
class Thresholds:
    """verify's gate per quantization family; every accuracy drop in percentage points."""

    float_agreement: float = option(0.995, "Minimum top-1 agreement of fp32/fp16 files with Keras (0-1).",
                                    flag="--min-agreement-float", minimum=0, maximum=1)
    float_max_drop_pts: float = option(0.2, "Allowed accuracy drop of fp32/fp16 files, in percentage points.",
                                       flag="--max-drop-float", minimum=0, maximum=100)
    quant_agreement: float = option(0.98, "Minimum top-1 agreement of dynamic/int8 files with Keras (0-1).",
                                    flag="--min-agreement-quant", minimum=0, maximum=1)
    quant_max_drop_pts: float = option(1.0, "Allowed accuracy drop of dynamic/int8 files, in percentage points.",
                                       flag="--max-drop-quant", minimum=0, maximum=100)
    # 0.01: the int8 goal of the calibration work (ECE within 0.01 of Keras). Demo model: fp16 and dynamic
    # files move it <= 0.0004, int8 TFLite 0.0008, ONNX/OpenVINO 0.0062 (one flip of 200: about 1/n).
    max_ece_change: float = option(0.01, "Allowed change of the expected calibration error (15 bins) of any "
                                         "exported file against Keras.", minimum=0, maximum=1)

    # The familiarity check has to refer the images Keras refers. Kappa, not agreement: where ~1% are
    # referred, a check that never fires agrees on 99%. 0.8 ("almost perfect", Landis & Koch 1977; the
    # shipped int8 files: 0.933-0.960), held to its 95% upper bound: with 4 of the demo's 200 test
    # images referred, one image at the limit changing sides gives 0.745, which says nothing.
    min_familiarity_kappa: float = option(0.8, "Minimum Cohen's kappa between the familiarity check's referrals "
                                               "through a file and through Keras (its 95% bootstrap upper bound "
                                               "must reach it).", minimum=-1, maximum=1)

    # Report-only by default (0): the goal is a median of 0.9 between int8 and Keras, measured
    # per run in parity.md; a user who relies on explanations sets the gate.
    min_explanation_corr: float = option(0.0, "Minimum median rank correlation of a file's occlusion maps with the "
                                              "Keras model's (0 = report only).", minimum=-1, maximum=1)

    def __post_init__(self):  # a gate of nan would pass every file
        check_fields(self)

    def for_quantization(self, q: str) -> tuple[float, float]:
        """(minimum agreement, maximum accuracy drop in points) for a file's quantization."""
        if q in ("none", "fp16"):
            return self.float_agreement, self.float_max_drop_pts
        return self.quant_agreement, self.quant_max_drop_pts
