"""Triton kernels of the fused LoRA op (imported only when a kernel is launched).

Shapes: x (M, K), A (R, K), B (N, R), base and y (M, N); h = drop(x) A^T (M, R) in fp32.
Every load is upcast to fp32 for element-wise math; dot operands are cast to DT (the
input dtype on a GPU, so tensor cores run; fp32 under the interpreter for bf16, whose
numpy emulation cannot multiply bf16) and accumulate in fp32.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _keep(seed, rows, cols, K, p):
    # Dropout mask of element (row, col) of x: the same rule in forward, backward and
    # dropout_mask_kernel (the tests build the reference from it).
    return tl.rand(seed, (rows[:, None] * K + cols[None, :]).to(tl.int32)) >= p


@triton.jit
def dropout_mask_kernel(m_ptr, M, K, p, seed, BM: tl.constexpr, BK: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rk = tl.program_id(1) * BK + tl.arange(0, BK)
    mask = (rm[:, None] < M) & (rk[None, :] < K)
    keep = _keep(seed, rm, rk, K, p)
    tl.store(m_ptr + rm[:, None].to(tl.int64) * K + rk[None, :], keep.to(tl.int8), mask=mask)


@triton.jit
def lora_fwd_kernel(x_ptr, a_ptr, b_ptr, base_ptr, y_ptr, h_ptr, M, K, N, R, scale, p, seed,
                    HAS_BASE: tl.constexpr, DROPOUT: tl.constexpr, BM: tl.constexpr,
                    BK: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, DT: tl.constexpr,
                    PREC: tl.constexpr):
    # One program owns BM rows: reads its x rows and base rows once, writes y rows once.
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    mm = rm < M
    rm64 = rm.to(tl.int64)
    rr = tl.arange(0, BR)
    mr = rr < R
    h = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        mk = rk < K
        x = tl.load(x_ptr + rm64[:, None] * K + rk[None, :], mask=mm[:, None] & mk[None, :], other=0.0)
        x = x.to(tl.float32)
        if DROPOUT:
            x = tl.where(_keep(seed, rm, rk, K, p), x / (1.0 - p), 0.0)
        at = tl.load(a_ptr + rr[None, :] * K + rk[:, None], mask=mr[None, :] & mk[:, None], other=0.0)
        h += tl.dot(x.to(DT), at.to(DT), input_precision=PREC)  # (BM, BR)
    tl.store(h_ptr + rm64[:, None] * R + rr[None, :], h, mask=mm[:, None] & mr[None, :])
    hs = (h * scale).to(DT)
    for n0 in range(0, N, BN):
        rn = n0 + tl.arange(0, BN)
        mn = rn < N
        bt = tl.load(b_ptr + rn[None, :] * R + rr[:, None], mask=mr[:, None] & mn[None, :], other=0.0)
        out = tl.dot(hs, bt.to(DT), input_precision=PREC)  # (BM, BN)
        io = rm64[:, None] * N + rn[None, :]
        mo = mm[:, None] & mn[None, :]
        if HAS_BASE:
            out += tl.load(base_ptr + io, mask=mo, other=0.0).to(tl.float32)
        tl.store(y_ptr + io, out.to(y_ptr.dtype.element_ty), mask=mo)


@triton.jit
def lora_bwd_dx_kernel(g_ptr, a_ptr, b_ptr, dh_ptr, dx_ptr, M, K, N, R, scale, p, seed,
                       NEED_DX: tl.constexpr, DROPOUT: tl.constexpr, BM: tl.constexpr,
                       BK: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, DT: tl.constexpr,
                       PREC: tl.constexpr):
    # dh = scale * g B (M, R), kept for dA; dx = mask * (dh A) / (1 - p): one pass over g and dx.
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    mm = rm < M
    rm64 = rm.to(tl.int64)
    rr = tl.arange(0, BR)
    mr = rr < R
    dh = tl.zeros((BM, BR), dtype=tl.float32)
    for n0 in range(0, N, BN):
        rn = n0 + tl.arange(0, BN)
        mn = rn < N
        g = tl.load(g_ptr + rm64[:, None] * N + rn[None, :], mask=mm[:, None] & mn[None, :], other=0.0)
        b = tl.load(b_ptr + rn[:, None] * R + rr[None, :], mask=mn[:, None] & mr[None, :], other=0.0)
        dh += tl.dot(g.to(tl.float32).to(DT), b.to(DT), input_precision=PREC)
    dh = dh * scale
    tl.store(dh_ptr + rm64[:, None] * R + rr[None, :], dh, mask=mm[:, None] & mr[None, :])
    if NEED_DX:
        dhd = dh.to(DT)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            mk = rk < K
            a = tl.load(a_ptr + rr[:, None] * K + rk[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
            dx = tl.dot(dhd, a.to(DT), input_precision=PREC)  # (BM, BK)
            if DROPOUT:
                dx = tl.where(_keep(seed, rm, rk, K, p), dx / (1.0 - p), 0.0)
            tl.store(dx_ptr + rm64[:, None] * K + rk[None, :], dx.to(dx_ptr.dtype.element_ty),
                     mask=mm[:, None] & mk[None, :])


@triton.jit
def lora_bwd_dw_kernel(g_ptr, h_ptr, x_ptr, dh_ptr, db_part_ptr, dat_part_ptr, M, K, N, R,
                       rows_per_split, scale, p, seed, DROPOUT: tl.constexpr, BM: tl.constexpr,
                       BC: tl.constexpr, BR: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    # Weight gradients are reductions over the M rows: program (c, s) reduces column block c
    # over row split s into its own partial slot (summed on the host side: deterministic).
    # Column blocks [0, nN) give dB = scale g^T h, blocks [nN, nN + nK) give dA^T = x_drop^T dh.
    c = tl.program_id(0)
    s = tl.program_id(1)
    n_blocks_n = tl.cdiv(N, BC)
    rr = tl.arange(0, BR)
    mr = rr < R
    row0 = s * rows_per_split
    row1 = tl.minimum(row0 + rows_per_split, M)
    acc = tl.zeros((BC, BR), dtype=tl.float32)
    if c < n_blocks_n:
        rc = c * BC + tl.arange(0, BC)
        mc = rc < N
        for m0 in range(row0, row1, BM):
            rm = m0 + tl.arange(0, BM)
            mm = rm < row1
            rm64 = rm.to(tl.int64)
            gt = tl.load(g_ptr + rm64[None, :] * N + rc[:, None], mask=mc[:, None] & mm[None, :], other=0.0)
            h = tl.load(h_ptr + rm64[:, None] * R + rr[None, :], mask=mm[:, None] & mr[None, :], other=0.0)
            acc += tl.dot(gt.to(tl.float32).to(DT), h.to(DT), input_precision=PREC)
        acc = acc * scale
        tl.store(db_part_ptr + s.to(tl.int64) * N * R + rc[:, None] * R + rr[None, :], acc,
                 mask=mc[:, None] & mr[None, :])
    else:
        rc = (c - n_blocks_n) * BC + tl.arange(0, BC)
        mc = rc < K
        for m0 in range(row0, row1, BM):
            rm = m0 + tl.arange(0, BM)
            mm = rm < row1
            rm64 = rm.to(tl.int64)
            xt = tl.load(x_ptr + rm64[None, :] * K + rc[:, None], mask=mc[:, None] & mm[None, :], other=0.0)
            xt = xt.to(tl.float32)
            if DROPOUT:
                keep = tl.rand(seed, (rm[None, :] * K + rc[:, None]).to(tl.int32)) >= p  # _keep, transposed
                xt = tl.where(keep, xt / (1.0 - p), 0.0)
            dh = tl.load(dh_ptr + rm64[:, None] * R + rr[None, :], mask=mm[:, None] & mr[None, :], other=0.0)
            acc += tl.dot(xt.to(DT), dh.to(DT), input_precision=PREC)
        tl.store(dat_part_ptr + s.to(tl.int64) * K * R + rc[:, None] * R + rr[None, :], acc,
                 mask=mc[:, None] & mr[None, :])
