"""Two-phase DenseNet121 training: frozen base + head, then fine-tuning the top of the base."""

from __future__ import annotations

import platform
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from . import __version__, augment, data, distill, distribute, feed, groups, preprocess, qat, quiet, report
from .config import CalibrateConfig, TrainConfig, carve_seed
from .errors import MriEdgeError, require, training_packages
from .files import atomic_copy
from .progress import Heartbeat
from .evaluate import evaluate_run
from .run import RUNS_ROOT, RunFolder
from .schedule import PhaseClock, phase_budgets


class TrainError(MriEdgeError):
    pass


def default_run_dir(task: str) -> Path:
    return RUNS_ROOT / f"{task}-{time.strftime('%Y%m%d-%H%M%S')}"


def resolve_phases(cfg: TrainConfig) -> tuple[list[dict], list[str]]:
    """The phase plan (name, epochs, lr, unfreeze, freeze_bn) and human notes about it."""
    notes, phases = [], []
    pretrained = cfg.weights != "none"
    if pretrained:
        if cfg.epochs_head > 0:
            phases.append({"name": "head", "epochs": cfg.epochs_head, "lr": cfg.lr, "unfreeze": "none", "freeze_bn": True})
        lr_ft = cfg.lr_finetune if cfg.lr_finetune is not None else cfg.lr / 10
        if cfg.epochs_finetune > 0:
            phases.append({"name": "finetune", "epochs": cfg.epochs_finetune, "lr": lr_ft,
                           "unfreeze": cfg.unfreeze, "freeze_bn": not cfg.train_bn})
    else:
        unused = [f"--epochs-head {cfg.epochs_head}"] if cfg.epochs_head else []
        if cfg.unfreeze != TrainConfig.unfreeze:
            unused.append(f"--unfreeze {cfg.unfreeze}")
        extra = f" ({', '.join(unused)} unused)" if unused else ""
        notes.append(f"--weights none: phase 1 (frozen base) skipped, a frozen random base learns nothing{extra}; "
                     f"the whole network trains from scratch for {cfg.epochs_finetune} "
                     f"epoch{'s' * (cfg.epochs_finetune != 1)} (--epochs-finetune), batch norms training.")
        if cfg.epochs_finetune > 0:
            phases.append({"name": "scratch", "epochs": cfg.epochs_finetune, "unfreeze": "all", "freeze_bn": False,
                           "lr": cfg.lr_finetune if cfg.lr_finetune is not None else cfg.lr})
    if not phases:
        raise TrainError("nothing to train: " + ("--epochs-head and --epochs-finetune are both 0" if pretrained else
                         "--epochs-finetune is 0 (with --weights none it counts the epochs from scratch)"))
    return phases, notes


def versions() -> dict:
    import keras  # noqa: PLC0415

    return {"mri_edge": __version__, "keras": keras.__version__, "backend": keras.backend.backend(),
            "numpy": np.__version__, "python": platform.python_version()}


def write_run_header(run: RunFolder, cfg: TrainConfig, dataset: data.Dataset, distribution: dict | None = None,
                     teacher: dict | None = None) -> None:
    """What a run folder holds from its start: the split manifest, the config and the labels."""
    run.path.mkdir(parents=True, exist_ok=True)
    cfg.class_names = dataset.class_names
    cfg.phases, _ = resolve_phases(cfg)
    report.write_json(run.manifest_path, dataset.manifest())
    kept = {"val_kept_from": dataset.val_split["kept_from"]} if "kept_from" in dataset.val_split else {}
    report.write_json(run.config_path, {**asdict(cfg), **kept, "versions": versions(),
                                        "preprocessing": preprocess.contract(cfg.image_size),
                                        **({"distribution": distribution} if distribution else {}),
                                        **({"distillation": teacher} if teacher else {})})
    report.write_json(run.labels_path, {"task": cfg.task, "class_names": cfg.class_names,
                                        "class_keys": dataset.class_keys})


