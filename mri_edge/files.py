"""File helpers written once: atomic writes, hashing and JSON reads with one-line errors.

Standard library only (the on-device runtime uses them).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from .errors import FileFormatError


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp", mode: int = 0o644):
    """A temporary path beside `path` for the block to write; it replaces `path` (one rename)
    only when the block succeeds, so a crash, a full disk or a kill never leaves half a file
    where a whole one was. `suffix` keeps the extension a writer insists on (.keras, .npz)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clear_stale(path, suffix)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    except OSError as e:  # a read-only folder, a full disk: name the file meant, not the temporary one
        raise OSError(e.errno, e.strerror, str(path)) from None
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, mode)  # mkstemp creates 0600; reports and models are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


STALE_S = 3600  # a temporary file of atomic_path untouched this long was left by a killed writer


def _clear_stale(path: Path, suffix: str) -> None:
    """Remove the temporary files of earlier writes of `path` that a kill (SIGKILL, out of
    memory) left behind, once they are old enough not to be another writer's at work."""
    if not suffix:  # ".name.*" would take other tools' hidden files too
        return
    # mkstemp's shape exactly: its 8 random characters between the prefix and the suffix
    for old in path.parent.glob(f".{glob.escape(path.name)}.{'?' * 8}{glob.escape(suffix)}"):
        with contextlib.suppress(OSError):
            if time.time() - old.stat().st_mtime > STALE_S:
                old.unlink()


def writable(folder: Path) -> bool:
    """Whether files can be made in `folder` (a read-only mount says no, even to root)."""
    return os.access(folder, os.W_OK | os.X_OK)


def unwritable(folder: str | Path) -> str | None:
    """Why files cannot be made in `folder` (new or existing), or None: its nearest existing
    folder must be one that can be entered and written."""
    nearest = Path(folder).absolute()
    while not os.path.lexists(nearest) and nearest != nearest.parent:  # lexists never raises
        nearest = nearest.parent
    try:
        is_dir = nearest.is_dir()  # a dangling link or a folder we may not enter: False or OSError
    except OSError:
        is_dir = False
    if not is_dir:
        return f"{folder}: {nearest} is not a folder that can be entered"
    if not writable(nearest):
        return f"{folder}: cannot write in {nearest} (read-only or no permission)"
    try:  # the permissions allow it; a file system of the kernel's (/proc, /sys) still refuses: ask it
        os.rmdir(tempfile.mkdtemp(prefix=".mri-edge-probe-", dir=nearest))
    except OSError as e:
        return f"{folder}: cannot make a folder in {nearest} ({e.strerror or e})"
    return None


def atomic_write_bytes(path: str | Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` whole or not at all (see atomic_path)."""
    with atomic_path(path, mode=mode) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """UTF-8; a file name that is not (its bytes kept by Python as surrogates) is written escaped."""
    atomic_write_bytes(path, text.encode("utf-8", "backslashreplace"))


def atomic_copy(src: str | Path, dst: str | Path) -> None:
    """Copy `src` to `dst` whole or not at all (see atomic_path)."""
    with atomic_path(dst, suffix=Path(dst).suffix) as tmp:
        shutil.copyfile(src, tmp)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, limit: int | None = None) -> str:
    """SHA-256 of a file (of its first `limit` bytes when given), read in 1 MiB chunks."""
    h = hashlib.sha256()
    left = limit
    with open(path, "rb") as f:
        while left is None or left > 0:
            chunk = f.read(1 << 20 if left is None else min(1 << 20, left))
            if not chunk:
                break
            h.update(chunk)
            if left is not None:
                left -= len(chunk)
    return h.hexdigest()


def read_json(path: str | Path, what: str | None = None, keys: tuple[str, ...] = ()) -> dict:
    """A JSON object from `path`, or FileFormatError with one line that names the file and
    the problem (missing, unreadable, not JSON, not an object, missing keys)."""
    path = Path(path)
    label = f"{what} {path}" if what else str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileFormatError(f"{label}: not found") from None
    except OSError as e:
        raise FileFormatError(f"{label}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise FileFormatError(f"{label}: not a JSON file (binary content)") from None
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise FileFormatError(f"{label}: not valid JSON ({e}); the file is damaged") from None
    if not isinstance(obj, dict):
        raise FileFormatError(f"{label}: expected a JSON object, found {type(obj).__name__}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise FileFormatError(f"{label}: missing {', '.join(missing)}")
    return obj
