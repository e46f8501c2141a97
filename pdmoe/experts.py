"""The experts of an MoE layer in the fused layout, and the switch between their implementations.

Weights are stored as on disk (METHOD.md): ``gate_up_proj`` [E, 2F, H] and ``down_proj`` [E, H, F].
For CPT the original experts can be frozen without copying anything each step: the storage is
split into a frozen buffer (experts 0..n-1) and a trainable Parameter (the rest), both views of the
same memory, and the expert function receives the pair. The state dict always shows the fused
tensors, so checkpoints and optimizers see one stable format.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pdmoe.errors import UsageError
from pdmoe.layout import FUSED_EXPERT_TENSORS, MoETensor, frozen_attribute, trainable_attribute

ExpertWeight = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
ExpertFunction = Callable[
    [torch.Tensor, ExpertWeight, ExpertWeight, torch.Tensor, torch.Tensor], torch.Tensor
]


def expert_function(impl: str, device: torch.device) -> ExpertFunction:
    """'torch' is the PyTorch reference, 'triton' the kernels, 'auto' the kernels on CUDA only."""
    from pdmoe import kernels

    if impl == "auto":
        impl = "triton" if device.type == "cuda" else "torch"
    if impl == "torch":
        return kernels.moe_mlp_reference
    if impl == "triton":
        return kernels.moe_mlp
    raise UsageError(f"unknown experts implementation {impl!r}; use 'auto', 'torch' or 'triton'")


class MoEExperts(nn.Module):
    """E SwiGLU experts: y_t = Σ_j w_tj · down_e(silu(gate_e x_t) ⊙ up_e x_t)."""

    def __init__(
        self, num_experts: int, hidden_size: int, intermediate_size: int, impl: str = "auto"
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.impl = impl
        self.num_frozen = 0
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.register_state_dict_post_hook(_fuse_state_dict)
        self.register_load_state_dict_pre_hook(_split_state_dict)

    def weights(self, tensor: MoETensor) -> ExpertWeight:
        """A fused weight, or the (frozen, trainable) pair while experts are frozen."""
        if self.num_frozen:
            return getattr(self, frozen_attribute(tensor)), getattr(self, trainable_attribute(tensor))
        return getattr(self, tensor.attribute)

    def forward(
        self, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        function = expert_function(self.impl, hidden.device)
        return function(
            hidden, self.weights(MoETensor.GATE_UP), self.weights(MoETensor.DOWN), topk_weights, topk_ids
        )

    def freeze_experts(self, num_frozen: int) -> None:
        """Freeze experts 0..num_frozen-1: no gradient, no optimizer state, no per-step copy for them."""
        if not 0 < num_frozen < self.num_experts:
            raise UsageError(f"can freeze 1..{self.num_experts - 1} leading experts, not {num_frozen}")
        self.unfreeze_experts()
        for tensor in FUSED_EXPERT_TENSORS:
            fused = getattr(self, tensor.attribute)
            delattr(self, tensor.attribute)
            self.register_buffer(frozen_attribute(tensor), fused.data[:num_frozen], persistent=False)
            trainable = nn.Parameter(fused.data[num_frozen:], requires_grad=fused.requires_grad)
            setattr(self, trainable_attribute(tensor), trainable)
        self.num_frozen = num_frozen

    def unfreeze_experts(self) -> None:
        """Back to one fused Parameter per weight (one copy; done at save time, not per step)."""
        if not self.num_frozen:
            return
        for tensor in FUSED_EXPERT_TENSORS:
            frozen, trainable = self.weights(tensor)
            delattr(self, frozen_attribute(tensor))
            delattr(self, trainable_attribute(tensor))
            fused = nn.Parameter(torch.cat([frozen, trainable.data]), requires_grad=trainable.requires_grad)
            setattr(self, tensor.attribute, fused)
        self.num_frozen = 0

    def extra_repr(self) -> str:
        down = self.weights(MoETensor.DOWN)
        _, hidden, intermediate = (down[0] if isinstance(down, tuple) else down).shape
        return f"experts={self.num_experts}, hidden={hidden}, intermediate={intermediate}, impl={self.impl}, frozen={self.num_frozen}"


def _fuse_state_dict(
    module: MoEExperts, state_dict: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    if not module.num_frozen:
        return
    for tensor in FUSED_EXPERT_TENSORS:
        frozen, trainable = module.weights(tensor)
        state_dict.pop(f"{prefix}{trainable_attribute(tensor)}", None)
        state_dict[f"{prefix}{tensor.attribute}"] = torch.cat([frozen, trainable.detach()])


def _split_state_dict(module: MoEExperts, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    if not module.num_frozen:
        return
    for tensor in FUSED_EXPERT_TENSORS:
        fused = state_dict.pop(f"{prefix}{tensor.attribute}", None)
        if fused is None:
            continue
        frozen, _ = module.weights(tensor)
        with torch.no_grad():
            frozen.copy_(fused[: module.num_frozen])
        state_dict[f"{prefix}{trainable_attribute(tensor)}"] = fused[module.num_frozen :]
