"""Triton kernels of the fused bottleneck adapter (imported only when a kernel is launched).

y = res + s * (act(x Wd^T + bd) Wu^T + bu); x, res, y (M, D); Wd (H, D); Wu (D, H); s a scalar
(1 when absent). The hidden (BM x H) stays in registers between the two projections; z, the
pre-activation (M, H) fp32, is the only thing saved for backward. Conventions as in
triton_lora.py: fp32 element-wise math, dot operands in DT, fp32 accumulation.
"""

from __future__ import annotations

import triton
import triton.language as tl

RELU, GELU, SILU = 0, 1, 2


@triton.jit
def act_fwd(z, ACT: tl.constexpr):
    if ACT == 0:
        return tl.maximum(z, 0.0)
    elif ACT == 1:  # exact (erf) GELU, as nn.GELU()
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    else:
        return z * tl.sigmoid(z)


@triton.jit
def act_bwd(z, ACT: tl.constexpr):
    """d act / d z."""
    if ACT == 0:
        return tl.where(z > 0.0, 1.0, 0.0)
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        return cdf + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    else:
        sg = tl.sigmoid(z)
        return sg * (1.0 + z * (1.0 - sg))


@triton.jit
def bottleneck_fwd_kernel(x_ptr, wd_ptr, bd_ptr, wu_ptr, bu_ptr, res_ptr, s_ptr, y_ptr, z_ptr,
                          M, D, H, RES: tl.constexpr, HAS_S: tl.constexpr, ACT: tl.constexpr,
                          BM: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr,
                          DT: tl.constexpr, PREC: tl.constexpr):
    # RES: 0 none, 1 res is x (sequential: second pass over x), 2 separate res tensor.
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    mm = rm < M
    rm64 = rm.to(tl.int64)
    rh = tl.arange(0, BH)
    mh = rh < H
    z = tl.zeros((BM, BH), dtype=tl.float32)
    for d0 in range(0, D, BD):
        rd = d0 + tl.arange(0, BD)
        md = rd < D
        x = tl.load(x_ptr + rm64[:, None] * D + rd[None, :], mask=mm[:, None] & md[None, :], other=0.0)
        wdt = tl.load(wd_ptr + rh[None, :] * D + rd[:, None], mask=mh[None, :] & md[:, None], other=0.0)
        z += tl.dot(x.to(tl.float32).to(DT), wdt.to(DT), input_precision=PREC)
    z += tl.load(bd_ptr + rh, mask=mh, other=0.0).to(tl.float32)[None, :]
    tl.store(z_ptr + rm64[:, None] * H + rh[None, :], z, mask=mm[:, None] & mh[None, :])
    s = 1.0
    if HAS_S:
        s = tl.load(s_ptr).to(tl.float32)
    a = (act_fwd(z, ACT) * s).to(DT)  # padded hidden columns are act(0) * 0-weights: harmless
    for d0 in range(0, D, BD):
        rd = d0 + tl.arange(0, BD)
        md = rd < D
        wut = tl.load(wu_ptr + rd[None, :] * H + rh[:, None], mask=mh[:, None] & md[None, :], other=0.0)
        out = tl.dot(a, wut.to(DT), input_precision=PREC)
        out += s * tl.load(bu_ptr + rd, mask=md, other=0.0).to(tl.float32)[None, :]
        io = rm64[:, None] * D + rd[None, :]
        mo = mm[:, None] & md[None, :]
        if RES == 1:
            out += tl.load(x_ptr + io, mask=mo, other=0.0).to(tl.float32)
        elif RES == 2:
            out += tl.load(res_ptr + io, mask=mo, other=0.0).to(tl.float32)
        tl.store(y_ptr + io, out.to(y_ptr.dtype.element_ty), mask=mo)


