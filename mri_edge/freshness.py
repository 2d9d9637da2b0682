"""Which rows of a run's reports (calibrate.json, parity.json, bench.json, the card) describe its
files as they are now: by the model_sha256 each row recorded and each file's metadata holds."""

from __future__ import annotations


def made_from_another(metadata: dict[str, dict], model_sha: str | None) -> list[str]:
    """Exported files (`RunFolder.export_metadata`) whose metadata names another model.keras than the
    run's (sha256 `model_sha`): retrained, or `evaluate --fp16-weights`, since they were exported."""
    return sorted(n for n, m in metadata.items() if model_sha and m.get("source_model_sha256") not in (None, model_sha))


def renamed(rows: dict, metadata: dict[str, dict]) -> dict[str, str]:
    """{old name: new name} for report rows (by file name) of files no longer there whose recorded
    model_sha256 a file there now holds that has no row of its own: the file was renamed."""
    free = {}  # model bytes' hash -> a file holding them without a row (the first, by name)
    for n in sorted(metadata):
        if n not in rows and (sha := metadata[n].get("model_sha256")):
            free.setdefault(sha, n)
    out = {}
    for n, r in sorted(rows.items()):
        if n not in metadata and isinstance(r, dict) and (new := free.get(r.get("model_sha256"))) \
                and new not in out.values():
            out[n] = new
    return out


def by_current_name(rows: dict, metadata: dict[str, dict]) -> dict:
    """Report rows by file name, a renamed file's (`renamed`) under its name now."""
    moved = renamed(rows, metadata)
    return {moved.get(n, n): r for n, r in rows.items()}


def current_rows(rows: dict, metadata: dict, what: str, command: str, missing: list, keep=(),
                 skipped: dict | None = None) -> dict:
    """The rows of a report (by file name) that describe a file as it is now: a file exported again
    since (`exported_again`) or gone has its rows left out, and they with the files the report
    never measured are named in `missing` (with the reason a report gives in `skipped`, by name).
    `keep`: rows of other files (model.keras, a calibration's reference). A renamed file keeps its rows."""
    rows = by_current_name(rows, metadata)
    stale = exported_again(rows.items(), metadata)
    unmeasured = [n for n in metadata if n not in rows and n not in (skipped or {})]
    for names, why in ((stale, f"exported again since; run {command}"), (unmeasured, f"not measured; run {command}"),
                       *(([n], reason) for n, reason in (skipped or {}).items() if n in metadata and n not in rows)):
        if names:
            missing.append(f"{what} of {', '.join(names)} ({why})")
    return {n: r for n, r in rows.items() if n not in stale and (n in metadata or n in keep)}


def exported_again(rows, metadata: dict[str, dict]) -> list[str]:
    """Files whose report rows ((name, row) pairs) record another model_sha256 than the file now
    holds (`RunFolder.export_metadata`): exported again after the report, so the rows describe
    the file it replaced. Rows that record no hash, or files not there, cannot be checked."""
    return sorted({n for n, r in rows if r.get("model_sha256")
                   and metadata.get(n, {}).get("model_sha256") not in (None, r["model_sha256"])})
