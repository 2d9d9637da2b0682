"""`mri-edge bench`: latency, throughput, size and memory of every artifact on every runtime.

Each row (artifact x runtime x threads x batch) runs in a fresh Python process
(`python -m mri_edge.bench_worker`), so one runtime's memory and thread pools cannot skew
another's. Missing runtimes and GPU back ends become "skipped" rows, never errors.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path


from . import ov, quiet
from .errors import MriEdgeError, installed
from .files import sha256_file, unwritable
from .run import BENCH_FILES, RunFolder
from .integrity import RuntimeMissingError, check_model_file
from .backends import EXPORT_SUFFIXES, MODEL_SUFFIXES, read_metadata, recorded_model_sha256
from .bench_worker import ONNX_RUNTIMES, TFLITE_RUNTIMES
from .config import BENCH_DEFAULTS

SCHEMA_VERSION = 1


class BenchError(MriEdgeError):
    pass


def read_bench(path) -> dict:
    """An earlier bench.json for --compare, checked before anything is timed."""
    from .files import read_json  # noqa: PLC0415

    old = read_json(path, "--compare", ("rows",))
    if not isinstance(old["rows"], list) or not all(isinstance(r, dict) and {"model", "threads", "batch", "p50_ms"}
                                                    <= set(r) for r in old["rows"]):
        raise BenchError(f"--compare {path}: its rows are not those of a bench.json of `mri-edge bench`")
    return old


def machine_info() -> dict:
    cpu, flags = platform.processor() or "", []
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                all_flags = set(line.split(":", 1)[1].split())
                flags = sorted(f for f in all_flags if f.startswith(("avx", "amx", "fma", "sse4", "f16c", "vnni")))
                break
    except OSError:
        pass
    from importlib.metadata import packages_distributions, version  # noqa: PLC0415

    dists = packages_distributions()  # import name -> the installed distributions (tensorflow: tensorflow-cpu)
    versions = {}
    for mod in ("numpy", "tensorflow", "keras", "ai_edge_litert", "tflite_runtime", "onnxruntime", "openvino", "torch",
                "cv2"):
        if not installed(mod):
            continue
        try:
            versions[mod] = version((dists.get(mod) or [mod])[0])
        except Exception:
            versions[mod] = "?"
    return {"cpu": cpu, "cpu_flags": flags, "cores": os.cpu_count(), "machine": platform.machine(),
            "python": platform.python_version(), "versions": versions}


def _ort_providers() -> list[str]:
    if not installed("onnxruntime"):
        return []
    out = subprocess.run([sys.executable, "-c", "import onnxruntime as o; print(','.join(o.get_available_providers()))"],
                         capture_output=True, text=True)
    return out.stdout.strip().split(",") if out.returncode == 0 else []


def _torch_cuda() -> bool:
    if not installed("torch"):
        return False
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                         capture_output=True, text=True)
    return out.stdout.strip() == "True"


def first_readable(paths: list[Path]) -> str | None:
    """The first image that decodes (the end-to-end timing needs one; a run may list a broken file)."""
    from .preprocess import load_image  # noqa: PLC0415

    for p in paths:
        try:
            load_image(p)
            return str(p)
        except MriEdgeError:
            continue
    return None


def plan(targets: list[str]) -> tuple[list[dict], list[dict], str | None]:
    """(artifacts, skipped rows, sample image) for run folders and/or model files."""
    artifacts = []
    image = None
    for t in targets:
        p = Path(t)
        if p.is_dir():
            run = RunFolder(p)
            files = ([run.model_path] if run.model_path.is_file() else []) + run.export_files()
            if not files:
                raise BenchError(f"{p}: no model.keras, .tflite, .onnx or OpenVINO .xml files")
            if run.manifest_path.is_file() and image is None:
                m = run.manifest()
                rows = m["splits"].get("test") or m["splits"].get("train") or []
                image = first_readable([Path(m["root"]) / rel for rel, _ in rows[:20]])
            artifacts += files
        elif p.is_file():
            check_model_file(p, MODEL_SUFFIXES, "a model file")  # one line now, not a failed row per runtime
            if p.suffix in EXPORT_SUFFIXES:
                try:
                    read_metadata(p)  # a file its runtime cannot open, too
                except RuntimeMissingError:
                    pass  # its rows are skipped, below
            artifacts.append(p)
        else:
            raise BenchError(f"{p}: no such file or folder")
    seen, uniq = set(), []
    for a in artifacts:
        if a.resolve() not in seen:
            seen.add(a.resolve())
            uniq.append(a)
    providers = _ort_providers()
    rows, skipped = [], []
    for a in uniq:
        if a.suffix == ".keras":
            if installed("keras") and (installed("tensorflow") or os.environ.get("KERAS_BACKEND")):
                rows.append({"model": str(a), "runtime": "keras", "device": "cpu"})
            else:
                skipped.append({"model": a.name, "runtime": "keras", "reason": "keras/tensorflow not installed"})
            if _torch_cuda():
                rows.append({"model": str(a), "runtime": "keras", "device": "gpu", "keras_backend": "torch"})
            else:
                skipped.append({"model": a.name, "runtime": "keras[torch] GPU", "reason": "no CUDA GPU with torch"})
        elif a.suffix == ".tflite":
            for rt, mod in list(TFLITE_RUNTIMES.items())[:2]:  # tf.lite: a last fallback, not benched
                if installed(mod):
                    rows.append({"model": str(a), "runtime": rt, "device": "cpu"})
                else:
                    skipped.append({"model": a.name, "runtime": rt, "reason": f"{mod} not installed"})
        elif a.suffix == ".xml":
            if installed("openvino"):
                rows.append({"model": str(a), "runtime": "openvino", "device": "cpu"})
            else:
                skipped.append({"model": a.name, "runtime": "openvino", "reason": "openvino not installed"})
        elif a.suffix == ".onnx":
            for rt, (prov, *_) in ONNX_RUNTIMES.items():
                if prov in providers:
                    rows.append({"model": str(a), "runtime": rt, "device": "cpu" if prov.startswith("CPU") else "gpu"})
                else:
                    skipped.append({"model": a.name, "runtime": rt, "reason": "onnxruntime not installed"
                                    if prov.startswith("CPU") else f"{prov} not available"})
    return rows, skipped, image


def run_row(spec: dict, timeout: float = 900) -> dict:
    cmd = [sys.executable, "-m", "mri_edge.bench_worker", json.dumps(spec)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    try:
        # subprocess.run kills the child when this process is interrupted (Ctrl-C, SIGTERM)
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    line = next((ln for ln in reversed(out.stdout.splitlines()) if ln.startswith("{")), None)
    if line is None:  # the worker died without a word (a crash in native code)
        return {"error": f"the runtime crashed (exit status {out.returncode}): {cause_line(out.stderr)}"}
    return json.loads(line)


def cause_line(stderr: str) -> str:
    """The line of a dead process's stderr that names the cause: the last 'XxxError: ...' line,
    else the last line with more than punctuation on it."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for ln in reversed(lines):
        head = ln.split(":", 1)[0]
        if head.endswith(("Error", "Exception")) and " " not in head:
            return ln[:300]
    return next((ln[:300] for ln in reversed(lines) if sum(c.isalnum() for c in ln) > 3), "no output")


