"""An image folder with a captions file: CSV or TSV with a header, or JSONL.

Columns / keys: the image path (``file``, ``file_name``, ``filename``, ``image`` or ``path``,
relative to the captions file's folder or ``--images``) and the caption (``caption`` or
``text``). Several rows naming the same image give that image several captions.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from dodo.data.ingest import Item, Source, SourceError, read_file, require_path

IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
PATH_COLUMNS: tuple[str, ...] = ("file", "file_name", "filename", "image", "path")
CAPTION_COLUMNS: tuple[str, ...] = ("caption", "text")


class FolderSource(Source):
    kind = "folder"

    def _rows(self, path: Path) -> list[dict]:
        suffix = path.suffix.lower()
        try:
            if suffix == ".jsonl":
                with open(path, encoding="utf-8", errors="surrogateescape") as f:
                    return [json.loads(line) for line in f if line.strip()]
            if suffix in (".csv", ".tsv"):
                with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
                    return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
        except (json.JSONDecodeError, csv.Error) as err:
            raise SourceError(f"{path} cannot be parsed ({err})") from None
        raise SourceError(f"captions file {path} must end in .csv, .tsv or .jsonl")

    def items(self) -> list[Item]:
        path = require_path(self.src, "captions file")
        folder = (require_path(self.images_dir, "--images folder", want_dir=True)
                  if self.images_dir else path.parent)
        rows = self._rows(path)
        if not rows:
            raise SourceError(f"captions file {path} has no rows")
        cols = {c.lower(): c for c in rows[0]}
        pcol = next((cols[c] for c in PATH_COLUMNS if c in cols), None)
        ccol = next((cols[c] for c in CAPTION_COLUMNS if c in cols), None)
        if pcol is None or ccol is None:
            raise SourceError(f"captions file {path} needs an image column ({', '.join(PATH_COLUMNS)}) and "
                              f"a caption column ({', '.join(CAPTION_COLUMNS)}); it has {', '.join(rows[0])}")
        grouped: dict[str, list] = {}
        for row in rows:
            caption = row.get(ccol)
            if isinstance(caption, str):
                caption = caption.encode("utf-8", "surrogateescape")
            grouped.setdefault(str(row.get(pcol) or ""), []).append(caption)
        items = []
        for name, captions in grouped.items():
            key = str(Path(name).with_suffix("")) or "<empty>"
            items.append(Item(key, str(folder / name), (str(folder / name), captions)))
        return items

    def load(self, item: Item) -> tuple[bytes | np.ndarray, list]:
        path, captions = item.payload
        return read_file(Path(path)), list(captions)
