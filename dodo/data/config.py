"""Data config. The embedded default is the synthetic shapes dataset."""

from __future__ import annotations

from dataclasses import dataclass

from typing import Literal

from dodo.config.errors import check


@dataclass
class DataConfig:
    kind: Literal["synthetic"] = "synthetic"
    seed: int = 1234
    num_train: int = 20000
    num_eval: int = 256
    image_size: int = 32
    max_caption_tokens: int = 16
    num_workers: int = 0

    def __post_init__(self) -> None:
        for name in ("num_train", "num_eval", "image_size", "max_caption_tokens"):
            check(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        check(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")
