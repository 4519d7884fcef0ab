"""Triton kernels of the grouped MoE adapter experts (imported only when a kernel is launched).

Rows are the T*k (token, slot) assignments sorted by expert (router's ``order``/``offsets``);
no padded copies exist: a program takes a tile of up to BM sorted rows of ONE expert, gathers
their token rows of x, and runs that expert's bottleneck with the hidden in registers.
Tile -> expert is found in-kernel from ``offsets`` (tiles per expert = ceil(count / BM)); the
grid is the upper bound cdiv(T*k, BM) + E, so nothing waits on the host. Expert e's
parameters: Wd[e] (H, D), bd[e] (H), Wu[e] (D, H), bu[e] (D).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_bottleneck import act_bwd, act_fwd


@triton.jit
def _tile(offs_ptr, E, BM: tl.constexpr, BE: tl.constexpr):
    """(expert, first sorted row, end row) of this program's tile; expert == E: no work."""
    pid = tl.program_id(0)
    re = tl.arange(0, BE)
    lo = tl.load(offs_ptr + re, mask=re < E, other=0)
    hi = tl.load(offs_ptr + re + 1, mask=re < E, other=0)
    tiles = (hi - lo + BM - 1) // BM
    last = tl.cumsum(tiles, axis=0)  # tiles of experts 0..e
    e = tl.sum((last <= pid).to(tl.int32), axis=0)
    first_tile = tl.sum(tl.where(re == e, last - tiles, 0), axis=0)
    start = tl.sum(tl.where(re == e, lo, 0), axis=0) + (pid - first_tile) * BM
    end = tl.sum(tl.where(re == e, hi, 0), axis=0)
    return e, start, end


@triton.jit
def moe_fwd_kernel(x_ptr, gate_ptr, order_ptr, offs_ptr, wd_ptr, bd_ptr, wu_ptr, bu_ptr,
                   res_ptr, out_ptr, z_ptr, E, D, H, K: tl.constexpr, DIRECT: tl.constexpr,
                   HAS_RES: tl.constexpr, ACT: tl.constexpr, BM: tl.constexpr,
                   BD: tl.constexpr, BH: tl.constexpr, BE: tl.constexpr, DT: tl.constexpr,
                   PREC: tl.constexpr):
    # DIRECT (k == 1): each token has one row, so y[t] = res[t] + gate * expert(x[t]) is
    # written in place; otherwise row t*k+j of the (T*k, D) buffer gets gate * expert(x[t]).
    e, start, end = _tile(offs_ptr, E, BM, BE)
    if e < E:
        ri = start + tl.arange(0, BM)
        mi = ri < end
        a_idx = tl.load(order_ptr + ri, mask=mi, other=0).to(tl.int64)
        tok = a_idx // K
        gate = tl.load(gate_ptr + a_idx, mask=mi, other=0.0).to(tl.float32)
        rh = tl.arange(0, BH)
        mh = rh < H
        e64 = e.to(tl.int64)
        z = tl.zeros((BM, BH), dtype=tl.float32)
        for d0 in range(0, D, BD):
            rd = d0 + tl.arange(0, BD)
            md = rd < D
            x = tl.load(x_ptr + tok[:, None] * D + rd[None, :], mask=mi[:, None] & md[None, :], other=0.0)
            wdt = tl.load(wd_ptr + e64 * H * D + rh[None, :] * D + rd[:, None],
                          mask=mh[None, :] & md[:, None], other=0.0)
            z += tl.dot(x.to(tl.float32).to(DT), wdt.to(DT), input_precision=PREC)
        z += tl.load(bd_ptr + e64 * H + rh, mask=mh, other=0.0).to(tl.float32)[None, :]
        tl.store(z_ptr + ri.to(tl.int64)[:, None] * H + rh[None, :], z, mask=mi[:, None] & mh[None, :])
        a = (act_fwd(z, ACT) * gate[:, None]).to(DT)
        for d0 in range(0, D, BD):
            rd = d0 + tl.arange(0, BD)
            md = rd < D
            wut = tl.load(wu_ptr + e64 * D * H + rd[None, :] * H + rh[:, None],
                          mask=mh[:, None] & md[None, :], other=0.0)
            o = tl.dot(a, wut.to(DT), input_precision=PREC)
            o += gate[:, None] * tl.load(bu_ptr + e64 * D + rd, mask=md, other=0.0).to(tl.float32)[None, :]
            mo = mi[:, None] & md[None, :]
            if DIRECT:
                io = tok[:, None] * D + rd[None, :]
                if HAS_RES:
                    o += tl.load(res_ptr + io, mask=mo, other=0.0).to(tl.float32)
            else:
                io = a_idx[:, None] * D + rd[None, :]
            tl.store(out_ptr + io, o.to(out_ptr.dtype.element_ty), mask=mo)


