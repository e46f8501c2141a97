"""The arithmetic of a graft, on blocks of rows: no I/O here.

``out = round_to_output_dtype(cpt + scale * (instruct - base))``, computed in float32, with one
rounding at the end. float32 is exact for the difference of two bf16 / fp16 tensors, so where CPT
froze a tensor (cpt == base) the sum gives back INSTRUCT's value bit for bit (docs/method.md's second
invariant). Float32 inputs need float64 for that same guarantee, so they are computed in float64.
"""

from __future__ import annotations

import torch


def work_dtype(*inputs: torch.dtype) -> torch.dtype:
    """float32, or float64 when an input is already float32 / float64 (see the module docstring)."""
    return torch.float64 if any(dtype.itemsize >= 4 for dtype in inputs) else torch.float32


def param_delta(
    base: torch.Tensor,
    instruct: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    scratch: torch.Tensor,
) -> torch.Tensor:
    """``scale * (instruct - base)`` in ``out``'s dtype, into ``out`` (the inputs are left alone).

    Both operands are brought to the working dtype first (``scratch`` holds ``base``'s copy): an op
    on mixed dtypes would allocate a converted copy of its input for every block.
    """
    out.copy_(instruct).sub_(scratch.copy_(base))
    return out if scale == 1.0 else out.mul_(scale)


def apply_delta(
    cpt: torch.Tensor, delta: torch.Tensor, out: torch.Tensor, scratch: torch.Tensor
) -> torch.Tensor:
    """``cpt + delta`` rounded once to ``out``'s dtype, into ``out``; ``delta`` is left alone (it
    serves every expert); ``scratch`` (shaped and typed like ``delta``) holds the exact sum."""
    return out.copy_(scratch.copy_(cpt).add_(delta))
