"""Parallel text (a sentence and its translation): ``.jsonl`` records with ``src`` and ``tgt``.

``src`` is the side the frozen teacher reads (English for CLIP's text tower), ``tgt`` the
target-language side the student reads (docs/methods.md "Language adapter"). SRC is a
``.jsonl`` file, a folder of them (sorted) or a glob. The cache is text-only (modality
``text``, ``source.kind == "parallel"``): each pair is one row with exactly two captions,
``[src, tgt]`` in that order, so ``CachedDataset`` sample ``2 i`` is pair i's ``src`` and
``2 i + 1`` its ``tgt``. A pair with an empty or non-UTF-8 side is skipped whole (reported in
bad_samples.jsonl), never half-kept.

    dodo data cache pairs_en_de.jsonl --from parallel --out data/parallel_en_de

``ParallelPairs`` reads such a cache back as (src, tgt) pairs.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from dodo.data.ingest import Item, Loaded, Source, SourceError, json_lines
from dodo.data.ingest.images import BadSample, check_caption

KIND = "parallel"


class ParallelSource(Source):
    kind = KIND
    modality = "text"

    def files(self) -> list[Path]:
        path = Path(self.src).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() == ".jsonl")
        elif path.is_file():
            found = [path]
        else:
            found = sorted(Path(p) for p in glob.glob(os.path.expanduser(self.src)))
        if not found:
            raise SourceError(f"no parallel text at {self.src}; give a .jsonl file of {{\"src\": ..., "
                              "\"tgt\": ...}} records, a folder of them or a glob")
        bad = [p for p in found if p.suffix.lower() != ".jsonl"]
        if bad:
            raise SourceError(f"{bad[0]} is not a .jsonl file of {{\"src\": ..., \"tgt\": ...}} records")
        return found

    def items(self) -> list[Item]:
        out: list[Item] = []
        for path in self.files():
            for n, _, pair in json_lines(path, ("src", "tgt"), "a JSON object with 'src' and 'tgt' fields",
                                         errors="surrogateescape"):
                out.append(Item(f"{len(out):09d}", f"{path}:{n}", pair))
        if not out:
            raise SourceError(f"{self.src} holds no pairs")
        return out

    def load(self, item: Item) -> Loaded:
        sides = []
        for name, text in zip(("src", "tgt"), item.payload):
            if not isinstance(text, str):
                raise BadSample("missing caption", f"'{name}' is not a string")
            try:
                sides.append(check_caption(text))
            except BadSample as b:
                raise BadSample(b.reason, f"'{name}': {b.detail}") from None
        return Loaded(None, sides)

    def meta(self) -> dict[str, Any]:
        return {**super().meta(), "dataset": self.dataset or KIND}


def is_parallel(manifest: Any) -> bool:
    """Whether a cache manifest (dodo.data.manifest.Manifest) was built ``--from parallel``."""
    return manifest.modality == "text" and manifest.source.get("kind") == KIND


@dataclass
class Pair:
    src: str
    tgt: str
    key: str


class ParallelPairs:
    """Pairs ``[start, stop)`` of a ``--from parallel`` cache (a map-style dataset of Pair)."""

    def __init__(self, root: str | Path, verify: str = "checksum", start: int = 0, stop: Optional[int] = None):
        from dodo.data.dataset import CachedDataset  # torch: only where pairs are read
        from dodo.data.manifest import CacheError

        self.texts = CachedDataset(root, verify)
        if not is_parallel(self.texts.manifest):
            raise CacheError(f"data cache {root} was not built from parallel text (source "
                             f"{self.texts.manifest.source.get('kind')!r}); build one with "
                             "`dodo data cache PAIRS.jsonl --from parallel --out DIR`")
        total = len(self.texts) // 2
        self.start, self.stop = start, total if stop is None else stop
        if not 0 <= self.start < self.stop <= total:
            raise CacheError(f"pairs [{self.start}, {self.stop}) are outside {root} ({total} pairs)")

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> Pair:
        if not 0 <= i < len(self):
            raise IndexError(f"pair {i} out of range for {len(self)} pairs")
        a, b = self.texts[2 * (self.start + i)], self.texts[2 * (self.start + i) + 1]
        key = a.key.rsplit("#", 1)[0]
        if b.key != f"{key}#1":  # every row has exactly [src, tgt]
            raise ValueError(f"{self.texts.root}: sample {a.key} / {b.key} is not one pair; rebuild the cache")
        return Pair(a.caption, b.caption, key)
