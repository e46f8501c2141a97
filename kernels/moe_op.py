"""``moe_mlp``: the expert computation of docs/method.md on fused Triton kernels, differentiable.

(The module is ``moe_op`` rather than ``moe_mlp`` so the package attribute does not shadow it.)

Pipeline (grouped_gemm.py has the GEMMs, permutation.py the expert order, rows.py the row moves):
  forward   permute → gate_up_fwd (gather + [gate|up] GEMM + SwiGLU) → grouped_gemm (down GEMM ·
            routing weight, sorted rows) → combine (each token's k rows added in a fixed order).
  backward  gather dy into sorted rows → act_bwd (dy · W_down; SwiGLU backward, y1s = s·h and
            d(topk_weight) in the epilogue) → grouped_gemm with W_gate_up, combine → d(hidden);
            gather hidden → weight_grad(dpreact, x) = dW_gate_up; weight_grad(dy, y1s) = dW_down.
  The two weight gradients and d(hidden)'s GEMM are plain ragged GEMMs; dispatch.py sends them to
  ``torch._grouped_mm`` where that is expected to be faster.

FLOPs: forward 6·T·k·H·F; backward 12·T·k·H·F (act_bwd 2, d(hidden) 4, dW_gate_up 4, dW_down 2, in
units of T·k·H·F), minus what is not asked for. Besides the GEMMs, the gathers and combines move
O(T·k·H) bytes each: 1-4 % of a training step's time (the most where H·F per expert is small).

Saved for backward, per token: the pre-activations [gate | up] (k·2F elements in the activation dtype:
k·4F bytes in bf16) and two int32 indices per slot (8k bytes); plus 8E + 4 bytes per call. Neither h,
nor the gathered inputs, nor the down projection's outputs are saved: the backward recomputes h
where it loads [gate | up] and gathers hidden and dy again (memory-bound copies). Recomputing
[gate | up] too would cost a full GEMM, a third more FLOPs, so it is kept.

Decode (T ≤ 64): an expert owns at most T rows, so one row tile of next_pow2(T) rows holds them all
(tuning.py) and each active expert's weights are streamed once; the down projection, whose output
(H) is narrow next to its K (F), is split over K into enough programs to keep HBM busy, and the
combine adds the fp32 partials in a fixed order. No launch reads anything back to the host, so the
whole call can be captured in a CUDA graph.

Ids outside [0, E) are dropped (permutation.py): such a slot adds nothing to its token's output and
gets a zero d(topk_weight).

Weights may be a ``(frozen, trainable)`` pair (see reference.py): both parts are passed to the kernels
as two descriptors or pointers, nothing is concatenated, and weight gradients are computed and
allocated only for the parts that require grad.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import triton

from . import grouped_gemm as gg
from .dispatch import input_grad_grouped_mm, use_grouped_mm, weight_grad_grouped_mm
from .permutation import Permutation, permute
from .reference import ExpertWeights, split_experts
from .rows import combine_rows, gather_rows
from .tuning import Gemm, TileConfig, bucket, get_config, split_k

Tensor = torch.Tensor


class GradSlots(NamedTuple):
    """One value per differentiable input of the op, in its argument order: whether its gradient is
    needed (bool) or the gradient (Tensor). The custom op's schema carries them as a plain list/tuple.
    (Any: a generic NamedTuple needs Python 3.11.)"""

    hidden: Any
    gate_up_first: Any
    gate_up_second: Any
    down_first: Any
    down_second: Any
    topk_weights: Any


def _experts(first: Tensor, second: Tensor | None) -> tuple[Tensor, Tensor, int, int]:
    """(first, second-or-first, n_first, E) as the kernels take them."""
    if second is None:
        return first, first, first.shape[0], first.shape[0]
    return first, second, first.shape[0], first.shape[0] + second.shape[0]


def _cfg(gemm: Gemm, n_tokens: int, like: Tensor) -> TileConfig:
    return get_config(gemm, n_tokens, like.device, like.dtype)


def forward(
    hidden: Tensor,
    gate_up_first: Tensor,
    gate_up_second: Tensor | None,
    down_first: Tensor,
    down_second: Tensor | None,
    topk_weights: Tensor,
    topk_ids: Tensor,
    save_preact: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Output [T, H], then what backward needs: pre-activations and the permutation's four tensors."""
    T, H = hidden.shape
    k = topk_ids.shape[1]
    gu1, gu2, n_first, E = _experts(gate_up_first, gate_up_second)
    d1, d2, _, _ = _experts(down_first, down_second)
    perm = permute(topk_ids, E)
    h, preact = gg.gate_up_fwd(
        hidden, gu1, gu2, n_first, E, perm, k, save_preact=save_preact, cfg=_cfg(Gemm.GATE_UP_FWD, T, hidden)
    )
    cfg = _cfg(Gemm.DOWN_FWD, T, hidden)
    n_split = 1
    if bucket(T) == "decode":
        tiles = min(E, T * k) * triton.cdiv(H, cfg.BLOCK_N)
        n_split = split_k(tiles, triton.cdiv(h.shape[1], cfg.BLOCK_K), 2, cfg, hidden.device)
    scale = topk_weights.reshape(-1)
    rows = gg.grouped_gemm(
        h, d1, d2, n_first, E, transpose_w=False, scale=scale, perm=perm, cfg=cfg, n_split=n_split
    )
    y = combine_rows(rows, perm.slot_rows, T, k, hidden.dtype)
    return y, preact, *perm


