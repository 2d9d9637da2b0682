"""Units of export work and the processes that run them.

A unit is one TFLite file, or the ONNX chain (fp32 ONNX, then int8 ONNX and the OpenVINO
files made from it). Units run side by side in spawned worker processes, each described by
a typed, picklable WorkerContext; or in-process when one worker is asked for.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import progress, quiet
from ..files import sha256_file
from ..integrity import hashed_file
from ..ov import size_on_disk
from ..runtime import usable_cores
from .accuracy import accuracy_change
from .formats import ExportJob


@dataclass
class WorkerContext:
    """Everything one unit of work needs, in plain values (it crosses a process boundary)."""

    jobs: list[ExportJob]
    targets: list[str]  # where each file is written (the work folder; export_run moves it)
    metas: list[dict]  # each file's metadata so far (the converters add I/O details)
    run_dir: str
    workdir: str
    saved_model: str
    size: int
    opset: int
    calib_range: str
    bn_scales: str
    # Threads of a calibration session: cores / workers (see onnx.onnx_ranges).
    threads: int = field(default_factory=usable_cores)
    calib: str | None = None  # .npy of the calibration images
    val: str | None = None  # .npz of validation images, Keras probabilities, labels (--bn-scales auto, --max-drop)
    max_drop: float | None = None  # accuracy-aware int8 (points of held-out agreement and accuracy)

    def calibration(self) -> np.ndarray | None:
        return np.load(self.calib) if self.calib else None

    def validation(self):
        """The held-out images (heldout.HeldOut), or None."""
        from .heldout import HeldOut  # noqa: PLC0415

        if not self.val:
            return None
        with np.load(self.val) as z:
            return HeldOut(z["x"], z["ref"], z["labels"])


def record(job: ExportJob, meta: dict, target: Path, started: float, error: Exception | None) -> dict:
    """One row of exports.json (or of the failures)."""
    if error is not None:
        msg = f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"[:300]
        return {"file": job.filename, "format": job.fmt, "quantization": job.quantize, "error": msg}
    # An OpenVINO model is two files: its size counts both, its hash is that of the weights.
    data = hashed_file(target)
    return {"file": job.filename, "format": job.fmt, "quantization": job.quantize,
            "io_dtype": meta["input"]["dtype"], "size_mb": size_on_disk(target) / 1e6,
            "seconds": time.time() - started, "sha256": sha256_file(data),
            **({"bn_scales": meta["bn_scales"]} if "bn_scales" in meta else {}),
            **({"float_weights": meta["float_weights"]} if "float_weights" in meta else {}),
            **({"int8_from": meta["int8_from"]} if "int8_from" in meta else {}),
            **({"float_parts": float_parts(meta["accuracy_aware"])} if "accuracy_aware" in meta else {})}


def records_from_files(files: list[Path]) -> dict[str, dict]:
    """exports.json's rows rebuilt from the files' own metadata (for an index found damaged): all
    but how long each took (None), which only the export that made it knew. A file whose metadata
    cannot be read here (damaged, or its runtime not installed) is left out."""
    from ..backends import read_metadata  # noqa: PLC0415

    out = {}
    for f in files:
        try:
            meta = read_metadata(f)
            job = ExportJob(meta["format"], meta["quantization"], meta["input"]["dtype"])
            out[f.name] = {**record(job, meta, f, time.time(), None), "file": f.name, "seconds": None}
        except Exception:  # whatever a damaged file raises: the index is rebuilt from the others
            continue
    return out


def float_parts(recipe: dict) -> str:
    """One line of what an accuracy-aware file keeps in float ('body': what comes before conv1,
    the input normalisation), and its held-out score."""
    dynamic = recipe.get("hybrid_stages") or []
    if "float_stages" in recipe:
        what = "in float: " + (", ".join(s for s in recipe["float_stages"] if s not in dynamic) or "nothing")
        what += f"; dynamic-range int8: {', '.join(dynamic)}" if dynamic else ""
    else:
        what = f"in float: {recipe['float_nodes']} operations"
    if recipe.get("weight_only"):
        what = "every operation (weight-only int8: int8 weights, float compute)"
    drop = recipe.get("held_out_accuracy_drop_pts")
    acc = "" if drop is None else f", {accuracy_change(drop)}"
    weights = f", weights {recipe['float_weights']}" if "float_weights" in recipe else ""
    bound = recipe.get("held_out_flip_bound")
    flips = "" if bound is None else f", flips <= {bound:.2%} at 95%"
    size = ""
    if "instead_of" in recipe:  # the weight-only file, for --max-size
        replaced = recipe["instead_of"]
        gone = f", {', '.join(replaced['hybrid_stages'])} dynamic-range" if replaced.get("hybrid_stages") else ""
        size = (f"; chosen for --max-size {recipe['max_size_mb']:g} MB over the file with "
                f"{', '.join(replaced['float_stages']) or 'nothing'} in float{gone} ({replaced['size_mb']:.2f} MB)")
    elif recipe.get("within_size") is False:
        size = f", over --max-size {recipe['max_size_mb']:g} MB"
    return (f"{what} ({recipe['held_out_agreement']:.2%}{flips}{acc}"
            f"{'' if recipe['within_budget'] else ', over budget'}{weights}{size})")


def run_unit(ctx: WorkerContext, model=None) -> list[dict]:
    """Run one unit; every failure is caught and returned, so one broken format never stops
    the others. In a worker process model is None and model.keras is loaded here."""
    from . import onnx as onnx_backend  # noqa: PLC0415
    from . import tflite as tflite_backend  # noqa: PLC0415

    calib = ctx.calibration()
    targets = [Path(t) for t in ctx.targets]
    out = []

    def outcome(job, meta, target, started, error):
        out.append(record(job, meta, target, started, error))

    if ctx.jobs[0].fmt == "tflite":
        val = ctx.validation()
        for job, meta, target in zip(ctx.jobs, ctx.metas, targets):
            t = time.time()
            try:
                with quiet.native_stderr():  # the converter's debug lines
                    tflite_backend.convert(job, ctx.saved_model, calib, ctx.calib_range, meta, target, ctx.bn_scales,
                                           val, Path(ctx.workdir), ctx.threads, ctx.max_drop)
                outcome(job, meta, target, t, None)
            except Exception as e:
                outcome(job, meta, target, t, e)
        return out
    t = time.time()
    try:
        if model is None:
            from .graph import deployment_graph  # noqa: PLC0415
            from .pipeline import load_run  # noqa: PLC0415

            model = deployment_graph(load_run(Path(ctx.run_dir))[0])
    except Exception as e:
        return [record(job, {}, target, t, e) for job, target in zip(ctx.jobs, targets)]
    workdir = Path(ctx.workdir) / "onnx"
    workdir.mkdir(exist_ok=True)
    with quiet.native_stderr():  # tf2onnx, onnxruntime and NNCF log freely
        onnx_backend.convert_chain(ctx.jobs, model, ctx.size, ctx.opset, calib, ctx.calib_range, ctx.metas, targets,
                                   workdir, outcome, ctx.threads, held=ctx.validation() if ctx.max_drop is not None
                                   else None, max_drop=ctx.max_drop)
    return out


def units(jobs: list[ExportJob]) -> list[list[ExportJob]]:
    """Independent units of work, longest first: full-integer TFLite and the ONNX chain
    (conversion + int8 calibration) take the longest, the float TFLite files least."""
    onnx_jobs = [j for j in jobs if j.fmt in ("onnx", "openvino")]
    tfl = [j for j in jobs if j.fmt == "tflite"]
    cost = {"int8": 0, "none": 1, "fp16": 2, "dynamic": 3}
    groups = [[j] for j in sorted(tfl, key=lambda j: cost[j.quantize])]
    if onnx_jobs:
        groups.insert(1 if groups and groups[0][0].quantize == "int8" else 0,
                      sorted(onnx_jobs, key=lambda j: (j.fmt != "onnx", j.quantize != "none")))
    return groups


def default_workers(n_units: int) -> int:
    """Each converter keeps about one core busy, so run as many as there are cores (at most 2:
    beyond that the memory of several TensorFlow processes outweighs the gain)."""
    return max(1, min(2, usable_cores(), n_units))


def start_pool(workers: int, notes=None, running=None):
    """Spawned (not forked: forking a process that has TensorFlow loaded is unsafe) workers that
    die with their parent, ignore Ctrl-C (the parent stops them) and keep quiet unless verbose;
    their progress.note() lines go on `notes` (a queue of the spawn context) when given.
    running: a shared count (a Value of the spawn context) of the units still running, which
    the parent lowers as units finish (`threads_now`)."""
    import multiprocessing as mp  # noqa: PLC0415
    from concurrent.futures import ProcessPoolExecutor  # noqa: PLC0415

    return ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_start_worker,
                               initargs=(notes, running))


_running = None  # in a worker: start_pool's count of the units still running


def _start_worker(notes, running=None) -> None:
    global _running
    quiet.quiet_worker()
    _running = running
    if notes is not None:  # progress.note() lines go to the parent, which logs them (progress.Relay)
        progress.notes_to(notes.put)


def threads_now(threads: int | None) -> int | None:
    """Threads for a session this process opens now: in a worker, the cores shared by the units
    still running, so that a unit left alone (the ONNX search, after the TFLite files are done)
    takes the cores the others gave back (224 px tumor model, 2 cores: the int8 ONNX job took
    359 s beside the TFLite job on one thread, 240 s alone on two); `threads` in-process, or at
    least that."""
    if _running is None or threads is None:
        return threads
    return max(threads, cores_each(_running.value))


def cores_each(units: int) -> int:
    """The cores this process may use (`runtime.usable_cores`) shared among `units` running side by
    side (at least one each)."""
    return max(1, usable_cores() // max(1, units))


def kill_pool(pool) -> None:
    """Stop a process pool now: its workers would otherwise finish (or, after a SIGTERM to the
    parent, outlive it) while the run's index no longer describes what they write."""
    for p in list(getattr(pool, "_processes", {}).values()):
        if p.is_alive():
            p.kill()
    for p in list(getattr(pool, "_processes", {}).values()):
        p.join(5)
    pool.shutdown(wait=False, cancel_futures=True)
