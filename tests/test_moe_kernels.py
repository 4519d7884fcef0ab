"""The MoE layer on the dodo_kernels ops (route_topk, moe_adapter_experts) against its plain
PyTorch twin (topk_gating + moe_dispatch, `MoEAdapter.use_kernels(False)`).

Tolerances: expert math in float64 agrees to 1e-12 (only the summation order differs: the op
sorts a token's rows by expert token-major and computes dropped rows with gate 0). Routing
runs in fp32 on both paths; the op's router has one softmax where the twin has two (one for
top-k, one for the balance loss), so gradients through the router (router weight, and x via
the router) differ by fp32 rounding: 1e-5 relative. Under the Triton interpreter everything
is fp32: 1e-4 relative (tests/kernel_testing.py).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dodo.adapters.bottleneck import AdaptedSublayer, BottleneckAdapter
from dodo.adapters.config import AdapterConfig
from dodo.moe.config import MoEConfig
from dodo.moe.layer import MoEAdapter, RoutingContext, stacked_experts
from dodo.moe.routers import HashRouter, TopKRouter

D = 8


def make_layer(cfg: MoEConfig, activation: str = "relu", dtype=torch.float64, kernels: bool = True,
               empty_expert: bool = False) -> MoEAdapter:
    torch.manual_seed(0)
    experts = [BottleneckAdapter(D, AdapterConfig(downsample=2, init_std=0.3, activation=activation))
               for _ in range(cfg.num_experts)]
    layer = MoEAdapter(experts, TopKRouter(D, cfg), cfg, RoutingContext(), layer_index=0).to(dtype)
    if empty_expert:  # inputs are positive below: the last expert's logit is always the lowest
        with torch.no_grad():
            layer.deepspeed_moe.gate.wg.weight[-1] = -1.0
    return layer.use_kernels(kernels)


def inputs(dtype, positive: bool):
    torch.manual_seed(1)
    x = torch.randn(3, 7, D, dtype=dtype)
    return (x.abs() if positive else x), torch.randn(3, 7, D, dtype=dtype)


def run(layer: nn.Module, x, g):
    """Forward + backward of a MoEAdapter (or an AdaptedSublayer holding one)."""
    moe = layer.adapter if isinstance(layer, AdaptedSublayer) else layer
    x = x.clone().requires_grad_()
    y = layer(x)
    aux = moe.last_aux_loss
    ((y * g).sum() + aux).backward()
    grads = {name: p.grad for name, p in layer.named_parameters()}
    return y.detach(), aux.detach(), x.grad, grads


def rel(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12))


CASES = [  # k, capacity factor (None = dropless), empty expert
    (1, 1.0, False), (1, None, True), (2, 1.0, False), (2, 0.75, True), (2, None, False), (3, 1.0, True),
]


@pytest.mark.parametrize("k,factor,empty", CASES)
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_kernel_routed_layer_equals_plain_path(k, factor, empty, activation):
    cfg = MoEConfig(num_experts=5, top_k=k, capacity_factor=factor or 1.0, min_capacity=2,
                    dropless=factor is None, aux_loss=0.1, z_loss=0.01)
    fast, plain = (make_layer(cfg, activation, kernels=on, empty_expert=empty) for on in (True, False))
    x, g = inputs(torch.float64, positive=empty)
    y1, aux1, gx1, gp1 = run(fast, x, g)
    y2, aux2, gx2, gp2 = run(plain, x, g)

    routing = fast.deepspeed_moe.gate(x.reshape(-1, D))
    counts = (routing.offsets[1:] - routing.offsets[:-1]).tolist()
    assert sum(counts) == x.shape[0] * x.shape[1] * k
    if empty:
        assert counts[-1] == 0 and routing.stats["load"][-1] == 0
    if factor is not None and factor < 1.5:
        assert routing.token.numel() < routing.num_slots  # some assignments were dropped
        assert int((routing.gates > 0).sum()) == routing.token.numel()

    assert torch.allclose(y1, y2, rtol=0, atol=1e-12)
    assert torch.allclose(aux1, aux2, rtol=1e-6, atol=0)
    assert rel(gx1, gx2) < 1e-5
    for name in gp2:
        tol = 1e-5 if ".gate." in name else 1e-12
        assert rel(gp1[name], gp2[name]) < tol, name
    assert fast.stats["load"].tolist() == plain.stats["load"].tolist()
    assert float(fast.stats["dropped"]) == float(plain.stats["dropped"])


def test_hash_routed_layer_is_bitwise_the_plain_path():
    cfg = MoEConfig(num_experts=4, router="hash", aux_loss=0.0, z_loss=0.0)
    outs = []
    for on in (True, False):
        torch.manual_seed(0)
        experts = [BottleneckAdapter(D, AdapterConfig(downsample=2, init_std=0.3)) for _ in range(4)]
        context = RoutingContext()
        layer = MoEAdapter(experts, HashRouter(cfg, vocab_size=50, max_positions=16), cfg, context, 0)
        layer.use_kernels(on)
        torch.manual_seed(1)
        context.set(torch.randint(-1, 50, (3, 7)))
        x, g = torch.randn(3, 7, D), torch.randn(3, 7, D)
        outs.append(run(layer, x, g))
    (y1, _, gx1, gp1), (y2, _, gx2, gp2) = outs
    assert torch.equal(y1, y2) and torch.equal(gx1, gx2)
    assert all(torch.equal(gp1[n], gp2[n]) for n in gp2)


def test_plain_path_where_the_op_does_not_fit():
    """Dropout in training, layer norm and tanh keep the plain dispatch (the op has none)."""
    cfg = MoEConfig(num_experts=3, top_k=2, dropless=True)
    for adapter in (AdapterConfig(downsample=2, dropout=0.5), AdapterConfig(downsample=2, layer_norm=True),
                    AdapterConfig(downsample=2, activation="tanh")):
        torch.manual_seed(0)
        layer = MoEAdapter([BottleneckAdapter(D, adapter) for _ in range(3)], TopKRouter(D, cfg), cfg,
                           RoutingContext(), 0)
        assert stacked_experts(list(layer.local_experts)) is None
    assert stacked_experts([BottleneckAdapter(D, AdapterConfig(downsample=2, dropout=0.5)).eval()]) is not None


@pytest.mark.parametrize("k,factor", [(1, 1.0), (2, 0.75), (2, None)])
def test_triton_kernels_in_the_layer_match_the_plain_path(monkeypatch, k, factor):
    """The Triton kernels (compiled on CUDA, the interpreter on CPU) inside the layer, residual
    fused through AdaptedSublayer's sequential placement, against the plain path; fp32."""
    pytest.importorskip("triton")
    from kernel_testing import DEVICE, TOL

    cfg = MoEConfig(num_experts=4, top_k=k, capacity_factor=factor or 1.0, min_capacity=2,
                    dropless=factor is None, aux_loss=0.1, z_loss=0.01)
    import dodo_kernels.moe
    import dodo_kernels.router

    def no_reference(*args, **kwargs):
        raise AssertionError("the PyTorch reference ran where the Triton kernel should")

    results = []
    for on in (True, False):
        monkeypatch.setenv("DODO_KERNELS", "triton" if on else "reference")
        monkeypatch.setenv("DODO_KERNELS_POISON", "1")
        sub = AdaptedSublayer(nn.Identity(), D, AdapterConfig(downsample=2, placement="sequential"))
        sub.adapter = make_layer(cfg, "silu", torch.float32, kernels=on, empty_expert=True)
        sub.to(DEVICE)
        x, g = (t.to(DEVICE) for t in inputs(torch.float32, positive=True))
        with monkeypatch.context() as m:
            if on:
                m.setattr(dodo_kernels.moe, "moe_experts_reference", no_reference)
                m.setattr(dodo_kernels.router, "route_topk_reference", no_reference)
                assert sub.adapter.fused_add(x, x) is not None  # the residual goes into the kernel
                sub.adapter.reset_stats()
            results.append(run(sub, x, g) + (sub.adapter.stats["load"],))
    (y1, _, gx1, gp1, load1), (y2, _, gx2, gp2, load2) = results
    assert torch.isfinite(y1).all() and load1[-1] == 0
    assert rel(y1, y2) < TOL[torch.float32] and rel(gx1, gx2) < TOL[torch.float32]
    for name in gp2:
        assert rel(gp1[name], gp2[name]) < TOL[torch.float32], name
    assert load1.tolist() == load2.tolist()
