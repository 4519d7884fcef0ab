"""The shard store: one file (HDF5) or one directory (zarr v3) per shard, same layout in both.

A shard holds ``n`` samples and ``m >= n`` captions (COCO has several per image):

    images        jpeg: variable-length JPEG bytes per sample, as one flat uint8 array
                  ``image_bytes`` + ``image_offsets`` (n + 1,) int64 (a slice per sample: faster
                  than an HDF5 vlen dataset, whose per-element heap costs ~70 us a read)
                  raw:  (n, H, W, 3) uint8, contiguous (HDF5) / one chunk per sample (zarr)
                  text-only shards (attr ``modality: text``) hold no image arrays
    keys          (n,) UTF-8 strings, unique within the cache
    labels        (n,) int32 class index per sample row, -1 without labels (absent in old shards)
    captions      (m,) UTF-8 strings ("" once per image in an image-only shard)
    caption_image (m,) int32: the sample row each caption belongs to
    tokens        optional (m,) variable-length int32: captions pre-tokenised (attr ``tokenizer``)

A sample row's global image id is its index in shard order (shard k's rows follow shard k-1's).

Readers open lazily: nothing is opened until the first read, and a reader that finds itself in
another process than the one that opened it (a forked DataLoader worker) opens its own handle,
so one HDF5 handle is never shared across a fork. Read-only HDF5 files are opened with file
locking off (``locking=False``): parallel file systems (GPFS, Lustre) often lack the POSIX locks
HDF5 asks for, and a read-only cache needs none. The image arrays are contiguous and
uncompressed, so HDF5 readers memory-map them (see ``ShardReader._mapped``).
"""

from __future__ import annotations

import hashlib
import io
import os
from collections import OrderedDict
from pathlib import Path
from typing import Literal, Optional, Sequence

import numpy as np
from PIL import Image

StoreKind = Literal["hdf5", "zarr"]
Encode = Literal["jpeg", "raw"]
SUFFIX: dict[str, str] = {"hdf5": ".h5", "zarr": ".zarr"}
FORMAT_VERSION = 1
ZARR_CHUNK_CACHE = 256  # chunks of 64 KiB kept per zarr shard reader: 16 MiB


class ShardError(RuntimeError):
    """A shard that cannot be read: corrupt, truncated or not a dodo shard."""


def shard_name(index: int, store: StoreKind) -> str:
    return f"shard-{index:05d}{SUFFIX[store]}"


# --- checksums --------------------------------------------------------------------------------

