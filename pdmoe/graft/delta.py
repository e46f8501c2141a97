"""The arithmetic of a graft, on blocks of rows: no I/O here.

``out = round_to_output_dtype(cpt + alpha * (instruct - base))``, computed in float32, with one
rounding at the end. float32 is exact for the difference of two bf16 / fp16 tensors, so where CPT
froze a tensor (cpt == base) the sum gives back INSTRUCT's value bit for bit (METHOD.md's second
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
    alpha: float,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``alpha * (instruct - base)`` in ``dtype``, into ``out`` if given (the inputs are left alone)."""
    delta = torch.empty(instruct.shape, dtype=dtype) if out is None else out
    delta.copy_(instruct).sub_(base)
    return delta if alpha == 1.0 else delta.mul_(alpha)


def apply_delta(
    cpt: torch.Tensor, delta: torch.Tensor, out_dtype: torch.dtype, scratch: torch.Tensor | None = None
) -> torch.Tensor:
    """``cpt + delta`` rounded once to ``out_dtype``, as a new tensor; ``delta`` is left alone (it
    serves every expert); ``scratch`` (shaped and typed like ``delta``) saves an allocation."""
    return torch.add(delta, cpt, out=scratch).to(out_dtype, copy=True)
