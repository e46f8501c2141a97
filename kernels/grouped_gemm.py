"""Grouped GEMMs over expert-sorted rows, with the MoE's gather/scatter and SwiGLU fused in.

Rows are the T·k slots in expert-grouped order (``routing.route``); a row tile never straddles two
experts. Every kernel works on any strides, takes the expert weights as two tensors
(``first`` holds experts [0, n_first), ``second`` the rest: the frozen/trainable split, or the same
tensor twice with n_first = E) and computes element offsets in int64, so T·k·H beyond 2^31 is fine.

Forward
  * ``gate_up_fwd``: h[r] = silu(x[t_r] Wg_e^T) ⊙ (x[t_r] Wu_e^T) — token rows gathered in the operand
    load (prologue), gate and up as two accumulators of one tile, SwiGLU in the epilogue; optionally
    also stores the pre-activations [g | u] for backward.
  * ``scatter_gemm``: out[slot_r] = s_r · (A[r] B_e^T) — routing-weight multiply and scatter back to
    slot order in the epilogue (used for the down projection and, without scale, for d(hidden)).
    Every slot row is written exactly once, so summing a token's k rows afterwards is deterministic.
Backward
  * ``act_bwd``: G = dy[t_r] W_down,e, then in the epilogue d[g | u] from the saved pre-activations
    (h recomputed, never saved) and the per-tile partial of d(topk_weight)_r = <G_r, h_r>.
  * ``weight_grad``: dW_e = Σ_{r ∈ e} A[r]^T B[r], one program per (expert, output tile) looping over
    the expert's rows: no atomics, nothing launched for experts outside the requested range.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl


@triton.jit
def _offset(index, stride):
    """Element offset index·stride in int64 (int32 would wrap once T·k·H passes 2^31)."""
    return index.to(tl.int64) * stride


@triton.jit
def _swizzle(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Grouped tile order: GROUP_M row tiles walk the column tiles together, so B tiles stay in L2."""
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % width) % size_m, (pid % width) // size_m