def bench(targets, threads=BENCH_DEFAULTS["threads"], batches=BENCH_DEFAULTS["batches"],
          warmup=BENCH_DEFAULTS["warmup"], runs=BENCH_DEFAULTS["runs"], seconds=None, out_dir=None,
          log=print, ort_opt_level="all", image=None, device="all") -> dict:
    rows, skipped, found_image = plan(list(targets))
    if out_dir and (why := unwritable(out_dir)):  # before minutes of timing
        raise BenchError(why)
    if device != "all":
        skipped += [{"model": Path(r["model"]).name, "runtime": r["runtime"], "reason": f"--device {device}"}
                    for r in rows if r["device"] != device]
        rows = [r for r in rows if r["device"] == device]
        if not rows:
            raise BenchError(f"no {device} runtime for these targets")
    if image:  # decoded once here: a bad --image is one error, not one per row
        from .preprocess import load_image  # noqa: PLC0415

        load_image(image)
    image = str(image) if image else found_image
    if image is None:
        log("end-to-end timing (e2e) skipped: give --image (a run folder lends its first test image when it is where "
            "its split manifest says)")
    results = []
    from .progress import Progress  # noqa: PLC0415

    specs = [{**r, "threads": t, "batch": b, "warmup": warmup, "runs": runs, "seconds": seconds, "image": image,
              "ort_opt_level": ort_opt_level}
             for r in rows for t in threads for b in batches]
    hashes = {}  # which file each row measured (the model card leaves out rows of a file exported again)
    with Progress(len(specs), "bench rows") as bar:
        for s in specs:
            res = run_row(s)
            path = Path(s["model"])
            if path not in hashes:
                hashes[path] = recorded_model_sha256(path) if path.suffix in EXPORT_SUFFIXES else sha256_file(path)
            row = {"model": path.name, "path": str(path), "runtime": s["runtime"], "device": s["device"],
                   "threads": s["threads"], "batch": s["batch"], "size_mb": ov.size_on_disk(path) / 1e6,
                   "model_sha256": hashes[path], **res}
            if "error" in res:
                log(f"  {path.name} [{s['runtime']}] t={s['threads']} b={s['batch']}: cannot run: {res['error']}")
            results.append(row)
            bar.update()
    ok = sorted((r for r in results if "error" not in r), key=lambda r: (r["batch"], r["p50_ms"]))
    out = {"schema_version": SCHEMA_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "machine": machine_info(), "settings": {"threads": list(threads), "batches": list(batches),
                                                    "warmup": warmup, "runs": runs, "seconds": seconds,
                                                    "ort_opt_level": ort_opt_level, "device": device},
           "rows": ok, "errors": [r for r in results if "error" in r], "skipped": skipped}
    if not ok:  # a bench where no row ran writes nothing: the folder keeps its earlier report
        errors = out["errors"]
        shown = [f"{s['model']} on {s['runtime']} ({s['reason']})" for s in skipped[:3]]
        shown += [f"{len(skipped) - 3} more skipped"] if len(skipped) > 3 else []
        why = (f"{len(errors)} row(s) failed (every row): {errors[0]['error']}" if errors else
               "no row could run here: " + "; ".join(shown))
        kept = f", {out_dir} keeps what it held" if out_dir and Path(out_dir).exists() else ""
        raise BenchError(f"{why}; nothing written{kept}")
    if out_dir:
        with quiet.signals_deferred():  # bench.json, bench.md and bench.png describe one run
            write_outputs(out, Path(out_dir))
    return out


