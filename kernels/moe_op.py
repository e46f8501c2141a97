"""``moe_mlp``: the expert computation of METHOD.md on fused Triton kernels, differentiable.

(The module is ``moe_op`` rather than ``moe_mlp`` so the package attribute does not shadow it.)

Pipeline (grouped_gemm.py has the kernels, routing.py the permutation):
  forward   route → gate_up_fwd (gather + [gate|up] GEMM + SwiGLU) → scatter_gemm (down GEMM ·
            routing weight, scattered to slot order) → sum of each token's k slot rows (no atomics).
  backward  act_bwd (gathered dy · W_down, SwiGLU backward and d(topk_weight) in the epilogue)
            → scatter_gemm with W_gate_up for d(hidden) → weight_grad per expert for both weights.

Saved for backward, per token: the pre-activations [gate | up] (k·2F elements in the activation
dtype: k·4F bytes in bf16, 114,688 B for F = 14336, k = 2) and two int32 indices per slot (8k bytes);
plus 4(E+1) bytes per call. The gathered inputs, h = silu(g)·u, the down projection's per-slot
outputs are never saved: h is recomputed where the backward kernels load it (elementwise, free next
to the GEMMs); hidden, the weights and the routing weights are the op's inputs (no extra memory).
Recomputing [gate | up] too would cost a third more FLOPs (a full GEMM), so it is kept.

Decode (T ≤ 64): each token's k experts are distinct, so an expert owns at most T rows and a row tile
of next_pow2(T) rows holds them all (tuning.py); narrow N tiles with a wide K then give about one
program per (active expert, N tile), and the step streams each active expert's weights exactly once.
The row-tile grid is bounded by the number of slots and nothing syncs with the host, so the whole
call can be captured in a CUDA graph.

Weights may be a ``(frozen, trainable)`` pair (see reference.py): both parts are passed to the kernels
as two pointers, nothing is concatenated, and weight gradients are computed and allocated only for the
parts that require grad.
"""

from __future__ import annotations

import torch

from . import grouped_gemm as gg
from .reference import ExpertWeights, split_experts
from .routing import route
from .tuning import get_config

Tensor = torch.Tensor


def _experts(first: Tensor, second: Tensor | None) -> tuple[Tensor, Tensor, int, int]:
    """(first, second-or-first, n_first, E) as the kernels take them."""
    if second is None:
        return first, first, first.shape[0], first.shape[0]
    return first, second, first.shape[0], first.shape[0] + second.shape[0]


def _cfg(kernel: str, n_tokens: int, like: Tensor) -> dict:
    return get_config(kernel, n_tokens, like.device, like.dtype)


