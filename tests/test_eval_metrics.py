"""Each metric against a small case computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dodo.eval.knn import knn_accuracy, knn_predict
from dodo.eval.retrieval import positives_from_captions, positives_from_index, recall_at_k
from dodo.eval.wise import wise_curve, write_curve
from dodo.eval.zeroshot import class_embeddings, topk_accuracy, zero_shot_accuracy


def test_recall_at_k_hand_computed():
    # 3 images, 5 texts; texts 0,1 -> image 0; 2,3 -> image 1; 4 -> image 2.
    pos = positives_from_index([0, 0, 1, 1, 2], 3)
    sim = torch.tensor([
        [0.1, 0.9, 0.5, 0.0, 0.2],  # image 0: best text 1 (positive) -> TR hit@1
        [0.9, 0.0, 0.1, 0.2, 0.3],  # image 1: its texts 2 (0.1), 3 (0.2); 0.9, 0.3 above -> rank 2
        [0.5, 0.4, 0.3, 0.2, 0.1],  # image 2: text 4 last -> rank 4
    ])
    r = recall_at_k(sim, pos, ks=(1, 3, 5))
    assert r["tr_r1"] == 1 / 3 and r["tr_r3"] == 2 / 3 and r["tr_r5"] == 1.0
    # IR, columns: text 0 -> image 0 (0.1) below 0.9, 0.5 -> rank 2; text 1: image 0 top -> 0;
    # text 2: image 1 (0.1) below 0.5, 0.3 -> 2; text 3: image 1 (0.2) tied with image 2, above
    # 0.0 -> 0 or 1, each half the time (half a hit at 1); text 4: image 2 (0.1) below 0.2, 0.3 -> 2.
    assert r["ir_r1"] == pytest.approx(1.5 / 5) and r["ir_r3"] == 1.0
    assert math.isclose(r["r_mean"], (1 / 3 + 2 / 3 + 1 + 1.5 / 5 + 1 + 1) / 6)


def test_positives_from_captions():
    pos = positives_from_captions(["a", "b", "a"], ["a", "b"])
    assert pos.tolist() == [[True, False], [False, True], [True, False]]


def test_zero_shot_template_average_hand_computed():
    table = {"a cat": [1.0, 0.0], "the cat": [0.0, 1.0], "a dog": [-1.0, 0.0], "the dog": [0.0, -1.0]}
    encode = lambda texts: torch.tensor([table[t] for t in texts])  # noqa: E731
    emb = class_embeddings(encode, ["cat", "dog"], ["a {}", "the {}"])
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(emb, torch.tensor([[s, s], [-s, -s]]))
    images = torch.tensor([[1.0, 0.2], [-0.1, -1.0], [1.0, 1.0]])
    acc = zero_shot_accuracy(images, emb, torch.tensor([0, 1, 1]), ks=(1, 2))
    assert acc == {"top1": 2 / 3, "top2": 1.0}


def test_topk_accuracy():
    logits = torch.tensor([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05]])
    assert topk_accuracy(logits, torch.tensor([2, 0]), ks=(1, 2)) == {"top1": 0.5, "top2": 1.0}


def test_knn_weighted_votes_hand_computed():
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 0])
    test = torch.tensor([[0.6, 0.8]])
    # cosines: 0.6, 0.96, 0.8, -0.6; k = 3 -> 0.96 (1), 0.8 (1), 0.6 (0)
    scores = knn_predict(train, labels, test, 2, k=3, temperature=0.5)
    want = torch.tensor([[math.exp(0.6 / 0.5), math.exp(0.96 / 0.5) + math.exp(0.8 / 0.5)]])
    torch.testing.assert_close(scores, want)
    # k = 1 with a closer class-0 point: the single nearest neighbour decides
    assert knn_accuracy(train, labels, torch.tensor([[0.99, 0.1]]), torch.tensor([0]), 2, k=1) == 1.0


class Scaled(nn.Module):
    """y = x + up(x): up is an adapter output parameter."""
    is_dodo_adapter = True
    output_params = ("up.weight",)

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(1, 1, bias=False)
        self.up.weight.data.fill_(2.0)

    def forward(self, x):
        return x + self.up(x)


def test_wise_curve_interpolates_and_restores(tmp_path):
    model = Scaled()
    rows = wise_curve(model, lambda m: {"y": float(m(torch.ones(1, 1)))}, [0.0, 0.25, 1.0])
    assert [r["y"] for r in rows] == [1.0, 1.5, 3.0]
    assert float(model.up.weight) == 2.0
    files = write_curve(rows, tmp_path)
    assert files["png"].stat().st_size > 0 and "| 0.250 | 1.500 |" in files["md"].read_text()