@triton.jit
def _expert_tile(offsets_ptr, pid_m, n_experts, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Expert and row range [start, end) of the pid_m-th row tile; expert == n_experts past the last."""
    e_idx = tl.arange(0, BLOCK_E)
    starts = tl.load(offsets_ptr + e_idx, mask=e_idx < n_experts, other=0)
    ends = tl.load(offsets_ptr + e_idx + 1, mask=e_idx < n_experts, other=0)
    tiles = (ends - starts + BLOCK_M - 1) // BLOCK_M
    last = tl.cumsum(tiles, axis=0)
    expert = tl.sum((last <= pid_m).to(tl.int32), axis=0)
    here = e_idx == expert
    start = tl.sum(tl.where(here, starts + (pid_m - last + tiles) * BLOCK_M, 0), axis=0)
    end = tl.sum(tl.where(here, ends, 0), axis=0)
    return expert, start, end


@triton.jit
def _expert_weights(first_ptr, second_ptr, n_first, expert, stride_e):
    """Base pointer of expert ``expert`` in the logical concatenation (first, second)."""
    ptr = second_ptr + _offset(expert - n_first, stride_e)
    if expert < n_first:
        ptr = first_ptr + _offset(expert, stride_e)
    return ptr


@triton.jit
def _gate_up_fwd_kernel(
    x_ptr,
    w1_ptr,
    w2_ptr,
    h_ptr,
    preact_ptr,
    sorted_slots_ptr,
    offsets_ptr,
    n_experts,
    n_first,
    top_k,
    num_m,
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
    PRECISION: tl.constexpr,
    BLOCK_E: tl.constexpr,
    GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    num_n = tl.cdiv(F, BLOCK_N)
    pid_m, pid_n = _swizzle(tl.program_id(0), num_m, num_n, GROUP_M)
    expert, start, end = _expert_tile(offsets_ptr, pid_m, n_experts, BLOCK_M, BLOCK_E)
    if expert >= n_experts:
        return
    rows = start + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    tokens = tl.load(sorted_slots_ptr + rows, mask=row_ok, other=0) // top_k
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < F
    ks = tl.arange(0, BLOCK_K)
    w_ptr = _expert_weights(w1_ptr, w2_ptr, n_first, expert, stride_we)
    a_ptrs = x_ptr + _offset(tokens, stride_xt)[:, None] + ks[None, :] * stride_xh
    g_ptrs = w_ptr + _offset(cols, stride_wn)[None, :] + ks[:, None] * stride_wk
    u_ptrs = g_ptrs + _offset(F, stride_wn)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k_ok = ks + k0 < H
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        bg = tl.load(g_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        bu = tl.load(u_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc_g = tl.dot(a, bg, acc_g, input_precision=PRECISION)
        acc_u = tl.dot(a, bu, acc_u, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_xh
        g_ptrs += BLOCK_K * stride_wk
        u_ptrs += BLOCK_K * stride_wk
    h = acc_g * tl.sigmoid(acc_g) * acc_u
    mask = row_ok[:, None] & col_ok[None, :]
    out_rows = _offset(rows, stride_hr)[:, None]
    tl.store(h_ptr + out_rows + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=mask)
    if SAVE_PREACT:
        p_ptrs = preact_ptr + _offset(rows, stride_pr)[:, None] + cols[None, :]
        tl.store(p_ptrs, acc_g.to(preact_ptr.dtype.element_ty), mask=mask)
        tl.store(p_ptrs + F, acc_u.to(preact_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scatter_gemm_kernel(
    a_ptr,
    w1_ptr,
    w2_ptr,
    scale_ptr,
    out_ptr,
    sorted_slots_ptr,
    offsets_ptr,
    n_experts,
    n_first,
    num_m,
    N,
    K,
    stride_ar,
    stride_ak,
    stride_we,
    stride_wn,
    stride_wk,
    stride_or,
    HAS_SCALE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_E: tl.constexpr,
    GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = _swizzle(tl.program_id(0), num_m, num_n, GROUP_M)
    expert, start, end = _expert_tile(offsets_ptr, pid_m, n_experts, BLOCK_M, BLOCK_E)
    if expert >= n_experts:
        return
    rows = start + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    slots = tl.load(sorted_slots_ptr + rows, mask=row_ok, other=0)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    w_ptr = _expert_weights(w1_ptr, w2_ptr, n_first, expert, stride_we)
    a_ptrs = a_ptr + _offset(rows, stride_ar)[:, None] + ks[None, :] * stride_ak
    b_ptrs = w_ptr + _offset(cols, stride_wn)[None, :] + ks[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = ks + k0 < K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_wk
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + slots, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    out_ptrs = out_ptr + _offset(slots, stride_or)[:, None] + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _act_bwd_kernel(
    dy_ptr,
    w1_ptr,
    w2_ptr,
    scale_ptr,
    preact_ptr,
    dpreact_ptr,
    dscale_part_ptr,
    sorted_slots_ptr,
    offsets_ptr,
    n_experts,
    n_first,
    top_k,
    num_m,
    H,
    F,
    stride_dt,
    stride_dh,
    stride_we,
    stride_wh,
    stride_wf,
    stride_pr,
    stride_dr,
    NEED_DSCALE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_E: tl.constexpr,
    GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    num_n = tl.cdiv(F, BLOCK_N)
    pid_m, pid_n = _swizzle(tl.program_id(0), num_m, num_n, GROUP_M)
    expert, start, end = _expert_tile(offsets_ptr, pid_m, n_experts, BLOCK_M, BLOCK_E)
    if expert >= n_experts:
        return
    rows = start + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    slots = tl.load(sorted_slots_ptr + rows, mask=row_ok, other=0)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < F
    ks = tl.arange(0, BLOCK_K)
    w_ptr = _expert_weights(w1_ptr, w2_ptr, n_first, expert, stride_we)
    a_ptrs = dy_ptr + _offset(slots // top_k, stride_dt)[:, None] + ks[None, :] * stride_dh
    b_ptrs = w_ptr + _offset(cols, stride_wf)[None, :] + ks[:, None] * stride_wh
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k_ok = ks + k0 < H
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_dh
        b_ptrs += BLOCK_K * stride_wh
    mask = row_ok[:, None] & col_ok[None, :]
    p_ptrs = preact_ptr + _offset(rows, stride_pr)[:, None] + cols[None, :]
    g = tl.load(p_ptrs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(p_ptrs + F, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    if NEED_DSCALE:
        part = tl.sum(acc * silu * u, axis=1)
        tl.store(dscale_part_ptr + _offset(rows, num_n) + pid_n, part, mask=row_ok)
    dh = acc * tl.load(scale_ptr + slots, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    d_ptrs = dpreact_ptr + _offset(rows, stride_dr)[:, None] + cols[None, :]
    dg = dh * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(d_ptrs, dg.to(dpreact_ptr.dtype.element_ty), mask=mask)
    tl.store(d_ptrs + F, (dh * silu).to(dpreact_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _weight_grad_kernel(
    a_ptr,
    b_ptr,
    scale_ptr,
    out_ptr,
    sorted_slots_ptr,
    offsets_ptr,
    expert_base,
    top_k,
    M,
    N,
    swiglu_shift,
    stride_ar,
    stride_am,
    stride_br,
    stride_bn,
    stride_oe,
    stride_om,
    stride_on,
    A_GATHER: tl.constexpr,
    A_SCALE: tl.constexpr,
    B_GATHER: tl.constexpr,
    B_SWIGLU: tl.constexpr,
    PRECISION: tl.constexpr,
    GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    local = tl.program_id(1)
    pid_m, pid_n = _swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    start = tl.load(offsets_ptr + expert_base + local)
    end = tl.load(offsets_ptr + expert_base + local + 1)
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = ms < M
    n_ok = ns < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        r_ok = rows < end
        slots = tl.load(sorted_slots_ptr + rows, mask=r_ok, other=0)
        a_rows = slots // top_k if A_GATHER else rows
        a = tl.load(
            a_ptr + _offset(a_rows, stride_ar)[None, :] + ms[:, None] * stride_am,
            mask=m_ok[:, None] & r_ok[None, :],
            other=0.0,
        )
        if A_SCALE:
            scale = tl.load(scale_ptr + slots, mask=r_ok, other=0.0).to(tl.float32)
            a = (a.to(tl.float32) * scale[None, :]).to(a_ptr.dtype.element_ty)
        b_rows = slots // top_k if B_GATHER else rows
        b_ptrs = b_ptr + _offset(b_rows, stride_br)[:, None] + ns[None, :] * stride_bn
        b_mask = r_ok[:, None] & n_ok[None, :]
        if B_SWIGLU:
            g = tl.load(b_ptrs, mask=b_mask, other=0.0).to(tl.float32)
            u = tl.load(b_ptrs + swiglu_shift * stride_bn, mask=b_mask, other=0.0).to(tl.float32)
            b = (g * tl.sigmoid(g) * u).to(b_ptr.dtype.element_ty)
        else:
            b = tl.load(b_ptrs, mask=b_mask, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    out_ptrs = out_ptr + _offset(local, stride_oe) + _offset(ms, stride_om)[:, None] + ns[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# ----------------------------------------------------------------------------------------------------
# Host-side launchers. ``cfg`` holds BLOCK_M/N/K, GROUP_M, num_warps, num_stages (see tuning.py).


def _precision(dtype: torch.dtype) -> str:
    """fp32 products follow torch's matmul setting (IEEE at the default "highest", TF32 once
    ``torch.set_float32_matmul_precision("high")``); bf16/fp16 ignore it."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def row_tiles_upper_bound(n_rows: int, n_experts: int, block_m: int) -> int:
    """Most row tiles any routing of n_rows rows over n_experts can need (the grid is sized by this,
    not by the actual counts, so launching needs no host sync)."""
    return min(n_rows, triton.cdiv(n_rows, block_m) + min(n_experts, n_rows))


