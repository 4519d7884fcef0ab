"""Ingest: read image-caption pairs from a source format, one module per format.

A source lists its samples cheaply and deterministically in the main process (``items``),
then loads each one in a worker (``load``). The cache builder cuts the item list into shards
of a fixed number of items, so a shard's content is a pure function of the source and the
options: that is what lets ``dodo data cache`` resume by redoing only unfinished shards.

``load`` returns a :class:`Loaded` (or a plain ``(image, captions)`` tuple): ``image`` is
encoded bytes (any format PIL reads), an (H, W, 3) uint8 array, or None for a text source;
``captions`` a list of str or bytes (empty for an image-only source); ``label`` the class
index (-1 none); ``tokens`` token ids the source cut itself (text blocks). It raises
:class:`BadSample` for a sample to skip. Listing-level problems (an unreadable tar member)
go to ``source.listing_bad`` as ``(key, where, reason, detail)``.

After ``items()`` a source knows its manifest facts (``meta()``): modality, dataset name,
split, class names and class ids. Sources register by name in ``SOURCES``.
"""

from __future__ import annotations

import abc
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Optional, Sequence

import numpy as np

from dodo.data.ingest.images import BadSample

# --from NAME -> "module:class" (imported only when used)
SOURCES: dict[str, str] = {
    "webdataset": "dodo.data.ingest.webdataset:WebDatasetSource",
    "coco": "dodo.data.ingest.coco:CocoSource",
    "karpathy": "dodo.data.ingest.karpathy:KarpathySource",
    "cc3m": "dodo.data.ingest.cc3m:CC3MSource",
    "folder": "dodo.data.ingest.folder:FolderSource",
    "cifar": "dodo.data.ingest.cifar:CifarSource",
    "svhn": "dodo.data.ingest.svhn:SvhnSource",
    "text": "dodo.data.ingest.text:TextSource",
    "parallel": "dodo.data.ingest.parallel:ParallelSource",
    "vqa": "dodo.data.ingest.vqa:VqaSource",
    "nlvr2": "dodo.data.ingest.nlvr2:Nlvr2Source",
    "synthetic": "dodo.data.ingest.synthetic:SyntheticSource",
}
SOURCE_KINDS: tuple[str, ...] = tuple(SOURCES)


class SourceError(ValueError):
    """The source as a whole is unusable (wrong path, wrong format): one message, exit 2."""


@dataclass(frozen=True)
class Item:
    key: str  # unique within the cache
    where: str  # for people: the file (and member) it came from
    payload: Any  # picklable, source-specific


class Loaded(NamedTuple):
    image: Any  # encoded bytes | (H, W, 3) uint8 | None (text)
    captions: list  # str | bytes; [] for an image-only source
    label: int = -1
    tokens: Optional[Sequence[Sequence[int]]] = None  # per caption, when the source tokenised


class Source(abc.ABC):
    kind: str = ""
    modality: str = "image_text"  # "image_text" | "image" | "text"

    def __init__(self, src: str, images: Optional[str] = None, num: int = 0, seed: int = 1234,
                 image_size: int = 0, split: str = "", classnames: str = "", block: int = 0,
                 tokenizer: str = "", dataset: str = "", min_count: int = 0) -> None:
        self.src, self.images_dir, self.num, self.seed = src, images, num, seed
        self.min_count = min_count  # vqa: answers given fewer times are not in the vocabulary
        self.image_size = image_size
        self.split, self.classnames_file, self.block = split, classnames, block
        self.tokenizer, self.dataset = tokenizer, dataset
        self.listing_bad: list[tuple[str, str, str, str]] = []
        # Filled by items() where the source has classes: label -> name / source id.
        self.classnames: list[str] = []
        self.class_ids: list[str] = []
        self.has_labels = False

    @abc.abstractmethod
    def items(self) -> list[Item]:
        """Every sample of the source, in a fixed order."""

    @abc.abstractmethod
    def load(self, item: Item) -> tuple[bytes | np.ndarray, list]:
        """(image bytes or (H, W, 3) uint8, captions); raises BadSample."""

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": self.src, "images": self.images_dir}

    def tables(self) -> dict[str, Any]:
        """JSON tables the cache builder writes beside the shards, file name -> object (known
        after ``items()``): e.g. VQA's questions and answers, joined to the images by key."""
        return {}

    def meta(self) -> dict[str, Any]:
        """Manifest facts known after ``items()`` (see dodo.data.manifest.Manifest)."""
        return {"modality": self.modality, "dataset": self.dataset, "split": self.split,
                "has_labels": self.has_labels, "classnames": list(self.classnames),
                "class_ids": list(self.class_ids), "synthetic": False}


def open_source(kind: str, src: str, **options: Any) -> Source:
    if kind not in SOURCES:
        raise SourceError(f"--from {kind!r} is not a source format; use one of {', '.join(SOURCE_KINDS)}")
    import importlib

    module, name = SOURCES[kind].split(":")
    return getattr(importlib.import_module(module), name)(src, **options)


def guess_split(name: str) -> str:
    """train / val / test from a file name (captions_val2017.json, Train_GCC-training.tsv), or ""."""
    import re

    found = re.search(r"(train|val|test)", name.lower())
    return found.group(1) if found else ""


def read_file(path: Path) -> bytes:
    """A source file's bytes, or BadSample('missing file')."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise BadSample("missing file", str(path)) from None
    except OSError as err:
        raise BadSample("missing file", f"{path}: {err}") from None


def read_table(root: str | Path, name: str) -> Any:
    """A table a source wrote beside a cache's shards (``Source.tables``), e.g. VQA's questions."""
    return json.loads((Path(root).expanduser() / name).read_text(encoding="utf-8"))


def json_lines(path: Path, fields: Sequence[str], what: str, errors: str = "replace"
               ) -> Iterator[tuple[int, dict, tuple]]:
    """(line number, record, the record's ``fields``) for each non-blank line of a JSON-lines
    file; a line that is not a JSON object with those fields stops the source: "<path>:<n> is
    not <what>"."""
    with open(path, encoding="utf-8", errors=errors) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                values = tuple(record[k] for k in fields)
            except (json.JSONDecodeError, KeyError, TypeError):
                raise SourceError(f"{path}:{n} is not {what}") from None
            yield n, record, values


def require_path(src: str, what: str, want_dir: bool = False) -> Path:
    path = Path(src).expanduser()
    if not path.exists():
        raise SourceError(f"{what} {src} does not exist; check the path")
    if want_dir and not path.is_dir():
        raise SourceError(f"{what} {src} is not a directory")
    if not want_dir and path.is_dir():
        raise SourceError(f"{what} {src} is a directory; expected a file")
    return path


__all__ = ["BadSample", "Item", "Loaded", "Source", "SourceError", "SOURCES", "SOURCE_KINDS", "open_source"]
