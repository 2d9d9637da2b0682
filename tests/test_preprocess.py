import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from mri_edge import preprocess
from mri_edge.preprocess import ImageError, load_image

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (40, 52, 3), dtype=np.uint8)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, fmt, **kw)
    return b.getvalue()


@pytest.mark.parametrize("kind", ["L", "RGB", "RGBA", "P", "I;16", "CMYK-JPEG", "L-JPEG", "LA", "BMP"])
def test_every_image_kind_gives_rgb_uint8(kind):
    base = Image.fromarray(RGB)
    if kind == "CMYK-JPEG":
        data = encode(base.convert("CMYK"), "JPEG", quality=95)
    elif kind == "L-JPEG":
        data = encode(base.convert("L"), "JPEG", quality=95)
    elif kind == "I;16":
        data = encode(Image.fromarray(RGB[:, :, 0].astype(np.uint16) * 257), "PNG")
    elif kind == "BMP":
        data = encode(base, "BMP")
    else:
        data = encode(base.convert(kind), "PNG")
    out = load_image(data, 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    full = load_image(data)
    assert full.shape == (40, 52, 3)
    if kind in ("RGB", "RGBA", "BMP"):
        assert np.array_equal(full, RGB)
    if kind == "I;16":
        assert np.array_equal(full[:, :, 0], RGB[:, :, 0])
    if kind == "CMYK-JPEG":
        assert np.abs(full.astype(int) - RGB).mean() < 20  # colours survive, not inverted
    if kind in ("L", "L-JPEG", "I;16", "LA"):
        assert np.array_equal(full[:, :, 0], full[:, :, 1])


def test_arrays_of_any_layout():
    assert load_image(RGB[:, :, 0]).shape == (40, 52, 3)
    assert load_image(RGB[:, :, :1]).shape == (40, 52, 3)
    f = load_image(RGB.astype(np.float32) / 255.0)
    assert np.abs(f.astype(int) - RGB).max() <= 1
    with pytest.raises(ImageError):
        load_image(np.zeros((4, 4, 7)))


@pytest.mark.parametrize("data", [b"", b"hello world", b"\x89PNG\r\n\x1a\n" + b"\x00" * 30])
def test_garbage_is_an_image_error(data):
    with pytest.raises(ImageError):
        load_image(data)


def test_a_pipe_or_device_named_as_an_image_is_refused_unread(tmp_path):
    import os

    fifo = tmp_path / "scan.jpg"
    os.mkfifo(fifo)  # read, it would wait for a writer forever
    for path in (fifo, "/dev/zero"):  # read, it would never end
        with pytest.raises(ImageError, match="not a regular file"):
            load_image(path)


def test_truncated_jpeg_is_refused():
    data = encode(Image.fromarray(RGB), "JPEG")
    with pytest.raises(ImageError):
        load_image(data[:40])


def test_decompression_bomb_refused_before_decoding(monkeypatch):
    # A valid PNG header that claims a 100k x 100k canvas.
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    with pytest.raises(ImageError, match="cap"):
        load_image(png)
    monkeypatch.setattr(preprocess, "MAX_PIXELS", 100)
    with pytest.raises(ImageError, match="cap"):
        load_image(encode(Image.fromarray(RGB), "PNG"))


def test_other_formats_are_refused_from_their_header(tmp_path, monkeypatch):
    """TIFF, BMP, WebP, ...: Pillow's lazy open reads the header, and nothing is decoded; without
    Pillow, OpenCV's own cap, set from MAX_PIXELS when this module is imported before cv2,
    refuses them before it decodes (a fresh process: OpenCV reads its limit when it loads)."""
    import os
    import subprocess
    import sys

    import cv2

    ok, tif = cv2.imencode(".tif", np.zeros((2000, 2000), np.uint8), [cv2.IMWRITE_TIFF_COMPRESSION, 5])
    (tmp_path / "bomb.tif").write_bytes(tif.tobytes())
    monkeypatch.setattr(preprocess, "MAX_PIXELS", 1_000_000)
    monkeypatch.setattr(cv2, "imdecode", lambda *a: pytest.fail("decoded"))
    with pytest.raises(ImageError, match="bomb.tif: 2000x2000 pixels exceeds the 1,000,000-pixel cap"):
        load_image(tmp_path / "bomb.tif")
    env = {k: v for k, v in os.environ.items() if k != "OPENCV_IO_MAX_IMAGE_PIXELS"}
    code = ("import sys\nsys.modules['PIL'] = None  # no Pillow\nfrom mri_edge import preprocess\n"
            "try:\n    preprocess.load_image(r'%s')\nexcept preprocess.ImageError as e:\n    print(e)"
            % (tmp_path / "bomb.tif"))
    out = subprocess.run([sys.executable, "-c", code], env={**env, "MRI_EDGE_MAX_PIXELS": "1000000"},
                         capture_output=True, text=True, timeout=120).stdout
    assert "over the 1,000,000-pixel cap" in out, out  # (after decoding, check_size would give the size)


def test_one_rule_for_pixel_values_of_any_dtype():
    """The same values give the same image whatever the dtype; data that would be read wrongly
    (normalised, unscaled, 12-bit pixels in 16 bits) is refused, not clipped."""
    full = np.arange(40 * 52).reshape(40, 52).astype(np.uint16) * 16  # 16-bit data, 0-33264
    want = load_image(full)
    for dtype in (np.int32, np.float32, np.float64):
        assert np.array_equal(load_image(full.astype(dtype)), want), dtype
    small = RGB[:, :, 0]
    for dtype in (np.int16, np.int64, np.float32):  # 8-bit values in a wider type: as they are
        assert np.array_equal(load_image(small.astype(dtype))[:, :, 0], small), dtype
    assert np.array_equal(load_image(small.astype(np.float32) / 255)[:, :, 0], small)
    for bad, match in ((full // 16, "window or rescale"), ((full // 16).astype(np.int16), "window or rescale"),
                       (small.astype(np.float32) - 128, "not normalised"), (full.astype(np.int64) * 2, "not normalised"),
                       (np.full((8, 8), np.nan, np.float32), "not normalised")):
        with pytest.raises(ImageError, match=match):
            load_image(bad)
    twelve_bit = encode(Image.fromarray((full // 16).astype(np.uint16)), "PNG")  # a scanner's 12 bits in a 16-bit PNG
    with pytest.raises(ImageError, match="<bytes>: 16-bit pixel values reaching only 2079 of 65535"):
        load_image(twelve_bit)
    opaque = np.stack([full // 16] * 3 + [np.full_like(full, 65535)], axis=2)  # alpha is no pixel value
    with pytest.raises(ImageError, match="reaching only 2079"):
        load_image(opaque)
    assert not load_image(np.zeros((8, 8), np.uint16)).any()  # all zero: blank, which predict flags
    with pytest.raises(ImageError, match="empty image"):
        load_image(np.zeros((0, 4), np.uint16))


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="cannot read"):
        load_image(tmp_path / "nope.png")


def test_header_size_of_jpeg_and_png():
    assert preprocess.header_size(encode(Image.fromarray(RGB), "JPEG")) == (52, 40)
    assert preprocess.header_size(encode(Image.fromarray(RGB), "PNG")) == (52, 40)
