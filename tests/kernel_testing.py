"""Shared helpers of tests/test_kernels_*.py: interpreter set-up, poisoning, tolerances.

Tolerances compare max |fast - ref| / max |ref| against a float64 reference run on the same
(rounded) inputs. The fast path rounds its outputs to the dtype (half an ulp: 2^-24 fp32,
2^-11 fp16, 2^-8 bf16 relative), rounds the small hidden/rank activations to the dtype before
the second matmul (as unfused PyTorch does) and sums in a different order; gradients pass
through two such roundings and reductions over up to a few hundred rows. So a few ulps of
the largest element: 1e-4 for fp32 (summation order only), 1e-2 for fp16 and 4e-2 for bf16.
"""

from __future__ import annotations

import os

import pytest
import torch

# TRITON_INTERPRET=1 on CPU is set by conftest.py, before any test module imports triton.

triton = pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2, torch.float64: 1e-10}


@pytest.fixture
def fast(monkeypatch):
    """Force the Triton path with poisoned output buffers."""
    monkeypatch.setenv("DODO_KERNELS", "triton")
    monkeypatch.setenv("DODO_KERNELS_POISON", "1")


def rel_err(fast: torch.Tensor, ref: torch.Tensor) -> float:
    assert fast.shape == ref.shape, (fast.shape, ref.shape)
    assert torch.isfinite(fast).all(), "non-finite values (an unwritten, poisoned element?)"
    return ((fast.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-6)).item()


def assert_close(fast: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    err = rel_err(fast, ref)
    assert err <= TOL[dtype], f"{what}: relative error {err:.3g} > {TOL[dtype]:g} ({dtype})"


def leaves(*tensors, dtype=None, device=DEVICE):
    """Fresh leaf tensors (cast to dtype) that require grad, and their float64 twins."""
    fast = [t.to(device=device, dtype=dtype or t.dtype).detach().requires_grad_() for t in tensors]
    ref = [t.detach().double().requires_grad_() for t in fast]
    return fast, ref
