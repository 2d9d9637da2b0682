"""What a model file is and whether it is whole: its kind from its first bytes (a renamed
file says so), and the hash of its model bytes against the one export recorded.

Standard library only (the on-device runtime uses it).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .errors import MriEdgeError
from .export.formats import FORMATS
from .files import sha256_file


class RuntimeModelError(MriEdgeError, ValueError):
    """The file is not an mri-edge model this runtime can run."""


class RuntimeMissingError(RuntimeModelError):
    """The runtime that opens this kind of file is not installed (bench skips such a file's rows)."""


def image_format(head: bytes) -> str | None:
    """"png" or "jpeg" from a file's first bytes (their signatures), else None."""
    return "png" if head[:8] == b"\x89PNG\r\n\x1a\n" else "jpeg" if head[:2] == b"\xff\xd8" else None


# What a model file's first bytes say it is (a renamed file gets a message that says so).
def sniff(path: str | Path) -> str:
    """"tflite", "onnx", "keras", "openvino", "image", "empty" or "unknown", from the first bytes."""
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        return "empty"
    if head[4:8] == b"TFL3":
        return "tflite"
    if head[:4] == b"PK\x03\x04":
        return "keras"
    if head.lstrip().startswith(b"<?xml") or head.lstrip().startswith(b"<net"):
        return "openvino"
    if image_format(head):
        return "image"
    if head[0] == 0x08:  # ModelProto field 1 (ir_version), a varint
        return "onnx"
    return "unknown"


KIND_BY_SUFFIX = {**{f.suffix: f.name for f in FORMATS.values()}, ".keras": "keras"}  # export's formats, Keras
SUFFIX_BY_KIND = {v: k for k, v in KIND_BY_SUFFIX.items()}
NAMED = {"tflite": "a TFLite", "onnx": "an ONNX", "openvino": "an OpenVINO", "keras": "a Keras", "image": "an image"}


def check_model_file(path: Path, suffixes, what: str) -> None:
    """A model file named on the command line, refused in one line before any slow work when it
    cannot be one: missing, a suffix outside `suffixes`, empty, or another kind's bytes."""
    if not path.is_file():
        raise RuntimeModelError(f"{path}: no such file")
    if path.suffix not in suffixes:
        raise RuntimeModelError(f"{path}: not {what} (expected {', '.join(suffixes)})")
    check_kind(path)


def check_kind(path: Path) -> None:
    expected = KIND_BY_SUFFIX.get(path.suffix)
    kind = sniff(path)
    if kind == "empty":
        raise RuntimeModelError(f"{path}: the file is empty (an interrupted copy?)")
    if expected and kind != expected and kind != "unknown":
        hint = f"; rename it to {path.stem}{SUFFIX_BY_KIND[kind]}" if kind in SUFFIX_BY_KIND else ""
        raise RuntimeModelError(f"{path}: not {NAMED[expected]} file: its bytes are those of {NAMED[kind]} file{hint}")
    if expected and kind == "unknown":
        raise RuntimeModelError(f"{path}: not {NAMED[expected]} file (unrecognised bytes; damaged or not a model)")
    if kind == "keras":
        import zipfile  # noqa: PLC0415

        if not zipfile.is_zipfile(path):  # Keras itself would say "File not found"
            raise RuntimeModelError(f"{path}: a damaged or truncated .keras file (not a whole zip archive)")


def onnx_content_sha256(data: bytes) -> str:
    """SHA-256 of an ONNX file's bytes without its metadata_props (field 14 of ModelProto).

    The metadata (which holds this very hash) is left out; every other top-level field (the
    graph, its weights, the opsets) is hashed as stored. Reads the protobuf wire format
    directly, so the device needs no onnx package.
    """
    h = hashlib.sha256()
    i, n = 0, len(data)

    def varint(j):
        shift = value = 0
        while True:
            if j >= n:
                raise RuntimeModelError("truncated ONNX file (a field runs past the end)")
            b = data[j]
            value |= (b & 0x7F) << shift
            j += 1
            if not b & 0x80:
                return value, j
            shift += 7

    while i < n:
        start = i
        tag, i = varint(i)
        wire = tag & 7
        if wire == 0:
            _, i = varint(i)
        elif wire == 1:
            i += 8
        elif wire == 2:
            length, i = varint(i)
            i += length
        elif wire == 5:
            i += 4
        else:
            raise RuntimeModelError(f"not an ONNX file (protobuf wire type {wire})")
        if i > n:
            raise RuntimeModelError("truncated ONNX file (a field runs past the end)")
        if tag >> 3 != 14:
            h.update(data[start:i])
    return h.hexdigest()


def model_files(path: str | Path) -> list[Path]:
    """A model's files on disk: the file, and for an OpenVINO IR (.xml, the graph) its .bin."""
    path = Path(path)
    return [path, path.with_suffix(".bin")] if path.suffix == ".xml" else [path]


def hashed_file(path: str | Path) -> Path:
    """The file whose bytes export hashes as a model's: an OpenVINO IR's .bin (its weights;
    the .xml holds the hash), any other file itself."""
    return model_files(path)[-1]


def content_sha256(path: str | Path, meta: dict) -> str | None:
    """The hash of a file's model bytes as export recorded them (None: nothing recorded)."""
    path = Path(path)
    if path.suffix == ".tflite" and "model_bytes" in meta:
        return sha256_file(path, limit=int(meta["model_bytes"]))
    if path.suffix == ".onnx":
        return onnx_content_sha256(path.read_bytes())
    if path.suffix == ".xml":
        return sha256_file(hashed_file(path))
    return None


def check_integrity(path: str | Path, meta: dict) -> None:
    """Refuse a file whose model bytes differ from the hash export embedded in it.

    Files exported before the hash existed carry none and are not checked.
    """
    want = meta.get("model_sha256")
    if not want:
        return
    got = content_sha256(path, meta)
    if got is not None and got != want:
        raise RuntimeModelError(f"{path}: its model bytes differ from what `mri-edge export` recorded (sha256 "
                                f"{got[:12]}... != {want[:12]}...): the file was modified or damaged; re-export it")
