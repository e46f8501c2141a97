"""Triton token permutation (offsets, expert order, expert-sorted slot order and its inverse) against
the torch reference, including slots whose expert id is out of range (dropped)."""

from __future__ import annotations

import pytest
import torch

from pdmoe.kernels.permutation import BLOCK, permute, permute_reference
from pdmoe.kernels.testing import random_routing


def check(ids: torch.Tensor, n_experts: int) -> None:
    got, want = permute(ids, n_experts), permute_reference(ids, n_experts)
    for name in got._fields:
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    n = ids.numel()
    # The inverse really is the inverse, and rows are grouped by expert in slot order.
    assert torch.equal(got.sorted_slots[got.slot_rows.long()], torch.arange(n, dtype=torch.int32))
    assert torch.equal(
        ids.reshape(-1)[got.sorted_slots.long()].long(), ids.reshape(-1).long().sort(stable=True).values
    )


@pytest.mark.parametrize(
    ("T", "E", "k", "seed"),
    # 700·2 slots span eleven blocks; E = 40 is no power of two.
    [(1, 1, 1, 0), (1, 8, 2, 1), (37, 8, 2, 2), (129, 6, 3, 3), (700, 5, 2, 4), (300, 40, 4, 5)],
)
def test_permute_random(T, E, k, seed):
    check(random_routing(T, E, k, generator=torch.Generator().manual_seed(seed)), E)


def test_permute_all_on_one_expert_and_empty_experts_int32():
    ids = torch.full((3 * BLOCK + 5, 1), 3, dtype=torch.int32)
    check(ids, 7)
    got = permute(ids, 7)
    assert got.offsets.tolist() == [0, 0, 0, 0, ids.numel()] + [ids.numel()] * 3
    assert got.expert_order.tolist() == [3, 0, 1, 2, 4, 5, 6]


def test_expert_order_is_by_descending_count_then_id():
    ids = torch.tensor([[2], [0], [2], [1], [0], [3], [2]])  # counts 2, 1, 3, 1
    assert permute(ids, 4).expert_order.tolist() == [2, 0, 1, 3]


def test_permute_no_tokens():
    got = permute(torch.empty(0, 2, dtype=torch.long), 4)
    assert got.offsets.tolist() == [0] * 5 and got.sorted_slots.numel() == 0
    assert got.expert_order.tolist() == [0, 1, 2, 3]


def test_out_of_range_ids_are_dropped():
    """Ids outside [0, E) (negative, E, and int64 values that would wrap to a valid int32) get no
    row: the permutation of the valid slots alone, and slot_rows = -1 for the dropped ones."""
    ids = random_routing(300, 6, 2, generator=torch.Generator().manual_seed(6))
    bad = torch.zeros_like(ids, dtype=torch.bool)
    bad[::7, 0] = True
    bad[3::11, 1] = True
    ids = ids.masked_fill(bad, 6)
    ids[5, 0], ids[9, 1], ids[13, 0] = -1, 2**32 + 1, -(2**40)
    bad[5, 0] = bad[9, 1] = bad[13, 0] = True
    got = permute(ids, 6)
    flat_bad = bad.reshape(-1)
    valid_slots = torch.nonzero(~flat_bad).squeeze(1)
    want = permute_reference(ids.reshape(-1)[valid_slots], 6)
    n_valid = valid_slots.numel()
    assert torch.equal(got.offsets, want.offsets) and got.offsets[-1] == n_valid
    assert torch.equal(got.expert_order, want.expert_order)
    assert torch.equal(got.sorted_slots[:n_valid].long(), valid_slots[want.sorted_slots.long()])
    assert (got.slot_rows[flat_bad] == -1).all()
    assert torch.equal(got.slot_rows[valid_slots], want.slot_rows)