@triton.jit
def combine_kernel(buf_ptr, res_ptr, y_ptr, T, D, K: tl.constexpr, HAS_RES: tl.constexpr,
                   BT: tl.constexpr, BD: tl.constexpr):
    """y[t] = res[t] + sum_j buf[t*k+j], summed in fp32 (used for y and for dx when k > 1)."""
    rt = tl.program_id(0) * BT + tl.arange(0, BT)
    rd = tl.program_id(1) * BD + tl.arange(0, BD)
    m = (rt[:, None] < T) & (rd[None, :] < D)
    rt64 = rt.to(tl.int64)
    acc = tl.zeros((BT, BD), dtype=tl.float32)
    if HAS_RES:
        acc += tl.load(res_ptr + rt64[:, None] * D + rd[None, :], mask=m, other=0.0).to(tl.float32)
    for j in tl.static_range(K):
        acc += tl.load(buf_ptr + (rt64[:, None] * K + j) * D + rd[None, :], mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + rt64[:, None] * D + rd[None, :], acc.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def moe_bwd_rows_kernel(g_ptr, gate_ptr, order_ptr, offs_ptr, wd_ptr, wu_ptr, bu_ptr, z_ptr,
                        dz_ptr, dgate_ptr, dx_ptr, E, D, H, K: tl.constexpr,
                        DIRECT: tl.constexpr, ACT: tl.constexpr, BM: tl.constexpr,
                        BD: tl.constexpr, BH: tl.constexpr, BE: tl.constexpr,
                        DT: tl.constexpr, PREC: tl.constexpr):
    # Per tile: gu = g[t] Wu_e (BM, H); d gate = sum(act(z) gu) + g[t] . bu_e;
    # dz = gate gu act'(z) (saved, sorted rows); dx row = dz Wd_e (to dx[t] or buf[t*k+j]).
    e, start, end = _tile(offs_ptr, E, BM, BE)
    if e < E:
        ri = start + tl.arange(0, BM)
        mi = ri < end
        ri64 = ri.to(tl.int64)
        a_idx = tl.load(order_ptr + ri, mask=mi, other=0).to(tl.int64)
        tok = a_idx // K
        gate = tl.load(gate_ptr + a_idx, mask=mi, other=0.0).to(tl.float32)
        rh = tl.arange(0, BH)
        mh = rh < H
        e64 = e.to(tl.int64)
        gu = tl.zeros((BM, BH), dtype=tl.float32)
        gbu = tl.zeros((BM,), dtype=tl.float32)
        for d0 in range(0, D, BD):
            rd = d0 + tl.arange(0, BD)
            md = rd < D
            g = tl.load(g_ptr + tok[:, None] * D + rd[None, :], mask=mi[:, None] & md[None, :], other=0.0)
            g = g.to(tl.float32)
            wu = tl.load(wu_ptr + e64 * D * H + rd[:, None] * H + rh[None, :],
                         mask=md[:, None] & mh[None, :], other=0.0)
            gu += tl.dot(g.to(DT), wu.to(DT), input_precision=PREC)
            gbu += tl.sum(g * tl.load(bu_ptr + e64 * D + rd, mask=md, other=0.0).to(tl.float32)[None, :], axis=1)
        z = tl.load(z_ptr + ri64[:, None] * H + rh[None, :], mask=mi[:, None] & mh[None, :], other=0.0)
        tl.store(dgate_ptr + a_idx, tl.sum(act_fwd(z, ACT) * gu, axis=1) + gbu, mask=mi)
        dz = tl.where(mh[None, :], gate[:, None] * gu * act_bwd(z, ACT), 0.0)
        tl.store(dz_ptr + ri64[:, None] * H + rh[None, :], dz, mask=mi[:, None] & mh[None, :])
        dzd = dz.to(DT)
        for d0 in range(0, D, BD):
            rd = d0 + tl.arange(0, BD)
            md = rd < D
            wd = tl.load(wd_ptr + e64 * H * D + rh[:, None] * D + rd[None, :],
                         mask=mh[:, None] & md[None, :], other=0.0)
            dx = tl.dot(dzd, wd.to(DT), input_precision=PREC)
            if DIRECT:
                io = tok[:, None] * D + rd[None, :]
            else:
                io = a_idx[:, None] * D + rd[None, :]
            tl.store(dx_ptr + io, dx.to(dx_ptr.dtype.element_ty), mask=mi[:, None] & md[None, :])


@triton.jit
def moe_bwd_weights_kernel(g_ptr, x_ptr, gate_ptr, order_ptr, offs_ptr, z_ptr, dz_ptr,
                           dwd_ptr, dbd_ptr, dwu_ptr, dbu_ptr, D, H, K: tl.constexpr,
                           ACT: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
                           BH: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    # Program (e, c): expert e, D-columns block c; walks e's sorted rows (none: zeros).
    # dWu[e] = sum gate g[t]^T act(z); dbu[e] = sum gate g[t]; dWd[e] = dz^T x[t]; dbd[e] = sum dz.
    e = tl.program_id(0)
    c = tl.program_id(1)
    e64 = e.to(tl.int64)
    lo = tl.load(offs_ptr + e)
    hi = tl.load(offs_ptr + e + 1)
    rd = c * BD + tl.arange(0, BD)
    md = rd < D
    rh = tl.arange(0, BH)
    mh = rh < H
    acc_u = tl.zeros((BD, BH), dtype=tl.float32)
    acc_d = tl.zeros((BD, BH), dtype=tl.float32)
    bu = tl.zeros((BD,), dtype=tl.float32)
    bd = tl.zeros((BH,), dtype=tl.float32)
    for i0 in range(lo, hi, BM):
        ri = i0 + tl.arange(0, BM)
        mi = ri < hi
        ri64 = ri.to(tl.int64)
        a_idx = tl.load(order_ptr + ri, mask=mi, other=0).to(tl.int64)
        tok = a_idx // K
        gate = tl.load(gate_ptr + a_idx, mask=mi, other=0.0).to(tl.float32)
        m2 = md[:, None] & mi[None, :]
        gt = tl.load(g_ptr + tok[None, :] * D + rd[:, None], mask=m2, other=0.0).to(tl.float32) * gate[None, :]
        z = tl.load(z_ptr + ri64[:, None] * H + rh[None, :], mask=mi[:, None] & mh[None, :], other=0.0)
        a = tl.where(mi[:, None] & mh[None, :], act_fwd(z, ACT), 0.0)
        acc_u += tl.dot(gt.to(DT), a.to(DT), input_precision=PREC)
        bu += tl.sum(gt, axis=1)
        xt = tl.load(x_ptr + tok[None, :] * D + rd[:, None], mask=m2, other=0.0)
        dz = tl.load(dz_ptr + ri64[:, None] * H + rh[None, :], mask=mi[:, None] & mh[None, :], other=0.0)
        acc_d += tl.dot(xt.to(tl.float32).to(DT), dz.to(DT), input_precision=PREC)
        bd += tl.sum(dz, axis=0)
    mw = md[:, None] & mh[None, :]
    tl.store(dwu_ptr + e64 * D * H + rd[:, None] * H + rh[None, :], acc_u.to(dwu_ptr.dtype.element_ty), mask=mw)
    tl.store(dbu_ptr + e64 * D + rd, bu.to(dbu_ptr.dtype.element_ty), mask=md)
    tl.store(dwd_ptr + e64 * H * D + rh[None, :] * D + rd[:, None], acc_d.to(dwd_ptr.dtype.element_ty), mask=mw)
    if c == 0:
        tl.store(dbd_ptr + e64 * H + rh, bd.to(dbd_ptr.dtype.element_ty), mask=mh)
