"""The embedded synthetic shapes (dodo.data.synthetic) as a source: SRC is the split name.

``dodo data cache train --from synthetic --num 20000 --seed 1234 --image-size 32`` caches
exactly the images ``SyntheticShapes("train", 20000, 32, 1234)`` generates.
"""

from __future__ import annotations

import numpy as np

from dodo.data.ingest import Item, Source, SourceError
from dodo.data.synthetic import SyntheticShapes


class SyntheticSource(Source):
    kind = "synthetic"

    def _dataset(self) -> SyntheticShapes:
        if self.src not in ("train", "eval"):
            raise SourceError(f"synthetic SRC must be the split name 'train' or 'eval', got {self.src!r}")
        if self.num <= 0:
            raise SourceError("--from synthetic needs --num N (how many samples to generate)")
        if self.image_size < 16:
            raise SourceError("--from synthetic needs --image-size >= 16")
        return SyntheticShapes(self.src, self.num, self.image_size, self.seed)

    def items(self) -> list[Item]:
        ds = self._dataset()
        return [Item(f"{self.src}-{i:06d}", f"synthetic {self.src}[{i}]", i) for i in range(len(ds))]

    def load(self, item: Item) -> tuple[bytes | np.ndarray, list]:
        if not hasattr(self, "_ds"):
            self._ds = self._dataset()
        sample = self._ds[item.payload]
        return sample.image, [sample.caption]

    def meta(self) -> dict:
        return {**super().meta(), "dataset": "shapes", "split": self.src, "synthetic": True}

    def describe(self) -> dict:
        return {"kind": self.kind, "split": self.src, "num": self.num, "seed": self.seed,
                "image_size": self.image_size}
