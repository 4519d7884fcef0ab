"""JPEG decoders (dodo/data/decode.py) agree with PIL within JPEG decoder tolerance; draft-mode
and DCT-scaled decodes agree with a full decode + resize; a jpeg cache reads through them."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from dodo.data import decode as dec
from dodo.data.store import ShardError, decode_jpeg


def photo(size: int, seed: int = 0) -> np.ndarray:
    """A photo-like image: smooth gradients plus noise texture (not flat shapes)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([np.sin(6 * x + seed) , np.cos(5 * y), np.sin(4 * (x + y))], -1) * 80 + 128
    return np.clip(base + rng.normal(0, 18, base.shape), 0, 255).astype(np.uint8)


def jpeg(img: np.ndarray, quality: int = 90) -> bytes:
    out = io.BytesIO()
    Image.fromarray(img).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def pil_full(data: bytes, target: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        rgb = im.convert("RGB")
        if target and rgb.size != (target, target):
            rgb = rgb.resize((target, target), Image.Resampling.BICUBIC)
        return np.asarray(rgb)


def test_auto_resolves_to_an_installed_decoder():
    assert dec.resolve("auto") in dec.available()
    assert {"pil", "pil_draft"} <= set(dec.available())
    with pytest.raises(ValueError, match="unknown decoder"):
        dec.resolve("nvjpeg")


@pytest.mark.parametrize("name", [n for n in dec.DECODERS if n != "auto"])
def test_decoders_agree_with_pil_at_stored_size(name):
    if name not in dec.available():
        pytest.skip(f"{name} is not installed here")
    data = jpeg(photo(96, 1))
    ref = pil_full(data, 0)
    out = dec.decode(data, 0, name)
    assert out.shape == ref.shape == (96, 96, 3) and out.dtype == np.uint8
    diff = np.abs(out.astype(int) - ref.astype(int))
    # Same libjpeg-turbo family: identical or off by IDCT / upsampling rounding only.
    assert diff.max() <= 8 and diff.mean() < 1.0, (diff.max(), diff.mean())
    assert np.array_equal(dec.decode(data, 96, name), out)  # target == stored size: no resize


@pytest.mark.parametrize("name", [n for n in dec.DECODERS if n not in ("auto", "pil")])
def test_dct_scaled_decode_matches_full_decode_and_resize(name):
    if name not in dec.available():
        pytest.skip(f"{name} is not installed here")
    data = jpeg(photo(256, 2))
    ref = pil_full(data, 64).astype(int)  # full decode, bicubic down to 64 px
    out = dec.decode(data, 64, name)
    assert out.shape == (64, 64, 3)
    diff = np.abs(out.astype(int) - ref)
    # DCT downscaling (1/4 here) is a different low-pass filter than bicubic: close, not equal.
    assert diff.mean() < 6 and np.corrcoef(out.ravel(), ref.ravel())[0, 1] > 0.97, diff.mean()


def test_bad_bytes_name_the_sample():
    for name in dec.available():
        with pytest.raises(ShardError, match="shard-3.h5:7 does not decode"):
            decode_jpeg(b"not a jpeg", "shard-3.h5:7", name)


def test_a_jpeg_cache_reads_through_the_configured_decoder(tmp_path):
    from dodo.data.cache import CacheOptions, build_cache
    from dodo.data.dataset import CachedDataset

    opts = CacheOptions(source="synthetic", src="train", out=str(tmp_path / "c"), store="hdf5",
                        encode="jpeg", image_size=32, samples_per_shard=8, workers=1, num=12, seed=0)
    build_cache(opts, log=lambda m: None)
    images = {name: CachedDataset(tmp_path / "c", "none", decoder=name)[5].image
              for name in dec.available()}
    ref = images["pil"]
    for name, img in images.items():
        assert img.shape == (32, 32, 3)
        assert np.abs(img.astype(int) - ref.astype(int)).max() <= 8, name


def test_an_uninstalled_decoder_is_refused_at_config_time():
    from dodo.config.errors import ConfigValueError
    from dodo.data.config import DataConfig

    assert DataConfig(decoder="pil_draft").decoder == "pil_draft"
    missing = [n for n in ("simplejpeg", "turbojpeg") if n not in dec.available()]
    for name in missing:
        with pytest.raises(ConfigValueError, match=f"{name} is not installed here"):
            DataConfig(decoder=name)
