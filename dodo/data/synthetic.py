"""The embedded synthetic image-caption dataset: one coloured shape per image.

Every caption reads "a {size} {colour} {shape} in the {position}", for example
"a small red circle in the top left". Sample ``i`` of a split is a pure function of
``(seed, split, i)``, so every rank and every DataLoader worker sees the same sample
without any shared state, and the dataset needs no files at all.

The interface is the one every dodo dataset keeps: a map-style ``torch.utils.data.Dataset``
whose ``__getitem__`` returns a :class:`Sample`. The collator (``dodo.data.collate``) only
relies on that.
"""

from __future__ import annotations

import itertools
import re
from typing import Literal, Optional

import numpy as np
from PIL import Image, ImageDraw

from dodo.data.sample import Sample  # re-exported: old imports keep working

# RGB values chosen to be told apart at a glance and by their dominant channel.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (40, 90, 230),
    "yellow": (230, 210, 40),
    "purple": (160, 50, 210),
    "white": (235, 235, 235),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Diameter of the shape as a fraction of the image side. Large is ~1.8x small in
# diameter (~3.2x in area), so size is never ambiguous.
SIZES: dict[str, float] = {"small": 0.25, "large": 0.44}
# Centre of the shape as (x, y) fractions of the image side: the middle of each quadrant.
# A large shape (diameter 0.44 plus jitter) stays inside its quadrant.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
    "center": (0.5, 0.5),
}
ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "size", "position")

_SPLIT_IDS: dict[str, int] = {"train": 0, "eval": 1}
_SUPERSAMPLE = 4  # draw at 4x and box-filter down: anti-aliased edges at 32x32
_SIZE_JITTER = 0.05  # relative jitter of the diameter
_POS_JITTER = 0.02  # jitter of the centre, as a fraction of the image side


def attribute_words() -> dict[str, tuple[str, ...]]:
    """The values each attribute can take, e.g. {"colour": ("red", ...), ...}."""
    return {
        "colour": tuple(COLOURS),
        "shape": SHAPES,
        "size": tuple(SIZES),
        "position": tuple(POSITIONS),
    }


def make_caption(attrs: dict[str, str]) -> str:
    """The one caption grammar: "a {size} {colour} {shape} in the {position}"."""
    return f"a {attrs['size']} {attrs['colour']} {attrs['shape']} in the {attrs['position']}"


def all_captions() -> list[str]:
    """Every caption the generator can produce (6 x 3 x 2 x 5 = 180), in a fixed order."""
    words = attribute_words()
    return [
        make_caption(dict(colour=c, shape=s, size=z, position=p))
        for c, s, z, p in itertools.product(words["colour"], words["shape"],
                                            words["size"], words["position"])
    ]


def caption_attributes(caption: str) -> dict[str, Optional[str]]:
    """Parse colour, shape, size and position back out of a caption; None where absent.

    Works on free-form model output too ("red circle top left" -> colour=red, shape=circle,
    position=top left); the first mention of each attribute wins.
    """
    words = re.findall(r"[a-z]+", caption.lower())
    text = " ".join(words)
    found: dict[str, Optional[str]] = {name: None for name in ATTRIBUTES}
    for name in ("colour", "shape", "size"):
        values = attribute_words()[name]
        found[name] = next((w for w in words if w in values), None)
    # Positions are phrases: pick the one mentioned earliest ("centre" counts as "center").
    text = re.sub(r"\bcentre\b", "center", text)
    hits = [(m.start(), p) for p in POSITIONS for m in [re.search(rf"\b{p}\b", text)] if m]
    if hits:
        found["position"] = min(hits)[1]
    return found


def _shape_mask(shape: str, cx: float, cy: float, diameter: float, size: int) -> np.ndarray:
    """Anti-aliased coverage of one shape, (size, size) float32 in [0, 1]. Units are pixels."""
    s = _SUPERSAMPLE
    canvas = Image.new("L", (size * s, size * s), 0)
    draw = ImageDraw.Draw(canvas)
    x, y, r = cx * s, cy * s, diameter * s / 2
    if shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=255)
    elif shape == "square":
        h = 0.9 * r  # a slightly smaller square keeps its area close to the circle's
        draw.rectangle([x - h, y - h, x + h, y + h], fill=255)
    elif shape == "triangle":
        h = r * np.sqrt(3.0)  # equilateral, base = diameter, pointing up
        draw.polygon([(x, y - h / 2), (x - r, y + h / 2), (x + r, y + h / 2)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def render(attrs: dict[str, str], image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw one shape on a dark, slightly noisy background. Returns (H, W, 3) uint8."""
    n = image_size
    diameter = SIZES[attrs["size"]] * n * (1.0 + rng.uniform(-_SIZE_JITTER, _SIZE_JITTER))
    fx, fy = POSITIONS[attrs["position"]]
    cx = (fx + rng.uniform(-_POS_JITTER, _POS_JITTER)) * n
    cy = (fy + rng.uniform(-_POS_JITTER, _POS_JITTER)) * n
    alpha = _shape_mask(attrs["shape"], cx, cy, diameter, n)[..., None]  # (H, W, 1)

    background = rng.uniform(8.0, 28.0)
    colour = np.asarray(COLOURS[attrs["colour"]], dtype=np.float32)  # (3,)
    image = background + alpha * (colour - background)  # (H, W, 3)
    image = image + rng.normal(0.0, 4.0, size=image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


# A plain map-style dataset (__len__ / __getitem__), which DataLoader takes as it is; not a
# torch Dataset subclass, so that config checks reading the vocabulary above stay torch-free.
class SyntheticShapes:
    """``num`` deterministic samples of one split. Sample i depends only on (seed, split, i)."""

    def __init__(self, split: Literal["train", "eval"], num: int, image_size: int = 32,
                 seed: int = 1234) -> None:
        if split not in _SPLIT_IDS:
            raise ValueError(f"split={split!r}; expected one of {tuple(_SPLIT_IDS)}")
        if num <= 0:
            raise ValueError(f"num={num} must be > 0")
        if image_size < 16:
            raise ValueError(f"image_size={image_size} must be >= 16 for shapes to be legible")
        if seed < 0:
            raise ValueError(f"seed={seed} must be >= 0 (numpy SeedSequence needs it)")
        self.split = split
        self.num = num
        self.image_size = image_size
        self.seed = seed
        self._split_id = _SPLIT_IDS[split]

    def __len__(self) -> int:
        return self.num

    def __getitem__(self, i: int) -> Sample:
        i = int(i)
        if i < 0:
            i += self.num
        if not 0 <= i < self.num:
            raise IndexError(f"index {i} out of range for {self.split} split of {self.num}")
        # The split id is part of the seed sequence, so train and eval are independent streams.
        rng = np.random.default_rng([self.seed, self._split_id, i])
        words = attribute_words()
        attrs = {name: words[name][int(rng.integers(len(words[name])))] for name in ATTRIBUTES}
        image = render(attrs, self.image_size, rng)
        return Sample(image=image, caption=make_caption(attrs), key=f"{self.split}-{i:06d}",
                      image_id=i, label=-1, attrs=attrs)