@torch.library.custom_op("pdmoe::moe_mlp_fwd", mutates_args=())
def _moe_mlp_fwd(
    hidden: Tensor,
    gate_up_first: Tensor,
    gate_up_second: Tensor | None,
    down_first: Tensor,
    down_second: Tensor | None,
    topk_weights: Tensor,
    topk_ids: Tensor,
    save_preact: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Output [T, H], then what backward needs: pre-activations, sorted slots, slot rows, offsets."""
    T, H = hidden.shape
    k = topk_ids.shape[1]
    gu1, gu2, n_first, E = _experts(gate_up_first, gate_up_second)
    d1, d2, _, _ = _experts(down_first, down_second)
    routing = route(topk_ids, E)
    h, preact = gg.gate_up_fwd(
        hidden,
        gu1,
        gu2,
        n_first,
        E,
        routing.sorted_slots,
        routing.offsets,
        k,
        save_preact,
        _cfg("gate_up_fwd", T, hidden),
    )
    y = gg.scatter_gemm(
        h,
        d1,
        d2,
        n_first,
        E,
        False,
        topk_weights.reshape(-1),
        routing.sorted_slots,
        routing.offsets,
        _cfg("scatter_gemm", T, hidden),
    )
    return y.view(T, k, H).sum(dim=1), preact, routing.sorted_slots, routing.slot_rows, routing.offsets


@_moe_mlp_fwd.register_fake
def _(hidden, gate_up_first, gate_up_second, down_first, down_second, topk_weights, topk_ids, save_preact):
    n_slots = topk_ids.numel()
    E = _experts(gate_up_first, gate_up_second)[3]
    two_f = gate_up_first.shape[1]
    index = topk_ids.new_empty(n_slots, dtype=torch.int32)
    return (
        hidden.new_empty(hidden.shape),
        hidden.new_empty(n_slots if save_preact else 0, two_f),
        index,
        torch.empty_like(index),
        topk_ids.new_empty(E + 1, dtype=torch.int32),
    )


@torch.library.custom_op("pdmoe::moe_mlp_bwd", mutates_args=())
def _moe_mlp_bwd(
    grad_out: Tensor,
    hidden: Tensor,
    gate_up_first: Tensor,
    gate_up_second: Tensor | None,
    down_first: Tensor,
    down_second: Tensor | None,
    topk_weights: Tensor,
    preact: Tensor,
    sorted_slots: Tensor,
    slot_rows: Tensor,
    offsets: Tensor,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients for (hidden, gate_up_first, gate_up_second, down_first, down_second, topk_weights);
    an empty tensor where ``needs`` is False (nothing is computed or allocated for it)."""
    T, H = hidden.shape
    k = topk_weights.shape[1]
    gu1, gu2, n_first, E = _experts(gate_up_first, gate_up_second)
    d1, d2, _, _ = _experts(down_first, down_second)
    need_x, need_gu1, need_gu2, need_w = needs[0], needs[1], needs[2], needs[5]
    scale = topk_weights.reshape(-1)
    grads = [hidden.new_empty(0) for _ in range(6)]  # outputs must not alias each other
    common = {"sorted_slots": sorted_slots, "offsets": offsets, "top_k": k}
    if need_x or need_gu1 or need_gu2 or need_w:
        dpreact, dscale = gg.act_bwd(
            grad_out,
            d1,
            d2,
            n_first,
            E,
            scale,
            preact,
            sorted_slots,
            offsets,
            k,
            need_w,
            _cfg("act_bwd", T, hidden),
        )
        if need_x:
            dx = gg.scatter_gemm(
                dpreact,
                gu1,
                gu2,
                n_first,
                E,
                True,
                None,
                sorted_slots,
                offsets,
                _cfg("scatter_gemm", T, hidden),
            )
            grads[0] = dx.view(T, k, H).sum(dim=1)
        if need_w:
            grads[5] = dscale[slot_rows.long()].view(T, k).to(topk_weights.dtype)
        for slot, base, n_local, weight in ((1, 0, n_first, gu1), (2, n_first, E - n_first, gu2)):
            if needs[slot]:
                grads[slot] = gg.weight_grad(
                    dpreact,
                    hidden,
                    base,
                    n_local,
                    **common,
                    a_gather=False,
                    a_scale=None,
                    b_gather=True,
                    b_swiglu=False,
                    out_dtype=weight.dtype,
                    cfg=_cfg("weight_grad", T, hidden),
                )
    for slot, base, n_local, weight in ((3, 0, n_first, d1), (4, n_first, E - n_first, d2)):
        if needs[slot]:
            grads[slot] = gg.weight_grad(
                grad_out,
                preact,
                base,
                n_local,
                **common,
                a_gather=True,
                a_scale=scale,
                b_gather=False,
                b_swiglu=True,
                out_dtype=weight.dtype,
                cfg=_cfg("weight_grad", T, hidden),
            )
    return tuple(grads)


@_moe_mlp_bwd.register_fake
def _(
    grad_out,
    hidden,
    gate_up_first,
    gate_up_second,
    down_first,
    down_second,
    topk_weights,
    preact,
    sorted_slots,
    slot_rows,
    offsets,
    needs,
):
    like = (hidden, gate_up_first, gate_up_second, down_first, down_second, topk_weights)
    return tuple(
        torch.empty_like(t) if need else hidden.new_empty(0) for t, need in zip(like, needs, strict=True)
    )


def _setup_context(ctx, inputs, output) -> None:
    hidden, gu1, gu2, d1, d2, topk_weights, _topk_ids, _save = inputs
    _out, preact, sorted_slots, slot_rows, offsets = output
    ctx.save_for_backward(hidden, gu1, gu2, d1, d2, topk_weights, preact, sorted_slots, slot_rows, offsets)


def _backward(ctx, grad_out, *_unused_grads):
    needs = list(ctx.needs_input_grad[:6])
    grads = torch.ops.pdmoe.moe_mlp_bwd(grad_out, *ctx.saved_tensors, needs)
    return (*(g if need else None for g, need in zip(grads, needs, strict=True)), None, None)


torch.library.register_autograd("pdmoe::moe_mlp_fwd", _backward, setup_context=_setup_context)


def moe_mlp(
    hidden: Tensor,
    gate_up_proj: ExpertWeights,
    down_proj: ExpertWeights,
    topk_weights: Tensor,
    topk_ids: Tensor,
) -> Tensor:
    """Fused-kernel expert MLP, same signature and result as ``moe_mlp_reference``.

    hidden [T, H]; gate_up_proj [E, 2F, H] and down_proj [E, H, F], each a tensor or a
    ``(frozen, trainable)`` pair split at the same expert; topk_weights [T, k]; topk_ids [T, k] int in
    [0, E) (the reference checks this; the kernels cannot without a host sync, so they do not).
    Differentiable w.r.t. hidden, every weight part that requires grad, and topk_weights. Under
    autocast, computes in the autocast dtype like ``F.linear``; otherwise all dtypes must agree.
    """
    gu1, gu2 = split_experts(gate_up_proj)
    d1, d2 = split_experts(down_proj)
    if (gu2 is None) != (d2 is None) or gu1.shape[0] != d1.shape[0]:
        raise ValueError("gate_up_proj and down_proj must be split at the same expert")
    if gu2 is not None and gu2.stride() != gu1.stride():
        gu1, gu2 = gu1.contiguous(), gu2.contiguous()  # the kernels share one stride set per weight
    if d2 is not None and d2.stride() != d1.stride():
        d1, d2 = d1.contiguous(), d2.contiguous()
    if hidden.dim() != 2 or topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != hidden.shape[0]:
        raise ValueError("expected hidden [T, H], topk_weights and topk_ids [T, k]")
    if torch.is_autocast_enabled(hidden.device.type):
        # Custom ops are not autocast by PyTorch: cast like F.linear would (fp32 master weights under
        # bf16 autocast); the casts are differentiable, so gradients still reach the fp32 parameters.
        amp = torch.get_autocast_dtype(hidden.device.type)
        hidden, gu1, gu2, d1, d2 = (None if t is None else t.to(amp) for t in (hidden, gu1, gu2, d1, d2))
    if any(w.dtype != hidden.dtype for w in (gu1, d1)):
        raise ValueError(f"expert weights must have the dtype of hidden ({hidden.dtype})")
    parts = (hidden, gu1, gu2, d1, d2, topk_weights)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in parts)
    return torch.ops.pdmoe.moe_mlp_fwd(hidden, gu1, gu2, d1, d2, topk_weights, topk_ids, save)[0]
