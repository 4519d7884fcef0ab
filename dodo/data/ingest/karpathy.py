"""Karpathy-split JSON: ``dataset_coco.json`` / ``dataset_flickr30k.json`` (/ ``dataset_flickr8k.json``).

The file (from Karpathy & Fei-Fei's "Deep Visual-Semantic Alignments" release) is

    {"dataset": "coco", "images": [{"split": "train|restval|val|test", "filepath": "val2014",
      "filename": "COCO_val2014_000000391895.jpg", "imgid": 0, "cocoid": 391895,
      "sentences": [{"raw": "A man with a red helmet on a small moped on a dirt road.", ...}, ...]}]}

Flickr30k entries have no ``filepath`` (images sit in one folder) and no ``cocoid``. SRC is the
JSON; ``--images ROOT`` the image root (default: the JSON's folder): an image is
``ROOT/<filepath>/<filename>``, or ``ROOT/<filename>``. ``--split`` picks the split(s): one of
train, restval, val, test or a comma list (``train,restval`` is the usual COCO training set).
Every caption of an image is kept (5 for COCO and Flickr30k; a few COCO images have 6-7).
"""

from __future__ import annotations

import json
from pathlib import Path

from dodo.data.ingest import Item, Loaded, Source, SourceError, read_file, require_path

SPLITS: tuple[str, ...] = ("train", "restval", "val", "test")


class KarpathySource(Source):
    kind = "karpathy"

    def _splits(self) -> list[str]:
        wanted = [s.strip() for s in self.split.split(",") if s.strip()]
        if not wanted:
            raise SourceError("--from karpathy needs --split (train, restval, val, test, or a comma "
                              "list such as train,restval)")
        unknown = [s for s in wanted if s not in SPLITS]
        if unknown:
            raise SourceError(f"--split {unknown[0]!r} is not a Karpathy split; use {', '.join(SPLITS)}")
        return wanted

    def items(self) -> list[Item]:
        splits = self._splits()
        path = require_path(self.src, "Karpathy split JSON")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            images = data["images"]
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise SourceError(f"{path} is not a Karpathy split JSON ({err})") from None
        except (KeyError, TypeError):
            raise SourceError(f"{path} is not a Karpathy split JSON: it needs a top-level 'images' "
                              "list (dataset_coco.json / dataset_flickr30k.json)") from None
        root = (require_path(self.images_dir, "--images folder", want_dir=True)
                if self.images_dir else path.parent)
        name = str(data.get("dataset", "")) or path.stem.removeprefix("dataset_")
        self.dataset = self.dataset or name
        items = []
        for n, im in enumerate(images):
            if not isinstance(im, dict) or "filename" not in im or "split" not in im:
                raise SourceError(f"{path}: images[{n}] has no 'filename' / 'split'; not a Karpathy "
                                  "split JSON")
            if im["split"] not in splits:
                continue
            file = root / im.get("filepath", "") / im["filename"]
            ident = im.get("cocoid", im.get("imgid", n))
            key = f"{ident:012d}" if isinstance(ident, int) else str(ident)
            captions = [s.get("raw") for s in im.get("sentences", []) if isinstance(s, dict)]
            items.append(Item(key, str(file), (str(file), captions)))
        if not items:
            found = sorted({str(im.get("split")) for im in images if isinstance(im, dict)})
            raise SourceError(f"{path} has no images in split {self.split!r} (it has: {', '.join(found)})")
        return items

    def load(self, item: Item) -> Loaded:
        path, captions = item.payload
        return Loaded(read_file(Path(path)), list(captions))

    def describe(self) -> dict:
        return {**super().describe(), "split": self.split}
