"""Zero-shot top-1 / top-5 with class subsets, class lists from clip_benchmark, kNN on any
labels and the linear probe, each against a hand-computed case."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dodo.data.sample import Sample
from dodo.eval import classnames as cn
from dodo.eval.knn import run_knn
from dodo.eval.linear_probe import fit_predict, probe_accuracy, run_linear_probe
from dodo.eval.zeroshot import run_zeroshot, subset_logits, topk_accuracy


def test_zero_shot_top5_hand_computed():
    logits = torch.tensor([[.9, .8, .7, .6, .5, .4, .3],   # label 4: rank 4 -> top-5 hit, top-1 miss
                           [.9, .8, .7, .6, .5, .4, .3],   # label 5: rank 5 -> miss
                           [.9, .1, .1, .1, .1, .1, .1]])  # label 0: top-1 hit
    acc = topk_accuracy(logits, torch.tensor([4, 5, 0]), ks=(1, 5))
    assert acc == {"top1": pytest.approx(1 / 3), "top5": pytest.approx(2 / 3)}


def test_class_subset_predicts_among_the_subset():
    # 7 classes in all; the dataset's labels 0, 1, 2 are full classes 1, 3, 5.
    logits = torch.tensor([[.9, .1, .8, .3, .0, .2, .0]])  # full argmax 0; among {1, 3, 5}: 3
    sub = subset_logits(logits, [1, 3, 5])
    assert sub.tolist() == [[pytest.approx(.1), pytest.approx(.3), pytest.approx(.2)]]
    assert topk_accuracy(sub, torch.tensor([1]), ks=(1,)) == {"top1": 1.0}


def labelled(labels: list[int]) -> list[Sample]:
    return [Sample(image=np.full((2, 2, 3), 10 * i, dtype=np.uint8), caption="", key=f"{i}", image_id=i, label=y)
            for i, y in enumerate(labels)]


def test_run_zeroshot_with_templates_file_and_subset(tmp_path):
    names = ["goldfish", "tabby cat", "fire truck", "teapot"]
    table = {name: torch.eye(4)[i] for i, name in enumerate(names)}
    encode_texts = lambda texts: torch.stack([table[t.split(" of a ")[1].rstrip(".")] for t in texts])  # noqa: E731
    # image i looks like full class [3, 1, 0][i]; the dataset's classes are full classes [0, 1, 3]
    looks = {0: 3, 10: 1, 20: 0}
    encode_images = lambda x: torch.stack([table[names[looks[int(v)]]] for v in x[:, 0, 0, 0]])  # noqa: E731
    (tmp_path / "t.txt").write_text("a photo of a {}.\na drawing of a {c}.\n")
    temps = cn.templates(str(tmp_path / "t.txt"))
    assert temps == ["a photo of a {}.", "a drawing of a {}."]
    r = run_zeroshot(encode_images, encode_texts, labelled([2, 1, 0]), names, temps, subset=[0, 1, 3], ks=(1, 2))
    assert r == {"top1": 1.0, "top2": 1.0}
    r = run_zeroshot(encode_images, encode_texts, labelled([0, 1, 2]), names, temps, subset=[0, 1, 3], ks=(1,))
    assert r["top1"] == pytest.approx(1 / 3)


def test_clip_benchmark_lists():
    names = cn.classnames("clip_benchmark:imagenet1k")
    assert len(names) == 1000 and names[0] == "tench"
    assert cn.classnames("clip_benchmark:imagenet-r") == names  # the shifts use ImageNet's names
    temps = cn.templates("", "cifar10")
    assert len(temps) > 1 and all("{}" in t and "{c}" not in t for t in temps)
    assert len(cn.templates("", "imagenet_a")) == 80  # CLIP's 80 ImageNet templates
    assert cn.templates("", "my_own_data") == ["a photo of a {}."]
    assert len(cn.classnames("clip_benchmark_zh:imagenet1k")) == 1000
    assert cn.classnames("clip_benchmark_zh:imagenet1k") == cn.classnames("clip_benchmark_cn:imagenet1k")
    with pytest.raises(cn.ClassListError, match="not 'nosuchset'"):
        cn.classnames("clip_benchmark:nosuchset")


def test_class_files(tmp_path):
    (tmp_path / "a.txt").write_text("dog\n\ncat\n")
    (tmp_path / "b.json").write_text(json.dumps(["dog", "cat"]))
    assert cn.classnames(str(tmp_path / "a.txt")) == cn.classnames(str(tmp_path / "b.json")) == ["dog", "cat"]
    with pytest.raises(cn.ClassListError, match="neither"):
        cn.classnames(str(tmp_path / "missing.txt"))


def test_subset_indices_from_wnids():
    order = cn.imagenet_wnids()
    assert len(order) == 1000 and order == sorted(order)
    r = cn.subset_indices("imagenet_r")
    a = cn.subset_indices("imagenet_a")
    assert len(r) == len(a) == 200 and r == sorted(r) and r != a
    # With the cache's wnids (its class folders), label i maps to that wnid's ImageNet index.
    wnids = [order[i] for i in r[:3]]
    assert cn.subset_indices("imagenet_r", wnids) == r[:3]
    with pytest.raises(cn.ClassListError, match="not in the imagenet_a subset"):
        cn.subset_indices("imagenet_a", [order[0]])  # tench is not an ImageNet-A class


def test_knn_any_labels():
    # bank: class 7 near +x, class 2 near +y (labels need not start at 0 or be contiguous)
    bank = labelled([7, 7, 2, 2])
    test = labelled([7, 2])
    emb = {0: [1.0, 0.1], 10: [0.9, 0.2], 20: [0.1, 1.0], 30: [0.2, 0.9]}
    test_emb = {0: [1.0, 0.0], 10: [0.0, 1.0]}
    enc = lambda table: (lambda x: torch.tensor([table[int(v)] for v in x[:, 0, 0, 0]]))  # noqa: E731
    calls = []

    def encode(x):
        calls.append(len(x))
        return enc(emb)(x) if len(calls) == 1 else enc(test_emb)(x)
    assert run_knn(encode, bank, test, k=2, temperature=0.1) == {"top1": 1.0}


def _solve(c: float) -> float:
    """w with w = 2 c sigmoid(-w): the minimiser of w^2 / 2 + c * 2 log(1 + exp(-w))."""
    lo, hi = 0.0, 10.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mid < 2 * c / (1 + math.exp(mid)) else (lo, mid)
    return lo


@pytest.mark.parametrize("c", [0.5, 2.0])
def test_linear_probe_hand_computed(c):
    # Two points x = +1 (label 1) and x = -1 (label 0): by symmetry b = 0 and p(1 | x=+1) = sigmoid(w).
    x = torch.tensor([[1.0], [-1.0]])
    y = torch.tensor([1, 0])
    pred, proba = fit_predict(x, y, torch.tensor([[1.0], [-1.0]]), c=c)
    assert pred.tolist() == [1, 0]
    w = _solve(c)
    assert proba[0, 1] == pytest.approx(1 / (1 + math.exp(-w)), abs=1e-4)


def test_linear_probe_suite():
    g = np.random.default_rng(0)
    centres = np.array([[3.0, 0, 0], [0, 3.0, 0], [0, 0, 3.0]])
    feats = {}

    def ds(n: int, offset: int) -> list[Sample]:
        out = []
        for i in range(n):
            y = i % 3
            feats[offset + i] = torch.tensor(centres[y] + g.normal(0, 0.5, 3), dtype=torch.float32)
            out.append(Sample(image=np.full((1, 1, 3), 0, np.uint8), caption="", key=str(offset + i),
                              image_id=offset + i, label=y))
            out[-1].image = np.frombuffer(np.int32(offset + i).tobytes(), np.uint8)[:3].reshape(1, 1, 3).copy()
        return out
    train, test = ds(30, 0), ds(12, 100)
    encode = lambda x: torch.stack([feats[int.from_bytes(bytes(v[0, 0].tolist()) + b"\0", "little")]  # noqa: E731
                                    for v in x])
    assert run_linear_probe(encode, train, test) == {"top1": 1.0}
    # a probe trained on shuffled labels does no better than chance on these 12 points
    assert probe_accuracy(torch.stack([feats[i] for i in range(30)]), torch.tensor(g.permutation([i % 3 for i in range(30)])),
                          torch.stack([feats[100 + i] for i in range(12)]), torch.tensor([i % 3 for i in range(12)])) < 0.9
