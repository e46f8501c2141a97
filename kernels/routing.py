"""Token permutation for the grouped GEMMs: which rows each expert owns, without a host sync.

Slots are the T·k (token, choice) pairs in row-major order (slot s = t·k + j). Routing produces
  * ``sorted_slots`` [N] int32 — the slots grouped by expert, in slot order inside an expert (stable),
  * ``slot_rows``    [N] int32 — its inverse: the sorted row of every slot,
  * ``offsets``      [E+1] int32 — where each expert's rows start (exclusive prefix sum of the counts).

Two tiny Triton kernels, both with grids fixed by (E,) so a decode step can be captured in a CUDA
graph: one counts the slots of every expert, one turns counts into offsets and writes each expert's
slots at ``offsets[e] + rank`` (the rank from a running ``tl.cumsum``). Nothing here reads a value back
to the host; the grouped GEMMs launch an upper-bound grid (``max_row_tiles``) and let programs past
the last real tile exit, which is the one place a host sync (``offsets[-1].item()``) would otherwise be
needed. Work is O(E·N) integer reads, negligible next to the GEMMs for the E ≤ 256 of real MoEs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .reference import sort_by_expert


class Routing(NamedTuple):
    """Expert-grouped order of the T·k slots (see the module docstring)."""

    sorted_slots: torch.Tensor
    slot_rows: torch.Tensor
    offsets: torch.Tensor


@triton.jit
def _count_kernel(ids_ptr, counts_ptr, n_slots, BLOCK: tl.constexpr):
    expert = tl.program_id(0)
    total = tl.zeros((), dtype=tl.int32)
    for start in range(0, n_slots, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ids = tl.load(ids_ptr + offs, mask=offs < n_slots, other=-1)
        total += tl.sum((ids == expert).to(tl.int32), axis=0)
    tl.store(counts_ptr + expert, total)


@triton.jit
def _place_kernel(
    ids_ptr,
    counts_ptr,
    offsets_ptr,
    sorted_slots_ptr,
    slot_rows_ptr,
    n_slots,
    n_experts,
    BLOCK: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    expert = tl.program_id(0)
    e_idx = tl.arange(0, BLOCK_E)
    counts = tl.load(counts_ptr + e_idx, mask=e_idx < n_experts, other=0)
    inclusive = tl.cumsum(counts, axis=0)
    if expert == 0:
        tl.store(offsets_ptr, 0)
        tl.store(offsets_ptr + 1 + e_idx, inclusive, mask=e_idx < n_experts)
    row = tl.sum(tl.where(e_idx < expert, counts, 0), axis=0)
    for start in range(0, n_slots, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ids = tl.load(ids_ptr + offs, mask=offs < n_slots, other=-1)
        mine = (ids == expert).to(tl.int32)
        rows = row + tl.cumsum(mine, axis=0) - 1
        tl.store(sorted_slots_ptr + rows, offs, mask=mine != 0)
        tl.store(slot_rows_ptr + offs, rows, mask=mine != 0)
        row += tl.sum(mine, axis=0)


def route(topk_ids: torch.Tensor, n_experts: int) -> Routing:
    """Expert-grouped slot order of ``topk_ids`` [T, k] (ids in [0, E)) with Triton, no host sync."""
    ids = topk_ids.reshape(-1)
    if not ids.is_contiguous():
        ids = ids.contiguous()
    n_slots = ids.numel()
    counts = torch.empty(n_experts, dtype=torch.int32, device=ids.device)
    offsets = torch.empty(n_experts + 1, dtype=torch.int32, device=ids.device)
    sorted_slots = torch.empty(n_slots, dtype=torch.int32, device=ids.device)
    slot_rows = torch.empty(n_slots, dtype=torch.int32, device=ids.device)
    block = min(1024, max(16, triton.next_power_of_2(n_slots)))
    _count_kernel[(n_experts,)](ids, counts, n_slots, BLOCK=block)
    _place_kernel[(n_experts,)](
        ids,
        counts,
        offsets,
        sorted_slots,
        slot_rows,
        n_slots,
        n_experts,
        BLOCK=block,
        BLOCK_E=triton.next_power_of_2(n_experts),
    )
    return Routing(sorted_slots, slot_rows, offsets)


def route_reference(topk_ids: torch.Tensor, n_experts: int) -> Routing:
    """The same three tensors with a stable argsort (PyTorch)."""
    order, counts = sort_by_expert(topk_ids.reshape(-1), n_experts)
    slot_rows = torch.empty_like(order)
    slot_rows[order] = torch.arange(order.numel(), device=order.device)
    offsets = torch.nn.functional.pad(torch.cumsum(counts, 0), (1, 0))
    return Routing(order.int(), slot_rows.int(), offsets.int())