def table(out: dict) -> str:
    from .report import md_table  # noqa: PLC0415

    return md_table(
        ["model", "runtime", "thr", "batch", "size MB", "load s", "first ms", "p50 ms", "p90 ms", "p99 ms",
         "mean±std ms", "img/s", "e2e p50 ms", "+RSS MB"],
        [[r["model"], r["runtime_label"] + (" GPU" if r["device"] == "gpu" else ""), r["threads"], r["batch"], f"{r['size_mb']:.1f}", f"{r['load_s']:.2f}",
          f"{r['first_inference_ms']:.1f}", f"{r['p50_ms']:.2f}", f"{r['p90_ms']:.2f}", f"{r['p99_ms']:.2f}",
          f"{r['mean_ms']:.2f}±{r['std_ms']:.2f}", f"{r['throughput_img_s']:.1f}",
          "" if r["e2e_p50_ms"] is None else f"{r['e2e_p50_ms']:.2f}",
          f"{r['peak_rss_added_mb']:.0f}" + (f" (GPU {r['gpu_peak_mb']:.0f})" if r.get("gpu_peak_mb") else "")]
         for r in out["rows"]])


def compare(out: dict, old: dict) -> str:
    from .report import md_table  # noqa: PLC0415

    key = lambda r: (r["model"], r.get("runtime_label", r["runtime"]), r["threads"], r["batch"])  # noqa: E731
    prev = {key(r): r for r in old.get("rows", [])}
    rows = []
    for r in out["rows"]:
        o = prev.get(key(r))
        if o:  # rows match by file name: say whether it is the same file (exported again, or from elsewhere)
            same = "?" if not (o.get("model_sha256") and r.get("model_sha256")) else \
                "yes" if o["model_sha256"] == r["model_sha256"] else "no"
            rows.append([r["model"], same, r["runtime_label"], r["threads"], r["batch"], f"{o['p50_ms']:.2f}",
                         f"{r['p50_ms']:.2f}", f"{o['p50_ms'] / r['p50_ms']:.2f}x"])
    cpus = f"old: {old.get('machine', {}).get('cpu', '?')}; new: {out.get('machine', {}).get('cpu', '?')}"
    return f"{cpus}\n\n" + md_table(["model", "same file", "runtime", "thr", "batch", "old p50 ms", "new p50 ms",
                                       "speed-up"], rows) if rows else "no rows in common with the compared file"


