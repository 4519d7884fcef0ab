"""Router and grouped MoE expert kernels against their float64 references."""

from __future__ import annotations

import pytest
import torch

from kernel_testing import DEVICE, TOL, assert_close, fast, leaves, rel_err  # noqa: F401

from dodo_kernels import (moe_adapter_experts, moe_experts_reference, route_topk,
                          route_topk_reference)

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


def _logits(t: int, e: int, empty: tuple[int, ...] = ()) -> torch.Tensor:
    logits = torch.randn(t, e) * 2
    logits[:, list(empty)] = -30.0  # these experts never win: empty groups
    return logits


@pytest.mark.parametrize("t,e,k,normalize,empty", [
    (37, 5, 1, False, ()), (70, 16, 2, True, (0, 7)), (33, 8, 2, False, (3,)), (1, 4, 2, True, ()),
])
def test_router_matches_reference(fast, t, e, k, normalize, empty):
    (logits,), (logits_ref,) = leaves(_logits(t, e, empty))
    out = route_topk(logits, k, normalize)
    ref = route_topk_reference(logits_ref, k, normalize)
    assert_close(out.probs, ref.probs, F32, "probs")
    assert_close(out.weights, ref.weights, F32, "weights")
    for name in ("ids", "counts", "offsets", "order", "position"):
        got, want = getattr(out, name), getattr(ref, name)
        assert got.dtype == torch.int32 and torch.equal(got.cpu(), want.cpu()), name
    assert all(out.counts[list(empty)] == 0)
    gp, gw = torch.randn(t, e, device=DEVICE), torch.randn(t, k, device=DEVICE)
    (d,) = torch.autograd.grad((out.probs * gp).sum() + (out.weights * gw).sum(), logits)
    (d_ref,) = torch.autograd.grad((ref.probs * gp.double()).sum() + (ref.weights * gw.double()).sum(),
                                   logits_ref)
    assert_close(d, d_ref, F32, "dlogits")
    # only the weights used (probs get no gradient); squared: their plain sum is 1 when normalised
    (d,) = torch.autograd.grad((route_topk(logits, k, normalize).weights ** 2).sum(), logits)
    (d_ref,) = torch.autograd.grad((route_topk_reference(logits_ref, k, normalize).weights ** 2).sum(),
                                   logits_ref)
    assert_close(d, d_ref, F32, "dlogits (weights only)")


def test_reference_matches_naive_per_token_loop():
    t, e, k, d, h = 9, 4, 2, 6, 3
    x, w_d, b_d = torch.randn(t, d).double(), torch.randn(e, h, d).double(), torch.randn(e, h).double()
    w_u, b_u = torch.randn(e, d, h).double(), torch.randn(e, d).double()
    r = route_topk_reference(torch.randn(t, e), k, normalize=True)
    y = moe_experts_reference(x, r.weights.double(), r.order, r.offsets, w_d, b_d, w_u, b_u, x, "silu")
    for i in range(t):
        want = x[i].clone()
        for j in range(k):
            ex = int(r.ids[i, j])
            want += r.weights[i, j].double() * (w_u[ex] @ torch.nn.functional.silu(w_d[ex] @ x[i] + b_d[ex]) + b_u[ex])
        assert torch.allclose(y[i], want)


@pytest.mark.parametrize("t,e,k,d,h,dtype,act,empty,with_res", [
    (37, 5, 1, 70, 9, F32, "relu", (), True),
    (45, 8, 2, 64, 16, BF16, "gelu", (2, 5), True),
    (29, 6, 2, 40, 5, F16, "silu", (0,), False),
    (50, 4, 1, 33, 8, BF16, "relu", (3,), False),
])
def test_moe_experts_match_reference(fast, t, e, k, d, h, dtype, act, empty, with_res):
    routing = route_topk_reference(_logits(t, e, empty), k, normalize=k > 1)
    params = [torch.randn(t, d), routing.weights, torch.randn(e, h, d) * 0.3, torch.randn(e, h) * 0.3,
              torch.randn(e, d, h) * 0.3, torch.randn(e, d) * 0.3, torch.randn(t, d)]
    (x, _, wd, bd, wu, bu, res), ref = leaves(*params, dtype=dtype)
    (gates,), (gates_ref,) = leaves(params[1], dtype=F32)
    ref[1] = gates_ref
    y = moe_adapter_experts(x, gates, routing.order, routing.offsets, wd, bd, wu, bu,
                            res if with_res else None, act)
    y_ref = moe_experts_reference(ref[0], ref[1], routing.order, routing.offsets, *ref[2:6],
                                  ref[6] if with_res else None, act)
    assert_close(y, y_ref, dtype, "y")
    g = torch.randn_like(y)
    inputs = [x, gates, wd, bd, wu, bu] + ([res] if with_res else [])
    names = ["x", "gates", "W_down", "b_down", "W_up", "b_up", "residual"]
    grads = torch.autograd.grad(y, inputs, g)
    grads_ref = torch.autograd.grad(y_ref, ref[:len(inputs)], g.double())
    for name, gf, gr in zip(names, grads, grads_ref):
        assert_close(gf, gr, dtype, f"d{name}")
    for ex in empty:  # empty experts get exact zero gradients, not poison
        assert (grads[2][ex] == 0).all() and (grads[4][ex] == 0).all()


def test_router_feeds_experts_end_to_end(fast):
    t, e, k, d, h = 24, 4, 2, 32, 8
    (logits, x, wd, bd, wu, bu), ref = leaves(torch.randn(t, e), torch.randn(t, d), torch.randn(e, h, d) * 0.3,
                                              torch.randn(e, h) * 0.3, torch.randn(e, d, h) * 0.3,
                                              torch.randn(e, d) * 0.3)
    r = route_topk(logits, k, normalize=True)
    y = moe_adapter_experts(x, r.weights, r.order, r.offsets, wd, bd, wu, bu, x)
    rr = route_topk_reference(ref[0], k, normalize=True)
    y_ref = moe_experts_reference(ref[1], rr.weights, rr.order, rr.offsets, *ref[2:], ref[1])
    assert_close(y, y_ref, F32, "y")
    g = torch.randn_like(y)
    for name, gf, gr in zip(["logits", "x"], torch.autograd.grad(y, (logits, x), g),
                            torch.autograd.grad(y_ref, (ref[0], ref[1]), g.double())):
        assert_close(gf, gr, F32, f"d{name}")
