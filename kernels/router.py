"""Top-k router: fp32 softmax, top-k, expert counts and the dispatch permutation.

``route_topk(logits, k, normalize)`` returns a ``Routing``:
  probs    (T, E) fp32   softmax of the logits (for load-balancing losses), differentiable
  weights  (T, k) fp32   the top-k probabilities (renormalised to sum 1 when ``normalize``), differentiable
  ids      (T, k) int32  chosen experts, best first; ties go to the lower expert index
  counts   (E,)   int32  assignments per expert (experts may be empty)
  offsets  (E+1,) int32  exclusive cumulative counts: expert e owns sorted rows offsets[e]:offsets[e+1]
  order    (T*k,) int32  assignment index t*k+j of each sorted row, grouped by expert, stable
  position (T*k,) int32  the inverse: sorted row of assignment t*k+j
Layers: triton_router.py -> ``torch.ops.dodo_kernels.router_fwd`` / ``router_bwd`` ->
``RouterFunction`` -> ``route_topk``; ``route_topk_reference`` is the PyTorch twin.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import dispatch

BT = 32
MAX_EXPERTS = 256


class Routing(NamedTuple):
    probs: Tensor
    weights: Tensor
    ids: Tensor
    counts: Tensor
    offsets: Tensor
    order: Tensor
    position: Tensor


def route_topk_reference(logits: Tensor, k: int, normalize: bool = False) -> Routing:
    t, e = logits.shape
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, k, dim=-1)
    if normalize:
        weights = weights / weights.sum(-1, keepdim=True)
    flat = ids.reshape(-1)
    counts = torch.bincount(flat, minlength=e).to(torch.int32)
    offsets = torch.zeros(e + 1, dtype=torch.int32, device=logits.device)
    offsets[1:] = torch.cumsum(counts, 0)
    order = torch.sort(flat, stable=True).indices
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel(), device=logits.device)
    return Routing(probs, weights, ids.to(torch.int32), counts, offsets, order.to(torch.int32),
                   position.to(torch.int32))


@torch.library.custom_op("dodo_kernels::router_fwd", mutates_args=())
def router_fwd(logits: Tensor, k: int, normalize: bool
               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    from . import triton_router as tk
    t, e = logits.shape
    be, bk = dispatch.next_pow2(e, 2), dispatch.next_pow2(k, 2)
    n_blocks = max(1, cdiv(t, BT))
    dev = logits.device
    probs = dispatch.empty((t, e), torch.float32, dev)
    weights = dispatch.empty((t, k), torch.float32, dev)
    ids = dispatch.empty((t, k), torch.int32, dev)
    rank = torch.empty((t, k), dtype=torch.int32, device=dev)
    hist = torch.zeros((n_blocks, be), dtype=torch.int32, device=dev)
    start = torch.empty((n_blocks, be), dtype=torch.int32, device=dev)
    counts = dispatch.empty((e,), torch.int32, dev)
    offsets = dispatch.empty((e + 1,), torch.int32, dev)
    order = dispatch.empty((t * k,), torch.int32, dev)
    position = dispatch.empty((t * k,), torch.int32, dev)
    if t:
        tk.router_topk_kernel[(n_blocks,)](logits, probs, weights, ids, rank, hist, t, e, K=k,
                                           NORM=normalize, BT=BT, BE=be, BK=bk)
    tk.router_scan_kernel[(1,)](hist, start, counts, offsets, n_blocks, e, BE=be, BB=16)
    if t:
        tk.router_place_kernel[(n_blocks,)](ids, rank, start, position, order, t, K=k, BT=BT, BE=be)
    return probs, weights, ids, counts, offsets, order, position


@router_fwd.register_fake
def _(logits, k, normalize):
    t, e = logits.shape
    f = dict(dtype=torch.float32, device=logits.device)
    i = dict(dtype=torch.int32, device=logits.device)
    return (torch.empty((t, e), **f), torch.empty((t, k), **f), torch.empty((t, k), **i),
            torch.empty((e,), **i), torch.empty((e + 1,), **i), torch.empty((t * k,), **i),
            torch.empty((t * k,), **i))


@torch.library.custom_op("dodo_kernels::router_bwd", mutates_args=())
def router_bwd(probs: Tensor, weights: Tensor, ids: Tensor, dprobs: Tensor | None, dweights: Tensor,
               normalize: bool, logits_dtype: torch.dtype) -> Tensor:
    from . import triton_router as tk
    t, e = probs.shape
    k = ids.shape[1]
    dlogits = dispatch.empty((t, e), logits_dtype, probs.device)
    if t:
        tk.router_bwd_kernel[(cdiv(t, BT),)](
            probs, weights, ids, dprobs if dprobs is not None else probs, dweights.contiguous(),
            dlogits, t, e, K=k, NORM=normalize, HAS_DPROB=dprobs is not None, BT=BT,
            BE=dispatch.next_pow2(e, 2), BK=dispatch.next_pow2(k, 2))
    return dlogits


@router_bwd.register_fake
def _(probs, weights, ids, dprobs, dweights, normalize, logits_dtype):
    return torch.empty(probs.shape, dtype=logits_dtype, device=probs.device)


class RouterFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, k: int, normalize: bool):
        out = torch.ops.dodo_kernels.router_fwd(logits, k, normalize)
        probs, weights, ids = out[:3]
        ctx.save_for_backward(probs, weights, ids)
        ctx.args = (normalize, logits.dtype)
        ctx.mark_non_differentiable(*out[2:])
        return out

    @staticmethod
    def backward(ctx, dprobs, dweights, *_):
        probs, weights, ids = ctx.saved_tensors
        normalize, dtype = ctx.args
        if dweights is None:
            dweights = torch.zeros_like(weights)
        dlogits = torch.ops.dodo_kernels.router_bwd(
            probs, weights, ids, None if dprobs is None else dprobs.contiguous(), dweights,
            normalize, dtype)
        return dlogits, None, None


def route_topk(logits: Tensor, k: int, normalize: bool = False) -> Routing:
    """Route T tokens over E experts from ``logits`` (T, E) in fp32; see the module doc."""
    t, e = logits.shape
    if not 1 <= k <= e:
        raise ValueError(f"top-k routing needs 1 <= k <= num_experts, got k={k}, num_experts={e}")
    if not dispatch.use_triton(logits, e <= MAX_EXPERTS, "route_topk"):
        return route_topk_reference(logits, k, normalize)
    return Routing(*RouterFunction.apply(logits.contiguous(), k, normalize))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
