"""Ingest: read image-caption pairs from a source format, one module per format.

A source lists its samples cheaply and deterministically in the main process (``items``),
then loads each one in a worker (``load``). The cache builder cuts the item list into shards
of a fixed number of items, so a shard's content is a pure function of the source and the
options: that is what lets ``dodo data cache`` resume by redoing only unfinished shards.

``load`` returns ``(image, captions)`` where ``image`` is encoded bytes (any format PIL reads)
or an (H, W, 3) uint8 array, and ``captions`` a list of str or bytes; it raises
:class:`BadSample` for a sample to skip. Listing-level problems (an unreadable tar member)
go to ``source.listing_bad`` as ``(key, where, reason, detail)``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from dodo.data.ingest.images import BadSample

SOURCE_KINDS: tuple[str, ...] = ("webdataset", "coco", "cc3m", "folder", "synthetic")


class SourceError(ValueError):
    """The source as a whole is unusable (wrong path, wrong format): one message, exit 2."""


@dataclass(frozen=True)
class Item:
    key: str  # unique within the cache
    where: str  # for people: the file (and member) it came from
    payload: Any  # picklable, source-specific


class Source(abc.ABC):
    kind: str = ""

    def __init__(self, src: str, images: Optional[str] = None, num: int = 0, seed: int = 1234,
                 image_size: int = 0) -> None:
        self.src, self.images_dir, self.num, self.seed = src, images, num, seed
        self.image_size = image_size
        self.listing_bad: list[tuple[str, str, str, str]] = []

    @abc.abstractmethod
    def items(self) -> list[Item]:
        """Every sample of the source, in a fixed order."""

    @abc.abstractmethod
    def load(self, item: Item) -> tuple[bytes | np.ndarray, list]:
        """(image bytes or (H, W, 3) uint8, captions); raises BadSample."""

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": self.src, "images": self.images_dir}


def open_source(kind: str, src: str, **options: Any) -> Source:
    if kind == "webdataset":
        from dodo.data.ingest.webdataset import WebDatasetSource as cls
    elif kind == "coco":
        from dodo.data.ingest.coco import CocoSource as cls
    elif kind == "cc3m":
        from dodo.data.ingest.cc3m import CC3MSource as cls
    elif kind == "folder":
        from dodo.data.ingest.folder import FolderSource as cls
    elif kind == "synthetic":
        from dodo.data.ingest.synthetic import SyntheticSource as cls
    else:
        raise SourceError(f"--from {kind!r} is not a source format; use one of {', '.join(SOURCE_KINDS)}")
    return cls(src, **options)


def read_file(path: Path) -> bytes:
    """A source file's bytes, or BadSample('missing file')."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise BadSample("missing file", str(path)) from None
    except OSError as err:
        raise BadSample("missing file", f"{path}: {err}") from None


def require_path(src: str, what: str, want_dir: bool = False) -> Path:
    path = Path(src).expanduser()
    if not path.exists():
        raise SourceError(f"{what} {src} does not exist; check the path")
    if want_dir and not path.is_dir():
        raise SourceError(f"{what} {src} is not a directory")
    if not want_dir and path.is_dir():
        raise SourceError(f"{what} {src} is a directory; expected a file")
    return path


__all__ = ["BadSample", "Item", "Source", "SourceError", "SOURCE_KINDS", "open_source"]
