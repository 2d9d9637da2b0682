"""The one preprocessing contract shared by training, export, verify and the device.

Every image, whatever its file type or pixel format, becomes an RGB uint8 array of
shape (size, size, 3) through `load_image`. Normalisation is *not* done here: it is
a layer inside the model graph, so every exported file takes raw 0-255 pixels.

This module is imported by `mri_edge.runtime`, so it may only use the standard
library, numpy and an optional decoder (OpenCV, else Pillow).
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from pathlib import Path

import numpy as np

from .errors import MriEdgeError
from .integrity import RuntimeModelError, image_format

# ImageNet statistics used by keras.applications.densenet ("torch" mode).
# They live here so the model layer and the metadata quote the same numbers.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Bump when decoding (not resizing or the model's input) changes: decoded-image caches are rebuilt.
DECODE_VERSION = 2

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".pgm", ".ppm"}

# Bump when decoding or resizing changes, so cached arrays are rebuilt.
CONTRACT_VERSION = 1


# The resize implementations, by preference. A model file records the one it was trained and
# checked with; the runtime refuses another unless told to accept it.
OPENCV, PILLOW, NEAREST = "opencv-area-linear", "pillow-box-bilinear", "nearest"
RESIZE_TEXT = {OPENCV: "stretch to square, OpenCV INTER_AREA (downscale) / INTER_LINEAR (upscale)",
               PILLOW: "stretch to square, Pillow BOX (downscale) / BILINEAR (upscale)",
               NEAREST: "stretch to square, nearest neighbour"}


class ImageError(MriEdgeError, ValueError):
    """An input could not be turned into an image (corrupt, truncated, too large, not an image)."""


def max_pixels(default: int = 50_000_000) -> int:
    """The decoded-image cap: MRI_EDGE_MAX_PIXELS, a whole number above 0, else the default."""
    raw = os.environ.get("MRI_EDGE_MAX_PIXELS", "").strip()
    if raw and not (raw.isascii() and raw.isdigit() and int(raw) > 0):
        raise ImageError(f"MRI_EDGE_MAX_PIXELS={raw}: must be a whole number of pixels above 0 (default {default:,})")
    return int(raw) if raw else default


# A decompression bomb (tiny file, giant canvas) is refused before decoding: PNG and JPEG from
# their headers here, other formats from the header Pillow reads when it opens a file (lazily).
# OpenCV's own header check gets the same cap when this module is imported before cv2 (OpenCV
# reads its limit when it loads): it covers a machine without Pillow.
MAX_PIXELS = max_pixels()
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(MAX_PIXELS))


def contract(image_size: int) -> dict:
    """The preprocessing record saved with the model and embedded in every export."""
    return {
        "image_size": [int(image_size), int(image_size)],
        "channels": 3,
        "color": "RGB; grayscale is replicated to 3 channels, alpha dropped, 16-bit scaled by 1/257",
        "resize": RESIZE_TEXT[resize_method()],
        "resize_method": resize_method(),
        "input_dtype": "float32 or uint8 raw pixels",
        "input_range": [0, 255],
        "normalization": {
            "where": "inside the model graph",
            "mean": [round(m * 255, 4) for m in IMAGENET_MEAN],
            "std": [round(s * 255, 4) for s in IMAGENET_STD],
        },
        "contract_version": CONTRACT_VERSION,
    }


def _cv2():
    try:
        import cv2  # noqa: PLC0415
    except ImportError:
        return None
    return cv2


def _pil():
    try:
        from PIL import Image  # noqa: PLC0415
    except ImportError:
        return None
    return Image


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header without decoding (PNG and JPEG here, other formats through
    Pillow's lazy open where Pillow is installed), else None."""
    if image_format(data):
        return png_jpeg_size(data)
    Image = _pil()
    if Image is None:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's own DecompressionBombWarning: the cap here decides
            with Image.open(io.BytesIO(data)) as im:
                return im.size
    except Image.DecompressionBombError:  # over twice Pillow's own cap (about 179 million pixels)
        raise ImageError(f"over {2 * Image.MAX_IMAGE_PIXELS:,} pixels (decompression bomb?)") from None
    except Exception:  # not an image Pillow knows: OpenCV's decoder has the last word
        return None


