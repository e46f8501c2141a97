"""Triton routing (counts, offsets, expert-sorted slot order and its inverse) against the torch reference."""

from __future__ import annotations

import pytest
import torch

from pdmoe.kernels.routing import route, route_reference
from pdmoe.kernels.testing import random_routing


def check(ids: torch.Tensor, n_experts: int) -> None:
    got, want = route(ids, n_experts), route_reference(ids, n_experts)
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
    [(1, 1, 1, 0), (1, 8, 2, 1), (37, 8, 2, 2), (129, 6, 3, 3), (700, 5, 2, 4)],  # 700·2 slots > one block
)
def test_route_random(T, E, k, seed):
    check(random_routing(T, E, k, generator=torch.Generator().manual_seed(seed)), E)


def test_route_all_on_one_expert_and_empty_experts_int32():
    ids = torch.full((50, 1), 3, dtype=torch.int32)
    check(ids, 7)
    got = route(ids, 7)
    assert got.offsets.tolist() == [0, 0, 0, 0, 50, 50, 50, 50]


def test_route_no_tokens():
    got = route(torch.empty(0, 2, dtype=torch.long), 4)
    assert got.offsets.tolist() == [0] * 5 and got.sorted_slots.numel() == 0
