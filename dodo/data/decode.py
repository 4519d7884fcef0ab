"""JPEG decoders for jpeg caches, chosen by ``data.decoder`` (torch-free: config checks use it).

    pil         Pillow: full-size decode, then a resize if the target differs
    pil_draft   Pillow with draft mode: when the stored image is at least twice the target,
                libjpeg scales the DCT by 1/2, 1/4 or 1/8 while decoding (far less work than
                decoding full size and resizing), then a resize to the exact target
    simplejpeg  simplejpeg (libjpeg-turbo bindings with a numpy API, one call per image; its
                ``min_height`` / ``min_width`` use the same DCT scaling)
    turbojpeg   PyTurboJPEG (libjpeg-turbo through ctypes; needs the system libturbojpeg)
    auto        simplejpeg, else turbojpeg, else pil_draft

All of them return ``(H, W, 3)`` uint8 RGB. They agree with PIL within JPEG decoder tolerance
(libjpeg-turbo's fast and slow IDCT / upsampling differ by a few levels: tests/test_perf_decode.py
bounds it); ``target == 0`` (or the stored size) keeps the stored size.
"""

from __future__ import annotations

import importlib.util
import io
from typing import Callable

import numpy as np
from PIL import Image

DECODERS = ("auto", "pil", "pil_draft", "simplejpeg", "turbojpeg")


class DecodeError(ValueError):
    """Bytes that are not a decodable JPEG."""


def available() -> list[str]:
    """Decoders usable in this environment (without importing the optional ones)."""
    names = ["pil", "pil_draft"]
    if importlib.util.find_spec("simplejpeg") is not None:
        names.append("simplejpeg")
    if importlib.util.find_spec("turbojpeg") is not None and _turbo() is not None:
        names.append("turbojpeg")
    return names


def resolve(name: str) -> str:
    if name not in DECODERS:
        raise ValueError(f"unknown decoder {name!r}; one of {', '.join(DECODERS)}")
    if name != "auto":
        return name
    have = available()
    return next(n for n in ("simplejpeg", "turbojpeg", "pil_draft") if n in have)


def _fit(rgb: np.ndarray, target: int) -> np.ndarray:
    """Resize to (target, target) when the decoded size differs (bicubic, as the cache builder
    resizes); a no-op in the common case of a cache stored at the training size."""
    if target <= 0 or rgb.shape[:2] == (target, target):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((target, target), Image.Resampling.BICUBIC))


def decode_pil(data, target: int = 0, draft: bool = False) -> np.ndarray:
    with Image.open(io.BytesIO(memoryview(data))) as im:
        if draft and target > 0 and min(im.size) >= 2 * target:
            # JPEG draft: the largest DCT scale (1/2, 1/4, 1/8) keeping both sides >= target.
            im.draft("RGB", (target, target))
        return _fit(np.asarray(im.convert("RGB")), target)


def decode_simplejpeg(data, target: int = 0) -> np.ndarray:
    import simplejpeg

    buf = np.frombuffer(memoryview(data), np.uint8)
    if target > 0:
        h, w = simplejpeg.decode_jpeg_header(buf)[:2]
        if min(h, w) >= 2 * target:  # DCT-scaled decode, like PIL's draft mode
            return _fit(simplejpeg.decode_jpeg(buf, colorspace="RGB", min_height=target,
                                               min_width=target), target)
    return _fit(simplejpeg.decode_jpeg(buf, colorspace="RGB"), target)


_TURBO: list = []


def _turbo():
    """The PyTurboJPEG handle, or None when the package or libturbojpeg is missing."""
    if not _TURBO:
        try:
            from turbojpeg import TurboJPEG
            _TURBO.append(TurboJPEG())
        except Exception:  # ImportError, or OSError / RuntimeError: libturbojpeg not found
            _TURBO.append(None)
    return _TURBO[0]


def decode_turbojpeg(data, target: int = 0) -> np.ndarray:
    from turbojpeg import TJPF_RGB

    tj = _turbo()
    if tj is None:
        raise DecodeError("PyTurboJPEG or libturbojpeg is not installed")
    buf = bytes(memoryview(data))
    scale = None
    if target > 0:
        w, h = tj.decode_header(buf)[:2]
        for num, den in ((1, 8), (1, 4), (1, 2)):  # the smallest scale keeping both sides >= target
            if min(w, h) * num // den >= target:
                scale = (num, den)
                break
    out = tj.decode(buf, pixel_format=TJPF_RGB, scaling_factor=scale) if scale else \
        tj.decode(buf, pixel_format=TJPF_RGB)
    return _fit(out, target)


_FUNCS: dict[str, Callable] = {
    "pil": lambda d, t: decode_pil(d, t, draft=False),
    "pil_draft": lambda d, t: decode_pil(d, t, draft=True),
    "simplejpeg": decode_simplejpeg,
    "turbojpeg": decode_turbojpeg,
}


def decoder(name: str = "auto") -> Callable[[object, int], np.ndarray]:
    """``f(jpeg_bytes, target_size) -> (H, W, 3) uint8`` for a decoder name (``auto`` resolved)."""
    return _FUNCS[resolve(name)]


def decode(data, target: int = 0, name: str = "auto") -> np.ndarray:
    """Decode one JPEG; raises DecodeError naming nothing (callers add where it came from)."""
    try:
        return decoder(name)(data, target)
    except DecodeError:
        raise
    except Exception as err:  # each library raises its own types for bad bytes
        raise DecodeError(f"{type(err).__name__}: {err}") from None
