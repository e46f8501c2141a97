"""The experts of an MoE layer in the fused layout, and the choice of their implementation.

Weights are stored as on disk (docs/method.md): ``gate_up_proj`` [E, 2F, H] and ``down_proj`` [E, H, F].
For CPT the original experts can be frozen without copying anything each step: the storage is
split once into a frozen Parameter without gradient (experts 0..n-1) and a trainable Parameter (the
rest), each owning only its own experts' memory, and the expert function receives the pair. Both
are parameters so that FSDP shards and gathers the frozen part like any frozen weight.

The state dict shows the fused tensors by default, the on-disk format (``StateDictLayout.FUSED``).
Sharded training needs keys that are the module's own tensors (torch's distributed state dicts
look every key up as an attribute and gather it), so a trainer can switch to
``StateDictLayout.SPLIT`` and fuse when it writes the checkpoint (``fuse_split_experts``).

The implementation is chosen through transformers' experts interface, like any transformers MoE:
``MoEExperts.forward`` is the eager one (the PyTorch reference) and ``config._experts_implementation``
names the function that runs instead (pdmoe.kernels registers "pdmoe" and "pdmoe_auto"; both read the
frozen/trainable pair through ``expert_weights()``). pdmoe's names for the choice (``experts_impl``,
mapped in pdmoe.config): "auto" (the default: the kernels on CUDA, the reference elsewhere), "torch"
(the reference) and "triton" (the kernels), or their keys "pdmoe_auto", "eager" and "pdmoe". It is a
per-load setting (``from_pretrained(..., experts_impl=...)`` or ``experts_implementation=...``),
never in config.json.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import torch
from torch import nn
from transformers.integrations.moe import use_experts_implementation

from pdmoe.config import MoEConfig, experts_impl_name
from pdmoe.errors import UsageError
from pdmoe.kernels import moe_mlp_reference
from pdmoe.layout import FUSED_EXPERT_TENSORS, MoETensor, frozen_attribute, trainable_attribute

ExpertWeight = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class StateDictLayout(Enum):
    """What the state dict of experts with frozen originals holds."""

    FUSED = "fused"  # one [E, ...] tensor per weight, as on disk
    SPLIT = "split"  # the module's own tensors: the frozen and the trainable Parameter


@use_experts_implementation
class MoEExperts(nn.Module):
    """E SwiGLU experts: y_t = Σ_j w_tj · down_e(silu(gate_e x_t) ⊙ up_e x_t).

    Built from the model config (transformers' experts interface keeps it as ``self.config`` and reads
    ``config._experts_implementation`` at every call)."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        num_experts, hidden_size, intermediate_size = (
            config.num_experts,
            config.hidden_size,
            config.intermediate_size,
        )
        self.num_experts = num_experts
        self.num_frozen = 0
        self.state_dict_layout = StateDictLayout.FUSED
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.register_state_dict_post_hook(_fuse_state_dict)
        self.register_load_state_dict_pre_hook(_split_state_dict)

    def weights(self, tensor: MoETensor) -> ExpertWeight:
        """A fused weight, or the (frozen, trainable) pair while experts are frozen.

        The pair has one dtype: the frozen part may be held in another one (the compute dtype under
        sharded mixed precision, float32 on one process), so it follows the trainable part."""
        if self.num_frozen:
            frozen = getattr(self, frozen_attribute(tensor))
            trainable = getattr(self, trainable_attribute(tensor))
            return frozen.to(trainable.dtype), trainable
        return getattr(self, tensor.attribute)

    def expert_weights(self) -> tuple[ExpertWeight, ExpertWeight]:
        """(gate_up, down), each fused or the (frozen, trainable) pair: what the kernels read."""
        return self.weights(MoETensor.GATE_UP), self.weights(MoETensor.DOWN)

    @property
    def impl(self) -> str:
        """The experts implementation in use, by pdmoe's name where it has one."""
        return experts_impl_name(self.config._experts_implementation)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """The eager implementation: the PyTorch reference (transformers' experts call signature)."""
        gate_up, down = self.expert_weights()
        return moe_mlp_reference(hidden_states, gate_up, down, top_k_weights, top_k_index)

    def freeze_experts(self, num_frozen: int) -> None:
        """Freeze experts 0..num_frozen-1: no gradient, no optimizer state, no per-step copy for them."""
        if not 0 < num_frozen < self.num_experts:
            raise UsageError(f"can freeze 1..{self.num_experts - 1} leading experts, not {num_frozen}")
        self.unfreeze_experts()
        for tensor in FUSED_EXPERT_TENSORS:
            fused = getattr(self, tensor.attribute)
            delattr(self, tensor.attribute)
            # Copies, not views: a view would keep the whole fused storage alive beside the sharded
            # or offloaded trainable part. The fused tensor is freed when this loop lets go of it.
            frozen = nn.Parameter(fused.data[:num_frozen].clone(), requires_grad=False)
            setattr(self, frozen_attribute(tensor), frozen)
            trainable = nn.Parameter(fused.data[num_frozen:].clone(), requires_grad=fused.requires_grad)
            setattr(self, trainable_attribute(tensor), trainable)
            del fused
        self.num_frozen = num_frozen

    def unfreeze_experts(self) -> None:
        """Back to one fused Parameter per weight (one copy; done at save time, not per step)."""
        if not self.num_frozen:
            return
        for tensor in FUSED_EXPERT_TENSORS:
            frozen, trainable = self.weights(tensor)
            delattr(self, frozen_attribute(tensor))
            delattr(self, trainable_attribute(tensor))
            fused = nn.Parameter(
                torch.cat([frozen.data, trainable.data]), requires_grad=trainable.requires_grad
            )
            setattr(self, tensor.attribute, fused)
        self.num_frozen = 0

    def extra_repr(self) -> str:
        down = self.weights(MoETensor.DOWN)
        _, hidden, intermediate = (down[0] if isinstance(down, tuple) else down).shape
        return f"experts={self.num_experts}, hidden={hidden}, intermediate={intermediate}, impl={self.impl}, frozen={self.num_frozen}"


