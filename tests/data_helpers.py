"""Small real inputs for the data tests: images PIL encodes, tars webdataset writes, COCO JSON."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image


def image_bytes(i: int, size: int = 24, fmt: str = "JPEG") -> bytes:
    """A small distinct image: a colour ramp seeded by i."""
    rng = np.random.default_rng(i)
    base = rng.integers(0, 255, size=3)
    ramp = np.linspace(0, 60, size)[None, :, None]
    pixels = np.clip(base[None, None, :] + ramp + np.zeros((size, size, 3)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return out.getvalue()


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


CORRUPT = b"this is not an image at all" * 4


def write_webdataset(path: Path, samples: list[dict]) -> None:
    import webdataset as wds

    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)


def write_coco(root: Path, images: dict[int, bytes | None], captions: dict[int, list[str]]) -> Path:
    """COCO layout: root/annotations/captions_val.json + root/val/<file>; None = file not written."""
    (root / "annotations").mkdir(parents=True)
    (root / "val").mkdir()
    entries, anns, ann_id = [], [], 1
    for image_id, data in images.items():
        name = f"{image_id:012d}.jpg"
        if data is not None:
            (root / "val" / name).write_bytes(data)
        entries.append({"id": image_id, "file_name": name, "width": 24, "height": 24})
        for c in captions.get(image_id, []):
            anns.append({"id": ann_id, "image_id": image_id, "caption": c})
            ann_id += 1
    path = root / "annotations" / "captions_val.json"
    path.write_text(json.dumps({"info": {"description": "test"}, "licenses": [],
                                "images": entries, "annotations": anns}))
    return path