def check_inputs(cfg: TrainConfig) -> None:
    """Every input path and value that training would otherwise trip over hours later."""
    if cfg.dedup:
        from . import audit  # noqa: PLC0415

        audit.read_audit(cfg.dedup)
    from .model import check_unfreeze, check_weights  # noqa: PLC0415

    check_weights(cfg.weights)
    check_unfreeze(cfg.unfreeze)
    if cfg.cache_dir and Path(cfg.cache_dir).exists() and not Path(cfg.cache_dir).is_dir():
        raise TrainError(f"--cache-dir {cfg.cache_dir} is a file, not a folder")


def _open_run(cfg: TrainConfig, resume: str | None, force: bool, log, chief: bool = True):
    """(run folder, config, dataset, saved state or None) of a new or resumed run; every input
    is checked here, before anything is written or trained (the folder by the chief alone)."""
    if not resume:
        check_inputs(cfg)
        run = RunFolder(cfg.out if cfg.out else default_run_dir(cfg.task))
        data.check_outside(cfg.data_dir, run.path)
        if chief:
            run.check_new_run(force)
        split_seed = carve_seed(cfg)
        dataset = data.discover(cfg.data_dir, cfg.task, cfg.val_fraction, split_seed, cfg.val_split,
                                cfg.group_threshold, cfg.weights)
        if "test" not in dataset.splits:
            raise data.DataError(f"no test split in {cfg.data_dir} (expected a folder named Testing or test)")
        dataset.splits = {k: data.limit_split(s, cfg.limit_per_class, split_seed) for k, s in dataset.splits.items()}
        if cfg.refit:
            data.refit(dataset)
        cfg.class_names = dataset.class_names
        cfg.phases, _ = resolve_phases(cfg)
        return run, cfg, dataset, None
    run = RunFolder(resume)
    if not run.path.is_dir():
        raise TrainError(f"--resume {resume}: no such folder")
    if not run.config_path.is_file():
        raise TrainError(f"--resume {resume}: not a run folder of `mri-edge train` (no config.json)")
    if not run.state_path.is_file() or not run.checkpoint_path.is_file():
        done = run.model_path.is_file()
        raise TrainError(f"--resume {resume}: " + ("that run already finished" if done else
                         "no finished epoch to resume from (interrupted before the first one ended); "
                         "start it again with the same command"))
    saved, state = run.config(), run.state()
    if state.get("finished"):
        raise TrainError(f"--resume {resume}: that run already finished")
    cfg = TrainConfig.from_saved(saved)
    check_inputs(cfg)
    run.check_preprocessing()  # its next epochs must see the pixels its first ones saw
    dataset = data.dataset_from_manifest(run.manifest())
    log(f"resuming {run.path}: phase {state['phase'] + 1}, after its epoch {state['epoch']}")  # as progress counts
    return run, cfg, dataset, state


def train(cfg: TrainConfig, resume: str | None = None, log=print, callbacks=(), force: bool = False) -> Path:
    """Run both phases, evaluate on the test split, write the run folder and return it (`force`: --out may hold other files)."""
    require(training_packages(), "mri-edge train")
    chief = distribute.plan(None if resume else cfg.devices).is_chief
    run, cfg, dataset, state = _open_run(cfg, resume, force, log, chief=chief)
    if not chief:  # another worker of a multi-worker run: the chief holds the folder
        return _train_opened(run, cfg, dataset, state, log, callbacks)
    made = [p for p in (run.path, *run.path.parents) if not p.exists()]  # folders this call makes
    run.path.mkdir(parents=True, exist_ok=True)  # to be held from here on (a second train with this --out is refused)
    with run.lock("train"):  # (refused: nothing of the holder's is touched)
        try:
            return _train_opened(run, cfg, dataset, state, log, callbacks)
        except BaseException:
            if made and {p.name for p in run.path.iterdir()} <= {".lock"}:  # failed before it wrote: no folder left
                shutil.rmtree(made[-1], ignore_errors=True)
            raise