def write_outputs(out: dict, out_dir: Path) -> None:
    from . import report  # noqa: PLC0415

    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path, png_path = (out_dir / name for name in BENCH_FILES)
    report.write_json(json_path, out)
    m = out["machine"]
    md = [f"# mri-edge bench ({out['created']})", "",
          f"CPU: {m['cpu']} ({m['cores']} cores; {', '.join(f for f in m['cpu_flags'] if 'avx512' in f or 'amx' in f) or 'no AVX-512'}). "
          f"Versions: {', '.join(f'{k} {v}' for k, v in m['versions'].items())}.", "",
          f"Warm-up {out['settings']['warmup']}, {out['settings']['runs']} timed runs per row, each row in a fresh "
          "process. Sorted by batch, then p50. `e2e` = decode JPEG + resize + invoke (batch 1).", "",
          table(out), ""]
    if out["skipped"]:
        md += ["Skipped (runtime not available here):", ""]
        md += [f"- {s['model']} on {s['runtime']}: {s['reason']}" for s in out["skipped"]] + [""]
    if out["errors"]:
        md += ["Rows that could not run (skipped):", ""]
        md += [f"- {e['model']} on {e['runtime']} (threads {e['threads']}, batch {e['batch']}): {e['error']}"
               for e in out["errors"]] + [""]
    rows = [r for r in out["rows"] if r["batch"] == min(out["settings"]["batches"])]
    plot = bool(rows) and installed("matplotlib")  # a device install has none: the tables alone
    if plot:
        md += [f"![p50 latency]({png_path.name})", ""]
    else:  # no plot of this bench: an older one must not pass for it
        png_path.unlink(missing_ok=True)
        md += ["No plot: matplotlib is not installed here (pip install matplotlib).", ""] if rows else []
    report.write_text(md_path, "\n".join(md))
    if plot:
        plt = report._plt()
        fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.5))
        labels = [f"{r['model']} [{r['runtime_label']}] t{r['threads']}" for r in rows]
        # whiskers from p50 to p90: latency is skewed (a mean ± std bar runs below 0 ms)
        ax.barh(range(len(rows)), [r["p50_ms"] for r in rows], color="tab:blue",
                xerr=[[0.0] * len(rows), [max(r["p90_ms"] - r["p50_ms"], 0.0) for r in rows]])
        ax.set_yticks(range(len(rows)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(f"p50 latency, ms (batch {rows[0]['batch']}; whisker to p90)")
        fig.tight_layout()
        report.save_figure(fig, png_path, 110)
    run = RunFolder(out_dir.parent)
    if out_dir == run.bench_dir and run.config_path.is_file():
        run.write_index()


