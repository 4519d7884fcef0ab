"""Image <-> text retrieval recall at k, with several captions per image.

``positives[i, j]`` says text j describes image i. Text retrieval (image -> text, "TR") hits
at k when any of the image's texts is among its top k; image retrieval (text -> image, "IR")
hits when any of the text's images is. Ties between a positive and a negative are broken in
favour of the positive. With one image per caption (COCO, Flickr30k) ``positives`` comes from
``positives_from_index``; the synthetic shapes data has repeated captions, and every image
with the same caption counts as a positive (``positives_from_captions``).
"""

from __future__ import annotations

from typing import Sequence

import torch


def positives_from_index(text_to_image: Sequence[int], num_images: int) -> torch.Tensor:
    t2i = torch.as_tensor(list(text_to_image))
    pos = torch.zeros(num_images, len(t2i), dtype=torch.bool)
    pos[t2i, torch.arange(len(t2i))] = True
    return pos


def positives_from_captions(image_captions: Sequence[str], texts: Sequence[str]) -> torch.Tensor:
    return torch.tensor([[c == t for t in texts] for c in image_captions], dtype=torch.bool)


def _hits(scores: torch.Tensor, positives: torch.Tensor, ks: Sequence[int]) -> dict[int, float]:
    """Rows are queries. Rank of the best positive = number of negatives scoring above it."""
    best = scores.masked_fill(~positives, float("-inf")).max(1, keepdim=True).values  # (Q, 1)
    rank = ((scores > best) & ~positives).sum(1)  # (Q,)
    valid = positives.any(1)
    return {k: float((rank[valid] < k).double().mean()) for k in ks}


def recall_at_k(sim: torch.Tensor, positives: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """sim, positives: (num_images, num_texts). Returns {"tr_r1": ..., "ir_r1": ..., "r_mean": ...}."""
    if sim.shape != positives.shape:
        raise ValueError(f"similarities {tuple(sim.shape)} and positives {tuple(positives.shape)} differ in shape")
    out = {}
    for k, v in _hits(sim, positives, ks).items():
        out[f"tr_r{k}"] = v
    for k, v in _hits(sim.T, positives.T, ks).items():
        out[f"ir_r{k}"] = v
    out["r_mean"] = sum(out.values()) / len(out)
    return out
