"""Image folders: class-folder trees (ImageNet layout), or a captions / labels file.

SRC a directory: a class-folder tree ``SRC/<class>/*.jpg`` (ImageNet ``train/<wnid>/*.JPEG``,
ImageNet-R / -A / -Sketch, ImageNetV2's ``<0..999>/*.jpeg``, any ``root/<class>/*``). Label =
index of the folder in sorted order (numeric order when every folder name is an integer);
class names from ``--classnames`` (see dodo.data.ingest.classes) or the folder names. The cache
is image-only (caption "").

SRC a file: a CSV / TSV with a header, or JSONL. Columns / keys: the image path (``file``,
``file_name``, ``filename``, ``image`` or ``path``, relative to the file's folder or
``--images``), the caption (``caption`` or ``text``) and optionally the class (``label``,
``class`` or ``cls``: integer indices, or names/ids mapped to sorted indices). Several rows naming
the same image give it several captions. Without a caption column the cache is image-only and
must have labels. ImageNet's ``LOC_val_solution.csv`` (``ImageId,PredictionString``) is read
as such a labels file: the first wnid of the prediction string is the class, images are
``--images/<ImageId>.JPEG``.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np

from dodo.data.ingest import Item, Loaded, Source, SourceError, read_file, require_path
from dodo.data.ingest.classes import WNID, resolve_classnames, sort_class_ids

IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
PATH_COLUMNS: tuple[str, ...] = ("file", "file_name", "filename", "image", "path")
CAPTION_COLUMNS: tuple[str, ...] = ("caption", "text")
LABEL_COLUMNS: tuple[str, ...] = ("label", "class", "cls")


def _pick(cols: dict[str, str], names: tuple[str, ...]) -> str | None:
    return next((cols[c] for c in names if c in cols), None)


class FolderSource(Source):
    kind = "folder"

    # --- SRC a directory: class folders ---------------------------------------------------------

    def _class_tree(self, root: Path) -> list[Item]:
        self.modality = "image"
        classes = sort_class_ids([d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith(".")])
        if not classes:
            raise SourceError(f"{root} has no class folders; expected SRC/<class>/<image> (ImageNet "
                              "layout), or give a captions / labels file")
        items = []
        for label, name in enumerate(classes):
            files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            for f in files:
                rel = f.relative_to(root)
                items.append(Item(str(rel.with_suffix("")), str(f), (str(f), [], label)))
        self._set_classes(classes)
        if not self.dataset and len(classes) == 1000 and all(WNID.match(c) for c in classes):
            self.dataset = "imagenet1k"
        return items

    def _set_classes(self, class_ids: list[str]) -> None:
        self.class_ids = class_ids
        self.classnames = resolve_classnames(self.classnames_file, class_ids)
        self.has_labels = True

    # --- SRC a file: captions and / or labels per row -------------------------------------------

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
        raise SourceError(f"captions file {path} must end in .csv, .tsv or .jsonl (or be a folder of "
                          "class folders)")

    def _labels(self, path: Path, raw: list) -> list[int]:
        """Row labels as indices: integers are kept, names / ids become sorted indices."""
        text = [str(v).strip() if v is not None else "" for v in raw]
        if "" in text:
            raise SourceError(f"{path}: row {text.index('') + 1} has no label; every row needs one")
        if all(t.lstrip("-").isdigit() for t in text):
            values = [int(t) for t in text]
            if min(values) < 0:
                raise SourceError(f"{path}: label {min(values)} is negative; labels are 0-based indices")
            self._set_classes([str(i) for i in range(max(values) + 1)])
            return values
        ids = sort_class_ids(sorted(set(text)))
        self._set_classes(ids)
        index = {c: i for i, c in enumerate(ids)}
        return [index[t] for t in text]

    def items(self) -> list[Item]:
        path = Path(self.src).expanduser()
        if path.is_dir():
            return self._class_tree(path)
        path = require_path(self.src, "captions file")
        folder = (require_path(self.images_dir, "--images folder", want_dir=True)
                  if self.images_dir else path.parent)
        rows = self._rows(path)
        if not rows:
            raise SourceError(f"captions file {path} has no rows")
        cols = {c.lower(): c for c in rows[0]}
        if "imageid" in cols and "predictionstring" in cols:  # ImageNet LOC_val_solution.csv
            rows = [{"file": f"{r[cols['imageid']]}.JPEG",
                     "label": str(r[cols["predictionstring"]] or "").split(" ")[0]} for r in rows]
            cols = {"file": "file", "label": "label"}
        pcol, ccol, lcol = _pick(cols, PATH_COLUMNS), _pick(cols, CAPTION_COLUMNS), _pick(cols, LABEL_COLUMNS)
        if pcol is None or (ccol is None and lcol is None):
            raise SourceError(f"captions file {path} needs an image column ({', '.join(PATH_COLUMNS)}) and "
                              f"a caption column ({', '.join(CAPTION_COLUMNS)}) or a label column "
                              f"({', '.join(LABEL_COLUMNS)}); it has {', '.join(rows[0])}")
        if ccol is None:
            self.modality = "image"
        labels = self._labels(path, [r.get(lcol) for r in rows]) if lcol else [-1] * len(rows)
        grouped: dict[str, tuple[list, int]] = {}
        for row, label in zip(rows, labels):
            name = str(row.get(pcol) or "")
            captions, first = grouped.setdefault(name, ([], label))
            if label != first:
                raise SourceError(f"{path}: image {name} has two labels ({first} and {label})")
            caption = row.get(ccol) if ccol else None
            if isinstance(caption, str):
                caption = caption.encode("utf-8", "surrogateescape")
            if ccol:
                captions.append(caption)
        items = []
        for name, (captions, label) in grouped.items():
            key = str(Path(name).with_suffix("")) or "<empty>"
            items.append(Item(key, str(folder / name), (str(folder / name), captions, label)))
        return items

    def load(self, item: Item) -> Loaded:
        path, captions, label = item.payload
        return Loaded(read_file(Path(path)), list(captions), label)