def checksum(path: Path) -> str:
    """sha256 of a shard: the file (HDF5), or every file of the directory by sorted path (zarr)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if f is not path:
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def shard_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --- writing ----------------------------------------------------------------------------------

class ShardWriter:
    """Collects one shard's samples, then writes them in one go with :meth:`close`.

    Raw images of a known size stream straight into the preallocated HDF5 array (a shard of
    raw 256 px images is ~200 MB per 1000 samples); everything else is buffered, which is
    small for JPEG. Zarr is written at close because a sharded zarr array rewrites its whole
    shard on every partial write.
    """

    def __init__(self, path: Path, store: StoreKind, encode: Encode, capacity: int,
                 image_size: int, tokenizer: str = "", modality: str = "image_text") -> None:
        if encode == "raw" and image_size <= 0 and modality != "text":
            raise ValueError("--encode raw needs a fixed --image-size")
        self.path, self.store, self.encode = path, store, encode
        self.image_size, self.tokenizer, self.modality = image_size, tokenizer, modality
        self.has_images = modality != "text"
        self.keys: list[str] = []
        self.labels: list[int] = []
        self.captions: list[str] = []
        self.caption_image: list[int] = []
        self.tokens: list[np.ndarray] = []
        self.jpegs: list[bytes] = []
        self.raw: Optional[np.ndarray] = None
        self._h5 = None
        if not self.has_images:
            pass
        elif store == "hdf5" and encode == "raw":
            import h5py
            self._h5 = h5py.File(path, "w", track_order=True)
            self.raw = self._h5.create_dataset(
                "images", shape=(capacity, image_size, image_size, 3), dtype=np.uint8,
                track_times=False)  # contiguous: one sample is one memcpy-sized read
        elif encode == "raw":
            self.raw = np.zeros((capacity, image_size, image_size, 3), np.uint8)

    def add(self, key: str, image: bytes | np.ndarray | None, captions: Sequence[str],
            tokens: Optional[Sequence[Sequence[int]]] = None, label: int = -1) -> None:
        row = len(self.keys)
        if not self.has_images:
            pass
        elif self.encode == "raw":
            self.raw[row] = image
        else:
            self.jpegs.append(bytes(image))
        self.keys.append(key)
        self.labels.append(int(label))
        for j, caption in enumerate(captions):
            self.captions.append(caption)
            self.caption_image.append(row)
            if tokens is not None:
                self.tokens.append(np.asarray(tokens[j], np.int32))

    def close(self, attrs: dict) -> None:
        n = len(self.keys)
        attrs = {**attrs, "format_version": FORMAT_VERSION, "num_samples": n,
                 "num_captions": len(self.captions), "encode": self.encode,
                 "image_size": self.image_size, "tokenizer": self.tokenizer, "modality": self.modality}
        if self.store == "hdf5":
            self._close_hdf5(attrs)
        else:
            self._close_zarr(attrs)

    def _close_hdf5(self, attrs: dict) -> None:
        import h5py

        f = self._h5 if self._h5 is not None else h5py.File(self.path, "w", track_order=True)
        try:
            kw = dict(track_times=False)
            if self.has_images and self.encode == "jpeg":
                flat, offsets = _flatten(self.jpegs)
                f.create_dataset("image_bytes", data=flat, **kw)
                f.create_dataset("image_offsets", data=offsets, **kw)
            text = h5py.string_dtype("utf-8")
            f.create_dataset("keys", data=np.array(self.keys, dtype=object), dtype=text, **kw)
            f.create_dataset("captions", data=np.array(self.captions, dtype=object), dtype=text, **kw)
            f.create_dataset("caption_image", data=np.array(self.caption_image, np.int32), **kw)
            f.create_dataset("labels", data=np.array(self.labels, np.int32), **kw)
            if self.tokens:
                tok = f.create_dataset("tokens", shape=(len(self.tokens),),
                                       dtype=h5py.vlen_dtype(np.int32), **kw)
                for i, t in enumerate(self.tokens):
                    tok[i] = t
            f.attrs.update(attrs)
        finally:
            f.close()

    def _close_zarr(self, attrs: dict) -> None:
        import zarr

        n = len(self.keys)
        g = zarr.open_group(str(self.path), mode="w", zarr_format=3)
        if not self.has_images:
            pass
        elif self.encode == "raw":
            s = self.image_size
            a = g.create_array("images", shape=(n, s, s, 3), dtype="uint8", chunks=(1, s, s, 3),
                               shards=(max(n, 1), s, s, 3), compressors=None)
            a[:] = self.raw[:n]
        else:
            flat, offsets = _flatten(self.jpegs)
            chunk = 1 << 16
            a = g.create_array("image_bytes", shape=flat.shape, dtype="uint8", chunks=(chunk,),
                               shards=(max(chunk, -(-len(flat) // chunk) * chunk),),
                               compressors=None)  # JPEG does not compress further
            a[:] = flat
            g.create_array("image_offsets", data=offsets)
        for name, values in (("keys", self.keys), ("captions", self.captions)):
            arr = g.create_array(name, shape=(len(values),), dtype=str,
                                 chunks=(max(len(values), 1),))
            arr[:] = np.array(values, dtype=object)
        g.create_array("caption_image", data=np.array(self.caption_image, np.int32))
        g.create_array("labels", data=np.array(self.labels, np.int32))
        if self.tokens:
            lengths = np.array([len(t) for t in self.tokens], np.int64)
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            g.create_array("token_ids", data=np.concatenate(self.tokens).astype(np.int32))
            g.create_array("token_offsets", data=offsets)
        g.attrs.update(attrs)


def _flatten(blobs: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Variable-length bytes as one flat uint8 array + (n + 1,) int64 offsets: sample i is
    flat[offsets[i]:offsets[i + 1]]. One contiguous slice read per sample, no per-element heap."""
    flat = np.frombuffer(b"".join(blobs), np.uint8)
    offsets = np.zeros(len(blobs) + 1, np.int64)
    np.cumsum([len(b) for b in blobs], out=offsets[1:])
    return flat, offsets


