"""Which implementation runs each plain ragged GEMM: pdmoe's Triton kernel or ``torch._grouped_mm``.

Two GEMMs of the backward have no fused prologue or epilogue, so a library grouped GEMM can run them
as they are, on the same sorted-row operands:
  * weight gradients, dW_e = A_e^T B_e with K = the expert's rows (``_grouped_mm`` 2D x 2D, offsets
    along K);
  * d(hidden) before the combine, dA_e = dpreact_e · W_gate_up,e (``_grouped_mm`` 2D x 3D, offsets
    along M).
On Hopper ``_grouped_mm`` is a CUTLASS kernel that Triton 3.x does not match on every count
(warp-specialised producer/consumer warps, TMA for every operand, persistent tile scheduling);
it needs bf16, 16-byte aligned strides, one weight tensor (not a frozen/trainable pair: it cannot
skip the frozen experts' rows without a host sync) and long enough K or M per expert to amortise
its per-group set-up. Where any of that fails, or on another GPU, pdmoe's kernel runs.

``GROUPED_MM_RULES`` is the one place to retune: per plain GEMM (the fused ones are not in it), the
smallest average number of rows per expert (T·k/E) from which ``_grouped_mm`` is used, ``None`` for
never. The starting points below are not measured: 256 rows is where a 128x128 tile's K-loop (weight
gradients) or a 128-row M tile (d(hidden)) is long enough that pipeline fill and per-group set-up stop
dominating.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tiles import _offset
from .tuning import Gemm

GROUPED_MM_RULES: dict[Gemm, int | None] = {
    Gemm.WEIGHT_GRAD: 256,
    Gemm.INPUT_GRAD: 256,
}


def _aligned(t: torch.Tensor) -> bool:
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all(s * size % 16 == 0 for s in t.stride() if s != 1)


def use_grouped_mm(gemm: Gemm, operands: tuple[torch.Tensor, ...], rows: int, n_experts: int) -> bool:
    """Whether ``gemm`` on ``operands`` (bf16 CUDA tensors, whole weights) goes to ``torch._grouped_mm``."""
    min_rows = GROUPED_MM_RULES[gemm]
    first = operands[0]
    return (
        min_rows is not None
        and hasattr(torch, "_grouped_mm")
        and first.is_cuda
        and torch.cuda.get_device_capability(first.device) >= (9, 0)
        and all(t.dtype == torch.bfloat16 and _aligned(t) for t in operands)
        and rows >= min_rows * n_experts
    )


@triton.jit
def _zero_empty_experts_kernel(
    out_ptr,  # [E, M, N] dW, contiguous: zeroed where an expert has no rows
    offsets_ptr,  # [E+1] int32 first sorted row of every expert
    per_expert,
    BLOCK: tl.constexpr,
):
    expert = tl.program_id(1)
    if tl.load(offsets_ptr + expert + 1) == tl.load(offsets_ptr + expert):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        zeros = tl.zeros((BLOCK,), dtype=out_ptr.dtype.element_ty)
        tl.store(out_ptr + _offset(index=expert, stride=per_expert) + offs, zeros, mask=offs < per_expert)


def weight_grad_grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """[E, M, N] with dW_e = a[rows of e]^T b[rows of e] for sorted-row a [N_rows, M] and b [N_rows, N].

    An expert without rows gets exact zeros from a kernel that writes only those experts' slices (its
    other programs stop after reading two offsets): a grouped GEMM whose K is empty for a group can
    leave that group's output unwritten (reported for CUTLASS's sm_100 grouped GEMM, NVIDIA/cutlass
    issue 2674), and no host sync may ask which experts are empty."""
    out = torch._grouped_mm(a.t(), b, offs=offsets[1:])
    n_experts, per_expert = out.shape[0], out[0].numel()
    if n_experts and per_expert:
        block = 4096
        _zero_empty_experts_kernel[(triton.cdiv(per_expert, block), n_experts)](
            out_ptr=out, offsets_ptr=offsets, per_expert=per_expert, BLOCK=block
        )
    return out


def input_grad_grouped_mm(a: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """[N_rows, N] with row r of expert e = a[r] · weight[e] for sorted-row a [N_rows, K], weight [E, K, N]
    (rows past the last expert's are not written)."""
    return torch._grouped_mm(a, weight, offs=offsets[1:])
