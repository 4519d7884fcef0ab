"""Losses against hand-computed cases and their reductions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dodo import losses


def unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


@pytest.mark.parametrize("batch", [2, 7])
def test_mpm_nce_reduces_to_infonce(batch):
    g = torch.Generator().manual_seed(batch)
    img, txt = unit(torch.randn(batch, 16, generator=g, dtype=torch.float64)), unit(
        torch.randn(batch, 16, generator=g, dtype=torch.float64))
    scale = 1 / 0.07
    want = losses.info_nce(img, txt, scale)
    got = losses.mpm_nce(img, txt, torch.eye(batch, dtype=torch.bool), eps=0.0, delta=0.0, tau=0.07)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_infonce_hand_computed():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)
    # logits (scale 1): [[1, .6], [0, .8]]; i2t rows, t2i columns
    i2t = (-math.log(math.e / (math.e + math.exp(0.6))) - math.log(math.exp(0.8) / (1 + math.exp(0.8)))) / 2
    t2i = (-math.log(math.e / (math.e + 1)) - math.log(math.exp(0.8) / (math.exp(0.6) + math.exp(0.8)))) / 2
    torch.testing.assert_close(losses.info_nce(img, txt, 1.0), torch.tensor(0.5 * (i2t + t2i), dtype=torch.float64))


def test_mpm_soft_labels_and_margin_hand_computed():
    pos = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    y = losses.mpm_soft_labels(pos, eps=0.1)
    want = torch.tensor([[0.45, 0.45, 0.1], [0.45, 0.45, 0.1], [0.05, 0.05, 0.9]])
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(y.sum(1), torch.ones(3))
    # One pair, explicit: image 0 vs texts (0 positive, 1 negative), delta on the negative.
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    txt = img.clone()
    eps, delta, tau = 0.2, 0.05, 0.5
    logits = torch.tensor([[1.0, 0.0 + delta], [0.0 + delta, 1.0]], dtype=torch.float64) / tau
    soft = torch.tensor([[0.8, 0.2], [0.2, 0.8]], dtype=torch.float64)
    row = -(soft * torch.log_softmax(logits, 1)).sum(1).mean()  # symmetric case: both directions equal
    got = losses.mpm_nce(img, txt, torch.eye(2, dtype=torch.bool), eps=eps, delta=delta, tau=tau)
    torch.testing.assert_close(got, row)


def test_mpm_nce_needs_a_positive():
    with pytest.raises(ValueError, match="positive"):
        losses.mpm_soft_labels(torch.zeros(2, 2, dtype=torch.bool), 0.1)


def test_random_patch_mask_ratio_and_patchify():
    mask = losses.random_patch_mask(5, 16, 0.6, torch.Generator().manual_seed(0))
    assert mask.shape == (5, 16) and mask.sum(1).tolist() == [10] * 5
    assert len({tuple(r.tolist()) for r in mask}) > 1  # different per image
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    p = losses.patchify(images, 2)
    assert p.shape == (2, 4, 12)
    # patch 1 (top right) of image 0: rows 0-1, cols 2-3, channels last
    want = torch.stack([images[0, :, r, c] for r in (0, 1) for c in (2, 3)]).reshape(-1)
    torch.testing.assert_close(p[0, 1], want)


def test_mim_loss_hand_computed():
    images = torch.zeros(1, 3, 2, 4)
    images[0, :, :, 2:] = torch.arange(12, dtype=torch.float32).view(3, 2, 2)  # patch 1 non-constant
    mask = torch.tensor([[False, True]])
    pred = torch.zeros(1, 2, 12)
    target = losses.patchify(images, 2)[0, 1]
    norm = (target - target.mean()) / (target.var() + 1e-6).sqrt()
    torch.testing.assert_close(losses.mim_loss(pred, images, mask, 2), norm.abs().mean())
    torch.testing.assert_close(losses.mim_loss(pred, images, mask, 2, norm_pix=False), target.abs().mean())
    pred[0, 1] = norm
    assert float(losses.mim_loss(pred, images, mask, 2)) < 1e-6
    pred[0, 0] = 100.0  # unmasked patches do not count
    assert float(losses.mim_loss(pred, images, mask, 2)) < 1e-6


def test_mask_tokens_bert_rule():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 50, (400, 20), generator=g)
    ids[:, -3:] = 0  # EOS / pad
    attn = torch.ones_like(ids)
    attn[:, -2:] = 0
    masked, labels = losses.mask_tokens(ids, attn, mask_id=2, vocab_size=50, special_ids=[0], prob=0.15, generator=g)
    picked = labels != -100
    assert 0.13 < float(picked[:, :17].float().mean()) < 0.17
    assert not picked[:, 17:].any()  # EOS and padding never picked
    assert torch.equal(labels[picked], ids[picked]) and torch.equal(masked[~picked], ids[~picked])
    share_mask = float((masked[picked] == 2).float().mean())
    share_same = float((masked[picked] == ids[picked]).float().mean())
    assert 0.76 < share_mask < 0.84 and 0.07 < share_same < 0.14
    one = torch.tensor([[5, 0]])  # a one-word caption still gets a target
    _, lab = losses.mask_tokens(one, torch.ones_like(one), 2, 50, [0], prob=1e-6, generator=g)
    assert lab.tolist() == [[5, -100]]


def test_hard_negatives_follow_similarity_and_skip_positives():
    sim = torch.tensor([[1.0, 0.9, -5.0, -5.0], [0.9, 1.0, -5.0, -5.0], [-5.0, -5.0, 1.0, 0.9],
                        [-5.0, -5.0, 0.9, 1.0]]) * 10
    pos = torch.eye(4, dtype=torch.bool)
    pos[0, 3] = True  # image 0 has a second positive text
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([losses.hard_negatives(sim, pos, g)[0] for _ in range(200)])  # (200, 4)
    assert not (draws[:, 0] == 0).any() and not (draws[:, 0] == 3).any()
    assert float((draws[:, 0] == 1).float().mean()) > 0.99  # the hardest negative
    assert float((draws[:, 2] == 3).float().mean()) > 0.99


def test_itm_loss_hand_computed():
    pos = torch.tensor([[0.0, 2.0]])
    neg = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    want = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1)) + math.log(2)) / 3
    torch.testing.assert_close(losses.itm_loss(pos, neg), torch.tensor(want))


def test_lm_loss_shifts():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = 10.0  # predicts token 2 at position 1
    labels = torch.tensor([[-100, 2, -100]])
    assert float(losses.lm_loss(logits, labels)) < 1e-3


def test_infonce_positive_ids_distinct_is_clip():
    g = torch.Generator().manual_seed(3)
    img, txt = unit(torch.randn(5, 8, generator=g, dtype=torch.float64)), unit(
        torch.randn(5, 8, generator=g, dtype=torch.float64))
    ids = torch.tensor([40, 7, 3, 12, 0])
    torch.testing.assert_close(losses.info_nce(img, txt, 10.0, positive_ids=ids), losses.info_nce(img, txt, 10.0))


def test_infonce_shared_image_ids_hand_computed():
    # Rows 0 and 1 share id 5 (two images of one class, with class templates as texts): each
    # row's target is 1/2 on both texts, each text's 1/2 on both images.
    img = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]], dtype=torch.float64)
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], dtype=torch.float64)
    ids = torch.tensor([5, 5, 9])
    logits = img @ txt.T  # scale 1
    def ce(row: torch.Tensor, target: list[float]) -> float:
        logp = row - torch.logsumexp(row, 0)
        return -float(sum(t * lp for t, lp in zip(target, logp)))
    tgt = [[.5, .5, 0], [.5, .5, 0], [0, 0, 1]]
    i2t = sum(ce(logits[i], tgt[i]) for i in range(3)) / 3
    t2i = sum(ce(logits[:, j], tgt[j]) for j in range(3)) / 3
    got = losses.info_nce(img, txt, 1.0, positive_ids=ids)
    assert float(got) == pytest.approx(0.5 * (i2t + t2i), rel=1e-12)
    assert abs(float(got) - float(losses.info_nce(img, txt, 1.0))) > 1e-3  # not CLIP's one-hot loss


def test_mpm_nce_positive_ids():
    g = torch.Generator().manual_seed(4)
    img, txt = unit(torch.randn(6, 8, generator=g, dtype=torch.float64)), unit(
        torch.randn(6, 8, generator=g, dtype=torch.float64))
    ids = torch.tensor([0, 1, 0, 2, 1, 3])  # image (or class) ids: 0 and 1 shared
    pos = losses.positives_from_ids(ids)
    assert pos.sum().item() == 6 + 4 and bool(pos[0, 2]) and not bool(pos[0, 1])
    torch.testing.assert_close(losses.mpm_nce(img, txt, positive_ids=ids), losses.mpm_nce(img, txt, pos))
    # eps = delta = 0: the multi-positive InfoNCE with the same ids
    torch.testing.assert_close(losses.mpm_nce(img, txt, positive_ids=ids, eps=0.0, delta=0.0, tau=0.1),
                               losses.info_nce(img, txt, 10.0, positive_ids=ids), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="positive_ids"):
        losses.mpm_nce(img, txt)