def _train_opened(run: RunFolder, cfg: TrainConfig, dataset: data.Dataset, state: dict | None, log, callbacks) -> Path:
    """train() on the run folder that _open_run checked."""
    dist = distribute.plan(cfg.devices)
    if dist.multi_worker and cfg.time_budget_s:
        raise TrainError("--time-budget with several workers: each would stop on its own clock; give epochs instead")
    t_start = time.time() - (state.get("elapsed_s", 0.0) if state else 0.0)
    quiet.import_tensorflow()
    import keras  # noqa: PLC0415

    from . import model as model_lib  # noqa: PLC0415
    from .callbacks import best_phase  # noqa: PLC0415

    dist.start(log)
    dist.check_batch(cfg.batch_size)
    teacher = distill.load(cfg, dataset, log, run.config().get("distillation") if state else None)  # before anything is built
    # where this process writes: the run folder, or for a worker other than the chief a folder of its own
    work = run if dist.is_chief else distribute.worker_folder(run, dist)
    with dist.scope():
        if state:
            keras.utils.set_random_seed(cfg.seed)
            net = model_lib.load_model(run.checkpoint_path)
        else:
            # Build first: bad --weights must fail before anything is written (build_model seeds itself).
            with Heartbeat(f"building DenseNet121 ({cfg.image_size} px, weights {cfg.weights})", every=10):
                net = model_lib.build_model(len(dataset.class_names), cfg.image_size, cfg.weights, cfg.dense_units,
                                            cfg.dropout, cfg.seed, cfg.drop_path)
            for p in cfg.phases:  # a --unfreeze name that matches no layer: refused before the images are decoded
                if p["unfreeze"] != "none":
                    model_lib.unfreeze_cut(net, p["unfreeze"])
    if dist.replicas > 1:
        n_bn = distribute.synchronise_batchnorm(net)
        log(f"{dist.kind} training on {dist.replicas} replicas ({', '.join(dist.device_names)}), worker "
            f"{dist.worker_index + 1} of {dist.workers}; global batch {cfg.batch_size}, "
            f"{cfg.batch_size // dist.replicas} per replica; {n_bn} batch-norm layers synchronised")
    if not state and dist.is_chief:
        write_run_header(run, cfg, dataset, dist.record() if dist.replicas > 1 else None,
                         teacher.record if teacher else None)
    manifest = dataset.manifest()
    notes = resolve_phases(cfg)[1] + distill.weights_seen(cfg.weights, manifest)
    for n in notes:
        log(n)
    if not state:  # once every input is checked, with the images the run uses (after --limit-per-class)
        log(groups.describe_carve(manifest))
        wanted = CalibrateConfig.__dataclass_fields__["min_images"].default
        n_val = len(dataset.splits["val"].paths)
        if 0 < n_val < wanted and not cfg.refit and "kept_from" not in (manifest.get("val_split") or {}):
            # found out at calibrate, it would cost a retraining (a kept carve is its first run's to change)
            log(f"note: {n_val} validation images, fewer than the {wanted} `mri-edge calibrate` fits on by default "
                "(--min-images): "
                + ("hold out more (--val-fraction)" if manifest.get("val_carved_from_train") else
                   "add images to the Validation folder") + " to calibrate this run")
    cache = Path(cfg.cache_dir) if cfg.cache_dir else None
    dec = {s: data.decode_split(dataset.splits[s], cfg.image_size, cache, cfg.strict) for s in ("train", "val", "test")}
    for s, d in dec.items():
        if d.skipped:
            log(f"{s}: skipped {len(d.skipped)} unreadable file(s), e.g. {d.skipped[0]['reason']}")
    if not state and cfg.weights not in ("none", "imagenet") and cfg.adapt_bn:
        n = model_lib.adapt_batchnorm(net, dec["train"].images)
        log(f"re-estimated batch-norm statistics of the {cfg.weights} backbone on {n} training images (AdaBN)")

    history: list[dict] = state["history"] if state else []
    first_phase = state["phase"] if state else 0
    budgets = phase_budgets(cfg.phases, cfg.time_budget_s)
    names = [p["name"] for p in cfg.phases]
    batches = _batches(cfg, dec, log, dist, teacher)
    qat_setup = qat.phase_setup(model_lib.BASE_NAME, dec["train"], log) if cfg.quant_aware else None
    for pi, phase in enumerate(cfg.phases[first_phase:], first_phase):
        _train_phase(work, net, cfg, pi, phase, batches, budgets[pi], state if pi == first_phase else None, history,
                     lambda: time.time() - t_start, traced=cfg.eager or pi > first_phase, log=log,
                     callbacks=callbacks, dist=dist, qat_setup=qat_setup)
        if pi + 1 < len(cfg.phases) and best_phase(history, cfg.monitor, names[:pi + 1]) == pi:
            atomic_copy(work.checkpoint_path, work.best_of_phases_path)  # the run's best so far: this phase's
        work.write_state(phase=pi + 1, epoch=0, history=history, elapsed_s=time.time() - t_start)
        work.best_path.unlink(missing_ok=True)
    best = best_phase(history, cfg.monitor, names)
    if best is not None and best < len(names) - 1 and work.best_of_phases_path.is_file():
        net.set_weights(model_lib.load_model(work.best_of_phases_path).get_weights())
        log(f"kept the best epoch of phase '{names[best]}': by {cfg.monitor}, no later phase beat it")
        atomic_copy(work.best_of_phases_path, work.checkpoint_path)  # an interrupt from here on resumes with it
    atomic_copy(work.checkpoint_path, work.model_path)  # the network's weights: a copy, not a second serialisation
    work.best_of_phases_path.unlink(missing_ok=True)
    if not dist.is_chief:
        distribute.remove_worker_folder(work)
        log(f"worker {dist.worker_index + 1} of {dist.workers}: trained; the chief writes {run.path}")
        dist.barrier()
        log(f"worker {dist.worker_index + 1} of {dist.workers}: done")
        dist.leave_quietly()
        return run.path
    if dist.replicas > 1:
        net = model_lib.load_model(run.model_path)  # the test report on one device, as every later check runs
    wall = time.time() - t_start
    report.write_history(run, history)
    # finished with its reports: the run index written beside them says so
    result = evaluate_run(run.path, net, dec, cfg, wall, notes, commit=lambda: run.write_state(
        phase=len(cfg.phases), epoch=0, history=history, elapsed_s=wall, finished=True))
    run.checkpoint_path.unlink(missing_ok=True)
    run.trainer_state_path.unlink(missing_ok=True)
    dist.barrier()
    log(f"{report.test_summary(result)}; wall time {wall:.0f} s; run folder {run.path}")
    return run.path