def png_jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG or JPEG header, else None."""
    kind = image_format(data)
    if kind == "png" and len(data) >= 24:
        w, h = struct.unpack(">II", data[16:24])
        return w, h
    if kind == "jpeg":
        i = 2
        n = len(data)
        while i + 9 < n:
            if data[i] != 0xFF:
                i += 1
                continue
            marker = data[i + 1]
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
                i += 1 if marker == 0xFF else 2
                continue
            seg_len = struct.unpack(">H", data[i + 2 : i + 4])[0]
            if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
                h, w = struct.unpack(">HH", data[i + 5 : i + 9])
                return w, h
            i += 2 + seg_len
    return None


def check_size(w: int, h: int, where: str) -> None:
    if w * h > MAX_PIXELS:
        raise ImageError(f"{where}: {w}x{h} pixels exceeds the {MAX_PIXELS:,}-pixel cap (decompression bomb?)")
    if w < 1 or h < 1:
        raise ImageError(f"{where}: empty image")


def to_uint8_values(a: np.ndarray) -> np.ndarray:
    """Pixel values -> 0-255, one rule whatever the dtype: uint8 as it is; floats within [0, 1]
    times 255; other values within 0-255 as they are (uint16 aside: its values are 16-bit);
    values up to 65535 as 16-bit data, scaled by 255/65535. Refused: negative, NaN or larger
    values (normalised or unscaled data), and 16-bit data under 4096 (12 of 16 bits used, e.g. a
    scanner's 12-bit pixels): scaled as 16-bit it is nearly black, and it needs a window first."""
    if a.dtype == np.uint8 or not a.size:
        return a.astype(np.uint8)
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise ImageError(f"unsupported image dtype {a.dtype}")
    floating = np.issubdtype(a.dtype, np.floating)
    low, high = float(np.min(a)), float(np.max(a))  # NaN if any is NaN (an empty array returned above)
    if not (np.isfinite(low) and np.isfinite(high)) or low < 0 or high > 65535:
        raise ImageError(f"{a.dtype} pixel values in [{low:.4g}, {high:.4g}]: give raw pixels (0-255, floats 0-1, "
                         "or 16-bit 0-65535), not normalised or unscaled data")
    if floating and high <= 1.0:
        return np.rint(a.astype(np.float32) * 255).astype(np.uint8)
    if high <= 255 and a.dtype != np.uint16:
        return (np.rint(a) if floating else a).astype(np.uint8)
    if 0 < high < 4096:  # (all zero: a blank image, which predict flags as such)
        raise ImageError(f"16-bit pixel values reaching only {high:.0f} of 65535: as 16-bit data the image is nearly "
                         "black; window or rescale it to 0-255 (uint8) first")
    if floating:
        return np.rint(a.astype(np.float32) * np.float32(255 / 65535)).astype(np.uint8)
    return ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def to_rgb_uint8(arr: np.ndarray, bgr: bool = False) -> np.ndarray:
    """Any decoded array -> HxWx3 uint8 RGB (values by `to_uint8_values`)."""
    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise ImageError(f"unsupported image array shape {a.shape}")
    a = to_uint8_values(a[:, :, :3] if a.ndim == 3 else a)  # alpha dropped first: it is no pixel value
    if a.ndim == 2:
        return np.repeat(a[:, :, None], 3, axis=2)
    if bgr:
        a = a[:, :, ::-1]
    return np.ascontiguousarray(a)


def named(where: str, fn, *args, **kwargs):
    """fn(*args, **kwargs), its ImageError naming the file."""
    try:
        return fn(*args, **kwargs)
    except ImageError as e:
        raise ImageError(f"{where}: {e}") from None


def decode_bytes(data: bytes, where: str = "<bytes>") -> np.ndarray:
    """Encoded image bytes -> HxWx3 uint8 RGB, or ImageError."""
    if not data:
        raise ImageError(f"{where}: empty file")
    size = named(where, header_size, data)
    if size:
        check_size(*size, where)
    cv2 = _cv2()
    if cv2 is not None:
        buf = np.frombuffer(data, np.uint8)
        try:
            img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
            if img is not None and img.ndim == 3 and img.shape[2] == 4 and image_format(data) == "jpeg":
                # A 4-channel JPEG is CMYK; IMREAD_COLOR lets libjpeg convert it properly.
                img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
        except cv2.error as e:  # OpenCV's pixel cap (from the header), or a decoder's own refusal
            if "MAX_IMAGE_PIXELS" in str(e):
                raise ImageError(f"{where}: over the {MAX_PIXELS:,}-pixel cap (decompression bomb?)") from None
            raise ImageError(f"{where}: not a readable image (OpenCV: {str(e).strip().splitlines()[-1][:120]})") from None
        if img is None:
            raise ImageError(f"{where}: not a readable image (corrupt, truncated or unsupported format)")
        check_size(img.shape[1], img.shape[0], where)
        return named(where, to_rgb_uint8, img, bgr=img.ndim == 3)
    Image = _pil()
    if Image is None:
        raise ImageError("no image decoder installed: pip install opencv-python-headless (or Pillow)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            check_size(im.width, im.height, where)
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # their values, by the one rule
                return named(where, to_rgb_uint8, np.asarray(im))
            return named(where, to_rgb_uint8, np.asarray(im.convert("RGB")))
    except ImageError:
        raise
    except Exception as e:  # Pillow raises many types for bad files
        raise ImageError(f"{where}: not a readable image ({type(e).__name__})") from None


def resize_method() -> str:
    """The resize this machine can run: OpenCV's, else Pillow's, else nearest-neighbour."""
    return OPENCV if _cv2() is not None else PILLOW if _pil() is not None else NEAREST


def recorded_resize(contract: dict) -> str:
    """The resize a preprocessing record names (records before `resize_method` existed named OpenCV)."""
    return contract.get("resize_method") or (OPENCV if "OpenCV" in contract.get("resize", "OpenCV") else NEAREST)


def resize(img: np.ndarray, size: int, method: str | None = None) -> np.ndarray:
    """Stretch to size x size with `method` (default: the best this machine has)."""
    h, w = img.shape[:2]
    if (h, w) == (size, size):
        return img
    method = method or resize_method()
    if method == OPENCV:
        cv2 = _cv2()
        if cv2 is None:
            raise ImageError("this model's preprocessing resizes with OpenCV: pip install opencv-python-headless")
        interp = cv2.INTER_AREA if size < min(h, w) else cv2.INTER_LINEAR
        return cv2.resize(img, (size, size), interpolation=interp)
    if method == PILLOW:
        Image = _pil()
        if Image is None:
            raise ImageError("this model's preprocessing resizes with Pillow: pip install Pillow")
        pil_method = Image.BOX if size < min(h, w) else Image.BILINEAR
        return np.asarray(Image.fromarray(img).resize((size, size), pil_method))
    ys = np.clip(((np.arange(size) + 0.5) * h / size).astype(int), 0, h - 1)
    xs = np.clip(((np.arange(size) + 0.5) * w / size).astype(int), 0, w - 1)
    return img[ys][:, xs]


def check_contract(path: Path, meta: dict, allow_other_resize: bool = False,
                   override: str | None = "--allow-other-resize") -> str:
    """The resize method to use for a model file, after checking its preprocessing record: the
    contract version this runtime implements, the input size, and a resize this machine can
    run exactly (another one only when `allow_other_resize`; `override`: the option that allows
    it, named in the error, None where a command has none)."""
    contract = meta.get("preprocessing")
    if not contract and Path(path).suffix != ".keras":  # an exported file carries its record
        raise RuntimeModelError(f"{path}: no preprocessing record in its metadata (not made by this mri-edge's "
                                "export); export it again")
    if not contract:  # a .keras model whose run folder's config.json predates the record
        return resize_method()
    version = contract.get("contract_version")
    if version != CONTRACT_VERSION:
        raise RuntimeModelError(f"{path}: made for preprocessing contract v{version}, this runtime implements "
                                f"v{CONTRACT_VERSION}; re-export it, or use mri-edge "
                                f"{meta.get('mri_edge_version', '?')}")
    if [int(v) for v in contract.get("image_size", meta["input_size"])] != [int(v) for v in meta["input_size"]]:
        raise RuntimeModelError(f"{path}: its preprocessing record says {contract['image_size']} px, its input "
                                f"is {meta['input_size']}; the file is inconsistent")
    recorded, here = recorded_resize(contract), resize_method()
    if recorded != here and not allow_other_resize:
        raise RuntimeModelError(f"{path}: its preprocessing resizes with {recorded}, this machine only has {here} "
                                "(pip install opencv-python-headless)"
                                + (f", or accept the difference with {override}" if override else ""))
    return here


def check_batch(batch, size: int, name: str) -> np.ndarray:
    """batch as an array, if it is (N, size, size, 3) raw pixels 0-255; a batch scaled to [0, 1]
    or [-1, 1] already (common elsewhere; a model file normalises inside its graph) is refused."""
    batch = np.asarray(batch)
    if batch.ndim != 4 or batch.shape[1:] != (size, size, 3):
        raise ImageError(f"{name} runs a batch of (N, {size}, {size}, 3) raw pixels, not shape {batch.shape}; "
                         "model.preprocess(image) makes one image")
    if batch.dtype != np.uint8 and batch.size:
        low, high = float(batch.min()), float(batch.max())
        if low < 0 or 0 < high <= 1 or high >= 256:  # 16-bit or unscaled data (255 + rounding: a mixup blend)
            raise ImageError(f"{name} runs raw pixels 0-255 (uint8), not values in [{low:.3g}, {high:.3g}]: it "
                             "normalises them itself; model.preprocess(image) makes one image")
    return batch


def load_image(source, size: int | None = None, method: str | None = None) -> np.ndarray:
    """Path, bytes or array -> RGB uint8 (resized to size x size with `method` when size is given)."""
    if isinstance(source, np.ndarray):
        img = to_rgb_uint8(source)
        check_size(img.shape[1], img.shape[0], "<array>")
    elif isinstance(source, (bytes, bytearray, memoryview)):
        img = decode_bytes(bytes(source))
    elif isinstance(source, (str, Path)):
        p = Path(source)
        if p.exists() and not p.is_file() and not p.is_dir():  # read, a pipe waits and a device never ends
            raise ImageError(f"{p}: not a regular file (a device, pipe or socket)")
        try:
            data = p.read_bytes()
        except OSError as e:
            raise ImageError(f"{p}: cannot read ({e.strerror or e})") from None
        img = decode_bytes(data, str(p))
    else:
        raise ImageError(f"cannot read an image from {type(source).__name__}")
    return resize(img, size, method) if size else img
