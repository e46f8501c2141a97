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

from pdmoe.errors import Option, Problem, UsageError
from pdmoe.layout import MLPKeys, MoETensor, is_trainable_expert_parameter
from pdmoe.modeling import MoEForCausalLM
from pdmoe.options import check_choice

from .settings import PARTS, Part, Stage

STAGE_PARTS: dict[Stage, tuple[Part, ...]] = {
    Stage.CPT: (Part.ROUTERS, Part.NEW_EXPERTS),
    Stage.REVIEW: (Part.ROUTERS,),
}


def parse_stage(stage: Stage | str) -> Stage:
    check_choice("stage", stage, [s.value for s in Stage])
    return Stage(stage)


def trainable_parts(stage: Stage | str, override: str | Sequence[str] | None = None) -> tuple[Part, ...]:
    """The stage's default parts, or the parts of ``override`` ('routers,new_experts' or a list)."""
    stage = parse_stage(stage)
    if override is None:
        return STAGE_PARTS[stage]
    parts = [p.strip() for p in override.split(",")] if isinstance(override, str) else list(override)
    parts = [p for p in parts if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise UsageError(
            "{option} takes a comma list of {parts}; got {override!r}",
            problem=Problem.INVALID,
            option=Option("trainable"),
            parts=", ".join(PARTS),
            override=override,
        )
    if Part.ORIGINAL_EXPERTS in parts and Part.NEW_EXPERTS not in parts:
        raise UsageError(
            "{option} needs new_experts too (only a prefix of experts can be frozen)",
            problem=Problem.INVALID,
            option=Option("trainable", Part.ORIGINAL_EXPERTS.value),
        )
    return tuple(part for part in Part if part in parts)


def apply_trainable(model: MoEForCausalLM, parts: Sequence[Part | str]) -> list[str]:
    """Freeze everything but ``parts``; returns the names of the trainable parameters."""
    model.unfreeze_experts()
    model.requires_grad_(False)
    if Part.NEW_EXPERTS in parts and Part.ORIGINAL_EXPERTS not in parts:
        model.freeze_original_experts()
    blocks = [MLPKeys.of_layer(index) for index, _ in model.moe_blocks()]
    for name, param in model.named_parameters():
        param.requires_grad_(_is_trainable(name, blocks, parts))
    names = [name for name, param in model.named_parameters() if param.requires_grad]
    if not names:
        raise UsageError(
            "nothing to train with {option}",
            problem=Problem.INVALID,
            option=Option("trainable", ",".join(parts)),
        )
    return names


def _is_trainable(name: str, blocks: list[MLPKeys], parts: Sequence[Part | str]) -> bool:
    block = next((mlp for mlp in blocks if name.startswith(mlp.block_prefix)), None)
    if block is None:
        return Part.NON_MOE in parts
    if name == block.moe(MoETensor.ROUTER):
        return Part.ROUTERS in parts
    if is_trainable_expert_parameter(name):  # the new experts of a split storage
        return Part.NEW_EXPERTS in parts
    return Part.NEW_EXPERTS in parts and Part.ORIGINAL_EXPERTS in parts  # fused storage: all experts


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
