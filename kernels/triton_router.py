"""Triton kernels of the top-k router (imported only when a kernel is launched).

Three launches for the forward: (1) per token block: fp32 softmax, top-k, the block's
per-expert histogram and each assignment's rank among the block's assignments to the same
expert; (2) one program: expert counts, offsets and each block's start per expert (a scan
over the block histograms); (3) per token block: the sorted position of every assignment
and the permutation ``order`` (assignment index t * k + j, grouped by expert, stable).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def router_topk_kernel(logit_ptr, prob_ptr, w_ptr, id_ptr, rank_ptr, hist_ptr, T, E,
                       K: tl.constexpr, NORM: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr,
                       BK: tl.constexpr):
    pid = tl.program_id(0)
    rt = pid * BT + tl.arange(0, BT)
    mt = rt < T
    rt64 = rt.to(tl.int64)
    re = tl.arange(0, BE)
    me = re < E
    x = tl.load(logit_ptr + rt64[:, None] * E + re[None, :], mask=mt[:, None] & me[None, :],
                other=float("-inf")).to(tl.float32)
    x = tl.where(mt[:, None], x, 0.0)  # padded rows: finite, never stored
    x = tl.where(me[None, :], x, float("-inf"))
    e = tl.exp(x - tl.max(x, axis=1)[:, None])
    p = e / tl.sum(e, axis=1)[:, None]
    tl.store(prob_ptr + rt64[:, None] * E + re[None, :], p, mask=mt[:, None] & me[None, :])
    rk = tl.arange(0, BK)
    work = tl.where(me[None, :], p, -1.0)
    w = tl.zeros((BT, BK), dtype=tl.float32)
    ids = tl.zeros((BT, BK), dtype=tl.int32)
    onehot = tl.zeros((BT, BE), dtype=tl.int32)  # 1 where the token chose the expert
    for j in tl.static_range(K):
        best = tl.argmax(work, axis=1)  # lowest index among equal maxima
        val = tl.max(work, axis=1)
        hit = re[None, :] == best[:, None]
        onehot += hit.to(tl.int32)
        work = tl.where(hit, -2.0, work)
        w = tl.where(rk[None, :] == j, val[:, None], w)
        ids = tl.where(rk[None, :] == j, best[:, None].to(tl.int32), ids)
    if NORM:
        w = w / tl.sum(w, axis=1)[:, None]
    onehot = tl.where(mt[:, None], onehot, 0)
    # rank among earlier tokens of this block with the same expert (a token picks an expert once)
    before = tl.cumsum(onehot, axis=0) - onehot
    io = rt64[:, None] * K + rk[None, :]
    mo = mt[:, None] & (rk[None, :] < K)
    tl.store(w_ptr + io, w, mask=mo)
    tl.store(id_ptr + io, ids, mask=mo)
    for j in tl.static_range(K):
        idj = tl.sum(tl.where(rk[None, :] == j, ids, 0), axis=1)
        rank = tl.sum(tl.where(re[None, :] == idj[:, None], before, 0), axis=1)
        tl.store(rank_ptr + rt64 * K + j, rank, mask=mt)
    tl.store(hist_ptr + pid.to(tl.int64) * BE + re, tl.sum(onehot, axis=0))


@triton.jit
def router_scan_kernel(hist_ptr, start_ptr, count_ptr, offset_ptr, n_blocks, E,
                       BE: tl.constexpr, BB: tl.constexpr):
    re = tl.arange(0, BE)
    me = re < E
    total = tl.zeros((BE,), dtype=tl.int32)
    for b0 in range(0, n_blocks, BB):
        rb = b0 + tl.arange(0, BB)
        h = tl.load(hist_ptr + rb[:, None] * BE + re[None, :], mask=rb[:, None] < n_blocks, other=0)
        total += tl.sum(h, axis=0)
    tl.store(count_ptr + re, total, mask=me)
    offs = tl.cumsum(total, axis=0) - total
    tl.store(offset_ptr + re, offs, mask=me)
    tl.store(offset_ptr + E, tl.sum(total, axis=0))
    run = offs
    for b0 in range(0, n_blocks, BB):
        rb = b0 + tl.arange(0, BB)
        mb = rb[:, None] < n_blocks
        h = tl.load(hist_ptr + rb[:, None] * BE + re[None, :], mask=mb, other=0)
        tl.store(start_ptr + rb[:, None] * BE + re[None, :], run[None, :] + tl.cumsum(h, axis=0) - h, mask=mb)
        run += tl.sum(h, axis=0)


@triton.jit
def router_place_kernel(id_ptr, rank_ptr, start_ptr, pos_ptr, order_ptr, T,
                        K: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr):
    pid = tl.program_id(0)
    rt = pid * BT + tl.arange(0, BT)
    mt = rt < T
    for j in tl.static_range(K):
        a = rt.to(tl.int64) * K + j
        e = tl.load(id_ptr + a, mask=mt, other=0)
        pos = tl.load(start_ptr + pid.to(tl.int64) * BE + e, mask=mt, other=0) + tl.load(rank_ptr + a, mask=mt, other=0)
        tl.store(pos_ptr + a, pos, mask=mt)
        tl.store(order_ptr + pos, a.to(tl.int32), mask=mt)


@triton.jit
def router_bwd_kernel(prob_ptr, w_ptr, id_ptr, dprob_ptr, dw_ptr, dlogit_ptr, T, E,
                      K: tl.constexpr, NORM: tl.constexpr, HAS_DPROB: tl.constexpr,
                      BT: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr):
    # d logits = p * (gp - sum(gp * p)), gp = d probs + the top-k weights' grads scattered to
    # their experts (through the renormalisation w = p_sel / sum(p_sel) when NORM).
    rt = tl.program_id(0) * BT + tl.arange(0, BT)
    mt = rt < T
    rt64 = rt.to(tl.int64)
    re = tl.arange(0, BE)
    me = re < E
    m2 = mt[:, None] & me[None, :]
    p = tl.load(prob_ptr + rt64[:, None] * E + re[None, :], mask=m2, other=0.0)
    gp = tl.zeros((BT, BE), dtype=tl.float32)
    if HAS_DPROB:
        gp += tl.load(dprob_ptr + rt64[:, None] * E + re[None, :], mask=m2, other=0.0).to(tl.float32)
    rk = tl.arange(0, BK)
    mk = mt[:, None] & (rk[None, :] < K)
    io = rt64[:, None] * K + rk[None, :]
    dw = tl.load(dw_ptr + io, mask=mk, other=0.0).to(tl.float32)
    ids = tl.load(id_ptr + io, mask=mk, other=-1)
    if NORM:
        w = tl.load(w_ptr + io, mask=mk, other=0.0)
        psel = tl.zeros((BT,), dtype=tl.float32)
        for j in tl.static_range(K):
            idj = tl.sum(tl.where(rk[None, :] == j, ids, 0), axis=1)
            psel += tl.sum(tl.where(re[None, :] == idj[:, None], p, 0.0), axis=1)
        dw = (dw - tl.sum(dw * w, axis=1)[:, None]) / tl.where(mt, psel, 1.0)[:, None]
    for j in tl.static_range(K):
        idj = tl.sum(tl.where(rk[None, :] == j, ids, 0), axis=1)
        dwj = tl.sum(tl.where(rk[None, :] == j, dw, 0.0), axis=1)
        gp += tl.where(re[None, :] == idj[:, None], dwj[:, None], 0.0)
    dl = p * (gp - tl.sum(gp * p, axis=1)[:, None])
    tl.store(dlogit_ptr + rt64[:, None] * E + re[None, :], dl.to(dlogit_ptr.dtype.element_ty), mask=m2)
