"""Moving rows between token order and expert-sorted order (memory-bound copies around the GEMMs).

* ``gather_rows``: src[t] [T, H] → dst[r] = src[token of row r] [N_rows = T·k, H] for the valid rows, so
  the backward GEMMs that reduce over tokens read a contiguous operand (a gathered operand inside a
  K-loop would cap its prefetch depth).
* ``combine_rows``: out[t] = Σ_j Σ_s rows[s, slot_rows[t·k + j]] — the k expert outputs of a token (and,
  for a split-K product, its S partial sums) added in a fixed order, so the result is deterministic;
  a dropped slot (slot_rows = -1) adds nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tiles import _offset

BLOCK_ROWS = 16
BLOCK_COLS = 256


@triton.jit
def _gather_rows_kernel(
    src_ptr,  # [T, H] token rows
    dst_ptr,  # [N_rows, H] out: contiguous sorted rows
    sorted_slots_ptr,  # [N_rows] int32 slot (t·k + j) of every sorted row
    offsets_ptr,  # [E+1] int32 first sorted row of every expert
    n_experts,
    top_k,
    n_cols,
    stride_src_row,
    stride_src_col,
    stride_dst,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    ok = rows < tl.load(offsets_ptr + n_experts)
    tokens = tl.load(sorted_slots_ptr + rows, mask=ok, other=0) // top_k
    cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    mask = ok[:, None] & (cols < n_cols)[None, :]
    src_ptrs = (
        src_ptr
        + _offset(index=tokens, stride=stride_src_row)[:, None]
        + _offset(index=cols, stride=stride_src_col)[None, :]
    )
    values = tl.load(src_ptrs, mask=mask)
    tl.store(dst_ptr + _offset(index=rows, stride=stride_dst)[:, None] + cols[None, :], values, mask=mask)


@triton.jit
def _combine_rows_kernel(
    rows_ptr,  # [S, N_rows, H] sorted rows (S split-K partial sums; contiguous last dimension)
    slot_rows_ptr,  # [T·k] int32 sorted row of every slot, -1 for a dropped slot
    out_ptr,  # [T, H] out: every token's k rows added
    n_tokens,
    top_k,
    n_split,
    n_cols,
    stride_split,
    stride_row,
    stride_out,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_ok = cols < n_cols
    acc = tl.zeros((BLOCK_ROWS, BLOCK_COLS), dtype=tl.float32)
    for j in range(0, top_k):
        row = tl.load(
            slot_rows_ptr + _offset(index=tokens, stride=top_k) + j, mask=tokens < n_tokens, other=-1
        )
        mask = (row >= 0)[:, None] & col_ok[None, :]
        ptrs = rows_ptr + _offset(index=row, stride=stride_row)[:, None] + cols[None, :]
        for s in range(0, n_split):
            acc += tl.load(ptrs + _offset(index=s, stride=stride_split), mask=mask, other=0.0).to(tl.float32)
    out_ptrs = out_ptr + _offset(index=tokens, stride=stride_out)[:, None] + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(tokens < n_tokens)[:, None] & col_ok[None, :])


def gather_rows(
    src: torch.Tensor, sorted_slots: torch.Tensor, offsets: torch.Tensor, top_k: int
) -> torch.Tensor:
    """[N, H] copy of ``src`` [T, H] in expert-sorted row order (rows past offsets[E] left unwritten)."""
    n_rows, n_cols = sorted_slots.numel(), src.shape[1]
    dst = src.new_empty(n_rows, n_cols)
    if n_rows and n_cols:
        grid = (triton.cdiv(n_rows, BLOCK_ROWS), triton.cdiv(n_cols, BLOCK_COLS))
        _gather_rows_kernel[grid](
            src_ptr=src,
            dst_ptr=dst,
            sorted_slots_ptr=sorted_slots,
            offsets_ptr=offsets,
            n_experts=offsets.numel() - 1,
            top_k=top_k,
            n_cols=n_cols,
            stride_src_row=src.stride(0),
            stride_src_col=src.stride(1),
            stride_dst=dst.stride(0),
            BLOCK_ROWS=BLOCK_ROWS,
            BLOCK_COLS=BLOCK_COLS,
        )
    return dst


def combine_rows(
    rows: torch.Tensor, slot_rows: torch.Tensor, n_tokens: int, top_k: int, out_dtype: torch.dtype
) -> torch.Tensor:
    """[T, H] sums of every token's k rows of ``rows`` ([N, H], or [S, N, H] split-K partials; the
    last dimension contiguous)."""
    parts = rows if rows.dim() == 3 else rows.unsqueeze(0)
    n_split, _, n_cols = parts.shape
    out = torch.empty(n_tokens, n_cols, dtype=out_dtype, device=rows.device)
    if n_tokens and n_cols:
        grid = (triton.cdiv(n_tokens, BLOCK_ROWS), triton.cdiv(n_cols, BLOCK_COLS))
        _combine_rows_kernel[grid](
            rows_ptr=parts,
            slot_rows_ptr=slot_rows,
            out_ptr=out,
            n_tokens=n_tokens,
            top_k=top_k,
            n_split=n_split,
            n_cols=n_cols,
            stride_split=parts.stride(0),
            stride_row=parts.stride(1),
            stride_out=out.stride(0),
            BLOCK_ROWS=BLOCK_ROWS,
            BLOCK_COLS=BLOCK_COLS,
        )
    return out
