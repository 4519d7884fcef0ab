"""The cache manifest (``manifest.json``): what a cache holds and how to check it.

A cache directory is complete exactly when its manifest exists: the builder writes it last,
atomically. It records the source, the build options, the dodo version, the sample and
caption counts, the skipped samples by reason, and per shard its name, counts, size and
sha256. ``verify`` compares shards against it, so a shard with flipped bytes is named as
such instead of failing somewhere inside h5py.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from dodo.data.store import checksum, shard_bytes
from dodo.rundir import write_json_atomic

MANIFEST = "manifest.json"
SHARDS = "shards"
MODALITIES: tuple[str, ...] = ("image_text", "image", "text")
REPORT = "bad_samples.jsonl"
FORMAT = "dodo-cache"


class CacheError(ValueError):
    """A cache that is missing, incomplete, corrupt or built for something else."""


@dataclass
class ShardInfo:
    name: str
    samples: int
    captions: int
    bytes: int
    sha256: str
    bad: int = 0


@dataclass
class Manifest:
    store: str
    encode: str
    image_size: int
    source: dict[str, Any]
    options: dict[str, Any]
    shards: list[ShardInfo]
    num_samples: int = 0
    num_captions: int = 0
    bad: dict[str, int] = field(default_factory=dict)
    dodo_version: str = ""
    format: str = FORMAT
    version: int = 1
    # What the data can feed (docs/data.md "What a cache can feed"). Every field has a default
    # so caches written before these existed still load; __post_init__ fills what it can.
    modality: str = "image_text"  # "image_text" | "image" | "text"
    num_images: int = 0  # distinct images (text caches: 0)
    captions_per_image: float = 0.0  # mean; COCO / Flickr30k ~5
    has_labels: bool = False
    classnames: list[str] = field(default_factory=list)  # label -> human-readable class name
    class_ids: list[str] = field(default_factory=list)  # label -> source id (wnid, folder name, index)
    dataset: str = ""  # "coco", "flickr30k", "cifar10", "imagenet1k", ... ("" unknown)
    split: str = ""  # "train" | "val" | "test" | "restval" | ... when the source has splits
    tokenizer: dict[str, Any] = field(default_factory=dict)  # name_or_path, vocab_size, sha256
    synthetic: bool = False  # built from the synthetic shapes generator

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise KeyError(f"modality {self.modality!r}")
        if not self.num_images and self.modality != "text":
            self.num_images = self.num_samples  # old caches: one shard row is one image
        if not self.captions_per_image and self.num_images and self.modality == "image_text":
            self.captions_per_image = self.num_captions / self.num_images
        if self.source.get("kind") == "synthetic":
            self.synthetic = True

    def feeds(self) -> dict[str, Any]:
        """What this cache can feed an evaluation suite or a task (torch-free; submit-time checks)."""
        return {"modality": self.modality, "images": self.modality != "text",
                "captions": self.modality != "image", "labels": self.has_labels,
                "classnames": bool(self.classnames), "num_classes": len(self.classnames or self.class_ids),
                "image_ids": self.modality != "text", "captions_per_image": self.captions_per_image,
                "multi_caption": self.captions_per_image > 1.0, "synthetic": self.synthetic,
                "tokens": bool(self.tokenizer), "dataset": self.dataset, "split": self.split,
                "num_images": self.num_images, "num_samples": self.num_captions}

    def save(self, root: Path) -> None:
        write_json_atomic(root / MANIFEST, asdict(self))

    @classmethod
    def load(cls, root: Path) -> "Manifest":
        path = Path(root) / MANIFEST
        if not Path(root).is_dir():
            raise CacheError(f"data cache {root} does not exist; build it with `dodo data cache SRC "
                             f"--from FORMAT --out {root}` (see docs/data.md)")
        if not path.exists():
            hint = (" it is incomplete (a build was interrupted): rerun the same `dodo data cache` "
                    "command to finish it" if (Path(root) / "build.json").exists()
                    else " it is not a dodo data cache")
            raise CacheError(f"data cache {root} has no {MANIFEST};{hint}")
        try:
            data = json.loads(path.read_text())
            if data.get("format") != FORMAT:
                raise KeyError("format")
            data["shards"] = [ShardInfo(**s) for s in data["shards"]]
            known = set(cls.__dataclass_fields__)
            return cls(**{k: v for k, v in data.items() if k in known})  # newer keys: ignored
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CacheError(f"{path} is not a dodo cache manifest ({err}); rebuild the cache") from None

    def shard_path(self, root: Path, info: ShardInfo) -> Path:
        return Path(root) / SHARDS / info.name

    def verify(self, root: Path, level: Literal["checksum", "size", "none"] = "checksum") -> None:
        """Raise CacheError naming every shard that is missing, resized or (checksum) altered."""
        if level == "none":
            return
        problems = []
        for info in self.shards:
            path = self.shard_path(root, info)
            if not path.exists():
                problems.append(f"{path} is missing")
            elif shard_bytes(path) != info.bytes:
                problems.append(f"{path} has {shard_bytes(path)} bytes, the manifest says {info.bytes}")
            elif level == "checksum" and checksum(path) != info.sha256:
                problems.append(f"{path} fails its sha256 checksum (its bytes changed since it was written)")
        if problems:
            raise CacheError(f"data cache {root} is damaged: " + "; ".join(problems) +
                             ". Rebuild it: rerun `dodo data cache` with the same options after deleting "
                             "the damaged shards (finished shards are kept)")


def describe(path: str | Path) -> Manifest:
    """The manifest of the cache at ``path``: what it holds and can feed (see ``Manifest.feeds``).

    Reads manifest.json only (no shard, no torch): this is what ``dodo submit`` consults to
    refuse an evaluation suite the data cannot feed. Raises CacheError for a missing or
    incomplete cache.
    """
    return Manifest.load(Path(path).expanduser())