def _launch_opts(cfg: dict[str, Any]) -> dict[str, Any]:
    keys = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")
    return {key: cfg[key] for key in keys}


def gate_up_fwd(
    x: torch.Tensor,
    w_first: torch.Tensor,
    w_second: torch.Tensor,
    n_first: int,
    n_experts: int,
    sorted_slots: torch.Tensor,
    offsets: torch.Tensor,
    top_k: int,
    save_preact: bool,
    cfg: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor]:
    """h [N, F] in expert-sorted row order and, if ``save_preact``, [gate | up] [N, 2F] (else empty)."""
    n_rows, (two_f, H) = sorted_slots.numel(), w_first.shape[1:]
    F = two_f // 2
    h = x.new_empty(n_rows, F)
    preact = x.new_empty(n_rows, two_f) if save_preact else x.new_empty(0, two_f)
    num_m = row_tiles_upper_bound(n_rows, n_experts, cfg["BLOCK_M"])
    grid = (num_m * triton.cdiv(F, cfg["BLOCK_N"]),)
    if num_m:
        _gate_up_fwd_kernel[grid](
            x,
            w_first,
            w_second,
            h,
            preact,
            sorted_slots,
            offsets,
            n_experts,
            n_first,
            top_k,
            num_m,
            H,
            F,
            x.stride(0),
            x.stride(1),
            w_first.stride(0),
            w_first.stride(1),
            w_first.stride(2),
            h.stride(0),
            preact.stride(0),
            SAVE_PREACT=save_preact,
            PRECISION=_precision(x.dtype),
            BLOCK_E=triton.next_power_of_2(n_experts),
            **_launch_opts(cfg),
        )
    return h, preact


