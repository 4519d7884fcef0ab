"""Image <-> text retrieval recall at k, as the COCO / Flickr30k papers measure it.

The gallery holds each image once (deduplicated by ``Sample.image_id``) and every caption
(COCO and Flickr30k have 5 per image). Positives come from image ids:
  text -> image ("t2i", image retrieval): a hit at k when the caption's own image is in its top k;
  image -> text ("i2t", text retrieval): a hit at k when ANY of the image's captions is in its top k.
Reported: ``i2t_r{k}``, ``t2i_r{k}`` for each k and ``r_mean``, their mean (the "RSUM / 6" of
the papers). Ties between the best positive and negatives are broken at random, in
expectation: with g negatives scoring above it and t tied with it, its place is uniform over
g .. g + t, so a hit at k counts min(1, max(0, k - g) / (t + 1)). The papers' code breaks ties
by index order (argsort / topk), which is arbitrary; counting ties as hits would give a model
whose embeddings collapsed (every caption the same vector) perfect recall, and inflates I->T
recall wherever captions repeat across images.

``recall_at_k`` (dense ``positives`` matrix, keys ``tr_r{k}`` / ``ir_r{k}``) is the general
form, kept for callers with positives that are not image ids (the shapes suite: identical
captions); ``recall_by_image_ids`` is the same computation from the index, in query chunks so
a 5k x 25k COCO similarity matrix never needs its dense boolean twin. Each is tested against
the other and against a hand-computed case.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch


def positives_from_index(text_to_image: Sequence[int], num_images: int) -> torch.Tensor:
    """(num_images, num_texts) bool: text j describes image text_to_image[j]."""
    t2i = torch.as_tensor(list(text_to_image))
    pos = torch.zeros(num_images, len(t2i), dtype=torch.bool)
    pos[t2i, torch.arange(len(t2i))] = True
    return pos


def positives_from_captions(image_captions: Sequence[str], texts: Sequence[str]) -> torch.Tensor:
    return torch.tensor([[c == t for t in texts] for c in image_captions], dtype=torch.bool)


def _place(scores: torch.Tensor, positives: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows are queries: (negatives scoring above the best positive, negatives tied with it), (Q,) each."""
    best = scores.masked_fill(~positives, float("-inf")).max(1, keepdim=True).values  # (Q, 1)
    above = ((scores > best) & ~positives).sum(1)
    tied = ((scores == best) & ~positives).sum(1)
    return above, tied


def _hit_rate(above: torch.Tensor, tied: torch.Tensor, k: int) -> float:
    """Mean over queries of P(rank < k) with the tied negatives in random order (module docstring)."""
    return float(((k - above).clamp_min(0).double() / (tied + 1).double()).clamp_max(1.0).mean())


def _hits(scores: torch.Tensor, positives: torch.Tensor, ks: Sequence[int]) -> dict[int, float]:
    valid = positives.any(1)
    above, tied = _place(scores[valid], positives[valid])
    return {k: _hit_rate(above, tied, k) for k in ks}


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


def recall_by_image_ids(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: Sequence[int],
                        ks: Sequence[int] = (1, 5, 10), chunk: int = 1024) -> dict[str, float]:
    """image_emb (I, D), text_emb (T, D) (normalised or not: the score is their dot product);
    text_to_image (T,): the gallery row of each caption's image.
    Returns {"i2t_r1": ..., "t2i_r1": ..., "r_mean": ...}."""
    img, txt = image_emb.float(), text_emb.float()
    owner = torch.as_tensor(list(text_to_image), dtype=torch.long)  # (T,)
    if len(owner) != len(txt):
        raise ValueError(f"{len(owner)} image indices for {len(txt)} texts")
    i2t, t2i = [], []  # (above, tied) per query chunk
    images = torch.arange(len(img))
    for lo in range(0, len(txt), chunk):  # text -> image: the caption's own image
        s = txt[lo:lo + chunk] @ img.T  # (q, I)
        t2i.append(_place(s, images[None, :] == owner[lo:lo + chunk, None]))
    for lo in range(0, len(img), chunk):  # image -> text: the best of its captions
        s = img[lo:lo + chunk] @ txt.T  # (q, T)
        pos = owner[None, :] == images[lo:lo + chunk, None]  # (q, T)
        query = pos.any(1)  # an image without captions is no query
        i2t.append(_place(s[query], pos[query]))
    out = {}
    for name, places in (("i2t", i2t), ("t2i", t2i)):
        above, tied = (torch.cat(part) for part in zip(*places))
        for k in ks:
            out[f"{name}_r{k}"] = _hit_rate(above, tied, k)
    out["r_mean"] = sum(out.values()) / len(out)
    return out


# ---------------------------------------------------------------- galleries from a dataset


@dataclass
class Gallery:
    """A retrieval gallery: each image once, every caption, and which image each caption is of."""
    images: list[np.ndarray]  # I images, (H, W, 3) uint8
    image_ids: list[int]  # (I,) Sample.image_id of each gallery image
    texts: list[str]  # T captions
    text_to_image: list[int]  # (T,) index into ``images``


def build_gallery(dataset: Any, limit: int = 0) -> Gallery:
    """Walk a dataset of Samples (one per caption); ``limit`` caps the number of IMAGES.

    Images are deduplicated by ``image_id``; a source without image ids (-1) counts each
    sample as its own image. Samples with an empty caption add their image only."""
    images, image_ids, texts, owner = [], [], [], []
    row: dict[int, int] = {}
    for i in range(len(dataset)):
        s = dataset[i]
        iid = s.image_id if s.image_id >= 0 else -(i + 1)  # no id: its own image
        if iid not in row:
            if limit and len(images) == limit:
                continue  # keep walking: later captions may belong to images already in
            row[iid] = len(images)
            images.append(s.image)
            image_ids.append(s.image_id)
        if s.caption:
            texts.append(s.caption)
            owner.append(row[iid])
    return Gallery(images, image_ids, texts, owner)


def embed_images(encode_images: Callable[[torch.Tensor], torch.Tensor], images: Sequence[np.ndarray],
                 batch_size: int = 128) -> torch.Tensor:
    """(N, D) float32 on CPU; ``encode_images`` takes a (B, H, W, 3) uint8 tensor."""
    out = [encode_images(torch.from_numpy(np.stack(images[lo:lo + batch_size]))).float().cpu()
           for lo in range(0, len(images), batch_size)]
    return torch.cat(out)


def embed_texts(encode_texts: Callable[[list[str]], torch.Tensor], texts: Sequence[str],
                batch_size: int = 256) -> torch.Tensor:
    """(N, D) float32 on CPU."""
    return torch.cat([encode_texts(list(texts[lo:lo + batch_size])).float().cpu()
                      for lo in range(0, len(texts), batch_size)])


@torch.no_grad()
def run_retrieval(encode_images: Callable, encode_texts: Callable, dataset: Any,
                  ks: Sequence[int] = (1, 5, 10), limit: int = 0, batch_size: int = 128) -> dict[str, float]:
    """The retrieval suite on one dataset: embeddings L2-normalised (cosine similarity)."""
    g = build_gallery(dataset, limit)
    if not g.texts:
        raise ValueError("retrieval needs captions; this dataset has none (an image-only cache)")
    img = torch.nn.functional.normalize(embed_images(encode_images, g.images, batch_size), dim=-1)
    txt = torch.nn.functional.normalize(embed_texts(encode_texts, g.texts, batch_size), dim=-1)
    return recall_by_image_ids(img, txt, g.text_to_image, ks)
