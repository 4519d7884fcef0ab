"""Turning one source image (bytes of any format PIL reads) into what a shard stores."""

from __future__ import annotations

import io
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

Resize = Literal["center-crop", "pad", "stretch"]
RESIZE_MODES: tuple[str, ...] = ("center-crop", "pad", "stretch")
JPEG_QUALITY = 90


class BadSample(Exception):
    """A sample to skip. ``reason`` is one of the fixed reason names counted in the report."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


def decode(data: bytes) -> Image.Image:
    """Fully decode (so truncation is found now, not at training time) and convert to RGB."""
    if not data:
        raise BadSample("truncated image", "0 bytes")
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except UnidentifiedImageError as err:
        raise BadSample("corrupt image", str(err)) from None
    except (OSError, SyntaxError, ValueError) as err:
        # PIL says "image file is truncated" / "broken data stream" for cut-off files.
        text = str(err)
        cut = "truncat" in text.lower() or "broken data" in text
        reason = "truncated image" if cut else "corrupt image"
        raise BadSample(reason, text) from None
    except Image.DecompressionBombError as err:
        raise BadSample("corrupt image", str(err)) from None
    fmt = im.format
    im = im.convert("RGB")
    im.format = fmt  # convert() drops it; prepare() keeps JPEG bytes by it
    return im


def resize(im: Image.Image, size: int, mode: str) -> Image.Image:
    """Square ``size`` x ``size`` image. size <= 0 keeps the original size."""
    if size <= 0 or im.size == (size, size):
        return im
    w, h = im.size
    if mode == "stretch":
        return im.resize((size, size), Image.Resampling.BICUBIC)
    if mode == "pad":  # letterbox: the whole image, black bars
        scale = size / max(w, h)
        inner = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)
        canvas = Image.new("RGB", (size, size))
        canvas.paste(inner, ((size - inner.width) // 2, (size - inner.height) // 2))
        return canvas
    scale = size / min(w, h)  # center-crop: shorter side to size, then the middle
    rw, rh = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((rw, rh), Image.Resampling.BICUBIC)
    left, top = (rw - size) // 2, (rh - size) // 2
    return im.crop((left, top, left + size, top + size))


def prepare(data: bytes, size: int, mode: str, encode: str) -> bytes | np.ndarray:
    """Source bytes -> JPEG bytes or (size, size, 3) uint8, or BadSample."""
    im = decode(data)
    if encode == "jpeg" and size <= 0 and im.format == "JPEG":
        return data  # already JPEG and no resize asked: keep the original bytes
    im = resize(im, size, mode)
    if encode == "raw":
        return np.asarray(im, dtype=np.uint8)
    out = io.BytesIO()
    im.save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


def prepare_array(pixels: np.ndarray, size: int, mode: str, encode: str) -> bytes | np.ndarray:
    """An in-memory (H, W, 3) uint8 image (the synthetic generator) -> what a shard stores."""
    im = resize(Image.fromarray(pixels), size, mode)
    if encode == "raw":
        return np.asarray(im, dtype=np.uint8)
    out = io.BytesIO()
    im.save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


def check_caption(raw: bytes | str | None) -> str:
    """A caption as clean text, or BadSample for missing / non-UTF-8 / empty."""
    if raw is None:
        raise BadSample("missing caption")
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise BadSample("non-utf8 caption", str(err)) from None
    text = " ".join(raw.split())
    if not text:
        raise BadSample("empty caption")
    return text
