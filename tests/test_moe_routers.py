"""Routers and dispatch against naive references and against DeepSpeed's gating functions.

Tolerances: routing runs in fp32; gate weights and losses are compared at 1e-6 (a few ulps of
values near 1); the dispatch is compared in float64 at 1e-12.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dodo.moe.config import MoEConfig
from dodo.moe.dispatch import moe_dispatch, naive_moe
from dodo.moe.routers import (ExpertChoiceRouter, HashRouter, ModalityRouter, RoutingKeys, TopKRouter,
                              balance_loss, capacity_for, hash_table, topk_gating, z_loss)


def naive_topk(logits: torch.Tensor, k: int, capacity: int | None, normalize: bool):
    """One token at a time: choice level 1 for every token, then level 2, ... ; an expert takes
    a token while it has room. Returns {(token, expert): weight} and the balance loss."""
    n, num_experts = logits.shape
    probs = torch.softmax(logits.double(), dim=-1)
    ranked = [sorted(range(num_experts), key=lambda e: -float(probs[t, e]))[:k] for t in range(n)]
    load = [0] * num_experts
    kept = {}
    for level in range(k):
        for t in range(n):
            e = ranked[t][level]
            if capacity is None or load[e] < capacity:
                load[e] += 1
                kept[(t, e)] = float(probs[t, e])
    if normalize and k > 1:
        for t in range(n):
            total = sum(w for (tt, _), w in kept.items() if tt == t)
            for key in [key for key in kept if key[0] == t]:
                kept[key] /= total
    first = [ranked[t][0] for t in range(n)]
    f = [first.count(e) / n for e in range(num_experts)]
    p = [float(probs[:, e].mean()) for e in range(num_experts)]
    return kept, num_experts * sum(a * b for a, b in zip(p, f))


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("capacity", [None, 3, 7])
def test_topk_matches_naive_reference(k: int, capacity: int | None):
    torch.manual_seed(k * 100 + (capacity or 0))
    logits = torch.randn(24, 5) * 2
    token, expert, weight, kept = topk_gating(logits, k, capacity, normalize=True)
    got = {(int(t), int(e)): float(w) for t, e, w in zip(token, expert, weight)}
    want, want_bal = naive_topk(logits, k, capacity, normalize=True)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-6), key
    probs = torch.softmax(logits, -1)
    assert float(balance_loss(probs, probs.argmax(-1))) == pytest.approx(want_bal, abs=1e-6)
    assert kept.sum() == len(token)


def test_capacity_drops_exactly_the_tokens_over_capacity():
    # Every token's 1st choice is expert 0 and 2nd choice expert 1; capacity 5 of 12 tokens.
    logits = torch.tensor([[4.0, 2.0, 0.0, -1.0]]).repeat(12, 1) + torch.linspace(0, 0.1, 12)[:, None]
    token, expert, weight, kept = topk_gating(logits, k=2, capacity=5, normalize=True)
    assert token[expert == 0].tolist() == [0, 1, 2, 3, 4]  # first come, first served
    assert token[expert == 1].tolist() == [0, 1, 2, 3, 4]
    assert kept[:5].all() and not kept[5:].any()
    assert torch.allclose(weight.view(2, 5).sum(0), torch.ones(5))  # normalized over kept
    # Second choices queue behind all first choices: expert 1 full with 1st choices drops all 2nd.
    logits = torch.tensor([[0.0, 3.0, 2.0]]).repeat(4, 1)  # 1st: expert 1, 2nd: expert 2
    logits[2:] = torch.tensor([2.0, 0.0, 3.0])  # 1st: expert 2 (tokens 2, 3), 2nd: expert 0
    token, expert, _, _ = topk_gating(logits, k=2, capacity=3, normalize=False)
    pairs = sorted(zip(token.tolist(), expert.tolist()))
    assert pairs == [(0, 1), (0, 2), (1, 1), (2, 0), (2, 2), (3, 0), (3, 2)]  # (1, 2) over capacity
    assert capacity_for(10, 4, 2, 1.25, 4) == math.ceil(2 * 10 / 4 * 1.25)
    assert capacity_for(2, 4, 1, 1.0, 4) == 4


def _pairs_from_combine(combine: torch.Tensor) -> dict[tuple[int, int], float]:
    weights = combine.sum(-1)  # (S, E, C) -> (S, E)
    return {(int(t), int(e)): float(weights[t, e]) for t, e in weights.nonzero()}


@pytest.mark.parametrize("drop", [True, False])
def test_top2_agrees_with_deepspeed(drop: bool):
    from deepspeed.moe.sharded_moe import top2gating

    torch.manual_seed(3)
    logits = torch.randn(40, 6) * 1.5
    l_aux, combine, _, counts = top2gating(logits.clone(), capacity_factor=1.0, min_capacity=2,
                                           drop_tokens=drop, top2_2nd_expert_sampling=False)
    capacity = capacity_for(40, 6, 2, 1.0, 2) if drop else None
    token, expert, weight, _ = topk_gating(logits, 2, capacity, normalize=True)
    ours = {(int(t), int(e)): float(w) for t, e, w in zip(token, expert, weight)}
    theirs = _pairs_from_combine(combine)
    assert ours.keys() == theirs.keys()
    assert max(abs(ours[key] - theirs[key]) for key in ours) < 1e-6
    probs = torch.softmax(logits, -1)
    assert float(balance_loss(probs, probs.argmax(-1))) == pytest.approx(float(l_aux), abs=1e-6)
    assert counts.tolist() == torch.bincount(logits.topk(2).indices.reshape(-1), minlength=6).tolist()


def test_top1_agrees_with_deepspeed_when_nothing_is_dropped():
    from deepspeed.moe.sharded_moe import top1gating

    torch.manual_seed(4)
    logits = torch.randn(32, 4)
    l_aux, combine, _, _ = top1gating(logits, capacity_factor=4.0, min_capacity=4, use_rts=False)
    token, expert, weight, _ = topk_gating(logits, 1, capacity_for(32, 4, 1, 4.0, 4), normalize=True)
    ours = {(int(t), int(e)): float(w) for t, e, w in zip(token, expert, weight)}
    theirs = _pairs_from_combine(combine)
    assert ours.keys() == theirs.keys()
    assert max(abs(ours[key] - theirs[key]) for key in ours) < 1e-6  # k=1: the raw probability
    probs = torch.softmax(logits, -1)
    assert float(balance_loss(probs, probs.argmax(-1))) == pytest.approx(float(l_aux), abs=1e-6)


def test_router_losses_and_fp32():
    cfg = MoEConfig(num_experts=4, top_k=2, aux_loss=0.5, z_loss=0.25, dropless=True)
    router = TopKRouter(8, cfg).double()
    x = torch.randn(10, 8, dtype=torch.float64)
    r = router(x)
    logits = x.float() @ router.wg.weight.detach().float().t()
    assert float(z_loss(logits)) == pytest.approx(float((torch.logsumexp(logits, -1) ** 2).mean()), rel=1e-6)
    want = 0.5 * r.stats["balance_loss"] + 0.25 * r.stats["z_loss"]
    assert float(r.aux_loss.detach()) == pytest.approx(float(want), rel=1e-6)
    assert r.weight.dtype == torch.float32  # routing in fp32 whatever the input dtype
    r.aux_loss.backward()
    assert router.wg.weight.grad is not None and router.wg.weight.grad.abs().sum() > 0


def test_router_noise_only_in_training():
    cfg = MoEConfig(num_experts=4, noise="gaussian", noise_std=1.0)
    router = TopKRouter(8, cfg)
    x = torch.randn(6, 8)
    router.eval()
    assert torch.equal(router.logits(x), router.logits(x))
    router.train()
    assert not torch.equal(router.logits(x), router.logits(x))


def test_hash_routing_is_deterministic_and_balanced():
    cfg = MoEConfig(num_experts=4, router="hash", hash_table="balanced")
    table = hash_table(103, 4, "balanced", seed=7)
    counts = torch.bincount(table, minlength=4)
    assert counts.max() - counts.min() <= 1  # 103 ids over 4 experts: 26, 26, 26, 25
    assert torch.equal(table, hash_table(103, 4, "balanced", seed=7))
    assert not torch.equal(table, hash_table(103, 4, "balanced", seed=8))
    assert torch.equal(hash_table(50, 4, "random", 1), hash_table(50, 4, "random", 1))
    a, b = HashRouter(cfg, 103, 16, layer_seed=1), HashRouter(cfg, 103, 16, layer_seed=1)
    ids = torch.tensor([-1, -1, -1, 5, 9, 5, 100])
    keys = RoutingKeys(ids, torch.arange(7))
    ra, rb = a(torch.randn(7, 8), keys), b(torch.randn(7, 8), keys)
    assert torch.equal(ra.expert, rb.expert)  # no dependence on the hidden states
    assert ra.expert[3] == ra.expert[5] == a.text_table[5]  # same token id, same expert
    assert ra.expert[:3].tolist() == a.image_table[:3].tolist()  # image tokens by position
    assert torch.equal(ra.weight, torch.ones(7)) and float(ra.aux_loss) == 0.0
    assert "text_table" not in a.state_dict()  # rebuilt from the seed, not checkpointed


def test_expert_choice_each_expert_takes_its_top_tokens():
    cfg = MoEConfig(num_experts=4, router="expert_choice", top_k=1, capacity_factor=1.0, min_capacity=0)
    router = ExpertChoiceRouter(8, cfg)
    x = torch.randn(16, 8)
    r = router(x)
    probs = torch.softmax(router.logits(x), -1)
    for e in range(4):
        mine = r.token[r.expert == e]
        assert len(mine) == 4  # C = ceil(1 * 16 / 4 * 1.0)
        assert set(mine.tolist()) == set(probs[:, e].topk(4).indices.tolist())
    assert torch.allclose(r.weight, probs[r.token, r.expert])


def test_modality_routing():
    keys = RoutingKeys(torch.tensor([-1, -1, 3, 4]), torch.arange(4))
    r = ModalityRouter(MoEConfig(num_experts=2, router="modality"), layer_index=0)(torch.randn(4, 8), keys)
    assert r.expert.tolist() == [0, 0, 1, 1]
    vl = MoEConfig(num_experts=3, router="modality", vl_from_layer=1)
    assert ModalityRouter(vl, 0)(torch.randn(4, 8), keys).expert.tolist() == [0, 0, 1, 1]
    assert ModalityRouter(vl, 1)(torch.randn(4, 8), keys).expert.tolist() == [2, 2, 2, 2]


def test_dispatch_matches_naive_outputs_and_gradients():
    torch.manual_seed(5)
    experts = [nn.Sequential(nn.Linear(6, 3), nn.ReLU(), nn.Linear(3, 6)).double() for _ in range(4)]
    x = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    token = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 3, 3, 7])
    expert = torch.tensor([2, 0, 1, 3, 3, 3, 0, 1, 2, 2, 1, 0, 2, 0])
    weight = torch.rand(14, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(10, 6, dtype=torch.float64)
    results = []
    for fn in (lambda: moe_dispatch(x, token, expert, weight, experts, 4),
               lambda: naive_moe(x, token, expert, weight, experts)):
        for p in [x, weight, *[q for e in experts for q in e.parameters()]]:
            p.grad = None
        y = fn()
        y.backward(grad_out)
        results.append((y.detach(), x.grad.clone(), weight.grad.clone(),
                        [q.grad.clone() for e in experts for q in e.parameters()]))
    (y1, gx1, gw1, gp1), (y2, gx2, gw2, gp2) = results
    assert torch.allclose(y1, y2, atol=1e-12)
    assert torch.allclose(gx1, gx2, atol=1e-12) and torch.allclose(gw1, gw2, atol=1e-12)
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(gp1, gp2))
