"""CC3M as img2dataset leaves it: a TSV of ``caption<TAB>url`` and the downloaded images.

Row ``r`` of the TSV (0-based, header not counted) is the image whose file stem is ``r``
zero-padded to 9 digits, as img2dataset names them with its default 10,000 samples per
folder (``00000/000000123.jpg``). The caption comes from the TSV. Rows whose download failed
have no image and are reported as missing files. ``--images`` defaults to the TSV's folder.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from dodo.data.ingest import Item, Source, SourceError, guess_split, read_file, require_path
from dodo.data.ingest.folder import IMAGE_SUFFIXES


def scan_images(root: Path) -> dict[str, str]:
    """{file stem: path} for every image under root (one pass, os.scandir)."""
    found: dict[str, str] = {}
    stack = [str(root)]
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES:
                    found.setdefault(entry.name.split(".")[0], entry.path)
    return found


class CC3MSource(Source):
    kind = "cc3m"

    def items(self) -> list[Item]:
        tsv = require_path(self.src, "CC3M TSV")
        folder = (require_path(self.images_dir, "--images folder", want_dir=True)
                  if self.images_dir else tsv.parent)
        files = scan_images(folder)
        self.dataset = self.dataset or "cc3m"
        self.split = self.split or guess_split(tsv.name)
        items = []
        try:
            with open(tsv, newline="", encoding="utf-8", errors="surrogateescape") as f:
                rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
                first = next(rows, None)
                if first is None:
                    raise SourceError(f"{tsv} is empty")
                header = [c.strip().lower() for c in first]
                if "url" in header and "caption" in header:
                    ci, ui, start = header.index("caption"), header.index("url"), []
                else:
                    ci, ui, start = 0, 1, [first]
                    if len(first) < 2:
                        raise SourceError(f"{tsv} is not a CC3M TSV: line 1 has no TAB; expected "
                                          "caption<TAB>url per line")
                for r, row in enumerate([*start, *rows]):
                    stem = f"{r:09d}"
                    caption = row[ci] if len(row) > ci else None
                    if caption is not None:  # undo surrogateescape: bad UTF-8 is caught per sample
                        caption = caption.encode("utf-8", "surrogateescape")
                    url = row[ui] if len(row) > ui else ""
                    items.append(Item(stem, files.get(stem, f"{folder}/{stem}.jpg (url {url})"),
                                      (files.get(stem), caption)))
        except csv.Error as err:
            raise SourceError(f"{tsv} is not a readable TSV ({err})") from None
        return items

    def load(self, item: Item) -> tuple[bytes | np.ndarray, list]:
        path, caption = item.payload
        from dodo.data.ingest.images import BadSample
        if path is None:
            raise BadSample("missing file", item.where)
        return read_file(Path(path)), [caption]
