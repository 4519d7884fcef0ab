"""COCO captions: ``captions_*.json`` (images + annotations) and the image folder.

Every caption of an image is kept (COCO has about five); all captions of an image share its
image id in the cache. SRC is the JSON; ``--images`` the
folder (default: ``<json dir>/../<split>`` for ``annotations/captions_<split>.json``, else the
JSON's own folder).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dodo.data.ingest import Item, Source, SourceError, guess_split, read_file, require_path


class CocoSource(Source):
    kind = "coco"

    def _images_dir(self, ann: Path) -> Path:
        if self.images_dir:
            return require_path(self.images_dir, "--images folder", want_dir=True)
        split = ann.stem.removeprefix("captions_")
        guess = ann.parent.parent / split
        return guess if guess.is_dir() else ann.parent

    def items(self) -> list[Item]:
        ann = require_path(self.src, "COCO captions file")
        try:
            data = json.loads(ann.read_text(encoding="utf-8"))
            images, annotations = data["images"], data["annotations"]
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise SourceError(f"{ann} is not a COCO captions JSON ({err})") from None
        except (KeyError, TypeError):
            raise SourceError(f"{ann} is not a COCO captions JSON: it needs top-level 'images' and "
                              "'annotations' lists") from None
        folder = self._images_dir(ann)
        self.dataset = self.dataset or "coco"
        self.split = self.split or guess_split(ann.stem)
        captions: dict[int, list] = {}
        for a in annotations:
            if "image_id" not in a:
                raise SourceError(f"{ann}: annotation {a.get('id', '?')} has no image_id")
            captions.setdefault(a["image_id"], []).append(a.get("caption"))
        items = []
        for im in sorted(images, key=lambda im: im["id"]):
            key = f"{im['id']:012d}" if isinstance(im["id"], int) else str(im["id"])
            path = folder / im["file_name"]
            items.append(Item(key, str(path), (str(path), captions.get(im["id"], []))))
        return items

    def load(self, item: Item) -> tuple[bytes | np.ndarray, list]:
        path, captions = item.payload
        return read_file(Path(path)), list(captions)
