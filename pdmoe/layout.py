"""The tensor names of dense and MoE checkpoints, as data: the one place that spells them.

A decoder layer's MLP lives under a prefix (``model.layers.3.mlp``). In a dense checkpoint it holds
three projections; in pdmoe's MoE checkpoint (docs/method.md's on-disk contract, transformers' fused
expert layout) a router and two fused expert tensors:

    {mlp}.gate_proj.weight  [F, H]        {mlp}.gate.weight               [E, H]      router
    {mlp}.up_proj.weight    [F, H]        {mlp}.experts.gate_up_proj      [E, 2F, H]  [gate; up] per expert
    {mlp}.down_proj.weight  [H, F]        {mlp}.experts.down_proj         [E, H, F]

Upcycling, grafting, freezing, the demo's checks and exports all read names from here, so a new
key is added once: a member of ``DenseProjection`` or ``MoETensor`` and, for a fused tensor, its
entry in ``FUSED_FROM``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

LAYERS_PREFIX = "model.layers"


class DenseProjection(Enum):
    """The projections of a dense SwiGLU MLP; the value is the module name."""

    GATE = "gate_proj"
    UP = "up_proj"
    DOWN = "down_proj"


class MoETensor(Enum):
    """The tensors of an MoE block; the value is the key below the MLP prefix."""

    ROUTER = "gate.weight"
    GATE_UP = "experts.gate_up_proj"
    DOWN = "experts.down_proj"

    @property
    def attribute(self) -> str:
        """The attribute of the experts module that holds a fused tensor (``gate_up_proj``)."""
        return self.value.rsplit(".", 1)[-1]


# Each expert's slice of a fused tensor is these dense projections concatenated along its rows.
FUSED_FROM: dict[MoETensor, tuple[DenseProjection, ...]] = {
    MoETensor.GATE_UP: (DenseProjection.GATE, DenseProjection.UP),
    MoETensor.DOWN: (DenseProjection.DOWN,),
}
FUSED_EXPERT_TENSORS = tuple(FUSED_FROM)

# While the original experts are frozen for CPT, the experts module holds each fused tensor as two
# Parameters: ``frozen_<attribute>`` (experts 0..n-1, no gradient) and ``trainable_<attribute>``
# (the rest). The state dict shows the fused tensor unless a trainer asks for these (see experts.py).
FROZEN_PREFIX = "frozen_"
TRAINABLE_PREFIX = "trainable_"

# Embedding-like tensors: one row per token id, so their rows may grow with the vocabulary.
VOCABULARY_TENSOR = re.compile(r"(^|\.)(embed_tokens|lm_head|wte|word_embeddings|embed_out)\.weight$")
EMBED_TOKENS = "embed_tokens.weight"  # key suffixes (``model.embed_tokens.weight``)
LM_HEAD = "lm_head.weight"

_DENSE = re.compile(rf"^(?P<mlp>.+)\.(?P<part>{'|'.join(p.value for p in DenseProjection)})\.weight$")
_MOE = re.compile(rf"^(?P<mlp>.+)\.(?P<part>{'|'.join(re.escape(t.value) for t in MoETensor)})$")
_LAYER = re.compile(rf"^{re.escape(LAYERS_PREFIX)}\.(\d+)\.")


@dataclass(frozen=True)
class MLPKeys:
    """The keys of one MLP (dense or MoE) below its prefix, e.g. ``model.layers.3.mlp``."""

    prefix: str

    @classmethod
    def of_layer(cls, layer: int) -> MLPKeys:
        return cls(f"{LAYERS_PREFIX}.{layer}.mlp")

    @property
    def layer(self) -> int | None:
        """The decoder layer index, when the prefix is the standard ``model.layers.N.mlp``."""
        return layer_index(f"{self.prefix}.")

    def dense(self, projection: DenseProjection) -> str:
        return f"{self.prefix}.{projection.value}.weight"

    def moe(self, tensor: MoETensor) -> str:
        return f"{self.prefix}.{tensor.value}"

    def fused_sources(self, tensor: MoETensor) -> tuple[str, ...]:
        """The dense keys whose rows, concatenated, form each expert's slice of ``tensor``."""
        return tuple(self.dense(projection) for projection in FUSED_FROM[tensor])

    @property
    def block_prefix(self) -> str:
        """Prefix of every parameter of the block (``model.layers.3.mlp.``)."""
        return f"{self.prefix}."


def layer_index(name: str) -> int | None:
    """The decoder layer a tensor belongs to (``model.layers.3.…`` -> 3), or None."""
    match = _LAYER.match(name)
    return int(match.group(1)) if match else None


def match_dense(name: str) -> tuple[MLPKeys, DenseProjection] | None:
    """``(mlp, projection)`` when ``name`` is a dense MLP projection weight."""
    match = _DENSE.match(name)
    return (MLPKeys(match["mlp"]), DenseProjection(match["part"])) if match else None


def match_moe(name: str) -> tuple[MLPKeys, MoETensor] | None:
    """``(mlp, tensor)`` when ``name`` is a router or fused expert tensor of an MoE block."""
    match = _MOE.match(name)
    return (MLPKeys(match["mlp"]), MoETensor(match["part"])) if match else None


def frozen_attribute(tensor: MoETensor) -> str:
    return FROZEN_PREFIX + tensor.attribute


def trainable_attribute(tensor: MoETensor) -> str:
    return TRAINABLE_PREFIX + tensor.attribute


def is_frozen_expert_parameter(name: str) -> bool:
    """A parameter name (``...experts.frozen_gate_up_proj``) holding the frozen experts of a split."""
    return any(name.endswith(f".{frozen_attribute(tensor)}") for tensor in FUSED_EXPERT_TENSORS)


def is_trainable_expert_parameter(name: str) -> bool:
    """A parameter name (``...experts.trainable_gate_up_proj``) holding the new experts of a split."""
    return any(name.endswith(f".{trainable_attribute(tensor)}") for tensor in FUSED_EXPERT_TENSORS)
