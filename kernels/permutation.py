"""Token permutation for the grouped GEMMs: which sorted rows each expert owns, without a host sync.

Slots are the T·k (token, choice) pairs in row-major order (slot s = t·k + j). The permutation is
  * ``sorted_slots`` [N] int32 — the slots grouped by expert, in slot order inside an expert (stable);
    only the first ``offsets[E]`` entries are meaningful,
  * ``slot_rows``    [N] int32 — the sorted row of every slot, -1 for a dropped slot,
  * ``offsets``      [E+1] int32 — where each expert's rows start (exclusive prefix sum of the counts),
  * ``expert_order`` [E] int32 — the experts by descending row count (ties by id): the order in which
    the grouped GEMMs hand out tiles, so the longest work starts first.
A slot whose id lies outside [0, E) is dropped: it gets no row and contributes nothing (the
"no expert" marker of expert-parallel routing, or bad input the kernels cannot check without a sync).

Three launches, all with grids fixed by T·k, so a decode step can be captured in a CUDA graph:
  1. histogram — per block of BLOCK slots, the slot count of every expert;
  2. scan      — one program: per-expert totals → offsets and expert_order; per (block, expert) the
                 first row it writes (exclusive prefix over blocks);
  3. scatter   — per block, each slot's rank among the earlier slots of its expert in the block,
                 giving its row; writes sorted_slots and slot_rows.
O(T·k·(BLOCK + E/BLOCK)) work in total, with no pass that scans all slots per expert.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .reference import sort_by_expert

BLOCK = 128  # slots per program of the histogram and the scatter (rank is an O(BLOCK²) compare)
SCAN_CHUNK = 32  # blocks per step of the one-program scan


class Permutation(NamedTuple):
    """Expert-grouped order of the T·k slots (see the module docstring)."""

    sorted_slots: torch.Tensor
    slot_rows: torch.Tensor
    offsets: torch.Tensor
    expert_order: torch.Tensor


@triton.jit
def _valid_ids(
    ids_ptr,  # [T·k] int expert id of every slot
    offs,
    n_slots,
    n_experts,
):
    """The block's expert ids as int32, -1 where the slot is past the end or its id outside [0, E)."""
    ids = tl.load(ids_ptr + offs, mask=offs < n_slots, other=-1)
    valid = (offs < n_slots) & (ids >= 0) & (ids < n_experts)  # compared before any narrowing cast
    return tl.where(valid, ids, -1).to(tl.int32)


