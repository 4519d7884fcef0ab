"""Fused LoRA and bottleneck kernels against their float64 references: outputs and gradients."""

from __future__ import annotations

import pytest
import torch

from kernel_testing import DEVICE, assert_close, fast, leaves  # noqa: F401  (fixture)

from dodo_kernels import bottleneck_adapter, bottleneck_reference, lora, lora_reference
from dodo_kernels.lora import dropout_mask

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


@pytest.mark.parametrize("m,k,n,r,dtype,with_base", [
    (37, 70, 50, 5, F32, True),     # nothing a multiple of a block
    (64, 128, 96, 16, BF16, True),  # exact blocks
    (17, 33, 65, 3, F16, False),
    (1, 16, 16, 1, F32, True),
])
def test_lora_matches_reference(fast, m, k, n, r, dtype, with_base):
    x, a, b, base = torch.randn(m, k), torch.randn(r, k) * 0.2, torch.randn(n, r) * 0.2, torch.randn(m, n)
    (x, a, b, base), ref = leaves(x, a, b, base, dtype=dtype)
    y = lora(x, a, b, base if with_base else None, scale=2.0)
    y_ref = lora_reference(ref[0], ref[1], ref[2], ref[3] if with_base else None, scale=2.0)
    assert_close(y, y_ref, dtype, "y")
    g = torch.randn_like(y)
    inputs = [x, a, b] + ([base] if with_base else [])
    grads = torch.autograd.grad(y, inputs, g)
    grads_ref = torch.autograd.grad(y_ref, ref[:len(inputs)], g.double())
    for name, gf, gr in zip("x A B base".split(), grads, grads_ref):
        assert_close(gf, gr, dtype, f"d{name}")


def test_lora_dropout_uses_one_mask_in_forward_and_backward(fast):
    m, k, n, r, p = 40, 48, 24, 4, 0.3
    (x, a, b), ref = leaves(torch.randn(m, k), torch.randn(r, k) * 0.2, torch.randn(n, r) * 0.2)
    torch.manual_seed(5)
    y = lora(x, a, b, scale=0.5, dropout=p, training=True)
    torch.manual_seed(5)
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item())  # the seed lora() drew
    keep = dropout_mask((m, k), p, seed, x.device)
    assert 0.55 < keep.float().mean().item() < 0.85
    y_ref = lora_reference(*ref, scale=0.5, dropout=p, mask=keep)
    assert_close(y, y_ref, F32, "y")
    g = torch.randn_like(y)
    for name, gf, gr in zip("xAB", torch.autograd.grad(y, (x, a, b), g),
                            torch.autograd.grad(y_ref, ref, g.double())):
        assert_close(gf, gr, F32, f"d{name}")
    # eval mode: no dropout at all
    assert_close(lora(x, a, b, scale=0.5, dropout=p, training=False),
                 lora_reference(*ref, scale=0.5), F32, "eval y")


def test_lora_frozen_input_skips_dx(fast):
    (a, b), _ = leaves(torch.randn(4, 32) * 0.2, torch.randn(32, 4) * 0.2)
    x = torch.randn(20, 32, device=DEVICE)
    y = lora(x, a, b, x, scale=1.0)
    y.sum().backward()
    assert a.grad is not None and b.grad is not None and x.grad is None


CASES = [  # placement, activation, dtype, (M, D, H)
    ("sequential", "relu", F32, (37, 70, 9)),
    ("sequential", "gelu", BF16, (64, 128, 32)),
    ("parallel", "silu", F16, (33, 96, 16)),
    ("scaled_parallel", "gelu", F32, (20, 40, 3)),
    ("none", "relu", BF16, (5, 64, 64)),
]


@pytest.mark.parametrize("placement,act,dtype,shape", CASES)
def test_bottleneck_matches_reference(fast, placement, act, dtype, shape):
    m, d, h = shape
    tensors = [torch.randn(m, d), torch.randn(h, d) * 0.3, torch.randn(h) * 0.3,
               torch.randn(d, h) * 0.3, torch.randn(d) * 0.3, torch.randn(m, d), torch.tensor(1.7)]
    fast_in, ref_in = leaves(*tensors[:6], dtype=dtype)
    s_fast, s_ref = leaves(tensors[6], dtype=F32)
    x, wd, bd, wu, bu, res = fast_in
    xr, wdr, bdr, wur, bur, resr = ref_in
    residual, residual_ref = {"sequential": (x, xr), "parallel": (res, resr),
                              "scaled_parallel": (res, resr), "none": (None, None)}[placement]
    scale, scale_ref = (s_fast[0], s_ref[0]) if placement == "scaled_parallel" else (None, None)
    y = bottleneck_adapter(x, wd, bd, wu, bu, residual, scale, act)
    y_ref = bottleneck_reference(xr, wdr, bdr, wur, bur, residual_ref, scale_ref, act)
    assert_close(y, y_ref, dtype, "y")
    g = torch.randn_like(y)
    names = ["x", "W_down", "b_down", "W_up", "b_up"]
    inputs, inputs_ref = fast_in[:5], ref_in[:5]
    if placement in ("parallel", "scaled_parallel"):
        names, inputs, inputs_ref = names + ["residual"], inputs + [res], inputs_ref + [resr]
    if scale is not None:
        names, inputs, inputs_ref = names + ["scale"], inputs + [scale], inputs_ref + [scale_ref]
    grads = torch.autograd.grad(y, inputs, g)
    grads_ref = torch.autograd.grad(y_ref, inputs_ref, g.double())
    for name, gf, gr in zip(names, grads, grads_ref):
        assert_close(gf, gr, dtype, f"d{name}")


@pytest.mark.parametrize("placement,scaling", [("sequential", 1.0), ("parallel", 4.0), ("scaled_parallel", 1.0)])
def test_adapted_sublayer_uses_the_kernel_with_unchanged_results(monkeypatch, placement, scaling):
    """dodo's bottleneck wrapper: the fused path (forced) matches its plain modules (auto on CPU)."""
    from dodo.adapters.bottleneck import AdaptedSublayer
    from dodo.adapters.config import AdapterConfig

    torch.manual_seed(0)
    cfg = AdapterConfig(placement=placement, downsample=4, activation="gelu", init_std=0.2, scaling=scaling)
    layer = AdaptedSublayer(torch.nn.Linear(48, 48), 48, cfg).to(DEVICE)
    x = torch.randn(2, 7, 48, device=DEVICE)
    results = {}
    for mode in ("auto", "triton"):
        monkeypatch.setenv("DODO_KERNELS", mode)
        layer.zero_grad()
        y = layer(x)
        (y * torch.linspace(-1, 1, 48, device=DEVICE)).sum().backward()
        results[mode] = [y] + [p.grad.clone() for p in layer.parameters() if p.requires_grad]
    for name, f, r in zip(["y"] + [n for n, p in layer.named_parameters() if p.requires_grad],
                          results["triton"], results["auto"]):
        assert_close(f, r, F32, name)