def fuse_split_experts(model: nn.Module, state_dict: dict[str, Any]) -> dict[str, Any]:
    """Replace, in a ``StateDictLayout.SPLIT`` state dict of ``model`` (full tensors, e.g. gathered
    from every rank), each frozen / trainable expert pair by the fused tensor of the on-disk format
    (in the trainable part's dtype)."""
    for prefix, module in model.named_modules():
        if isinstance(module, MoEExperts) and module.num_frozen:
            _fuse_into(module, state_dict, f"{prefix}." if prefix else "")
    return state_dict


def _fuse_into(module: MoEExperts, state_dict: dict[str, Any], prefix: str) -> None:
    for tensor in FUSED_EXPERT_TENSORS:
        key = f"{prefix}{trainable_attribute(tensor)}"
        if key not in state_dict:
            continue
        trainable = state_dict.pop(key).detach()
        frozen = state_dict.pop(f"{prefix}{frozen_attribute(tensor)}").detach()
        state_dict[f"{prefix}{tensor.attribute}"] = torch.cat(
            [frozen.to(trainable.device, trainable.dtype), trainable]
        )


def _fuse_state_dict(
    module: MoEExperts, state_dict: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    if module.num_frozen and module.state_dict_layout is StateDictLayout.FUSED:
        _fuse_into(module, state_dict, prefix)


def _split_state_dict(module: MoEExperts, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    if not module.num_frozen or module.state_dict_layout is StateDictLayout.SPLIT:
        return
    for tensor in FUSED_EXPERT_TENSORS:
        fused = state_dict.pop(f"{prefix}{tensor.attribute}", None)
        if fused is None:
            continue
        state_dict[f"{prefix}{frozen_attribute(tensor)}"] = fused[: module.num_frozen]
        state_dict[f"{prefix}{trainable_attribute(tensor)}"] = fused[module.num_frozen :]
