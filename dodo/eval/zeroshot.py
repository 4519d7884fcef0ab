"""Zero-shot classification: class text embeddings averaged over prompt templates (CLIP)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F


def class_embeddings(encode_texts: Callable[[list[str]], torch.Tensor], classnames: Sequence[str],
                     templates: Sequence[str]) -> torch.Tensor:
    """(C, D): per class, the mean of the L2-normalised embeddings of every template filled
    with the class name ("{}" marks where it goes), normalised again."""
    rows = []
    for name in classnames:
        emb = F.normalize(encode_texts([t.format(name) for t in templates]).float(), dim=-1)  # (T, D)
        rows.append(F.normalize(emb.mean(0), dim=-1))
    return torch.stack(rows)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """logits (N, C), labels (N,) -> {"top1": ..., "top5": ...}; k larger than C counts as C."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # (N, K)
    hit = top == labels[:, None]
    return {f"top{k}": float(hit[:, :k].any(1).double().mean()) for k in ks}


def zero_shot_accuracy(image_emb: torch.Tensor, class_emb: torch.Tensor, labels: torch.Tensor,
                       ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    return topk_accuracy(F.normalize(image_emb.float(), dim=-1) @ class_emb.T, labels, ks)
