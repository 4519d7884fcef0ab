"""NLVR2 in its official files: ``train.json`` / ``dev.json`` / ``test1.json`` and the images.

Each file has one JSON object per line::

    {"identifier": "train-10171-0-0", "sentence": "The left image contains exactly two dogs.",
     "label": "True", "left_url": "...", "right_url": "...", ...}

The statement's image pair is ``<identifier without its last -N>-img0.png`` (left) and
``-img1.png`` (right). The official image release puts train images in numbered subfolders
``train/0`` .. ``train/99`` and dev / test1 images flat in ``dev/`` / ``test1/``, so images are
found by file name anywhere under ``--images ROOT`` (default: the first of
``<json dir>/images/<split>``, ``<json dir>/../images/<split>``, ``<json dir>/<split>`` that exists).

The cache is image-only (each image once: an image pair carries several statements). The
statements go into ``statements.json`` beside the shards: ``{"statements": [{"identifier",
"sentence", "label": 1 | 0 | -1 (unlabelled), "left": <image key>, "right": <image key>}]}``,
joined to the images by key when the cache is read (dodo/data/finetune.py). A missing image is a
bad sample (bad_samples.jsonl); its statements are left out when the cache is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dodo.data.ingest import Item, Loaded, Source, SourceError, json_lines, read_file, require_path
from dodo.data.ingest.images import BadSample

KIND = "nlvr2"
TABLE = "statements.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_LABELS = {"true": 1, "false": 0}


class Nlvr2Source(Source):
    kind = KIND
    modality = "image"

    def __init__(self, src: str, **options: Any) -> None:
        super().__init__(src, **options)
        self.table: dict[str, Any] = {}
        self.labelled = False

    def _image_root(self, path: Path, split: str) -> Path:
        if self.images_dir:
            return require_path(self.images_dir, "--images folder", want_dir=True)
        for guess in (path.parent / "images" / split, path.parent.parent / "images" / split, path.parent / split):
            if guess.is_dir():
                return guess
        raise SourceError(f"no image folder for {path}: tried {path.parent}/images/{split}, "
                          f"{path.parent.parent}/images/{split} and {path.parent}/{split}; give --images ROOT "
                          "(the folder holding the split's images, in subfolders or flat)")

    def items(self) -> list[Item]:
        path = require_path(self.src, "NLVR2 file")
        records: list[tuple[int, dict]] = []
        for n, rec, (ident, _) in json_lines(path, ("identifier", "sentence"), "an NLVR2 record (one JSON "
                                             "object per line with 'identifier' and 'sentence')"):
            if not isinstance(ident, str) or ident.count("-") < 3:
                raise SourceError(f"{path}:{n}: identifier {ident!r} is not <split>-<set>-<pair>-<sentence>")
            records.append((n, rec))
        if not records:
            raise SourceError(f"{path} holds no NLVR2 statements")
        split = records[0][1]["identifier"].split("-")[0]
        root = self._image_root(path, split)
        found = {p.stem: p for p in sorted(root.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES}
        items: dict[str, Item] = {}
        statements = []
        for n, rec in records:
            where = f"{path}:{n}"
            sentence = " ".join(str(rec["sentence"] or "").split())
            raw = rec.get("label")
            label = _LABELS.get(str(raw).lower(), None) if raw is not None else -1
            if not sentence or label is None:
                self.listing_bad.append((rec["identifier"], where, "empty statement" if not sentence else "bad label",
                                         "" if not sentence else f"label {raw!r} is not True / False"))
                continue
            pair = rec["identifier"].rsplit("-", 1)[0]
            keys = (f"{pair}-img0", f"{pair}-img1")
            for key in keys:
                if key not in items:
                    file = found.get(key)
                    items[key] = Item(key, str(file) if file else f"{root}/**/{key}.png", str(file) if file else "")
            statements.append({"identifier": rec["identifier"], "sentence": sentence, "label": label,
                               "left": keys[0], "right": keys[1]})
        self.labelled = bool(statements) and all(s["label"] >= 0 for s in statements)
        self.table = {"kind": KIND, "statements": statements}
        self.dataset = self.dataset or "nlvr2"
        self.split = self.split or split
        return [items[k] for k in sorted(items)]

    def load(self, item: Item) -> Loaded:
        if not item.payload:
            raise BadSample("missing file", f"no image named {item.key}.png under the image folder")
        return Loaded(read_file(Path(item.payload)), [])

    def tables(self) -> dict[str, Any]:
        return {TABLE: self.table}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "table": TABLE, "statements": len(self.table.get("statements", [])),
                "labelled": self.labelled}
