"""webdataset / img2dataset tars: ``<key>.jpg|.png|.webp`` + ``<key>.txt`` (+ ``.json``) per sample.

Tars are listed with the standard library (headers only; data is not read) and members are
read later by their byte offset, so a worker opens each tar once per shard. SRC is a tar, a
directory of ``*.tar`` (sorted), or a glob such as ``cc3m/0000*.tar``. A damaged header inside
a tar loses only the members it covers: the listing resynchronises on the next valid header
and reports the gap as an unreadable tar member.
"""

from __future__ import annotations

import glob
import os
import tarfile
from pathlib import Path

import numpy as np

from dodo.data.ingest import Item, Source, SourceError
from dodo.data.ingest.images import BadSample

IMAGE_EXTS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
BLOCK = tarfile.BLOCKSIZE


def split_key(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the path up to the first dot of the file name."""
    folder, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


class WebDatasetSource(Source):
    kind = "webdataset"

    def tars(self) -> list[Path]:
        path = Path(self.src).expanduser()
        if path.is_dir():
            found = sorted(path.glob("*.tar"))
        elif path.is_file():
            found = [path]
        else:
            found = sorted(Path(p) for p in glob.glob(os.path.expanduser(self.src)))
        if not found:
            raise SourceError(f"no webdataset tars at {self.src}; give a .tar file, a directory "
                              "of .tar files or a glob such as 'shards/*.tar'")
        return found

    def items(self) -> list[Item]:
        items: list[Item] = []
        for tar in self.tars():
            items += self._list(tar)
        return items

    def _list(self, tar: Path) -> list[Item]:
        size = tar.stat().st_size
        samples: dict[str, dict[str, tuple[int, int]]] = {}
        try:
            tf = tarfile.open(tar, "r:", ignore_zeros=True)
        except (tarfile.TarError, OSError) as err:
            self.listing_bad.append((tar.name, str(tar), "unreadable tar member", f"not a tar: {err}"))
            return []
        expected = 0  # where the next header should start if nothing was skipped
        with tf:
            while True:
                try:
                    m = tf.next()
                except (tarfile.TarError, OSError) as err:
                    # Past the end: the last member is cut short; load() reports that member.
                    if tf.offset < size:
                        self.listing_bad.append((f"{tar.name}@{tf.offset}", f"{tar}@{tf.offset}",
                                                 "unreadable tar member", str(err)))
                    break
                if m is None:
                    break
                if m.offset > expected and self._gap_has_data(tar, expected, m.offset):
                    self.listing_bad.append((f"{tar.name}@{expected}", f"{tar}@{expected}",
                                             "unreadable tar member", "damaged header skipped"))
                expected = m.offset_data + -(-m.size // BLOCK) * BLOCK
                if not m.isfile():
                    continue
                key, ext = split_key(m.name)
                samples.setdefault(key, {})[ext] = (m.offset_data, m.size)
        return [Item(key, f"{tar}:{key}", (str(tar), size, members)) for key, members in samples.items()]

    @staticmethod
    def _gap_has_data(tar: Path, lo: int, hi: int) -> bool:
        with open(tar, "rb") as f:
            f.seek(lo)
            return any(f.read(hi - lo))

    def load(self, item: Item) -> tuple[bytes | np.ndarray, list]:
        tar, size, members = item.payload
        image_ext = next((e for e in IMAGE_EXTS if e in members), None)
        if image_ext is None:
            raise BadSample("missing file", f"no image member ({'/'.join(IMAGE_EXTS)}) for key {item.key}")
        if "txt" not in members:
            raise BadSample("missing caption", f"no .txt member for key {item.key}")
        with open(tar, "rb") as f:
            image = self._read(f, size, *members[image_ext], item, image_ext)
            caption = self._read(f, size, *members["txt"], item, "txt")
        return image, [caption]

    @staticmethod
    def _read(f, size: int, offset: int, length: int, item: Item, ext: str) -> bytes:
        if offset + length > size:
            raise BadSample("unreadable tar member", f"{item.key}.{ext} runs past the end of the tar")
        f.seek(offset)
        data = f.read(length)
        if len(data) != length:
            raise BadSample("unreadable tar member", f"{item.key}.{ext} is truncated")
        return data
