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


def subset_logits(logits: torch.Tensor, subset: Sequence[int] | None) -> torch.Tensor:
    """Scores over a class subset: (N, C) -> (N, len(subset)), column i = class subset[i].
    ImageNet-R / -A are scored this way against the 1000 ImageNet class embeddings: the
    prediction is the best of the dataset's 200 classes (CLIP, WiSE-FT, clip_benchmark)."""
    return logits if subset is None else logits[:, torch.as_tensor(list(subset), dtype=torch.long)]


def labelled_images(dataset, limit: int = 0) -> tuple[list, torch.Tensor]:
    """(images, labels (N,)) of a labelled dataset, each image once (deduplicated by image_id)."""
    images, labels, seen = [], [], set()
    for i in range(len(dataset)):
        s = dataset[i]
        if s.image_id >= 0:
            if s.image_id in seen:
                continue
            seen.add(s.image_id)
        if s.label < 0:
            raise ValueError(f"sample {s.key!r} has no label; zero-shot / kNN / linear probe need a labelled cache")
        images.append(s.image)
        labels.append(s.label)
        if limit and len(images) == limit:
            break
    return images, torch.tensor(labels, dtype=torch.long)


@torch.no_grad()
def run_zeroshot(encode_images: Callable, encode_texts: Callable[[list[str]], torch.Tensor], dataset,
                 classnames: Sequence[str], templates: Sequence[str], subset: Sequence[int] | None = None,
                 ks: Sequence[int] = (1, 5), limit: int = 0, batch_size: int = 128) -> dict[str, float]:
    """The zero-shot suite on one dataset: {"top1": ..., "top5": ...}."""
    from dodo.eval.retrieval import embed_images

    images, labels = labelled_images(dataset, limit)
    n_classes = len(subset) if subset is not None else len(classnames)
    if int(labels.max()) >= n_classes:
        raise ValueError(f"label {int(labels.max())} but only {n_classes} classes "
                         f"({'class_subset' if subset is not None else 'classnames'}); check the suite's lists")
    cls = class_embeddings(encode_texts, classnames, templates)  # (C, D)
    img = F.normalize(embed_images(encode_images, images, batch_size), dim=-1)  # (N, D)
    return topk_accuracy(subset_logits(img @ cls.T, subset), labels, ks)
