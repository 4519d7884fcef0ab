"""kNN classification on frozen features (DINO's protocol): cosine similarity, the k nearest
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
