"""Non-finite values (NaN, ±inf) in streamed tensors, found on the way, without an extra pass.

One NaN or inf in a weight spreads: upcycling copies it into every expert, grafting adds it to every
expert, and every token that meets it comes out NaN. So upcycle and graft look at each block as it
streams by. A block's sum is finite only when every element is, so the common case costs one
reduction in the block's own dtype (the fastest); a finite block whose sum overflows that dtype is
summed again in float64, then checked element by element. Counting happens only on the way to an
error.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from pdmoe.errors import Option

ALLOW_NON_FINITE = Option("allow_non_finite", True)


def all_finite(block: torch.Tensor) -> bool:
    """True when no element of ``block`` is NaN or infinite (always true for integer blocks)."""
    if not block.dtype.is_floating_point or block.numel() == 0:
        return True
    values = block if block.dtype.itemsize > 1 else block.float()  # float8 has no reductions
    if bool(torch.isfinite(values.sum())):  # in the block's own dtype: the fastest reduction
        return True
    if values.dtype != torch.float64 and bool(torch.isfinite(values.sum(dtype=torch.float64))):
        return True  # finite values whose sum overflowed a narrow dtype (float16)
    return bool(torch.isfinite(values).all())


def count_non_finite(blocks: Iterable[torch.Tensor]) -> tuple[int, int]:
    """(NaN count, infinite count) over ``blocks``."""
    nan = inf = 0
    for block in blocks:
        if block.dtype.is_floating_point:
            values = block if block.dtype.itemsize > 1 else block.float()
            nan += int(torch.isnan(values).sum())
            inf += int(torch.isinf(values).sum())
    return nan, inf


def describe_counts(nan: int, inf: int) -> str:
    return " and ".join(
        part for part in (f"{nan} NaN" if nan else "", f"{inf} infinite" if inf else "") if part
    )
