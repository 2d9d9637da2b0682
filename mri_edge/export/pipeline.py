"""export_run: plan the files, prepare calibration, run the units of work (pool.py) and land
each finished file in exports/ with exports.json updated after every one."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from .. import __version__, preprocess, progress, quiet, report, trust
from ..config import ExportConfig, flag
from ..errors import MriEdgeError, require
from ..files import atomic_write_bytes, atomic_write_text, sha256_file
from ..integrity import hashed_file, model_files
from ..run import RunFolder, holding
from . import pool
from ..keras_model import validation_reference
from .calibration import calibration_manifest, calibration_set
from .formats import BN_SCALES, CALIB_RANGES, ExportError, ExportJob, file_name, plan
from .graph import deployment_graph


def load_run(run_dir: Path):
    """(keras model, config dict, labels dict); one-line errors for missing or corrupt files."""
    run = RunFolder(run_dir)
    model_path = run.require_model()
    run.check_writable(run.path, run.exports_dir)
    cfg, labels = run.config(), run.labels()
    run.manifest()  # calibration and the validation choice read it: damage is reported before any conversion
    run.check_preprocessing()  # and decode their images for this model
    quiet.import_tensorflow()
    from ..model import load_model  # noqa: PLC0415

    with quiet.native_stderr():
        model = load_model(model_path)  # a damaged file: one line (RuntimeModelError)
    return model, cfg, labels


def _land(staged: Path, out_dir: Path) -> None:
    """Move a finished file from the work folder into exports/ (an OpenVINO pair: .bin first, so
    the .xml that names it never appears without it)."""
    for f in reversed(model_files(staged)):
        os.replace(f, out_dir / f.name)


def _write_index(run: RunFolder, records: dict, model_sha: str, failures: list[dict], started: float,
                 workers: int) -> None:
    rows = sorted(records.values(), key=lambda r: r["file"])
    run.write_exports_index({"run_dir": str(run.path), "source_model_sha256": model_sha, "exports": rows, "last_failures":
                             failures, "last_export": {"seconds": round(time.time() - started, 1), "workers": workers}})
    failed = "".join(f"\n- {f['file']}: {f['error']}" for f in failures)
    atomic_write_text(run.exports_report_path, f"# Exported files of {run.path.name}\n\n"
                      + table(rows)
                      + (f"\n\nFailed in the last export:{failed}" if failed else "") + "\n")


def _check(calib_size: int, calib_range: str, bn_scales: str, opset: int, workers: int | None) -> None:
    if calib_size < 1:
        raise ExportError("--calib-size must be at least 1")
    if calib_range not in CALIB_RANGES:
        raise ExportError(f"--calib-range must be one of {', '.join(CALIB_RANGES)}")
    if bn_scales not in BN_SCALES:
        raise ExportError(f"--bn-scales must be one of {', '.join(BN_SCALES)}")
    if not 13 <= opset <= 21:
        raise ExportError("--opset must be between 13 and 21")
    if workers is not None and workers < 1:
        raise ExportError("--workers must be at least 1")


@holding("export")
def export_run(run_dir, formats=ExportConfig.formats, quantize=ExportConfig.quantize, io_dtype=ExportConfig.io_dtype,
               calib_size=ExportConfig.calib_size, opset=ExportConfig.opset, log=print,
               calib_range: str = ExportConfig.calib_range, workers: int | None = ExportConfig.workers,
               bn_scales: str = ExportConfig.bn_scales, given: tuple[str, ...] = (),
               max_drop: float | None = ExportConfig.max_drop,
               max_size: float | None = ExportConfig.max_size,
               float_head: bool = ExportConfig.float_head,
               float_weights: str = ExportConfig.float_weights,
               hybrid: bool = ExportConfig.hybrid,
               openvino_int8: str = ExportConfig.openvino_int8) -> tuple[list[dict], list[dict]]:
    """Run every export job; returns (successes, failures). Earlier files survive a failure.

    `given` names the options the user set explicitly: one that no planned file accepts is
    refused before anything runs. With workers > 1 the independent conversions (each TFLite
    file; the ONNX chain) run in that many fresh processes, since each TensorFlow converter
    uses about one core. Files are written in a work folder and moved into exports/ one by
    one, each move followed by an update of exports.json, so an interrupt (Ctrl-C, SIGTERM)
    leaves the index matching the files: each file is either the old one with its old record
    or the new one with its new.
    """
    require(("tensorflow", "keras"), "mri-edge export")  # the converters read the Keras model
    from .. import ov  # noqa: PLC0415
    from ..config import check_fields  # noqa: PLC0415

    # the command line's bounds for a Python call too (a --max-drop of nan would pass any file)
    try:
        check_fields(ExportConfig(io_dtype=io_dtype, calib_size=calib_size, calib_range=calib_range,
                                  bn_scales=bn_scales, max_drop=max_drop, max_size=max_size, float_weights=float_weights,
                                  openvino_int8=openvino_int8, opset=opset, workers=workers))  # (formats: by the plan)
    except MriEdgeError as e:
        raise ExportError(str(e)) from None

    run = RunFolder(run_dir)
    run_dir = run.path
    jobs = plan(tuple(formats), tuple(quantize), io_dtype, ov.available(for_export=True), tuple(given), float_head,
                openvino_int8, float_weights, max_size, hybrid)
    if "float_weights" in given and not float_head and max_drop is None:
        raise ExportError("--float-weights sets how operations kept in float store their weights: "
                          "add --float-head or --max-drop")
    if max_size is not None and max_drop is None:
        raise ExportError("--max-size limits the file that the accuracy-aware search writes: add --max-drop")
    if hybrid and max_drop is None:
        raise ExportError("--hybrid runs stages that the accuracy-aware search keeps in float as dynamic-range int8 "
                          "where its budget holds: add --max-drop")
    _check(calib_size, calib_range, bn_scales, opset, workers)
    started = time.time()
    model, cfg, labels = load_run(run_dir)
    model = deployment_graph(model)
    size = int(cfg["image_size"])
    out_dir = run.exports_dir
    made_dir = not out_dir.is_dir()
    out_dir.mkdir(exist_ok=True)
    model_sha = sha256_file(run.model_path)
    base_meta = {
        "mri_edge_version": __version__,
        "task": labels.get("task", cfg["task"]),
        "class_names": labels["class_names"],
        "input_size": [size, size],
        "preprocessing": cfg.get("preprocessing") or preprocess.contract(size),
        "source_model_sha256": model_sha,
        # the run's calibration travels into files exported after it, when it was fitted for this model.keras
        **({"trust": record} if (carried := trust.fitted_for(record := run.trust(), model_sha)) else {}),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())}
    if record and not carried:
        log(f"note: {run.trust_path.name} is another model.keras's: these files are not calibrated (mri-edge calibrate)")
    units = pool.units(jobs)
    workers = pool.default_workers(len(units)) if workers is None else min(workers, len(units))
    # Finished files wait inside exports/ itself (a rename into exports/ is atomic only within one filesystem),
    # and so does the work (SavedModel, ONNX graphs, candidates), so that what an export killed outright
    # (SIGKILL, out of memory) left is found and removed by the next one: no other export runs (`RunFolder.lock`).
    for left in [*out_dir.glob(".staging-*"), *out_dir.glob(".work-*")]:
        shutil.rmtree(left, ignore_errors=True)
    workdir = Path(tempfile.mkdtemp(prefix=".work-", dir=out_dir))
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out_dir))
    records = {r["file"]: r for r in run.exports_index().get("exports", []) if isinstance(r, dict) and "file" in r}
    if not records and run.exports_index_path.is_file() and (records := pool.records_from_files(run.export_files())):
        log(f"{run.exports_index_path} was damaged: its rows are rebuilt from the exported files' metadata")
    results, failures = [], []
    try:
        calib_path, calib_meta = None, {}
        if any(j.quantize == "int8" for j in jobs):
            t = time.time()
            calib, used = calibration_set(run_dir, cfg, calib_size)
            calib_path = str(workdir / "calib.npy")
            np.save(calib_path, calib)
            manifest, calib_meta = calibration_manifest(used, size, calib_range)
            # lands in exports/ with the first int8 file it describes
            report.write_json(staging / "calibration_manifest.json", manifest)
            log(f"calibration: {len(used)} training images ({time.time() - t:.1f} s)")
        val_path = None
        auto_bn = bn_scales == "auto" and any(j.fmt == "tflite" and j.quantize == "int8" for j in jobs)
        aware = max_drop is not None and any(j.quantize == "int8" for j in jobs)
        if auto_bn or aware:
            t = time.time()
            ref, x_val = validation_reference(run_dir, log, with_images=True)
            val_path = str(workdir / "val.npz")
            np.savez(val_path, x=x_val, ref=np.asarray(ref["probs"], np.float32), labels=np.asarray(ref["labels"]))
            why = " and ".join([w for w, on in (("choose batch-norm scales", auto_bn),
                                                 (f"keep int8 within {max_drop} points", aware)) if on])
            log(f"Keras reference on {len(x_val)} validation images, to {why} ({time.time() - t:.1f} s)")

        def context(unit: list[ExportJob]) -> pool.WorkerContext:
            return pool.WorkerContext(
                jobs=unit, targets=[str(staging / j.filename) for j in unit],
                metas=[{**base_meta, "format": j.fmt, "quantization": j.quantize,
                        **({"float_head": True} if j.float_head else {}),
                        **(calib_meta if j.quantize == "int8" else {}),
                        **({"bn_scales": bn_scales} if j.quantize == "int8" and j.fmt == "tflite" else {})}
                       for j in unit],
                run_dir=str(run_dir), workdir=str(workdir), saved_model=str(workdir / "saved_model"), size=size,
                opset=opset, calib_range=calib_range, bn_scales=bn_scales,
                threads=pool.cores_each(workers),
                calib=calib_path if any(j.quantize == "int8" for j in unit) else None, val=val_path,
                max_drop=max_drop)

        def collect(outcomes: list[dict]) -> None:
            for r in outcomes:
                if "error" in r:
                    failures.append(r)
                    log(f"  {r['file']} FAILED: {r['error']}")
                    continue
                with quiet.signals_deferred():  # the file and its record change together or not at all
                    if r["quantization"] == "int8" and (staging / "calibration_manifest.json").exists():
                        # every calibration an int8 file of exports/ was made with stays, named by its hash
                        # (the one each file's metadata records); calibration_manifest.json is the latest
                        sha = calib_meta["calibration_manifest_sha256"]
                        atomic_write_bytes(out_dir / "calibration" / f"{sha[:16]}.json",
                                           (staging / "calibration_manifest.json").read_bytes())
                        os.replace(staging / "calibration_manifest.json", out_dir / "calibration_manifest.json")
                    _land(staging / r["file"], out_dir)
                    records[r["file"]] = r
                    _write_index(run, records, model_sha, failures, started, workers)
                results.append(r)
                scales = f", batch-norm scales {r['bn_scales']}" if "bn_scales" in r else ""
                scales += f", {r['float_parts']}" if "float_parts" in r else \
                    f", the head's weights {r['float_weights']}" if "float_weights" in r else ""
                log(f"  {r['file']}: {r['size_mb']:.2f} MB in {r['seconds']:.1f} s{scales}")

        _run_units(units, context, collect, model, size, workdir, workers, log)
    except BaseException:  # interrupted after some files landed: report.md says what is there now
        if results:
            run.write_index()
        raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)
        if made_dir and not any(out_dir.iterdir()):  # an interrupted first export leaves no empty exports/
            out_dir.rmdir()
    order = {j.filename: i for i, j in enumerate(jobs)}
    results.sort(key=lambda r: order[r["file"]])
    failures.sort(key=lambda r: order[r["file"]])
    log(f"{len(results)} file(s) in {time.time() - started:.0f} s ({workers} worker{'s' if workers > 1 else ''})")
    made = {r["file"] for r in results}
    onnx8, xml8 = file_name("onnx", "int8"), file_name("openvino", "int8")
    if onnx8 in made and xml8 not in made and records.get(xml8, {}).get("int8_from", "").startswith(onnx8):
        log(f"note: {xml8} was converted from the {onnx8} this export replaced; export "
            "--format onnx --format openvino --quantize int8 to convert the new one")
    _write_index(run, records, model_sha, failures, started, workers)
    run.write_index()
    return results, failures


def _run_units(units, context, collect, model, size: int, workdir: Path, workers: int, log) -> None:
    """In-process with one worker, else in a pool that is killed on any interrupt."""
    from . import tflite  # noqa: PLC0415

    has_tflite = any(u[0].fmt == "tflite" for u in units)
    if workers == 1:
        if has_tflite:
            tflite.write_saved_model(model, str(workdir / "saved_model"), size)
        with progress.notes_going_to(log):  # the accuracy-aware search's steps
            for u in units:
                log(f"exporting {', '.join(j.filename for j in u)} ...")
                collect(pool.run_unit(context(u), model))
        return
    import multiprocessing as mp  # noqa: PLC0415
    from concurrent.futures import as_completed  # noqa: PLC0415

    log(f"exporting {sum(len(u) for u in units)} files with {workers} worker processes ...")
    notes = mp.get_context("spawn").Queue()  # the workers' progress.note() lines
    # pool.threads_now; no lock: one writer, and a worker killed while holding one would hang the parent
    running = mp.get_context("spawn").Value("i", workers, lock=False)
    executor = pool.start_pool(workers, notes, running)
    relay = None
    try:
        relay = progress.Relay(notes, log)
        # The ONNX chain needs only model.keras: start it while the SavedModel is written.
        # (a submit starts a worker: interrupts_held keeps a Ctrl-C during its imports from printing its traceback)
        with quiet.interrupts_held():
            futures = {executor.submit(pool.run_unit, context(u)): u for u in units if u[0].fmt != "tflite"}
        if has_tflite:
            tflite.write_saved_model(model, str(workdir / "saved_model"), size)
        with quiet.interrupts_held():
            futures.update({executor.submit(pool.run_unit, context(u)): u for u in units if u[0].fmt == "tflite"})
        for fut in as_completed(futures):
            running.value = max(1, min(workers, sum(not f.done() for f in futures)))
            try:
                outcomes = fut.result()
            except Exception as e:  # e.g. BrokenProcessPool: a converter crashed its process
                outcomes = [pool.record(j, {}, Path(j.filename), 0.0, e) for j in futures[fut]]
            collect(outcomes)
        executor.shutdown()  # the workers send their last lines before they exit
    except BaseException:
        pool.kill_pool(executor)
        raise
    finally:
        if relay is not None:
            relay.stop()
        notes.close()


def table(results: list[dict]) -> str:
    aware = any("float_parts" in r for r in results)
    return report.md_table(
        ["file", "format", "quantization", "I/O dtype", "size MB", "seconds"] + (["int8 recipe (held-out agreement)"]
                                                                                 if aware else []),
        [[r["file"], r["format"], r["quantization"], r["io_dtype"], round(r["size_mb"], 2),
          "" if r.get("seconds") is None else round(r["seconds"], 1)]
         + ([r.get("float_parts", "")] if aware else []) for r in results])


def add_features(path: Path) -> str:
    """Give a file exported before it had one the features output (`runtime.FEATURES`, what the
    familiarity check of `mri-edge calibrate` reads): the same graph, its pooled features also
    handed out, so its probabilities stay bit for bit. Returns what happened, in words: "added",
    or why not (it has one; no single global pooling, as in an ensemble). A TFLite file whose
    output its signature does not name gets the entry: "named in its signature"."""
    from ..integrity import check_integrity  # noqa: PLC0415
    from ..backends import read_metadata  # noqa: PLC0415
    from ..runtime import FEATURES  # noqa: PLC0415

    path = Path(path)
    meta = read_metadata(path)
    check_integrity(path, meta)
    had = FEATURES in meta
    if path.suffix == ".tflite":  # also names a features output its signature lacks
        from .rewrite import tflite_add_features  # noqa: PLC0415
        from .tflite import append_tflite_metadata, tflite_flatbuffer, tflite_io  # noqa: PLC0415

        fb = tflite_flatbuffer(path, meta)
        new = tflite_add_features(fb)
        if new == fb:
            return "has one" if had else "no single global pooling"
        meta.update(tflite_io(new))
        atomic_write_bytes(path, append_tflite_metadata(new, meta))
        return "named in its signature" if had else "added"
    if had:
        return "has one"
    if path.suffix == ".xml":
        from .openvino import add_features_output, io_details, save  # noqa: PLC0415

        from ..ov import core  # noqa: PLC0415

        model = core()[1].read_model(str(path))
        if not add_features_output(model):
            return "no single global pooling"
        meta.update(io_details(model))
        save(model, path, meta, expect_sha256=meta.get("model_sha256"))  # one more output, the same weights
        return "added"
    import onnx  # noqa: PLC0415

    from .onnx import onnx_bytes, onnx_io, set_onnx_metadata  # noqa: PLC0415
    from .rewrite import onnx_add_features  # noqa: PLC0415

    proto = onnx.load(str(path))
    if not onnx_add_features(proto):
        return "no single global pooling"
    meta.update(onnx_io(proto.SerializeToString()))
    set_onnx_metadata(proto, meta)
    atomic_write_bytes(path, onnx_bytes(proto))
    return "added"


@holding("export --add-features")
def add_features_run(run_dir, log=print, given: tuple[str, ...] = ()) -> list[str]:
    """`add_features` for each exported file of a run (`export --add-features`), each reported;
    the names of those changed. One that fails stops it, naming those changed before it. It makes
    no file, so an export option the user gave (`given`) would go unused: refused."""
    if given:
        raise ExportError(f"--add-features changes the exported files in place and uses no other option: drop "
                          f"{', '.join(flag(ExportConfig.__dataclass_fields__[n]) for n in given)}")
    run = RunFolder(run_dir)
    files = run.export_files()
    if not files:
        raise ExportError(f"{run.path}: no exported files")
    quiet.import_tensorflow()  # the flatbuffer tools; its log lines stay hidden
    changed = []
    for f in files:
        try:
            what = add_features(f)
        except MriEdgeError as e:
            raise ExportError(f"{e} (features output added so far: {', '.join(changed) or 'none'})") from None
        log(f"{f.name}: {what}")
        if what in ("added", "named in its signature"):
            changed.append(f.name)
            index_new_bytes(f)
    if changed:  # the check is fitted on the features: calibrate again to have it
        log(f"next: mri-edge calibrate {run_dir}")
    return changed


def rewrite_metadata(path: Path, meta: dict) -> None:
    """Give an exported file new metadata without touching its model bytes (their recorded
    hash is checked): how `mri-edge calibrate` stores its record in every file."""
    path = Path(path)
    if path.suffix == ".tflite":
        from .tflite import rewrite_tflite_metadata as rewrite  # noqa: PLC0415
    elif path.suffix == ".onnx":
        from .onnx import rewrite_onnx_metadata as rewrite  # noqa: PLC0415
    elif path.suffix == ".xml":
        from .openvino import rewrite_openvino_metadata as rewrite  # noqa: PLC0415
    else:
        raise ExportError(f"{path}: not an exported model file")
    rewrite(path, meta)
    index_new_bytes(path)


def index_new_bytes(path: Path) -> None:
    """exports.json's hash of a file changed in place (calibrate's record, --add-features): of the
    whole file, an OpenVINO model's of its .bin, as export records it (`pool.record`)."""
    run = RunFolder(path.parent.parent)
    index = run.exports_index() if path.parent.name == "exports" else {}
    rows = [r for r in index.get("exports", []) if isinstance(r, dict) and r.get("file") == path.name]
    if rows:
        rows[0]["sha256"] = sha256_file(hashed_file(path))
        run.write_exports_index(index)
