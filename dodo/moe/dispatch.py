"""Token dispatch for an MoE layer, in plain PyTorch: sort by expert, exchange, compute, combine.

    y[t] = sum over assignments (t, e, w) of  w * expert_e(x[t])

1. sort the assignments by expert (stable: priority order kept inside an expert);
2. expert parallelism (ep > 1): all-to-all the sorted rows to the ranks that own the experts
   (rank r of the expert-parallel group owns experts [r L, (r+1) L), L = E / ep), first the
   per-expert counts, then the rows with variable split sizes;
3. grouped compute: each local expert runs once on its contiguous block of rows;
4. all-to-all back, then combine: y = index_add over tokens of w * expert output.

Each step is a small function with plain tensors in and out, so a fused kernel can replace
one step without touching the routers or the layer. The all-to-all is differentiable: its
backward is the all-to-all with the split sizes swapped.

The layer (layer.py) replaces steps 1, 3 and 4 with ``dodo_kernels.moe_adapter_experts`` for
bottleneck experts without expert parallelism, and step 3 (``fused=``) with it when ep > 1.
This module's plain steps stay as the twin the tests compare with; `naive_moe` is the
one-assignment-at-a-time reference.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, send: list[int], recv: list[int], group) -> Tensor:  # type: ignore[override]
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty((sum(recv), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        back = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        return back, None, None, None


def all_to_all(x: Tensor, send: list[int], recv: list[int], group) -> Tensor:
    """Rows x[sum(send[:r]) : sum(send[:r+1])] go to rank r of ``group``; returns the rows
    received, ordered by source rank. Differentiable."""
    return _AllToAll.apply(x, send, recv, group)


def sort_by_expert(expert: Tensor) -> Tensor:
    """The permutation that groups assignments by expert, keeping their order inside one."""
    return torch.argsort(expert, stable=True)


def grouped_experts(rows: Tensor, counts: Sequence[int], experts: Sequence[nn.Module]) -> Tensor:
    """rows (R, d) grouped by expert, counts[i] rows for experts[i] -> outputs (R, d)."""
    chunks = rows.split(list(counts))
    return torch.cat([expert(chunk) for expert, chunk in zip(experts, chunks)], dim=0)


def combine(num_tokens: int, token: Tensor, weight: Tensor, expert_out: Tensor) -> Tensor:
    """(N, d) = sum over assignments of weight * expert output, per token."""
    weighted = expert_out * weight.to(expert_out.dtype)[:, None]
    out = expert_out.new_zeros((num_tokens, expert_out.shape[1]))
    return out.index_add(0, token, weighted)


# fused(rows, order, offsets) -> (R, d): every row through its expert, the rows' own order kept;
# ``order`` groups the rows by local expert, which owns order[offsets[e]:offsets[e+1]].
FusedExperts = Callable[[Tensor, Tensor, Tensor], Tensor]


def moe_dispatch(x: Tensor, token: Tensor, expert: Tensor, weight: Tensor, experts: Sequence[nn.Module],
                 num_experts: int, group: Optional[dist.ProcessGroup] = None,
                 fused: Optional[FusedExperts] = None) -> Tensor:
    """x (N, d) local tokens; assignments (M,); ``experts`` the experts this rank holds
    (all E without a group, E / ep with one). Returns (N, d) in x's dtype. With ep > 1,
    ``fused`` (if given) computes the received rows in place of `grouped_experts`."""
    ep = dist.get_world_size(group) if group is not None else 1
    local = num_experts // ep
    assert len(experts) == local, f"{len(experts)} local experts, expected {local}"
    order = sort_by_expert(expert)
    rows = x[token[order]]  # (M, d) grouped by global expert
    counts = torch.bincount(expert, minlength=num_experts)  # (E,)
    if ep == 1:
        out = grouped_experts(rows, counts.tolist(), experts)
    else:
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=group)  # (ep * L,): per source, per local expert
        recv_counts = recv_counts.view(ep, local)
        send = counts.view(ep, local).sum(1).tolist()
        recv = recv_counts.sum(1).tolist()
        received = all_to_all(rows, send, recv, group)  # by source rank, then local expert
        local_id = torch.arange(local, device=x.device).repeat(ep).repeat_interleave(recv_counts.reshape(-1))
        regroup = sort_by_expert(local_id)  # by local expert, then source rank
        if fused is not None:
            offsets = torch.zeros(local + 1, dtype=torch.int32, device=x.device)
            offsets[1:] = torch.cumsum(recv_counts.sum(0), 0)
            back = fused(received, regroup.to(torch.int32), offsets)  # already in received order
        else:
            computed = grouped_experts(received[regroup], recv_counts.sum(0).tolist(), experts)
            back = torch.empty_like(computed).index_copy(0, regroup, computed)  # undo the regroup
        if received.requires_grad and not back.requires_grad:
            # Every rank must run both all-to-alls in backward, in the same order. A rank that
            # received no rows gets back an output not connected to ``received`` (the fused op
            # had nothing to compute), so autograd would skip both exchanges on this rank while
            # its peers wait in them (gloo: "Received data size doesn't match expected size").
            # Tie the (empty) result back to the graph; adds zero.
            back = back + received * 0
        out = all_to_all(back, recv, send, group)
    return combine(x.shape[0], token[order], weight[order], out).to(x.dtype)


def naive_moe(x: Tensor, token: Tensor, expert: Tensor, weight: Tensor, experts: Sequence[nn.Module]) -> Tensor:
    """The reference: one assignment at a time. For tests."""
    out = torch.zeros_like(x)
    for t, e, w in zip(token.tolist(), expert.tolist(), weight):
        out[t] = out[t] + w.to(x.dtype) * experts[e](x[t:t + 1])[0]
    return out
