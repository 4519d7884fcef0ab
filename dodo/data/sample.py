"""What every dodo dataset's ``__getitem__`` returns (torch-free: numpy only).

One Sample is one (image, caption) pair. An image with five captions (COCO, Flickr30k) gives
five Samples that share ``image_id``: retrieval counts a text->image hit when the caption's
image is retrieved, and contrastive losses take their positives from it. An image-only source
(class folders without captions) has ``caption == ""``; a text-only source has ``image is None``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np


@dataclass
class Sample:
    image: Optional[np.ndarray]  # (H, W, 3) uint8; None for a text-only source
    caption: str  # "" for an image-only source (class folders without captions)
    key: str  # unique within a dataset, e.g. "000123#2" = caption 2 of image 000123
    image_id: int = -1  # index of the IMAGE in its dataset: all captions of one image share it
    label: int = -1  # class index; -1 when the source has no labels
    attrs: dict[str, str] = field(default_factory=dict)  # synthetic shapes only
    tokens: Optional[np.ndarray] = None  # (T,) int32 pre-tokenised caption, when the cache has them


__all__ = ["Sample"]