# --- reading ----------------------------------------------------------------------------------

_INHERITED: list = []


class ShardReader:
    """Read-only, lazily opened, fork-safe access to one shard."""

    def __init__(self, path: Path, store: StoreKind, decoder: str = "auto", target: int = 0) -> None:
        self.path, self.store = path, store
        self.decoder, self.target = decoder, target  # JPEG decoder (dodo.data.decode), output size
        self._pid: Optional[int] = None
        self._handle = None
        self.keys: list[str] = []
        self.captions: list[str] = []
        self.caption_image: np.ndarray = np.zeros(0, np.int32)
        self.tokens: Optional[list[np.ndarray]] = None
        self.labels: np.ndarray = np.zeros(0, np.int32)
        self.encode: str = "jpeg"
        self.has_images = True
        self._images = None
        self._offsets: Optional[np.ndarray] = None
        self._chunks: OrderedDict[int, np.ndarray] = OrderedDict()

    def open(self) -> None:
        """Open for this process (a no-op when already open here)."""
        if self._pid == os.getpid():
            return
        if self._handle is not None:
            # A handle inherited through fork: never use or close it in this process (closing
            # would run HDF5 on state shared with the parent); keep it alive and unused.
            _INHERITED.append(self._handle)
        self._handle, self._pid = None, os.getpid()
        self._chunks = OrderedDict()
        try:
            if self.store == "hdf5":
                self._open_hdf5()
            else:
                self._open_zarr()
        except ShardError:
            raise
        except Exception as err:  # h5py/zarr raise many types for a damaged file
            self._pid = None
            raise ShardError(f"shard {self.path} cannot be read ({type(err).__name__}: {err}); it is "
                             "damaged or was not written by dodo: run `dodo data verify "
                             f"{self.path.parent}` and rebuild it with `dodo data cache`") from None

    def _open_hdf5(self) -> None:
        import h5py

        f = h5py.File(self.path, "r", locking=False)
        self._handle = f
        self.encode = str(f.attrs["encode"])
        self.has_images = str(f.attrs.get("modality", "image_text")) != "text"
        if not self.has_images:
            pass
        elif self.encode == "raw":
            self._images = self._mapped(f["images"])
        else:
            self._images = self._mapped(f["image_bytes"])
            self._offsets = f["image_offsets"][:]
        self.keys = [k.decode() if isinstance(k, bytes) else k for k in f["keys"][:]]
        self.labels = f["labels"][:] if "labels" in f else np.full(len(self.keys), -1, np.int32)
        self.captions = [c.decode() if isinstance(c, bytes) else c for c in f["captions"][:]]
        self.caption_image = f["caption_image"][:]
        self.tokens = list(f["tokens"][:]) if "tokens" in f else None

    def _mapped(self, dset):
        """A contiguous, uncompressed dataset as a read-only memory map of its bytes in the file.

        h5py costs ~100 us per read of one sample, mostly its own overhead; the bytes of a
        contiguous dataset sit at one offset in the file (HDF5 reports it), so mapping them
        makes a sample read a page-cache copy (~10 us for 196 KiB). Anything else (chunked,
        compressed, empty) stays an h5py dataset.
        """
        offset = dset.id.get_offset()
        if offset is None or dset.chunks is not None or dset.size == 0:
            return dset
        return np.memmap(self.path, dtype=dset.dtype, mode="r", offset=offset, shape=dset.shape)

    def _open_zarr(self) -> None:
        import zarr

        g = zarr.open_group(str(self.path), mode="r")
        self._handle = g
        self.encode = str(g.attrs["encode"])
        self.has_images = str(g.attrs.get("modality", "image_text")) != "text"
        if not self.has_images:
            pass
        elif self.encode == "raw":
            self._images = g["images"]
        else:
            self._images = g["image_bytes"]
            self._offsets = g["image_offsets"][:]
        self.keys = [str(k) for k in g["keys"][:]]
        self.labels = g["labels"][:] if "labels" in g else np.full(len(self.keys), -1, np.int32)
        self.captions = [str(c) for c in g["captions"][:]]
        self.caption_image = g["caption_image"][:]
        if "token_ids" in g:
            ids, off = g["token_ids"][:], g["token_offsets"][:]
            self.tokens = [ids[off[i]:off[i + 1]] for i in range(len(off) - 1)]

    def __len__(self) -> int:
        self.open()
        return len(self.keys)

    def num_captions(self) -> int:
        self.open()
        return len(self.captions)

    def encoded(self, row: int) -> np.ndarray:
        """The stored image of one sample: JPEG bytes (uint8 1-D) or (H, W, 3) uint8."""
        self.open()
        try:
            if self._offsets is None:
                return self._images[row]
            lo, hi = int(self._offsets[row]), int(self._offsets[row + 1])
            return self._images[lo:hi] if self.store == "hdf5" else self._zarr_range(lo, hi)
        except Exception as err:
            raise ShardError(f"sample {row} of shard {self.path} cannot be read ({err}); the shard "
                             f"is damaged: run `dodo data verify {self.path.parent}`") from None

    def _zarr_range(self, lo: int, hi: int) -> np.ndarray:
        """Bytes [lo, hi) of the flat JPEG array, read a whole chunk at a time.

        Each zarr read costs ~0.5-1 ms of Python and asyncio overhead whatever its size, and the
        sampler visits neighbouring samples close together (shuffle blocks), so the last
        ``ZARR_CHUNK_CACHE`` chunks (64 KiB each, ~8 JPEGs of 256 px) are kept per shard.
        """
        size = self._images.chunks[0]
        first, last = lo // size, max(lo, hi - 1) // size
        parts = []
        for c in range(first, last + 1):
            chunk = self._chunks.get(c)
            if chunk is None:
                chunk = self._chunks[c] = self._images[c * size:(c + 1) * size]
                if len(self._chunks) > ZARR_CHUNK_CACHE:
                    self._chunks.popitem(last=False)
            else:
                self._chunks.move_to_end(c)
            parts.append(chunk)
        flat = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return flat[lo - first * size:hi - first * size]

    def image(self, row: int) -> Optional[np.ndarray]:
        """One decoded image, (H, W, 3) uint8; None in a text-only shard."""
        self.open()
        if not self.has_images:
            return None
        data = self.encoded(row)
        if self.encode == "raw":
            return np.array(data)  # a writable copy, never a view of the map
        return decode_jpeg(data, f"{self.path}:{row}", self.decoder, self.target)

    def close(self) -> None:
        if self._handle is not None and self._pid == os.getpid() and self.store == "hdf5":
            self._handle.close()
        self._handle, self._pid, self._images = None, None, None

    def __getstate__(self) -> dict:
        # Pickled into spawned workers: send the path only, never an open handle.
        return {"path": self.path, "store": self.store, "decoder": self.decoder, "target": self.target}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["store"], state.get("decoder", "auto"), state.get("target", 0))


def decode_jpeg(data: bytes | np.ndarray, where: str, decoder: str = "pil", target: int = 0) -> np.ndarray:
    """(H, W, 3) uint8 through ``dodo.data.decode`` (``decoder``: data.decoder; ``target``: the
    output side, 0 = as stored)."""
    from dodo.data.decode import DecodeError, decode

    try:
        return decode(data, target, decoder)
    except DecodeError as err:
        raise ShardError(f"image {where} does not decode ({err}); the shard is damaged") from None