def scatter_gemm(
    a: torch.Tensor,
    w_first: torch.Tensor,
    w_second: torch.Tensor,
    n_first: int,
    n_experts: int,
    transpose_w: bool,
    scale: torch.Tensor | None,
    sorted_slots: torch.Tensor,
    offsets: torch.Tensor,
    cfg: dict[str, Any],
) -> torch.Tensor:
    """out[slot_r] = scale_r · a[r] @ W_e^T (or W_e without the transpose when ``transpose_w``), [N, ·]."""
    n_rows, K = a.shape
    # W_e is [N_out, K] (down_proj [H, F]) or, with transpose_w, [K, N_out] (gate_up_proj [2F, H]).
    s_n, s_k = (
        (w_first.stride(2), w_first.stride(1)) if transpose_w else (w_first.stride(1), w_first.stride(2))
    )
    N = w_first.shape[2] if transpose_w else w_first.shape[1]
    out = a.new_empty(n_rows, N)
    num_m = row_tiles_upper_bound(n_rows, n_experts, cfg["BLOCK_M"])
    if num_m:
        _scatter_gemm_kernel[(num_m * triton.cdiv(N, cfg["BLOCK_N"]),)](
            a,
            w_first,
            w_second,
            a if scale is None else scale,
            out,
            sorted_slots,
            offsets,
            n_experts,
            n_first,
            num_m,
            N,
            K,
            a.stride(0),
            a.stride(1),
            w_first.stride(0),
            s_n,
            s_k,
            out.stride(0),
            HAS_SCALE=scale is not None,
            PRECISION=_precision(a.dtype),
            BLOCK_E=triton.next_power_of_2(n_experts),
            **_launch_opts(cfg),
        )
    return out


def act_bwd(
    dy: torch.Tensor,
    w_first: torch.Tensor,
    w_second: torch.Tensor,
    n_first: int,
    n_experts: int,
    scale: torch.Tensor,
    preact: torch.Tensor,
    sorted_slots: torch.Tensor,
    offsets: torch.Tensor,
    top_k: int,
    need_dscale: bool,
    cfg: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """d[gate | up] [N, 2F] (sorted rows) and, if asked, d(scale) per sorted row [N] (fp32)."""
    n_rows = preact.shape[0]
    H, F = w_first.shape[1], w_first.shape[2]
    dpreact = torch.empty_like(preact)
    num_n = triton.cdiv(F, cfg["BLOCK_N"])
    part = torch.empty(n_rows, num_n if need_dscale else 0, dtype=torch.float32, device=dy.device)
    num_m = row_tiles_upper_bound(n_rows, n_experts, cfg["BLOCK_M"])
    if num_m:
        _act_bwd_kernel[(num_m * num_n,)](
            dy,
            w_first,
            w_second,
            scale,
            preact,
            dpreact,
            part,
            sorted_slots,
            offsets,
            n_experts,
            n_first,
            top_k,
            num_m,
            H,
            F,
            dy.stride(0),
            dy.stride(1),
            w_first.stride(0),
            w_first.stride(1),
            w_first.stride(2),
            preact.stride(0),
            dpreact.stride(0),
            NEED_DSCALE=need_dscale,
            PRECISION=_precision(dy.dtype),
            BLOCK_E=triton.next_power_of_2(n_experts),
            **_launch_opts(cfg),
        )
    return dpreact, part.sum(dim=1) if need_dscale else None


def weight_grad(
    a: torch.Tensor,
    b: torch.Tensor,
    expert_base: int,
    n_local: int,
    sorted_slots: torch.Tensor,
    offsets: torch.Tensor,
    top_k: int,
    *,
    a_gather: bool,
    a_scale: torch.Tensor | None,
    b_gather: bool,
    b_swiglu: bool,
    out_dtype: torch.dtype,
    cfg: dict[str, Any],
) -> torch.Tensor:
    """dW[e - expert_base] = Σ_{rows r of e} A[r]^T B[r] for experts [expert_base, expert_base + n_local).

    A rows are gathered by token when ``a_gather`` (and scaled by ``a_scale[slot]``), else sorted rows;
    same for B; with ``b_swiglu`` B is silu(g)·u of the pre-activations [g | u]. Shape [n_local, M, N].
    """
    M = a.shape[1]
    N = b.shape[1] // 2 if b_swiglu else b.shape[1]
    out = torch.empty(n_local, M, N, dtype=out_dtype, device=a.device)
    tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
    if n_local and tiles:
        _weight_grad_kernel[(tiles, n_local)](
            a,
            b,
            a if a_scale is None else a_scale,
            out,
            sorted_slots,
            offsets,
            expert_base,
            top_k,
            M,
            N,
            N,
            a.stride(0),
            a.stride(1),
            b.stride(0),
            b.stride(1),
            out.stride(0),
            out.stride(1),
            out.stride(2),
            A_GATHER=a_gather,
            A_SCALE=a_scale is not None,
            B_GATHER=b_gather,
            B_SWIGLU=b_swiglu,
            PRECISION=_precision(a.dtype),
            **_launch_opts(cfg),
        )
    return out
