"""The dense model families pdmoe upcycles: every fact about a family in one record.

Adding a family is adding a ``Family`` to ``FAMILIES`` (and a row to README's family table, which
tests/test_families.py checks against this registry). Class names are strings, resolved only when
a model is built: the command line checks its arguments before torch or transformers load, and
commands that only read and write ``config.json`` (upcycle) never load transformers' models.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from pdmoe.errors import UsageError

if TYPE_CHECKING:
    from transformers import PreTrainedConfig, PreTrainedModel


class SlidingWindow(Enum):
    """How a family's config turns its sliding-window attention on."""

    NONE = "none"  # no window
    EVERY_LAYER = "every layer"  # ``sliding_window`` set: every layer has it (Mistral)
    PER_LAYER = "per layer"  # ``use_sliding_window``; ``layer_types`` says which layers (Qwen2, Qwen3)


@dataclass(frozen=True)
class Family:
    """One dense family: its transformers classes, its export targets, its tiny test model."""

    model_type: str  # ``model_type`` of its config.json, and pdmoe's ``base_model_type``
    title: str  # its name in help texts and messages
    config_class: str  # in ``transformers``
    modeling_module: str  # the transformers module of the classes below
    model_class: str  # the decoder stack pdmoe's MoEForCausalLM wraps
    decoder_layer_class: str
    architecture: str  # transformers' causal LM, as config.json's ``architectures`` names it
    # The ``NativeFormat`` values (pdmoe.export.formats) that compute this family's MoE exactly,
    # and why the others cannot (None: no reason recorded; the refusal then says only that).
    export_targets: tuple[str, ...]
    why_not_other_targets: str | None = None
    # Why no native MoE class computes this family with ``attention_bias=true`` (None: some does).
    attention_bias_not_exact: str | None = None
    qkv_bias: bool = False  # its attention always has q/k/v biases (Qwen2)
    sliding_window: SlidingWindow = SlidingWindow.NONE
    # Dense config values the tiny test models (pdmoe.tiny) take unless the caller overrides them.
    tiny_defaults: dict[str, Any] = field(default_factory=dict)

    def dense_config_class(self) -> type[PreTrainedConfig]:
        import transformers  # here: config classes import much of transformers' modeling code

        return getattr(transformers, self.config_class)

    def dense_model_class(self) -> type[PreTrainedModel]:
        return getattr(importlib.import_module(self.modeling_module), self.model_class)


_LLAMA_ATTENTION_BIAS = (
    "no native MoE class has Llama's attention biases (attention_bias=true, o_proj included)"
)
_NO_QK_NORMS = "Llama/Mistral attention has no q/k norms"

FAMILIES: dict[str, Family] = {
    family.model_type: family
    for family in (
        Family(
            model_type="llama",
            title="Llama",
            config_class="LlamaConfig",
            modeling_module="transformers.models.llama.modeling_llama",
            model_class="LlamaModel",
            decoder_layer_class="LlamaDecoderLayer",
            architecture="LlamaForCausalLM",
            export_targets=("mixtral", "qwen2_moe"),
            why_not_other_targets=_NO_QK_NORMS,
            attention_bias_not_exact=_LLAMA_ATTENTION_BIAS,
        ),
        Family(
            model_type="mistral",
            title="Mistral",
            config_class="MistralConfig",
            modeling_module="transformers.models.mistral.modeling_mistral",
            model_class="MistralModel",
            decoder_layer_class="MistralDecoderLayer",
            architecture="MistralForCausalLM",
            export_targets=("mixtral", "qwen2_moe"),
            why_not_other_targets=_NO_QK_NORMS,
            attention_bias_not_exact=_LLAMA_ATTENTION_BIAS,
            sliding_window=SlidingWindow.EVERY_LAYER,
        ),
        Family(
            model_type="qwen2",
            title="Qwen2",
            config_class="Qwen2Config",
            modeling_module="transformers.models.qwen2.modeling_qwen2",
            model_class="Qwen2Model",
            decoder_layer_class="Qwen2DecoderLayer",
            architecture="Qwen2ForCausalLM",
            export_targets=("qwen2_moe",),
            why_not_other_targets="Qwen2's q/k/v biases exist only in Qwen2-MoE",
            qkv_bias=True,
            sliding_window=SlidingWindow.PER_LAYER,
            tiny_defaults={"use_sliding_window": False},
        ),
        Family(
            model_type="qwen3",
            title="Qwen3",
            config_class="Qwen3Config",
            modeling_module="transformers.models.qwen3.modeling_qwen3",
            model_class="Qwen3Model",
            decoder_layer_class="Qwen3DecoderLayer",
            architecture="Qwen3ForCausalLM",
            export_targets=("qwen3_moe",),
            why_not_other_targets="Qwen3's q/k norms exist only in Qwen3-MoE",
            sliding_window=SlidingWindow.PER_LAYER,
        ),
    )
}
DEFAULT_FAMILY = "llama"  # of the tiny models and ``pdmoe demo``
FAMILY_TITLES = "/".join(family.title for family in FAMILIES.values())  # "Llama/Mistral/Qwen2/Qwen3"


def get_family(model_type: str | None) -> Family:
    """The family of ``model_type``, or a UsageError naming the supported ones."""
    if model_type not in FAMILIES:
        raise UsageError(
            f"unsupported architecture {model_type!r}; pdmoe upcycles these dense families: "
            f"{', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]