def _batches(cfg: TrainConfig, dec: dict, log, dist=None, teacher=None):
    """(training batches: class weights, the teacher's targets; validation batches: labels alone), this worker's part."""
    names = cfg.class_names
    weights = feed.class_weights(dec["train"].labels, len(names), cfg.class_weight)
    log(f"class weights ({cfg.class_weight}): " + ", ".join(f"{names[i]} {w:.2f}" for i, w in weights.items()))
    shard = (dist.worker_index, dist.workers) if dist else (0, 1)
    return (feed.make_batches(dec["train"].images, dec["train"].labels, len(names), cfg.batch_size, shuffle=True,
                              seed=cfg.seed, sample_weights=weights, shard=shard, mixup=cfg.mixup, cutmix=cfg.cutmix,
                              teacher=teacher, distill_weight=cfg.distill_weight),
            feed.make_batches(dec["val"].images, dec["val"].labels, len(names), cfg.batch_size, shuffle=False,
                              shard=shard))


def _train_phase(run: RunFolder, net, cfg: TrainConfig, pi: int, phase: dict, batches, budget_s, state, history,
                 elapsed, traced: bool, log, callbacks=(), dist=None, qat_setup=None) -> None:
    """One phase: trainable layers, a fresh optimizer (or a resumed one: `state`, the saved state), fit
    with the callbacks, then the phase's best epoch restored. `qat_setup(net)`: --quant-aware's model and callback."""
    import keras  # noqa: PLC0415

    from . import model as model_lib  # noqa: PLC0415
    from .callbacks import AveragedWeights, EpochOrder, EpochProgress, Keeper, Patience, TrainerState  # noqa: PLC0415

    clock = PhaseClock(budget_s, elapsed_s=state.get("phase_elapsed_s", 0.0) if state else 0.0)
    start_epoch = state["epoch"] if state else 0
    n_trainable = model_lib.set_phase(net, "head" if phase["name"] == "head" else "finetune", phase["unfreeze"],
                                      phase["freeze_bn"])
    log(f"phase {pi + 1}/{len(cfg.phases)} '{phase['name']}': {phase['epochs']} epoch{'s' * (phase['epochs'] != 1)}, lr {phase['lr']:g}, "
        f"{n_trainable} trainable DenseNet121 layers with weights")
    best, holds_best = run.saved_best(state, cfg.monitor), False  # holds_best: the network holds the kept epoch
    if start_epoch < phase["epochs"] and not (state or {}).get("stopped"):  # else only the phase's restore is left
        dist = dist or distribute.Distribution()
        with dist.scope():
            aug = augment.augmentation(cfg.seed) if cfg.augment else None
            inp = keras.Input((cfg.image_size, cfg.image_size, 3))
            body, ranges = qat_setup(net) if qat_setup else (net, None)  # quant-aware: trains `net` in place
            trainer = distribute.trainer_class(dist)(inp, body(aug(inp) if aug is not None else inp))
            trainer.compile(**model_lib.objective(phase["lr"], cfg.weight_decay, cfg.label_smoothing, cfg.select_by,
                                                  cfg.ema), jit_compile=cfg.jit_compile, run_eagerly=cfg.eager)
        train_batches, val_batches = batches
        average = [AveragedWeights(net, train_batches.images)] if cfg.ema else []
        patience = None if cfg.select_by == "last" else Patience(cfg.monitor, cfg.patience,
                                                                 state.get("patience") if state else None)
        saved = TrainerState(  # after the average's swap, with Keeper's checkpoint: a resume starts from those
            run, net, pi, start_epoch if state else 0 if pi else None, (average or [None])[0], log)
        keeper = Keeper(run, net, phase, pi, cfg.warmup_epochs, clock, history, cfg.monitor, best, elapsed,
                        model_lib.save_model, log, patience, trainer_state=saved)
        cbs = [EpochOrder(train_batches), EpochProgress(phase["name"], phase["epochs"], len(train_batches), log,
                                                         traced=traced), *average,
               *([patience] if patience else []), keeper, saved,
               *callbacks, *([ranges] if ranges else [])]
        trainer.fit(feed.for_fit(train_batches, dist), validation_data=feed.for_fit(val_batches, dist),
                    epochs=phase["epochs"], initial_epoch=start_epoch, shuffle=False,  # batches keep their own order
                    callbacks=cbs, verbose=0)
        best, holds_best = keeper.best, keeper.last_kept
    if run.best_path.exists():
        # Keep the best epoch of this phase (restore_best_weights does not survive a resume), and
        # checkpoint it, so an interrupt early in the next phase resumes from these weights.
        if not holds_best:  # else the network and the checkpoint hold it already
            net.set_weights(model_lib.load_model(run.best_path).get_weights())
            atomic_copy(run.best_path, run.checkpoint_path)
        log(f"phase '{phase['name']}': kept its last epoch" if cfg.select_by == "last" else
            f"phase '{phase['name']}': restored best epoch ({cfg.monitor} {'?' if best is None else f'{best:.4f}'})")
