"""Grouped GEMMs over expert-sorted rows, with the MoE's gather and SwiGLU fused in.

Rows are the T·k slots in expert-grouped order (permutation.py). Every kernel runs a persistent grid
over its tiles (tiles.py: the schedule, operand loads and K-loop they share), takes the expert
weights as two tensors (``first`` holds experts [0, n_first), ``second`` the rest: the frozen/trainable
split, or the same tensor twice with n_first = E), reads weights and contiguous row operands through
TMA descriptors where the device and the strides allow (pointers otherwise), and computes element
offsets in int64, so T·k·H beyond 2^31 is fine. Shape comments on the kernels' pointer parameters
use N_rows = T·k sorted rows and gate_up_proj [E, 2F, H], down_proj [E, H, F] (tiles.py says more).

Forward
  * ``gate_up_fwd``: h[r] = silu(x[t_r] Wg_e^T) ⊙ (x[t_r] Wu_e^T) — token rows gathered in the operand
    load, gate and up as two accumulators of one tile, SwiGLU in the epilogue; optionally also stores
    the pre-activations [g | u] for backward.
  * ``grouped_gemm``: out[r] = s_r · (A[r] W_e^T) (or A[r] W_e) in sorted row order, optionally split
    over K into fp32 partials (decode); the down projection, and d(hidden) in the backward.
Backward
  * ``act_bwd``: G = dy[t_r] W_down,e from the gathered dy, then in the epilogue d[g | u] from the saved
    pre-activations, y1s = s·h (the down projection's weight-gradient operand; h recomputed, never
    saved) and the per-tile partial of d(topk_weight)_r = <G_r, h_r>.
  * ``weight_grad``: dW_e = Σ_{r ∈ e} A[r]^T B[r] over contiguous sorted rows (K = the expert's rows),
    experts with the most rows first, optionally split over rows into fp32 partials.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from . import tuning
from .permutation import Permutation
from .tiles import (
    _load_rows,
    _offset,
    _row_tile_count,
    _row_tile_product,
    _swizzle,
    _tile_ptrs,
    persistent_grid,
    row_tiles_upper_bound,
)


@triton.jit
def _halves(acc, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The left and right column halves of a [BLOCK_M, BLOCK_N] tile."""
    return tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))


