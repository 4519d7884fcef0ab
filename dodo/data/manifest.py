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
            return cls(**data)
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
