"""kNN classification on frozen features (DINO's protocol), any integer labels: cosine similarity, the k nearest
training features vote for their label with weight exp(sim / T)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                num_classes: int, k: int = 20, temperature: float = 0.07) -> torch.Tensor:
    """Class scores (N, num_classes): the sum of exp(sim / T) over the k neighbours of each class."""
    a, b = F.normalize(test_feats.float(), dim=-1), F.normalize(train_feats.float(), dim=-1)
    sim = a @ b.T  # (N, M)
    k = min(k, b.shape[0])
    top, idx = sim.topk(k, dim=1)  # (N, k)
    votes = torch.zeros(a.shape[0], num_classes)
    votes.scatter_add_(1, train_labels[idx], (top / temperature).exp())
    return votes


def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, num_classes: int, k: int = 20, temperature: float = 0.07) -> float:
    scores = knn_predict(train_feats, train_labels, test_feats, num_classes, k, temperature)
    return float((scores.argmax(1) == test_labels).double().mean())


def num_classes_of(*labels: torch.Tensor) -> int:
    return int(max(int(x.max()) for x in labels if len(x))) + 1


@torch.no_grad()
def run_knn(encode_images, train_set, test_set, k: int = 20, temperature: float = 0.07,
            bank: int = 0, limit: int = 0, batch_size: int = 128) -> dict[str, float]:
    """The kNN suite: a bank of ``bank`` (0: all) training images with their labels, top-1 on
    the test images. Any integer labels (Sample.label); returns {"top1": ...}."""
    from dodo.eval.retrieval import embed_images
    from dodo.eval.zeroshot import labelled_images

    b_img, b_lab = labelled_images(train_set, bank)
    t_img, t_lab = labelled_images(test_set, limit)
    b, t = embed_images(encode_images, b_img, batch_size), embed_images(encode_images, t_img, batch_size)
    return {"top1": knn_accuracy(b, b_lab, t, t_lab, num_classes_of(b_lab, t_lab), k, temperature)}