@triton.jit
def _gate_up_store(
    g,
    u,
    row0,
    row_ok,
    c0,
    F,
    h_ptr,  # [N_rows, F] out: silu(gate) * up
    preact_ptr,  # [N_rows, 2F] out: [gate | up] (SAVE_PREACT)
    stride_hr,
    stride_pr,
    SAVE_PREACT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    SUB_N: tl.constexpr,
):
    cols = c0 + tl.arange(0, SUB_N)
    mask = row_ok[:, None] & (cols < F)[None, :]
    h = g * tl.sigmoid(g) * u
    tl.store(
        _tile_ptrs(ptr=h_ptr, row0=row0, stride_r=stride_hr, cols=cols, BLOCK_R=BLOCK_M),
        h.to(h_ptr.dtype.element_ty),
        mask=mask,
    )
    if SAVE_PREACT:
        p_ptrs = _tile_ptrs(ptr=preact_ptr, row0=row0, stride_r=stride_pr, cols=cols, BLOCK_R=BLOCK_M)
        tl.store(p_ptrs, g.to(preact_ptr.dtype.element_ty), mask=mask)
        tl.store(p_ptrs + F, u.to(preact_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gate_up_epilogue(
    g,
    u,
    row0,
    row_ok,
    c0,
    F,
    h_ptr,  # [N_rows, F] out: silu(gate) * up
    preact_ptr,  # [N_rows, 2F] out: [gate | up] (SAVE_PREACT)
    stride_hr,
    stride_pr,
    SAVE_PREACT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    SUB_N: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """``_gate_up_store`` on SPLIT column slices of the tile, one after the other (fewer live registers)."""
    if SPLIT == 1:
        _gate_up_store(
            g=g,
            u=u,
            row0=row0,
            row_ok=row_ok,
            c0=c0,
            F=F,
            h_ptr=h_ptr,
            preact_ptr=preact_ptr,
            stride_hr=stride_hr,
            stride_pr=stride_pr,
            SAVE_PREACT=SAVE_PREACT,
            BLOCK_M=BLOCK_M,
            SUB_N=SUB_N,
        )
    else:
        g0, g1 = _halves(acc=g, BLOCK_M=BLOCK_M, BLOCK_N=SUB_N)
        u0, u1 = _halves(acc=u, BLOCK_M=BLOCK_M, BLOCK_N=SUB_N)
        _gate_up_epilogue(
            g=g0,
            u=u0,
            row0=row0,
            row_ok=row_ok,
            c0=c0,
            F=F,
            h_ptr=h_ptr,
            preact_ptr=preact_ptr,
            stride_hr=stride_hr,
            stride_pr=stride_pr,
            SAVE_PREACT=SAVE_PREACT,
            BLOCK_M=BLOCK_M,
            SUB_N=SUB_N // 2,
            SPLIT=SPLIT // 2,
        )
        _gate_up_epilogue(
            g=g1,
            u=u1,
            row0=row0,
            row_ok=row_ok,
            c0=c0 + SUB_N // 2,
            F=F,
            h_ptr=h_ptr,
            preact_ptr=preact_ptr,
            stride_hr=stride_hr,
            stride_pr=stride_pr,
            SAVE_PREACT=SAVE_PREACT,
            BLOCK_M=BLOCK_M,
            SUB_N=SUB_N // 2,
            SPLIT=SPLIT // 2,
        )


@triton.jit
def _gate_up_fwd_kernel(
    x_ptr,  # [T, H] hidden states (token rows, gathered by the GEMM)
    w_desc1,  # TMA descriptor of w_ptr1, box [1, BLOCK_N, BLOCK_K] (W_TMA)
    w_desc2,  # TMA descriptor of w_ptr2 (W_TMA)
    w_ptr1,  # [n_first, 2F, H] gate_up_proj, first part
    w_ptr2,  # [E - n_first, 2F, H] gate_up_proj, second part
    h_ptr,  # [N_rows, F] out: silu(gate) * up
    preact_ptr,  # [N_rows, 2F] out: [gate | up] (SAVE_PREACT; else [0, 2F])
    sorted_slots_ptr,  # [N_rows] int32 slot (t·k + j) of every sorted row
    offsets_ptr,  # [E+1] int32 first sorted row of every expert
    order_ptr,  # [E] int32 experts by descending row count
    n_experts,
    n_first,
    top_k,
    H,
    F,
    stride_xt,
    stride_xh,
    stride_we,
    stride_wn,
    stride_wk,
    stride_hr,
    stride_pr,
    SAVE_PREACT: tl.constexpr,
    W_TMA: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_E: tl.constexpr,
    GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EPILOGUE_SPLIT: tl.constexpr,
):
    num_m = _row_tile_count(offsets_ptr=offsets_ptr, n_experts=n_experts, BLOCK_M=BLOCK_M, BLOCK_E=BLOCK_E)
    num_n = tl.cdiv(F, BLOCK_N)
    for tile in range(tl.program_id(0), num_m * num_n, tl.num_programs(0)):
        acc_g, acc_u, start, row_ok, n0 = _row_tile_product(
            tile=tile,
            num_m=num_m,
            num_n=num_n,
            offsets_ptr=offsets_ptr,
            order_ptr=order_ptr,
            sorted_slots_ptr=sorted_slots_ptr,
            n_experts=n_experts,
            top_k=top_k,
            a_desc=x_ptr,
            a_ptr=x_ptr,
            stride_ar=stride_xt,
            stride_ak=stride_xh,
            w_desc1=w_desc1,
            w_desc2=w_desc2,
            w_ptr1=w_ptr1,
            w_ptr2=w_ptr2,
            n_first=n_first,
            stride_we=stride_we,
            stride_wn=stride_wn,
            stride_wk=stride_wk,
            n_second=F,
            n_end=2 * F,
            k_lo=0,
            k_hi=H,
            MMA=True,
            GATHER_A=True,
            A_TMA=False,
            W_TMA=W_TMA,
            K_MAJOR=True,
            DUAL=True,
            PRECISION=PRECISION,
            BLOCK_E=BLOCK_E,
            GROUP_M=GROUP_M,
            BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N,
            BLOCK_K=BLOCK_K,
        )
        _gate_up_epilogue(
            g=acc_g,
            u=acc_u,
            row0=start,
            row_ok=row_ok,
            c0=n0,
            F=F,
            h_ptr=h_ptr,
            preact_ptr=preact_ptr,
            stride_hr=stride_hr,
            stride_pr=stride_pr,
            SAVE_PREACT=SAVE_PREACT,
            BLOCK_M=BLOCK_M,
            SUB_N=BLOCK_N,
            SPLIT=EPILOGUE_SPLIT,
        )


@triton.jit
def _grouped_gemm_kernel(
    a_desc,  # TMA descriptor of a_ptr, box [BLOCK_M, BLOCK_K] (A_TMA)
    a_ptr,  # [N_rows, K] sorted rows
    w_desc1,  # TMA descriptor of w_ptr1 (W_TMA)
    w_desc2,  # TMA descriptor of w_ptr2 (W_TMA)
    w_ptr1,  # [n_first, N, K] (K_MAJOR) or [n_first, K, N] weight, first part
    w_ptr2,  # [E - n_first, ...] weight, second part (the strides of w_ptr1)
    scale_ptr,  # [T·k] routing weight of every slot (HAS_SCALE)
    out_ptr,  # [n_split, N_rows, N] out (fp32 K-chunk partials if n_split > 1)
    sorted_slots_ptr,  # [N_rows] int32 slot (t·k + j) of every sorted row
    offsets_ptr,  # [E+1] int32 first sorted row of every expert
    order_ptr,  # [E] int32 experts by descending row count
    n_experts,
    n_first,
    N,
    K,
    k_chunk,
    n_split,
    stride_ar,
    stride_ak,
    stride_we,
    stride_wn,
    stride_wk,
    stride_os,
    stride_or,
    HAS_SCALE: tl.constexpr,
    A_TMA: tl.constexpr,
    W_TMA: tl.constexpr,
    K_MAJOR: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_E: tl.constexpr,
    GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    num_m = _row_tile_count(offsets_ptr=offsets_ptr, n_experts=n_experts, BLOCK_M=BLOCK_M, BLOCK_E=BLOCK_E)
    num_n = tl.cdiv(N, BLOCK_N)
    for tile in range(tl.program_id(0), num_m * num_n * n_split, tl.num_programs(0)):
        split = tile % n_split
        k_lo = split * k_chunk
        acc, _, start, row_ok, n0 = _row_tile_product(
            tile=tile // n_split,
            num_m=num_m,
            num_n=num_n,
            offsets_ptr=offsets_ptr,
            order_ptr=order_ptr,
            sorted_slots_ptr=sorted_slots_ptr,
            n_experts=n_experts,
            top_k=1,
            a_desc=a_desc,
            a_ptr=a_ptr,
            stride_ar=stride_ar,
            stride_ak=stride_ak,
            w_desc1=w_desc1,
            w_desc2=w_desc2,
            w_ptr1=w_ptr1,
            w_ptr2=w_ptr2,
            n_first=n_first,
            stride_we=stride_we,
            stride_wn=stride_wn,
            stride_wk=stride_wk,
            n_second=0,
            n_end=N,
            k_lo=k_lo,
            k_hi=tl.minimum(K, k_lo + k_chunk),
            MMA=True,
            GATHER_A=False,
            A_TMA=A_TMA,
            W_TMA=W_TMA,
            K_MAJOR=K_MAJOR,
            DUAL=False,
            PRECISION=PRECISION,
            BLOCK_E=BLOCK_E,
            GROUP_M=GROUP_M,
            BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N,
            BLOCK_K=BLOCK_K,
        )
        rows = start + tl.arange(0, BLOCK_M)
        if HAS_SCALE:
            slots = tl.load(sorted_slots_ptr + rows, mask=row_ok, other=0)
            acc = acc * tl.load(scale_ptr + slots, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        cols = n0 + tl.arange(0, BLOCK_N)
        out_ptrs = _tile_ptrs(
            ptr=out_ptr + _offset(index=split, stride=stride_os),
            row0=start,
            stride_r=stride_or,
            cols=cols,
            BLOCK_R=BLOCK_M,
        )
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols < N)[None, :])


@triton.jit
def _act_bwd_store(
    G,
    row0,
    row_ok,
    s,
    c0,
    F,
    preact_ptr,  # [N_rows, 2F] saved [gate | up]
    dpreact_ptr,  # [N_rows, 2F] out: d[gate | up] (WRITE_DPREACT)
    y1s_ptr,  # [N_rows, F] out: s·h, dW_down's operand (WRITE_Y1S)
    stride_pr,
    stride_dr,
    stride_yr,
    NEED_DSCALE: tl.constexpr,
    WRITE_DPREACT: tl.constexpr,
    WRITE_Y1S: tl.constexpr,
    BLOCK_M: tl.constexpr,
    SUB_N: tl.constexpr,
):
    """SwiGLU backward of one column slice; returns its part of <G_r, h_r> per row."""
    cols = c0 + tl.arange(0, SUB_N)
    mask = row_ok[:, None] & (cols < F)[None, :]
    p_ptrs = _tile_ptrs(ptr=preact_ptr, row0=row0, stride_r=stride_pr, cols=cols, BLOCK_R=BLOCK_M)
    g = tl.load(p_ptrs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(p_ptrs + F, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    if WRITE_Y1S:
        y_ptrs = _tile_ptrs(ptr=y1s_ptr, row0=row0, stride_r=stride_yr, cols=cols, BLOCK_R=BLOCK_M)
        tl.store(y_ptrs, (silu * u * s[:, None]).to(y1s_ptr.dtype.element_ty), mask=mask)
    if WRITE_DPREACT:
        dh = G * s[:, None]
        d_ptrs = _tile_ptrs(ptr=dpreact_ptr, row0=row0, stride_r=stride_dr, cols=cols, BLOCK_R=BLOCK_M)
        tl.store(d_ptrs, (dh * u * sig * (1.0 + g * (1.0 - sig))).to(dpreact_ptr.dtype.element_ty), mask=mask)
        tl.store(d_ptrs + F, (dh * silu).to(dpreact_ptr.dtype.element_ty), mask=mask)
    if NEED_DSCALE:
        return tl.sum(G * silu * u, axis=1)
    else:
        return tl.zeros_like(s)


@triton.jit
def _act_bwd_epilogue(
    G,
    row0,
    row_ok,
    s,
    c0,
    F,
    preact_ptr,  # [N_rows, 2F] saved [gate | up]
    dpreact_ptr,  # [N_rows, 2F] out: d[gate | up] (WRITE_DPREACT)
    y1s_ptr,  # [N_rows, F] out: s·h (WRITE_Y1S)
    stride_pr,
    stride_dr,
    stride_yr,
    NEED_DSCALE: tl.constexpr,
    WRITE_DPREACT: tl.constexpr,
    WRITE_Y1S: tl.constexpr,
    BLOCK_M: tl.constexpr,
    SUB_N: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """``_act_bwd_store`` on SPLIT column slices of G, one after the other (fewer live registers)."""
    if SPLIT == 1:
        return _act_bwd_store(
            G=G,
            row0=row0,
            row_ok=row_ok,
            s=s,
            c0=c0,
            F=F,
            preact_ptr=preact_ptr,
            dpreact_ptr=dpreact_ptr,
            y1s_ptr=y1s_ptr,
            stride_pr=stride_pr,
            stride_dr=stride_dr,
            stride_yr=stride_yr,
            NEED_DSCALE=NEED_DSCALE,
            WRITE_DPREACT=WRITE_DPREACT,
            WRITE_Y1S=WRITE_Y1S,
            BLOCK_M=BLOCK_M,
            SUB_N=SUB_N,
        )
    else:
        left, right = _halves(acc=G, BLOCK_M=BLOCK_M, BLOCK_N=SUB_N)
        part = _act_bwd_epilogue(
            G=left,
            row0=row0,
            row_ok=row_ok,
            s=s,
            c0=c0,
            F=F,
            preact_ptr=preact_ptr,
            dpreact_ptr=dpreact_ptr,
            y1s_ptr=y1s_ptr,
            stride_pr=stride_pr,
            stride_dr=stride_dr,
            stride_yr=stride_yr,
            NEED_DSCALE=NEED_DSCALE,
            WRITE_DPREACT=WRITE_DPREACT,
            WRITE_Y1S=WRITE_Y1S,
            BLOCK_M=BLOCK_M,
            SUB_N=SUB_N // 2,
            SPLIT=SPLIT // 2,
        )
        return part + _act_bwd_epilogue(
            G=right,
            row0=row0,
            row_ok=row_ok,
            s=s,
            c0=c0 + SUB_N // 2,
            F=F,
            preact_ptr=preact_ptr,
            dpreact_ptr=dpreact_ptr,
            y1s_ptr=y1s_ptr,
            stride_pr=stride_pr,
            stride_dr=stride_dr,
            stride_yr=stride_yr,
            NEED_DSCALE=NEED_DSCALE,
            WRITE_DPREACT=WRITE_DPREACT,
            WRITE_Y1S=WRITE_Y1S,
            BLOCK_M=BLOCK_M,
            SUB_N=SUB_N // 2,
            SPLIT=SPLIT // 2,
        )


@triton.jit
def _act_bwd_kernel(
    a_desc,  # TMA descriptor of a_ptr, box [BLOCK_M, BLOCK_K] (A_TMA)
    a_ptr,  # [N_rows, H] d(output) gathered into sorted rows
    w_desc1,  # TMA descriptor of w_ptr1, box [1, BLOCK_K, BLOCK_N] (W_TMA)
    w_desc2,  # TMA descriptor of w_ptr2 (W_TMA)
    w_ptr1,  # [n_first, H, F] down_proj, first part (read as [K=H, N=F])
    w_ptr2,  # [E - n_first, H, F] down_proj, second part
    scale_ptr,  # [T·k] routing weight of every slot
    preact_ptr,  # [N_rows, 2F] saved [gate | up]
    dpreact_ptr,  # [N_rows, 2F] out: d[gate | up] (WRITE_DPREACT)
    y1s_ptr,  # [N_rows, F] out: s·h (WRITE_Y1S)
    dscale_part_ptr,  # [N_rows, cdiv(F, BLOCK_N)] fp32 out: per-tile parts of <G_r, h_r> (NEED_DSCALE)
    sorted_slots_ptr,  # [N_rows] int32 slot (t·k + j) of every sorted row
    offsets_ptr,  # [E+1] int32 first sorted row of every expert
    order_ptr,  # [E] int32 experts by descending row count
    n_experts,
    n_first,
    H,
    F,
    stride_ar,
    stride_ak,
    stride_we,
    stride_wn,
    stride_wk,
    stride_pr,
    stride_dr,
    stride_yr,
    NEED_G: tl.constexpr,
    NEED_DSCALE: tl.constexpr,
    WRITE_DPREACT: tl.constexpr,
    WRITE_Y1S: tl.constexpr,
    A_TMA: tl.constexpr,
    W_TMA: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_E: tl.constexpr,
    GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EPILOGUE_SPLIT: tl.constexpr,
):
    num_m = _row_tile_count(offsets_ptr=offsets_ptr, n_experts=n_experts, BLOCK_M=BLOCK_M, BLOCK_E=BLOCK_E)
    num_n = tl.cdiv(F, BLOCK_N)
    for tile in range(tl.program_id(0), num_m * num_n, tl.num_programs(0)):
        acc, _, start, row_ok, n0 = _row_tile_product(
            tile=tile,
            num_m=num_m,
            num_n=num_n,
            offsets_ptr=offsets_ptr,
            order_ptr=order_ptr,
            sorted_slots_ptr=sorted_slots_ptr,
            n_experts=n_experts,
            top_k=1,
            a_desc=a_desc,
            a_ptr=a_ptr,
            stride_ar=stride_ar,
            stride_ak=stride_ak,
            w_desc1=w_desc1,
            w_desc2=w_desc2,
            w_ptr1=w_ptr1,
            w_ptr2=w_ptr2,
            n_first=n_first,
            stride_we=stride_we,
            stride_wn=stride_wn,
            stride_wk=stride_wk,
            n_second=0,
            n_end=F,
            k_lo=0,
            k_hi=H,
            MMA=NEED_G,
            GATHER_A=False,
            A_TMA=A_TMA,
            W_TMA=W_TMA,
            K_MAJOR=False,
            DUAL=False,
            PRECISION=PRECISION,
            BLOCK_E=BLOCK_E,
            GROUP_M=GROUP_M,
            BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N,
            BLOCK_K=BLOCK_K,
        )
        rows = start + tl.arange(0, BLOCK_M)
        slots = tl.load(sorted_slots_ptr + rows, mask=row_ok, other=0)
        s = tl.load(scale_ptr + slots, mask=row_ok, other=0.0).to(tl.float32)
        part = _act_bwd_epilogue(
            G=acc,
            row0=start,
            row_ok=row_ok,
            s=s,
            c0=n0,
            F=F,
            preact_ptr=preact_ptr,
            dpreact_ptr=dpreact_ptr,
            y1s_ptr=y1s_ptr,
            stride_pr=stride_pr,
            stride_dr=stride_dr,
            stride_yr=stride_yr,
            NEED_DSCALE=NEED_DSCALE,
            WRITE_DPREACT=WRITE_DPREACT,
            WRITE_Y1S=WRITE_Y1S,
            BLOCK_M=BLOCK_M,
            SUB_N=BLOCK_N,
            SPLIT=EPILOGUE_SPLIT,
        )
        if NEED_DSCALE:
            tl.store(dscale_part_ptr + _offset(index=rows, stride=num_n) + n0 // BLOCK_N, part, mask=row_ok)


@triton.jit
def _reduce_rows(
    acc,
    a_desc,  # TMA descriptor of a_ptr, box [BLOCK_K, BLOCK_M] (TMA)
    a_ptr,  # [N_rows, M] sorted rows
    b_desc,  # TMA descriptor of b_ptr, box [BLOCK_K, BLOCK_N] (TMA)
    b_ptr,  # [N_rows, N] sorted rows
    lo,
    hi,
    m0,
    n0,
    M,
    N,
    stride_ar,
    stride_am,
    stride_br,
    stride_bn,
    TMA: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """acc += A[lo:hi, m0:m0+BLOCK_M]^T · B[lo:hi, n0:n0+BLOCK_N]: whole BLOCK_K row steps in the
    pipelined loop, the ragged last step (rows of the next expert follow) with masked loads."""
    full = lo + (hi - lo) // BLOCK_K * BLOCK_K
    for r0 in range(lo, full, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        ok = rows < hi
        a = _load_rows(
            desc=a_desc,
            ptr=a_ptr,
            row0=r0,
            row_off=_offset(index=rows, stride=stride_ar),
            row_ok=ok,
            c0=m0,
            c_end=M,
            stride_c=stride_am,
            TMA=TMA,
            BLOCK_R=BLOCK_K,
            BLOCK_C=BLOCK_M,
        )
        b = _load_rows(
            desc=b_desc,
            ptr=b_ptr,
            row0=r0,
            row_off=_offset(index=rows, stride=stride_br),
            row_ok=ok,
            c0=n0,
            c_end=N,
            stride_c=stride_bn,
            TMA=TMA,
            BLOCK_R=BLOCK_K,
            BLOCK_C=BLOCK_N,
        )
        acc = tl.dot(a.T, b, acc, input_precision=PRECISION)
    if full < hi:
        rows = full + tl.arange(0, BLOCK_K)
        ok = rows < hi
        a = _load_rows(
            desc=a_ptr,
            ptr=a_ptr,
            row0=full,
            row_off=_offset(index=rows, stride=stride_ar),
            row_ok=ok,
            c0=m0,
            c_end=M,
            stride_c=stride_am,
            TMA=False,
            BLOCK_R=BLOCK_K,
            BLOCK_C=BLOCK_M,
        )
        b = _load_rows(
            desc=b_ptr,
            ptr=b_ptr,
            row0=full,
            row_off=_offset(index=rows, stride=stride_br),
            row_ok=ok,
            c0=n0,
            c_end=N,
            stride_c=stride_bn,
            TMA=False,
            BLOCK_R=BLOCK_K,
            BLOCK_C=BLOCK_N,
        )
        acc = tl.dot(a.T, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _weight_grad_kernel(
    a_desc,  # TMA descriptor of a_ptr, box [BLOCK_K, BLOCK_M] (TMA)
    a_ptr,  # [N_rows, M] sorted rows
    b_desc,  # TMA descriptor of b_ptr, box [BLOCK_K, BLOCK_N] (TMA)
    b_ptr,  # [N_rows, N] sorted rows
    out_ptr,  # [n_split, n_local, M, N] out: dW (fp32 row-chunk partials if n_split > 1)
    offsets_ptr,  # [E+1] int32 first sorted row of every expert
    order_ptr,  # [E] int32 experts by descending row count
    n_experts,
    expert_base,
    n_local,
    M,
    N,
    n_split,
    stride_ar,
    stride_am,
    stride_br,
    stride_bn,
    stride_os,
    stride_oe,
    stride_om,
    stride_on,
    TMA: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_E: tl.constexpr,
    GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_expert = num_m * num_n
    # This launch's experts [expert_base, expert_base + n_local), in expert_order (most rows first).
    lane = tl.arange(0, BLOCK_E)
    order = tl.load(order_ptr + lane, mask=lane < n_experts, other=-1)
    mine = (order >= expert_base) & (order < expert_base + n_local)
    position = tl.cumsum(mine.to(tl.int32), axis=0) - 1
    for tile in range(tl.program_id(0), n_local * n_split * per_expert, tl.num_programs(0)):
        index = tile // (n_split * per_expert)
        split = tile // per_expert % n_split
        pid_m, pid_n = _swizzle(tile=tile % per_expert, num_m=num_m, num_n=num_n, GROUP_M=GROUP_M)
        expert = tl.sum(tl.where(mine & (position == index), order, 0), axis=0)
        start = tl.load(offsets_ptr + expert)
        end = tl.load(offsets_ptr + expert + 1)
        chunk = tl.cdiv(tl.cdiv(end - start, n_split), BLOCK_K) * BLOCK_K
        lo = tl.minimum(start + split * chunk, end)
        hi = tl.minimum(lo + chunk, end)
        m0 = pid_m * BLOCK_M
        n0 = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc = _reduce_rows(
            acc=acc,
            a_desc=a_desc,
            a_ptr=a_ptr,
            b_desc=b_desc,
            b_ptr=b_ptr,
            lo=lo,
            hi=hi,
            m0=m0,
            n0=n0,
            M=M,
            N=N,
            stride_ar=stride_ar,
            stride_am=stride_am,
            stride_br=stride_br,
            stride_bn=stride_bn,
            TMA=TMA,
            PRECISION=PRECISION,
            BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N,
            BLOCK_K=BLOCK_K,
        )
        ms = m0 + tl.arange(0, BLOCK_M)
        ns = n0 + tl.arange(0, BLOCK_N)
        out_ptrs = (
            out_ptr
            + _offset(index=split, stride=stride_os)
            + _offset(index=expert - expert_base, stride=stride_oe)
            + _offset(index=ms, stride=stride_om)[:, None]
            + ns[None, :] * stride_on
        )
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(ms < M)[:, None] & (ns < N)[None, :])


# ----------------------------------------------------------------------------------------------------
# Host-side launchers. ``cfg`` is the GEMM's tuning.get_config().


def _precision(dtype: torch.dtype) -> str:
    """fp32 products follow torch's matmul setting (IEEE at the default "highest", TF32 once
    ``torch.set_float32_matmul_precision("high")``); bf16/fp16 ignore it."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _block_e(n_experts: int) -> int:
    """Lanes of the per-expert vectors of the tile schedule: at least 128, one register layout for
    every E up to 128 (64 lanes over 8 warps compiled to 40 more registers and spills in act_bwd)."""
    return max(128, triton.next_power_of_2(n_experts))


def _tma_ok(t: torch.Tensor) -> bool:
    """Whether the copy engine can address ``t``: contiguous last dimension, 16-byte aligned base and
    strides, no empty dimension."""
    size = t.element_size()
    return (
        t.stride(-1) == 1
        and all(s * size % 16 == 0 for s in t.stride()[:-1])
        and t.data_ptr() % 16 == 0
        and all(d > 0 for d in t.shape)
    )


def _row_operand(t: torch.Tensor, block: list[int], use_tma: bool) -> tuple[Any, bool]:
    """(descriptor or the tensor itself, whether it is a descriptor) of a 2-D row operand."""
    if use_tma and _tma_ok(t):
        return TensorDescriptor.from_tensor(t, block), True
    return t, False


def _weight_operand(
    first: torch.Tensor, second: torch.Tensor, block: list[int], use_tma: bool
) -> tuple[Any, Any, bool]:
    """Descriptors of both weight parts (one expert per box) when both allow it, else the tensors."""
    if use_tma and _tma_ok(first) and _tma_ok(second):
        box = [1, *block]
        return TensorDescriptor.from_tensor(first, box), TensorDescriptor.from_tensor(second, box), True
    return first, second, False


def gate_up_fwd(
    x: torch.Tensor,
    w_first: torch.Tensor,
    w_second: torch.Tensor,
    n_first: int,
    n_experts: int,
    perm: Permutation,
    top_k: int,
    *,
    save_preact: bool,
    cfg: tuning.TileConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """h [N, F] in expert-sorted row order and, if ``save_preact``, [gate | up] [N, 2F] (else empty)."""
    n_rows, (two_f, H) = perm.sorted_slots.numel(), w_first.shape[1:]
    F = two_f // 2
    h = x.new_empty(n_rows, F)
    preact = x.new_empty(n_rows, two_f) if save_preact else x.new_empty(0, two_f)
    tiles = row_tiles_upper_bound(n_rows, n_experts, cfg.BLOCK_M) * triton.cdiv(F, cfg.BLOCK_N)
    if not tiles:
        return h, preact
    use_tma = tuning.current_device(x.device).tma
    w1, w2, w_tma = _weight_operand(w_first, w_second, [cfg.BLOCK_N, cfg.BLOCK_K], use_tma)
    _gate_up_fwd_kernel[persistent_grid(tiles, tuning.programs(cfg, x.device))](
        x_ptr=x,
        w_desc1=w1,
        w_desc2=w2,
        w_ptr1=w_first,
        w_ptr2=w_second,
        h_ptr=h,
        preact_ptr=preact,
        sorted_slots_ptr=perm.sorted_slots,
        offsets_ptr=perm.offsets,
        order_ptr=perm.expert_order,
        n_experts=n_experts,
        n_first=n_first,
        top_k=top_k,
        H=H,
        F=F,
        stride_xt=x.stride(0),
        stride_xh=x.stride(1),
        stride_we=w_first.stride(0),
        stride_wn=w_first.stride(1),
        stride_wk=w_first.stride(2),
        stride_hr=h.stride(0),
        stride_pr=preact.stride(0),
        SAVE_PREACT=save_preact,
        W_TMA=w_tma,
        PRECISION=_precision(x.dtype),
        BLOCK_E=_block_e(n_experts),
        **cfg.launch_options(epilogue=True),
    )
    return h, preact


def grouped_gemm(
    a: torch.Tensor,
    w_first: torch.Tensor,
    w_second: torch.Tensor,
    n_first: int,
    n_experts: int,
    *,
    transpose_w: bool,
    scale: torch.Tensor | None,
    perm: Permutation,
    cfg: tuning.TileConfig,
    n_split: int = 1,
) -> torch.Tensor:
    """out[r] = scale[slot_r] · a[r] @ W_e^T (W_e without the transpose when ``transpose_w``), in sorted
    row order: [N, N_out] in a's dtype, or [n_split, N, N_out] fp32 partial sums over K chunks."""
    n_rows, K = a.shape
    # W_e is [N_out, K] (down_proj [H, F]: K-major) or, with transpose_w, [K, N_out] (gate_up_proj [2F, H]).
    if transpose_w:
        N, stride_n, stride_k, w_block = (
            w_first.shape[2],
            w_first.stride(2),
            w_first.stride(1),
            [cfg.BLOCK_K, cfg.BLOCK_N],
        )
    else:
        N, stride_n, stride_k, w_block = (
            w_first.shape[1],
            w_first.stride(1),
            w_first.stride(2),
            [cfg.BLOCK_N, cfg.BLOCK_K],
        )
    if n_split > 1:
        out = torch.empty(n_split, n_rows, N, dtype=torch.float32, device=a.device)
    else:
        out = a.new_empty(1, n_rows, N)
    k_chunk = triton.cdiv(triton.cdiv(K, n_split), cfg.BLOCK_K) * cfg.BLOCK_K
    tiles = row_tiles_upper_bound(n_rows, n_experts, cfg.BLOCK_M) * triton.cdiv(N, cfg.BLOCK_N) * n_split
    if tiles:
        use_tma = tuning.current_device(a.device).tma
        a_op, a_tma = _row_operand(a, [cfg.BLOCK_M, cfg.BLOCK_K], use_tma)
        w1, w2, w_tma = _weight_operand(w_first, w_second, w_block, use_tma)
        _grouped_gemm_kernel[persistent_grid(tiles, tuning.programs(cfg, a.device))](
            a_desc=a_op,
            a_ptr=a,
            w_desc1=w1,
            w_desc2=w2,
            w_ptr1=w_first,
            w_ptr2=w_second,
            scale_ptr=a if scale is None else scale,
            out_ptr=out,
            sorted_slots_ptr=perm.sorted_slots,
            offsets_ptr=perm.offsets,
            order_ptr=perm.expert_order,
            n_experts=n_experts,
            n_first=n_first,
            N=N,
            K=K,
            k_chunk=k_chunk,
            n_split=n_split,
            stride_ar=a.stride(0),
            stride_ak=a.stride(1),
            stride_we=w_first.stride(0),
            stride_wn=stride_n,
            stride_wk=stride_k,
            stride_os=out.stride(0),
            stride_or=out.stride(1),
            HAS_SCALE=scale is not None,
            A_TMA=a_tma,
            W_TMA=w_tma,
            K_MAJOR=not transpose_w,
            PRECISION=_precision(a.dtype),
            BLOCK_E=_block_e(n_experts),
            **cfg.launch_options(),
        )
    return out if n_split > 1 else out[0]


def act_bwd(
    dy_sorted: torch.Tensor,
    w_first: torch.Tensor,
    w_second: torch.Tensor,
    n_first: int,
    n_experts: int,
    scale: torch.Tensor,
    preact: torch.Tensor,
    perm: Permutation,
    *,
    need_dpreact: bool,
    need_dscale: bool,
    need_y1s: bool,
    cfg: tuning.TileConfig,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(d[gate | up] [N, 2F], d(scale) per sorted row [N] fp32, y1s = s·h [N, F]), each None unless asked.

    ``dy_sorted`` is d(output) gathered into sorted row order; G = dy · W_down is computed only when
    d[gate | up] or d(scale) is asked for (y1s alone needs just the saved pre-activations)."""
    n_rows, two_f = preact.shape
    H, F = w_first.shape[1], w_first.shape[2]
    num_n = triton.cdiv(F, cfg.BLOCK_N)
    dpreact = torch.empty_like(preact) if need_dpreact else preact.new_empty(0, two_f)
    y1s = preact.new_empty(n_rows, F) if need_y1s else preact.new_empty(0, F)
    part = torch.empty(n_rows, num_n if need_dscale else 0, dtype=torch.float32, device=preact.device)
    tiles = row_tiles_upper_bound(n_rows, n_experts, cfg.BLOCK_M) * num_n
    if tiles:
        use_tma = tuning.current_device(preact.device).tma
        a_op, a_tma = _row_operand(dy_sorted, [cfg.BLOCK_M, cfg.BLOCK_K], use_tma)
        w1, w2, w_tma = _weight_operand(w_first, w_second, [cfg.BLOCK_K, cfg.BLOCK_N], use_tma)
        _act_bwd_kernel[persistent_grid(tiles, tuning.programs(cfg, preact.device))](
            a_desc=a_op,
            a_ptr=dy_sorted,
            w_desc1=w1,
            w_desc2=w2,
            w_ptr1=w_first,
            w_ptr2=w_second,
            scale_ptr=scale,
            preact_ptr=preact,
            dpreact_ptr=dpreact,
            y1s_ptr=y1s,
            dscale_part_ptr=part,
            sorted_slots_ptr=perm.sorted_slots,
            offsets_ptr=perm.offsets,
            order_ptr=perm.expert_order,
            n_experts=n_experts,
            n_first=n_first,
            H=H,
            F=F,
            stride_ar=dy_sorted.stride(0),
            stride_ak=dy_sorted.stride(1),
            stride_we=w_first.stride(0),
            stride_wn=w_first.stride(2),
            stride_wk=w_first.stride(1),
            stride_pr=preact.stride(0),
            stride_dr=dpreact.stride(0),
            stride_yr=y1s.stride(0),
            NEED_G=need_dpreact or need_dscale,
            NEED_DSCALE=need_dscale,
            WRITE_DPREACT=need_dpreact,
            WRITE_Y1S=need_y1s,
            A_TMA=a_tma,
            W_TMA=w_tma,
            PRECISION=_precision(preact.dtype),
            BLOCK_E=_block_e(n_experts),
            **cfg.launch_options(epilogue=True),
        )
    return (
        dpreact if need_dpreact else None,
        part.sum(dim=1) if need_dscale else None,
        y1s if need_y1s else None,
    )


def weight_grad(
    a: torch.Tensor,
    b: torch.Tensor,
    expert_base: int,
    n_local: int,
    perm: Permutation,
    *,
    out_dtype: torch.dtype,
    cfg: tuning.TileConfig,
    n_split: int = 1,
) -> torch.Tensor:
    """dW[e - expert_base] = Σ_{sorted rows r of e} a[r]^T b[r] for experts [expert_base, + n_local):
    [n_local, M, N] for a [N_rows, M] and b [N_rows, N], both in sorted row order."""
    M, N = a.shape[1], b.shape[1]
    n_experts = perm.offsets.numel() - 1
    shape = (n_split, n_local, M, N)
    out = torch.empty(shape, dtype=torch.float32 if n_split > 1 else out_dtype, device=a.device)
    tiles = n_local * n_split * triton.cdiv(M, cfg.BLOCK_M) * triton.cdiv(N, cfg.BLOCK_N)
    if tiles:
        use_tma = tuning.current_device(a.device).tma and a.shape[0] > 0
        a_op, a_tma = _row_operand(a, [cfg.BLOCK_K, cfg.BLOCK_M], use_tma)
        b_op, b_tma = _row_operand(b, [cfg.BLOCK_K, cfg.BLOCK_N], use_tma)
        if a_tma != b_tma:
            a_op, b_op, a_tma = a, b, False
        _weight_grad_kernel[persistent_grid(tiles, tuning.programs(cfg, a.device))](
            a_desc=a_op,
            a_ptr=a,
            b_desc=b_op,
            b_ptr=b,
            out_ptr=out,
            offsets_ptr=perm.offsets,
            order_ptr=perm.expert_order,
            n_experts=n_experts,
            expert_base=expert_base,
            n_local=n_local,
            M=M,
            N=N,
            n_split=n_split,
            stride_ar=a.stride(0),
            stride_am=a.stride(1),
            stride_br=b.stride(0),
            stride_bn=b.stride(1),
            stride_os=out.stride(0),
            stride_oe=out.stride(1),
            stride_om=out.stride(2),
            stride_on=out.stride(3),
            TMA=a_tma,
            PRECISION=_precision(a.dtype),
            BLOCK_E=_block_e(n_experts),
            **cfg.launch_options(),
        )
    return out.sum(dim=0).to(out_dtype) if n_split > 1 else out[0]