@triton.jit
def _histogram_kernel(
    ids_ptr,  # [T·k] int expert id of every slot
    counts_ptr,  # [n_blocks, BLOCK_E] int32 out: slots per (block, expert)
    n_slots,
    n_experts,
    BLOCK: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    block = tl.program_id(0)
    ids = _valid_ids(
        ids_ptr=ids_ptr, offs=block * BLOCK + tl.arange(0, BLOCK), n_slots=n_slots, n_experts=n_experts
    )
    counts = tl.histogram(tl.maximum(ids, 0), BLOCK_E, mask=ids >= 0)
    tl.store(counts_ptr + block * BLOCK_E + tl.arange(0, BLOCK_E), counts)


@triton.jit
def _scan_kernel(
    counts_ptr,  # [n_blocks, BLOCK_E] int32 slots per (block, expert)
    block_rows_ptr,  # [n_blocks, BLOCK_E] int32 out: first sorted row of every (block, expert)
    offsets_ptr,  # [E+1] int32 out: first sorted row of every expert
    order_ptr,  # [E] int32 out: experts by descending row count
    n_blocks,
    n_experts,
    CHUNK: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    lane = tl.arange(0, BLOCK_E)
    totals = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for b0 in range(0, n_blocks, CHUNK):
        blocks = b0 + tl.arange(0, CHUNK)
        grid = blocks[:, None] * BLOCK_E + lane[None, :]
        totals += tl.sum(tl.load(counts_ptr + grid, mask=(blocks < n_blocks)[:, None], other=0), axis=0)
    inclusive = tl.cumsum(totals, axis=0)
    tl.store(offsets_ptr + 1 + lane, inclusive, mask=lane < n_experts)
    tl.store(offsets_ptr + lane, 0, mask=lane == 0)
    # Experts by descending count, ties by id: sort (count, -id) keys, largest first.
    keys = tl.where(lane < n_experts, totals.to(tl.int64) * BLOCK_E + (BLOCK_E - 1 - lane), -1)
    ranked = tl.sort(keys, descending=True)
    tl.store(order_ptr + lane, (BLOCK_E - 1 - ranked % BLOCK_E).to(tl.int32), mask=lane < n_experts)
    running = inclusive - totals
    for b0 in range(0, n_blocks, CHUNK):
        blocks = b0 + tl.arange(0, CHUNK)
        grid = blocks[:, None] * BLOCK_E + lane[None, :]
        ok = (blocks < n_blocks)[:, None]
        counts = tl.load(counts_ptr + grid, mask=ok, other=0)
        tl.store(block_rows_ptr + grid, running[None, :] + tl.cumsum(counts, axis=0) - counts, mask=ok)
        running += tl.sum(counts, axis=0)


@triton.jit
def _scatter_kernel(
    ids_ptr,  # [T·k] int expert id of every slot
    block_rows_ptr,  # [n_blocks, BLOCK_E] int32 first sorted row of every (block, expert)
    sorted_slots_ptr,  # [T·k] int32 out: slot of every sorted row
    slot_rows_ptr,  # [T·k] int32 out: sorted row of every slot, -1 for a dropped slot
    n_slots,
    n_experts,
    BLOCK: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    block = tl.program_id(0)
    lane = tl.arange(0, BLOCK)
    offs = block * BLOCK + lane
    ids = _valid_ids(ids_ptr=ids_ptr, offs=offs, n_slots=n_slots, n_experts=n_experts)
    earlier_same = (ids[:, None] == ids[None, :]) & (lane[None, :] < lane[:, None])
    rank = tl.sum(earlier_same.to(tl.int32), axis=1)
    valid = ids >= 0
    first = tl.load(block_rows_ptr + block * BLOCK_E + tl.maximum(ids, 0), mask=valid, other=0)
    rows = tl.where(valid, first + rank, -1)
    tl.store(sorted_slots_ptr + rows, offs, mask=valid)
    tl.store(slot_rows_ptr + offs, rows, mask=offs < n_slots)


def permute(topk_ids: torch.Tensor, n_experts: int) -> Permutation:
    """Expert-grouped slot order of ``topk_ids`` [T, k] (Triton, no host sync; see module docstring)."""
    ids = topk_ids.reshape(-1)
    if not ids.is_contiguous():
        ids = ids.contiguous()
    n_slots, device = ids.numel(), ids.device
    block_e = max(16, triton.next_power_of_2(n_experts))
    n_blocks = triton.cdiv(n_slots, BLOCK)
    offsets = torch.empty(n_experts + 1, dtype=torch.int32, device=device)
    order = torch.empty(n_experts, dtype=torch.int32, device=device)
    sorted_slots = torch.empty(n_slots, dtype=torch.int32, device=device)
    slot_rows = torch.empty(n_slots, dtype=torch.int32, device=device)
    counts = torch.empty(n_blocks, block_e, dtype=torch.int32, device=device)
    block_rows = torch.empty_like(counts)
    if n_blocks:
        _histogram_kernel[(n_blocks,)](
            ids_ptr=ids, counts_ptr=counts, n_slots=n_slots, n_experts=n_experts, BLOCK=BLOCK, BLOCK_E=block_e
        )
    _scan_kernel[(1,)](
        counts_ptr=counts,
        block_rows_ptr=block_rows,
        offsets_ptr=offsets,
        order_ptr=order,
        n_blocks=n_blocks,
        n_experts=n_experts,
        CHUNK=SCAN_CHUNK,
        BLOCK_E=block_e,
    )
    if n_blocks:
        _scatter_kernel[(n_blocks,)](
            ids_ptr=ids,
            block_rows_ptr=block_rows,
            sorted_slots_ptr=sorted_slots,
            slot_rows_ptr=slot_rows,
            n_slots=n_slots,
            n_experts=n_experts,
            BLOCK=BLOCK,
            BLOCK_E=block_e,
        )
    return Permutation(sorted_slots, slot_rows, offsets, order)


def permute_reference(topk_ids: torch.Tensor, n_experts: int) -> Permutation:
    """The same tensors with a stable argsort (PyTorch, ids in [0, E))."""
    order, counts = sort_by_expert(topk_ids.reshape(-1), n_experts)
    slot_rows = torch.empty_like(order)
    slot_rows[order] = torch.arange(order.numel(), device=order.device)
    offsets = torch.nn.functional.pad(torch.cumsum(counts, 0), (1, 0))
    expert_order = torch.argsort(-counts, stable=True)
    return Permutation(order.int(), slot_rows.int(), offsets.int(), expert_order.int())
