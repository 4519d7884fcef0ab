"""webdataset / img2dataset tars: ``<key>.jpg|.png|.webp`` + ``<key>.txt`` (+ ``.json``, ``.cls``) per sample.

Tars are listed with the standard library (headers only; data is not read) and members are
read later by their byte offset, so a worker opens each tar once per shard. SRC is a tar, a
directory of ``*.tar`` (sorted), or a glob such as ``cc3m/0000*.tar``. A damaged header inside
a tar loses only the members it covers: the listing resynchronises on the next valid header
and reports the gap as an unreadable tar member.

img2dataset writes ``00000.parquet`` beside ``00000.tar`` (one row per URL it tried: ``key``,
``caption``, ``url``, ``status``, ``error_message``, ...). When it is there (read with pyarrow),
every row whose download failed is reported as a missing file with img2dataset's error, so the
bad-sample report accounts for the whole source; a sample without a ``.txt`` member takes its
caption from the parquet; a ``label`` / ``cls`` column gives labels. A ``.cls`` member (the
webdataset convention: the class index as text) gives the sample's label.
"""

from __future__ import annotations

import glob
import os
import tarfile
from pathlib import Path

import numpy as np

from dodo.data.ingest import Item, Loaded, Source, SourceError
from dodo.data.ingest.classes import resolve_classnames
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
            items += self._with_parquet(tar, self._list(tar))
        labels = [it.payload[4] for it in items]
        if any(label >= 0 for label in labels):
            if any(label < 0 for label in labels):
                first = next(it for it in items if it.payload[4] < 0)
                raise SourceError(f"{first.where} has no label (.cls member or parquet label) while "
                                  "other samples have one; label every sample or none")
            self.class_ids = [str(i) for i in range(max(labels) + 1)]
            self.classnames = resolve_classnames(self.classnames_file, self.class_ids)
            self.has_labels = True
        return items

    def _with_parquet(self, tar: Path, items: list[Item]) -> list[Item]:
        """Complete the tar's items from img2dataset's ``<stem>.parquet`` beside it, if any."""
        parquet = tar.with_suffix(".parquet")
        if not parquet.exists():
            return items
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise SourceError(f"{parquet} needs pyarrow to be read: pip install pyarrow (or move the "
                              ".parquet files away to ignore them)") from None
        try:
            table = pq.read_table(parquet).to_pylist()
        except Exception as err:  # pyarrow raises several types for a damaged file
            raise SourceError(f"{parquet} is not a readable parquet file ({err})") from None
        if table and "key" not in table[0]:
            raise SourceError(f"{parquet} has no 'key' column; it is not img2dataset metadata")
        rows = {str(r["key"]): r for r in table}
        for key, r in rows.items():
            status = r.get("status")
            if status is not None and status != "success":
                self.listing_bad.append((key, f"{parquet}:{key} (url {r.get('url', '')})", "missing file",
                                         f"img2dataset: {status}: {r.get('error_message') or ''}".strip()))
        out = []
        for it in items:
            tar_path, size, members, caption, label = it.payload
            r = rows.get(it.key, {})
            if caption is None and isinstance(r.get("caption"), str):
                caption = r["caption"].encode("utf-8", "surrogateescape")
            if label < 0:
                for col in ("label", "cls"):
                    if isinstance(r.get(col), int):
                        label = r[col]
            out.append(Item(it.key, it.where, (tar_path, size, members, caption, label)))
        return out

    def _list(self, tar: Path) -> list[Item]:
        size = tar.stat().st_size
        samples: dict[str, dict[str, tuple[int, int]]] = {}
        labels: dict[str, int] = {}
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
                if ext == "cls" and m.size < 32:  # tiny; read now so labels are known at listing
                    try:
                        labels[key] = int(tf.extractfile(m).read().decode().strip())
                    except (ValueError, UnicodeDecodeError, OSError, tarfile.TarError):
                        pass  # reported by load() as a bad label
        return [Item(key, f"{tar}:{key}", (str(tar), size, members, None, labels.get(key, -1)))
                for key, members in samples.items()]

    @staticmethod
    def _gap_has_data(tar: Path, lo: int, hi: int) -> bool:
        with open(tar, "rb") as f:
            f.seek(lo)
            return any(f.read(hi - lo))

    def load(self, item: Item) -> Loaded:
        tar, size, members, caption, label = item.payload
        image_ext = next((e for e in IMAGE_EXTS if e in members), None)
        if image_ext is None:
            raise BadSample("missing file", f"no image member ({'/'.join(IMAGE_EXTS)}) for key {item.key}")
        if "txt" not in members and caption is None:
            raise BadSample("missing caption", f"no .txt member for key {item.key}")
        if "cls" in members and label < 0:
            raise BadSample("unreadable sample", f"{item.key}.cls is not an integer class index")
        with open(tar, "rb") as f:
            image = self._read(f, size, *members[image_ext], item, image_ext)
            if "txt" in members:
                caption = self._read(f, size, *members["txt"], item, "txt")
        return Loaded(image, [caption], label)

    @staticmethod
    def _read(f, size: int, offset: int, length: int, item: Item, ext: str) -> bytes:
        if offset + length > size:
            raise BadSample("unreadable tar member", f"{item.key}.{ext} runs past the end of the tar")
        f.seek(offset)
        data = f.read(length)
        if len(data) != length:
            raise BadSample("unreadable tar member", f"{item.key}.{ext} is truncated")
        return data
