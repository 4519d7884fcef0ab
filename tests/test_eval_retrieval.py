"""Retrieval with image-id positives, 5 captions per image, against hand-computed ranks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dodo.data.sample import Sample
from dodo.eval.retrieval import (build_gallery, positives_from_index, recall_at_k, recall_by_image_ids,
                                 run_retrieval)

# Similarity of each caption to images A, B, C (5 captions each). The image embeddings are the
# identity, so these rows ARE the caption-image similarities.
SIMS = [
    (.9, .1, .0), (.2, .8, .1), (.3, .1, .5), (.1, .6, .7), (.5, .4, .3),  # captions of A
    (.1, .5, .0), (.7, .2, .1), (.0, .3, .2), (.6, .1, .8), (.2, .4, .3),  # captions of B
    (.0, .0, .1), (.3, .2, .1), (.4, .6, .5), (.2, .1, .3), (.1, .2, .15),  # captions of C
]
OWNER = [0] * 5 + [1] * 5 + [2] * 5


def test_recall_five_captions_per_image_hand_computed():
    r = recall_by_image_ids(torch.eye(3), torch.tensor(SIMS), OWNER, ks=(1, 2, 3), chunk=4)
    # text -> image, rank of the caption's own image: A: 0 1 1 2 0, B: 0 1 0 2 0, C: 0 2 1 0 1
    assert r["t2i_r1"] == pytest.approx(7 / 15) and r["t2i_r2"] == pytest.approx(12 / 15) and r["t2i_r3"] == 1.0
    # image -> text, the best of its 5 captions: A .9 (none above) -> 0; B .5 (a1 .8, a3 .6,
    # c2 .6 above) -> 3; C .5 (a3 .7, b3 .8 above; a2 ties at .5) -> 2 or 3, each half the
    # time: half a hit at k = 3.
    assert r["i2t_r1"] == pytest.approx(1 / 3) and r["i2t_r2"] == pytest.approx(1 / 3)
    assert r["i2t_r3"] == pytest.approx(1.5 / 3)
    want = (1 / 3 + 1 / 3 + 1.5 / 3 + 7 / 15 + 12 / 15 + 1) / 6
    assert math.isclose(r["r_mean"], want)


def test_collapsed_embeddings_score_chance_not_perfect():
    """Every caption the same vector (a collapsed text tower): ties everywhere, so recall is
    what a random order gives: k / I for text -> image, k / (negatives + 1) for image -> text."""
    img, txt = torch.randn(4, 8), torch.ones(20, 8)
    owner = [i for i in range(4) for _ in range(5)]
    r = recall_by_image_ids(img, txt, owner, ks=(1, 5))
    assert r["i2t_r1"] == pytest.approx(1 / 16) and r["i2t_r5"] == pytest.approx(5 / 16)
    same = recall_at_k(torch.ones(4, 20), positives_from_index(owner, 4), ks=(1,))
    assert same["tr_r1"] == pytest.approx(1 / 16) and same["ir_r1"] == pytest.approx(1 / 4)


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_index_form_equals_dense_form(chunk):
    g = torch.Generator().manual_seed(chunk)
    img, txt = torch.randn(9, 8, generator=g), torch.randn(40, 8, generator=g)
    owner = torch.randint(0, 9, (40,), generator=g).tolist()
    owner[:9] = range(9)  # every image has a caption
    dense = recall_at_k(img @ txt.T, positives_from_index(owner, 9), ks=(1, 3, 5))
    fast = recall_by_image_ids(img, txt, owner, ks=(1, 3, 5), chunk=chunk)
    for k in (1, 3, 5):
        assert fast[f"i2t_r{k}"] == pytest.approx(dense[f"tr_r{k}"])
        assert fast[f"t2i_r{k}"] == pytest.approx(dense[f"ir_r{k}"])


CAPTIONS = [["a man riding a bike on a city street", "a cyclist rides past parked cars",
             "a person on a bicycle in traffic", "a man pedals down the road", "someone cycling downtown"],
            ["two dogs playing in the snow", "a pair of puppies run through snow", "dogs chase each other outside",
             "two brown dogs in a snowy yard", "playful dogs in winter"],
            ["a bowl of fruit on a wooden table", "apples and bananas in a bowl", "fresh fruit on the kitchen table",
             "a fruit bowl with oranges", "a still life of fruit"]]


def samples(order: list[int] | None = None) -> list[Sample]:
    out = []
    for img, caps in enumerate(CAPTIONS):
        pixels = np.full((4, 4, 3), img * 50, dtype=np.uint8)
        out += [Sample(image=pixels, caption=c, key=f"{img:06d}#{j}", image_id=img) for j, c in enumerate(caps)]
    return [out[i] for i in order] if order else out


def test_build_gallery_dedupes_images_and_limits():
    rng = np.random.default_rng(0)
    ds = samples(rng.permutation(15).tolist())  # captions of one image are not adjacent
    g = build_gallery(ds)
    assert len(g.images) == 3 and len(g.texts) == 15
    for text, row in zip(g.texts, g.text_to_image):
        assert text in CAPTIONS[g.image_ids[row]]
    small = build_gallery(ds, limit=2)
    assert len(small.images) == 2 and len(small.texts) == 10  # all 5 captions of the 2 images


def test_run_retrieval_end_to_end():
    def encode_images(x):  # (B, H, W, 3) uint8 -> one-hot of the image's grey level
        return torch.nn.functional.one_hot(x[:, 0, 0, 0].long() // 50, 3).float()

    def encode_texts(texts):  # each caption points at its image, slightly off-axis
        return torch.stack([torch.tensor([1.0 if t in CAPTIONS[i] else 0.1 for i in range(3)]) for t in texts])

    r = run_retrieval(encode_images, encode_texts, samples(), ks=(1, 5))
    assert r["i2t_r1"] == 1.0 and r["t2i_r1"] == 1.0 and r["r_mean"] == 1.0
    # Swap the meaning of two images' captions: those 10 captions now miss at 1.
    swap = {0: 1, 1: 0, 2: 2}
    r = run_retrieval(encode_images, lambda ts: encode_texts(
        [CAPTIONS[swap[next(i for i in range(3) if t in CAPTIONS[i])]][0] for t in ts]), samples(), ks=(1,))
    assert r["t2i_r1"] == pytest.approx(5 / 15) and r["i2t_r1"] == pytest.approx(1 / 3)