@triton.jit
def bottleneck_bwd_dx_kernel(g_ptr, wd_ptr, wu_ptr, bu_ptr, s_ptr, z_ptr, dz_ptr, dx_ptr, ds_ptr,
                             M, D, H, RES_IS_X: tl.constexpr, HAS_S: tl.constexpr,
                             NEED_DX: tl.constexpr, ACT: tl.constexpr, BM: tl.constexpr,
                             BD: tl.constexpr, BH: tl.constexpr, DT: tl.constexpr,
                             PREC: tl.constexpr):
    # da = s g Wu; dz = da act'(z) (saved for the weight kernel); dx = dz Wd (+ g when the
    # residual is x); ds partial per row block = sum(act(z) * g Wu) + sum(g bu).
    pid = tl.program_id(0)
    rm = pid * BM + tl.arange(0, BM)
    mm = rm < M
    rm64 = rm.to(tl.int64)
    rh = tl.arange(0, BH)
    mh = rh < H
    ga = tl.zeros((BM, BH), dtype=tl.float32)
    gbu = tl.zeros((BM,), dtype=tl.float32)
    for d0 in range(0, D, BD):
        rd = d0 + tl.arange(0, BD)
        md = rd < D
        g = tl.load(g_ptr + rm64[:, None] * D + rd[None, :], mask=mm[:, None] & md[None, :], other=0.0)
        g = g.to(tl.float32)
        wu = tl.load(wu_ptr + rd[:, None] * H + rh[None, :], mask=md[:, None] & mh[None, :], other=0.0)
        ga += tl.dot(g.to(DT), wu.to(DT), input_precision=PREC)
        if HAS_S:
            gbu += tl.sum(g * tl.load(bu_ptr + rd, mask=md, other=0.0).to(tl.float32)[None, :], axis=1)
    z = tl.load(z_ptr + rm64[:, None] * H + rh[None, :], mask=mm[:, None] & mh[None, :], other=0.0)
    s = 1.0
    if HAS_S:
        s = tl.load(s_ptr).to(tl.float32)
        part = tl.sum(tl.where(mm, tl.sum(act_fwd(z, ACT) * ga, axis=1) + gbu, 0.0), axis=0)
        tl.store(ds_ptr + pid, part)
    dz = tl.where(mh[None, :], s * ga * act_bwd(z, ACT), 0.0)
    tl.store(dz_ptr + rm64[:, None] * H + rh[None, :], dz, mask=mm[:, None] & mh[None, :])
    if NEED_DX:
        dzd = dz.to(DT)
        for d0 in range(0, D, BD):
            rd = d0 + tl.arange(0, BD)
            md = rd < D
            wd = tl.load(wd_ptr + rh[:, None] * D + rd[None, :], mask=mh[:, None] & md[None, :], other=0.0)
            dx = tl.dot(dzd, wd.to(DT), input_precision=PREC)
            io = rm64[:, None] * D + rd[None, :]
            mo = mm[:, None] & md[None, :]
            if RES_IS_X:
                dx += tl.load(g_ptr + io, mask=mo, other=0.0).to(tl.float32)
            tl.store(dx_ptr + io, dx.to(dx_ptr.dtype.element_ty), mask=mo)


@triton.jit
def bottleneck_bwd_dw_kernel(g_ptr, x_ptr, z_ptr, dz_ptr, s_ptr, dwu_part_ptr, dbu_part_ptr,
                             dwdt_part_ptr, dbd_part_ptr, M, D, H, rows_per_split,
                             HAS_S: tl.constexpr, ACT: tl.constexpr, BM: tl.constexpr,
                             BD: tl.constexpr, BH: tl.constexpr, DT: tl.constexpr,
                             PREC: tl.constexpr):
    # Program (c, s): column block c of D over row split s. c < nD: dWu = s g^T act(z) and
    # dbu = s sum g; c >= nD: dWd^T = x^T dz, and (first such block only) dbd = sum dz.
    c = tl.program_id(0)
    sp = tl.program_id(1)
    n_d = tl.cdiv(D, BD)
    rh = tl.arange(0, BH)
    mh = rh < H
    row0 = sp * rows_per_split
    row1 = tl.minimum(row0 + rows_per_split, M)
    acc = tl.zeros((BD, BH), dtype=tl.float32)
    vec = tl.zeros((BD,), dtype=tl.float32)
    hvec = tl.zeros((BH,), dtype=tl.float32)
    if c < n_d:
        rd = c * BD + tl.arange(0, BD)
        md = rd < D
        for m0 in range(row0, row1, BM):
            rm = m0 + tl.arange(0, BM)
            mm = rm < row1
            rm64 = rm.to(tl.int64)
            gt = tl.load(g_ptr + rm64[None, :] * D + rd[:, None], mask=md[:, None] & mm[None, :], other=0.0)
            gt = gt.to(tl.float32)
            z = tl.load(z_ptr + rm64[:, None] * H + rh[None, :], mask=mm[:, None] & mh[None, :], other=0.0)
            a = tl.where(mm[:, None] & mh[None, :], act_fwd(z, ACT), 0.0)
            acc += tl.dot(gt.to(DT), a.to(DT), input_precision=PREC)
            vec += tl.sum(gt, axis=1)
        s = 1.0
        if HAS_S:
            s = tl.load(s_ptr).to(tl.float32)
        off = sp.to(tl.int64) * D
        tl.store(dwu_part_ptr + off * H + rd[:, None] * H + rh[None, :], acc * s, mask=md[:, None] & mh[None, :])
        tl.store(dbu_part_ptr + off + rd, vec * s, mask=md)
    else:
        rd = (c - n_d) * BD + tl.arange(0, BD)
        md = rd < D
        for m0 in range(row0, row1, BM):
            rm = m0 + tl.arange(0, BM)
            mm = rm < row1
            rm64 = rm.to(tl.int64)
            xt = tl.load(x_ptr + rm64[None, :] * D + rd[:, None], mask=md[:, None] & mm[None, :], other=0.0)
            dz = tl.load(dz_ptr + rm64[:, None] * H + rh[None, :], mask=mm[:, None] & mh[None, :], other=0.0)
            acc += tl.dot(xt.to(tl.float32).to(DT), dz.to(DT), input_precision=PREC)
            hvec += tl.sum(dz, axis=0)
        off = sp.to(tl.int64) * D
        tl.store(dwdt_part_ptr + off * H + rd[:, None] * H + rh[None, :], acc, mask=md[:, None] & mh[None, :])
        if c == n_d:
            tl.store(dbd_part_ptr + sp.to(tl.int64) * H + rh, hvec, mask=mh)
