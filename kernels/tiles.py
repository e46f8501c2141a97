"""The ``@triton.jit`` pieces every grouped GEMM shares: which tile a program works on, how an
operand tile is loaded (TMA descriptor or pointers), and the K-loop.

Rows are the T·k slots in expert-grouped order (permutation.py). A row tile never straddles two
experts; the row tiles of all experts are numbered in ``expert_order`` (most rows first) and each
program of a persistent grid walks ``tile = pid, pid + programs, ...`` over (row tile, column tile)
pairs. Nothing about the per-expert counts is known on the host: the grid is sized by an upper bound
and each program finds its tiles' experts from ``offsets`` and ``expert_order`` (a few hundred bytes
every program reads, so they stay in cache).

An operand comes either as a host-made TMA descriptor (``*_TMA`` true: contiguous last dimension,
16-byte aligned rows) or as a base pointer plus strides; both produce the same tile. Weights are
two tensors (``first`` holds experts [0, n_first), ``second`` the rest), so a weight operand is a pair
of descriptors or of pointers, chosen once per tile. Element offsets are int64 (``_offset``).

Shape comments on pointer parameters: N_rows = T·k sorted rows (the first offsets[E] hold slots),
E experts, n_first of them in the first weight part; a constexpr named in parentheses (TMA, A_TMA,
GATHER_A, ...) marks what is used only when it is true.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _offset(index, stride):
    """Element offset index·stride in int64 (int32 would wrap once T·k·H passes 2^31)."""
    return tl.cast(index, tl.int64) * stride


@triton.jit
def _tile_ptrs(
    ptr,  # [rows, cols] row-major matrix (row stride stride_r, contiguous columns)
    row0,
    stride_r,
    cols,
    BLOCK_R: tl.constexpr,
):
    """Pointers to rows row0..row0+BLOCK_R, columns ``cols`` of a row-major matrix: the tile's offset
    in int64, offsets inside the tile in int32 (fewer registers than an int64 offset per element)."""
    local = tl.arange(0, BLOCK_R)[:, None] * stride_r + cols[None, :]
    return ptr + _offset(index=row0, stride=stride_r) + local


@triton.jit
def _swizzle(tile, num_m, num_n, GROUP_M: tl.constexpr):
    """Grouped tile order: GROUP_M row tiles walk the column tiles together, so B tiles stay in L2."""
    width = GROUP_M * num_n
    first_m = (tile // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (tile % width) % size_m, (tile % width) // size_m


@triton.jit
def _row_tile_count(
    offsets_ptr,  # [E+1] int32 first sorted row of every expert
    n_experts,
    BLOCK_M: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """Row tiles of all experts together: the length of a persistent kernel's row-tile loop."""
    lane = tl.arange(0, BLOCK_E)
    starts = tl.load(offsets_ptr + lane, mask=lane < n_experts, other=0)
    ends = tl.load(offsets_ptr + lane + 1, mask=lane < n_experts, other=0)
    return tl.sum((ends - starts + BLOCK_M - 1) // BLOCK_M, axis=0)


@triton.jit
def _row_tile(
    pid_m,
    offsets_ptr,  # [E+1] int32 first sorted row of every expert
    order_ptr,  # [E] int32 experts by descending row count
    n_experts,
    BLOCK_M: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """Expert and row range [start, end) of the pid_m-th row tile, counting the experts' tiles in
    ``expert_order`` (a vector of BLOCK_E lanes: loads, a prefix sum and three reductions)."""
    lane = tl.arange(0, BLOCK_E)
    live = lane < n_experts
    experts = tl.load(order_ptr + lane, mask=live, other=0)
    starts = tl.load(offsets_ptr + experts, mask=live, other=0)
    ends = tl.load(offsets_ptr + experts + 1, mask=live, other=0)
    tiles = (ends - starts + BLOCK_M - 1) // BLOCK_M
    last = tl.cumsum(tiles, axis=0)
    here = lane == tl.sum((last <= pid_m).to(tl.int32), axis=0)
    expert = tl.sum(tl.where(here, experts, 0), axis=0)
    start = tl.sum(tl.where(here, starts + (pid_m - last + tiles) * BLOCK_M, 0), axis=0)
    end = tl.sum(tl.where(here, ends, 0), axis=0)
    return expert, start, end


@triton.jit
def _pick_expert(
    desc1,  # TMA descriptor of the first weight part [n_first, ., .] (TMA)
    desc2,  # TMA descriptor of the second weight part [E - n_first, ., .] (TMA)
    ptr1,  # first weight part [n_first, ., .], expert stride stride_e
    ptr2,  # second weight part [E - n_first, ., .], expert stride stride_e
    n_first,
    expert,
    stride_e,
    TMA: tl.constexpr,
):
    """(descriptor, index in it) or (base pointer of the expert, 0) of ``expert`` in (first, second)."""
    if TMA:
        desc = desc1
        local = expert
        if expert >= n_first:
            desc = desc2
            local = expert - n_first
        return desc, local
    else:
        ptr = ptr2 + _offset(index=expert - n_first, stride=stride_e)
        if expert < n_first:
            ptr = ptr1 + _offset(index=expert, stride=stride_e)
        return ptr, 0


@triton.jit
def _load_rows(
    desc,  # TMA descriptor of the [rows, cols] operand, box [BLOCK_R, BLOCK_C] (TMA)
    ptr,  # [rows, cols] operand, column stride stride_c (not TMA)
    row0,
    row_off,
    row_ok,
    c0,
    c_end,
    stride_c,
    TMA: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """[BLOCK_R, BLOCK_C] tile of a row-major operand, columns c0..c0+BLOCK_C: rows row0.. through the
    descriptor (TMA), or rows at element offsets ``row_off`` (pointers: gathered or contiguous rows),
    zero past c_end and where ``row_ok`` is false."""
    if TMA:
        return desc.load([row0, c0])
    else:
        cs = c0 + tl.arange(0, BLOCK_C)
        ptrs = ptr + row_off[:, None] + cs[None, :] * stride_c
        return tl.load(ptrs, mask=row_ok[:, None] & (cs < c_end)[None, :], other=0.0)


@triton.jit
def _load_weight(
    w,  # TMA: descriptor of a weight part [E_part, N, K] / [E_part, K, N]; else the expert's [N, K] / [K, N]
    local,
    n0,
    k0,
    n_end,
    k_end,
    stride_n,
    stride_k,
    TMA: tl.constexpr,
    K_MAJOR: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """[BLOCK_K, BLOCK_N] tile (K rows, N columns) of one expert's weight matrix, whose storage is
    [N, K] (``K_MAJOR``, e.g. gate_up_proj in the forward) or [K, N]; zero outside [n_end, k_end)."""
    if TMA:
        if K_MAJOR:
            return w.load([local, n0, k0]).reshape(BLOCK_N, BLOCK_K).T
        else:
            return w.load([local, k0, n0]).reshape(BLOCK_K, BLOCK_N)
    else:
        ns = n0 + tl.arange(0, BLOCK_N)
        ks = k0 + tl.arange(0, BLOCK_K)
        ptrs = w + _offset(index=ns, stride=stride_n)[None, :] + _offset(index=ks, stride=stride_k)[:, None]
        return tl.load(ptrs, mask=(ns < n_end)[None, :] & (ks < k_end)[:, None], other=0.0)


@triton.jit
def _mma_k_loop(
    acc,
    acc2,
    a_desc,  # TMA descriptor of A [rows, K], box [BLOCK_M, BLOCK_K] (A_TMA)
    a_ptr,  # A [rows, K], column stride stride_ak (not A_TMA)
    a_row0,
    a_row_off,
    row_ok,
    stride_ak,
    w,  # the expert's weight, as _pick_expert gives it
    local,
    n0,
    n0_2,
    n_end,
    stride_wn,
    stride_wk,
    k_start,
    k_end,
    A_TMA: tl.constexpr,
    W_TMA: tl.constexpr,
    K_MAJOR: tl.constexpr,
    DUAL: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """acc += A[rows, k] · W_e[k, n0:n0+BLOCK_N] over k in [k_start, k_end); with ``DUAL`` also
    acc2 += A · W_e[k, n0_2:...] from the same A tile (gate and up share their input rows).

    A rows come from a descriptor at a_row0 or from the element offsets ``a_row_off`` (masked by row_ok)."""
    for k0 in range(k_start, k_end, BLOCK_K):
        a = _load_rows(
            desc=a_desc,
            ptr=a_ptr,
            row0=a_row0,
            row_off=a_row_off,
            row_ok=row_ok,
            c0=k0,
            c_end=k_end,
            stride_c=stride_ak,
            TMA=A_TMA,
            BLOCK_R=BLOCK_M,
            BLOCK_C=BLOCK_K,
        )
        b = _load_weight(
            w=w,
            local=local,
            n0=n0,
            k0=k0,
            n_end=n_end,
            k_end=k_end,
            stride_n=stride_wn,
            stride_k=stride_wk,
            TMA=W_TMA,
            K_MAJOR=K_MAJOR,
            BLOCK_N=BLOCK_N,
            BLOCK_K=BLOCK_K,
        )
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if DUAL:
            b2 = _load_weight(
                w=w,
                local=local,
                n0=n0_2,
                k0=k0,
                n_end=n_end,
                k_end=k_end,
                stride_n=stride_wn,
                stride_k=stride_wk,
                TMA=W_TMA,
                K_MAJOR=K_MAJOR,
                BLOCK_N=BLOCK_N,
                BLOCK_K=BLOCK_K,
            )
            acc2 = tl.dot(a, b2, acc2, input_precision=PRECISION)
    return acc, acc2


@triton.jit
def _row_tile_product(
    tile,
    num_m,
    num_n,
    offsets_ptr,  # [E+1] int32 first sorted row of every expert
    order_ptr,  # [E] int32 experts by descending row count
    sorted_slots_ptr,  # [N_rows] int32 slot (t·k + j) of every sorted row (GATHER_A)
    n_experts,
    top_k,
    a_desc,  # TMA descriptor of A [N_rows, K] (A_TMA)
    a_ptr,  # A [N_rows, K] sorted rows, or [T, K] token rows (GATHER_A)
    stride_ar,
    stride_ak,
    w_desc1,  # TMA descriptor of w_ptr1 (W_TMA)
    w_desc2,  # TMA descriptor of w_ptr2 (W_TMA)
    w_ptr1,  # first weight part [n_first, N, K] (K_MAJOR) or [n_first, K, N]
    w_ptr2,  # second weight part [E - n_first, ...], the strides of w_ptr1
    n_first,
    stride_we,
    stride_wn,
    stride_wk,
    n_second,
    n_end,
    k_lo,
    k_hi,
    MMA: tl.constexpr,
    GATHER_A: tl.constexpr,
    A_TMA: tl.constexpr,
    W_TMA: tl.constexpr,
    K_MAJOR: tl.constexpr,
    DUAL: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_E: tl.constexpr,
    GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Tile number ``tile`` (row tile x column tile) of a persistent row-tiled kernel: the prologue and
    the K-loop every such kernel shares.

    Returns (acc, acc2, start, row_ok, n0): the tile's expert rows start.. (row_ok: before the expert's
    end), its first column n0, and acc = A[rows] · W_e[k_lo:k_hi, n0:n0+BLOCK_N] (zero unless ``MMA``);
    with ``DUAL`` also acc2 from columns n_second + n0.. of the same weight (the up half). With
    ``GATHER_A`` A's rows are the rows' tokens (sorted slot // top_k) instead of the rows themselves."""
    pid_m, pid_n = _swizzle(tile=tile, num_m=num_m, num_n=num_n, GROUP_M=GROUP_M)
    expert, start, end = _row_tile(
        pid_m=pid_m,
        offsets_ptr=offsets_ptr,
        order_ptr=order_ptr,
        n_experts=n_experts,
        BLOCK_M=BLOCK_M,
        BLOCK_E=BLOCK_E,
    )
    rows = start + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    n0 = pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = acc
    if DUAL:
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if MMA:
        a_rows = rows
        if GATHER_A:
            a_rows = tl.load(sorted_slots_ptr + rows, mask=row_ok, other=0) // top_k
        w, local = _pick_expert(
            desc1=w_desc1,
            desc2=w_desc2,
            ptr1=w_ptr1,
            ptr2=w_ptr2,
            n_first=n_first,
            expert=expert,
            stride_e=stride_we,
            TMA=W_TMA,
        )
        acc, acc2 = _mma_k_loop(
            acc=acc,
            acc2=acc2,
            a_desc=a_desc,
            a_ptr=a_ptr,
            a_row0=start,
            a_row_off=_offset(index=a_rows, stride=stride_ar),
            row_ok=row_ok,
            stride_ak=stride_ak,
            w=w,
            local=local,
            n0=n0,
            n0_2=n_second + n0,
            n_end=n_end,
            stride_wn=stride_wn,
            stride_wk=stride_wk,
            k_start=k_lo,
            k_end=k_hi,
            A_TMA=A_TMA,
            W_TMA=W_TMA,
            K_MAJOR=K_MAJOR,
            DUAL=DUAL,
            PRECISION=PRECISION,
            BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N,
            BLOCK_K=BLOCK_K,
        )
    return acc, acc2, start, row_ok, n0


def persistent_grid(tiles_upper_bound: int, programs: int) -> tuple[int]:
    """One program per tile up to ``programs`` (SMs × CTAs per SM); each loops over the rest."""
    return (max(1, min(tiles_upper_bound, programs)),)


def row_tiles_upper_bound(n_rows: int, n_experts: int, block_m: int) -> int:
    """Most row tiles any routing of n_rows rows over n_experts can need (grids are sized by this,
    not by the actual counts, so launching needs no host sync)."""
    return min(n_rows, triton.cdiv(n_rows, block_m) + min(n_experts, n_rows))
