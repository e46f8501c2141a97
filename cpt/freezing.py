"""Which parameters train in each stage, and freezing the rest.

The parts a run can train (``--trainable`` overrides the stage's default with a comma list):

* ``routers``          the router of every MoE layer (``mlp.gate.weight``);
* ``new_experts``      experts n..E-1 of every MoE layer (the copies added by upcycling);
* ``original_experts`` experts 0..n-1 (the dense FFN; frozen in the method, so grafting works);
* ``non_moe``          everything else: embeddings, attention, norms, lm_head.

Stage ``cpt`` trains routers + new experts, stage ``review`` the routers only. Training the new
experts alone splits the fused expert storage so the frozen ones get no gradient and no optimizer
state (``MoEForCausalLM.freeze_original_experts``).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from pdmoe.errors import UsageError
from pdmoe.modeling import MoEForCausalLM

PARTS = ("routers", "new_experts", "original_experts", "non_moe")
STAGE_PARTS: dict[str, tuple[str, ...]] = {
    "cpt": ("routers", "new_experts"),
    "review": ("routers",),
}


def trainable_parts(stage: str, override: str | Sequence[str] | None = None) -> tuple[str, ...]:
    """The stage's default parts, or the parts of ``override`` ('routers,new_experts' or a list)."""
    if stage not in STAGE_PARTS:
        raise UsageError(f"--stage must be one of {', '.join(STAGE_PARTS)}, not {stage!r}")
    if override is None:
        return STAGE_PARTS[stage]
    parts = [p.strip() for p in override.split(",")] if isinstance(override, str) else list(override)
    parts = [p for p in parts if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise UsageError(f"--trainable takes a comma list of {', '.join(PARTS)}; got {override!r}")
    if "original_experts" in parts and "new_experts" not in parts:
        raise UsageError(
            "--trainable original_experts needs new_experts too (only a prefix of experts can be frozen)"
        )
    return tuple(p for p in PARTS if p in parts)


def apply_trainable(model: MoEForCausalLM, parts: Sequence[str]) -> list[str]:
    """Freeze everything but ``parts``; returns the names of the trainable parameters."""
    model.unfreeze_experts()
    model.requires_grad_(False)
    if "new_experts" in parts and "original_experts" not in parts:
        model.freeze_original_experts()
    moe_prefixes = tuple(f"model.layers.{index}.mlp." for index, _ in model.moe_blocks())
    for name, param in model.named_parameters():
        param.requires_grad_(_is_trainable(name, moe_prefixes, parts))
    names = [name for name, param in model.named_parameters() if param.requires_grad]
    if not names:
        raise UsageError(f"nothing to train with --trainable {','.join(parts)}")
    return names


def _is_trainable(name: str, moe_prefixes: tuple[str, ...], parts: Sequence[str]) -> bool:
    if not name.startswith(moe_prefixes):
        return "non_moe" in parts
    if name.endswith(".gate.weight"):
        return "routers" in parts
    if ".experts.trainable_" in name:  # the new experts of a split storage
        return "new_experts" in parts
    return "new_experts" in parts and "original_experts" in parts  # fused storage: all experts


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, frozen expert buffers included in the total."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen_buffers = sum(b.numel() for name, b in model.named_buffers() if ".frozen_" in name)
    return trainable, sum(p.numel() for p in model.parameters()) + frozen_buffers