def backward(
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
    expert_order: Tensor,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients for (hidden, gate_up_first, gate_up_second, down_first, down_second, topk_weights);
    an empty tensor where ``needs`` is False (nothing is computed or allocated for it)."""
    T = hidden.shape[0]
    k = topk_weights.shape[1]
    n_rows = sorted_slots.numel()
    gu1, gu2, n_first, E = _experts(gate_up_first, gate_up_second)
    d1, d2, _, _ = _experts(down_first, down_second)
    perm = Permutation(sorted_slots, slot_rows, offsets, expert_order)
    need = GradSlots(*needs)
    need_gu = need.gate_up_first or need.gate_up_second
    need_down = need.down_first or need.down_second
    grads = GradSlots(*(hidden.new_empty(0) for _ in need))  # outputs must not alias each other
    if not any(need):
        return tuple(grads)
    dy_sorted = gather_rows(grad_out, sorted_slots, offsets, k)
    dpreact, dscale, y1s = gg.act_bwd(
        dy_sorted,
        d1,
        d2,
        n_first,
        E,
        topk_weights.reshape(-1),
        preact,
        perm,
        need_dpreact=need.hidden or need_gu,
        need_dscale=need.topk_weights,
        need_y1s=need_down,
        cfg=_cfg(Gemm.ACT_BWD, T, hidden),
    )
    if need.hidden:
        if gate_up_second is None and use_grouped_mm(Gemm.INPUT_GRAD, (dpreact, gu1), n_rows, E):
            dx_rows = input_grad_grouped_mm(dpreact, gu1, offsets)
        else:
            cfg = _cfg(Gemm.INPUT_GRAD, T, hidden)
            dx_rows = gg.grouped_gemm(
                dpreact, gu1, gu2, n_first, E, transpose_w=True, scale=None, perm=perm, cfg=cfg
            )
        grads = grads._replace(hidden=combine_rows(dx_rows, slot_rows, T, k, hidden.dtype))
    if need.topk_weights:
        valid = slot_rows >= 0
        per_slot = torch.where(valid, dscale[slot_rows.clamp(min=0).long()], 0.0)
        grads = grads._replace(topk_weights=per_slot.view(T, k).to(topk_weights.dtype))
    if need_gu:
        x_sorted = gather_rows(hidden, sorted_slots, offsets, k)
        parts = (need.gate_up_first, need.gate_up_second)
        first, second = _weight_grads(dpreact, x_sorted, perm, parts, (gu1, gu2), n_first, T)
        grads = grads._replace(gate_up_first=first, gate_up_second=second)
    if need_down:
        parts = (need.down_first, need.down_second)
        first, second = _weight_grads(dy_sorted, y1s, perm, parts, (d1, d2), n_first, T)
        grads = grads._replace(down_first=first, down_second=second)
    return tuple(grads)


def _weight_grads(
    a: Tensor,
    b: Tensor,
    perm: Permutation,
    needs: tuple[bool, bool],
    parts: tuple[Tensor, Tensor],
    n_first: int,
    n_tokens: int,
) -> tuple[Tensor, Tensor]:
    """dW = Σ_rows a^T b per expert, for the parts (first, second) that ``needs`` asks for."""
    n_rows, E = a.shape[0], perm.offsets.numel() - 1
    whole = parts[0] is parts[1]
    out = [a.new_empty(0), a.new_empty(0)]
    if whole and use_grouped_mm(Gemm.WEIGHT_GRAD, (a, b), n_rows, E):
        out[0] = weight_grad_grouped_mm(a, b, perm.offsets).to(parts[0].dtype)
        return out[0], out[1]
    cfg = _cfg(Gemm.WEIGHT_GRAD, n_tokens, a)
    for i, (base, n_local) in enumerate(((0, n_first), (n_first, E - n_first))):
        if not needs[i] or n_local == 0:
            continue
        tiles = n_local * triton.cdiv(a.shape[1], cfg.BLOCK_M) * triton.cdiv(b.shape[1], cfg.BLOCK_N)
        rows_per_expert = triton.cdiv(n_rows, E)
        n_split = split_k(tiles, triton.cdiv(rows_per_expert, cfg.BLOCK_K), 4, cfg, a.device)
        out[i] = gg.weight_grad(a, b, base, n_local, perm, out_dtype=parts[i].dtype, cfg=cfg, n_split=n_split)
    return out[0], out[1]


_moe_mlp_fwd = torch.library.custom_op("pdmoe::moe_mlp_fwd", forward, mutates_args=())
_moe_mlp_bwd = torch.library.custom_op("pdmoe::moe_mlp_bwd", backward, mutates_args=())


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
        topk_ids.new_empty(E, dtype=torch.int32),
    )


@_moe_mlp_bwd.register_fake
def _(grad_out, hidden, gate_up_first, gate_up_second, down_first, down_second, topk_weights, *rest):
    needs = GradSlots(*rest[-1])
    like = GradSlots(hidden, gate_up_first, gate_up_second, down_first, down_second, topk_weights)
    return tuple(
        torch.empty_like(t) if need else hidden.new_empty(0) for t, need in zip(like, needs, strict=True)
    )


def _setup_context(ctx, inputs, output) -> None:
    hidden, gu1, gu2, d1, d2, topk_weights, _topk_ids, _save = inputs
    _out, preact, *perm = output
    ctx.save_for_backward(hidden, gu1, gu2, d1, d2, topk_weights, preact, *perm)


def _backward(ctx, grad_out, *_unused_grads):
    needs = list(ctx.needs_input_grad[: len(GradSlots._fields)])
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
    ``(frozen, trainable)`` pair split at the same expert; topk_weights [T, k]; topk_ids [T, k] int.
    A slot whose id is outside [0, E) is dropped (contributes nothing; the reference rejects such ids,
    the kernels cannot check them without a host sync). Differentiable w.r.t. hidden, every weight part
    that requires grad, and topk_weights. Under autocast, computes in the autocast dtype like
    ``F.linear``; otherwise all dtypes must agree.
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
