"""The native transformers MoE classes a pdmoe checkpoint maps onto exactly, and how.

pdmoe's tensors already have the keys and fused expert layout of Mixtral, Qwen2-MoE and Qwen3-MoE
in transformers >= 5; what differs is ``config.json``, and for serving stacks that read the hub's
per-expert layout (one tensor per expert and projection, as ``save_pretrained`` writes by default),
the tensor names. Each target below computes what pdmoe computes, to the last bit in float32:

* Mixtral: Llama or Mistral with every layer MoE and renormalised top-k (RoPE scaling, tied
  embeddings and Mistral's sliding window carry over).
* Qwen3-MoE: Qwen3; dense layers through ``mlp_only_layers``.
* Qwen2-MoE: Qwen2 (q/k/v biases), or Llama/Mistral with some dense layers (``qkv_bias=False``);
  its shared expert gets width 0, so it adds exactly 0.

Anything else has no exact target and is refused with the reason, never approximated.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from pdmoe.errors import UsageError
from pdmoe.layout import LAYERS_PREFIX, MoETensor, match_moe


class NativeFormat(Enum):
    AUTO = "auto"
    MIXTRAL = "mixtral"
    QWEN2_MOE = "qwen2_moe"
    QWEN3_MOE = "qwen3_moe"


class ExpertLayout(Enum):
    """How the experts are stored in the export."""

    PER_EXPERT = "per-expert"  # one tensor per expert and projection: what every serving stack reads
    FUSED = "fused"  # pdmoe's [E, 2F, H] / [E, H, F] tensors, unchanged: transformers >= 5 only


ARCHITECTURES = {
    NativeFormat.MIXTRAL: "MixtralForCausalLM",
    NativeFormat.QWEN2_MOE: "Qwen2MoeForCausalLM",
    NativeFormat.QWEN3_MOE: "Qwen3MoeForCausalLM",
}
# Dense fields every target reads with the dense family's meaning.
_SHARED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "tie_word_embeddings",
    "rope_parameters",
    "attention_dropout",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "dtype",
)
# Which dense families each target can express exactly.
_SOURCES = {
    NativeFormat.MIXTRAL: ("llama", "mistral"),
    NativeFormat.QWEN2_MOE: ("llama", "mistral", "qwen2"),
    NativeFormat.QWEN3_MOE: ("qwen3",),
}
_WHY_NOT = {
    "qwen2": "Qwen2's q/k/v biases exist only in Qwen2-MoE",
    "qwen3": "Qwen3's q/k norms exist only in Qwen3-MoE",
    "llama": "Llama/Mistral attention has no q/k norms",
    "mistral": "Llama/Mistral attention has no q/k norms",
}


def choose_format(config: dict[str, Any], requested: NativeFormat) -> NativeFormat:
    """The target for a (normalised) pdmoe config: ``requested``, or for AUTO the family's own MoE class."""
    family = config["base_model_type"]
    if requested is NativeFormat.AUTO:
        if family == "qwen3":
            return NativeFormat.QWEN3_MOE
        if family == "qwen2":
            return NativeFormat.QWEN2_MOE
        all_moe = sorted(config["moe_layers"]) == list(range(config["num_hidden_layers"]))
        return NativeFormat.MIXTRAL if all_moe and config.get("norm_topk_prob") else NativeFormat.QWEN2_MOE
    if family not in _SOURCES[requested]:
        raise UsageError(
            f"a {family} MoE has no exact {requested.value} form ({_WHY_NOT[family]}); use --format auto"
        )
    return requested


def _dense_layers(config: dict[str, Any]) -> list[int]:
    return sorted(set(range(config["num_hidden_layers"])) - set(config["moe_layers"]))


def _check_exact(config: dict[str, Any], target: NativeFormat) -> None:
    family = config["base_model_type"]
    if family in ("llama", "mistral") and config.get("attention_bias"):
        raise UsageError(
            "no native MoE class has Llama's attention biases (attention_bias=true, o_proj included); "
            "this model can only be used through pdmoe"
        )
    if target is NativeFormat.MIXTRAL:
        if _dense_layers(config):
            raise UsageError(
                f"Mixtral has no dense layers, but layers {_dense_layers(config)} are dense; "
                "use --format qwen2_moe (or auto)"
            )
        if not config.get("norm_topk_prob"):
            raise UsageError(
                "Mixtral always renormalises the top-k routing weights and this model does not "
                "(norm_topk_prob=false); use --format qwen2_moe"
            )
    if target is NativeFormat.QWEN3_MOE and config.get("use_sliding_window"):
        types = set(config.get("layer_types") or [])
        if types != {"sliding_attention"}:
            raise UsageError(
                "Qwen3-MoE applies its sliding window to every layer, this Qwen3 only to some "
                "(max_window_layers); it has no exact native form"
            )


def native_config(config: dict[str, Any], target: NativeFormat) -> dict[str, Any]:
    """The ``config.json`` of ``target`` for a normalised pdmoe config (``MoEConfig.to_dict()``)."""
    _check_exact(config, target)
    family = config["base_model_type"]
    native = {name: config[name] for name in _SHARED_FIELDS if name in config}
    native |= {
        "model_type": target.value,
        "architectures": [ARCHITECTURES[target]],
        "num_experts_per_tok": config["num_experts_per_tok"],
        # transformers' load-balancing loss counts all k slots of a token: k times pdmoe's value.
        "router_aux_loss_coef": config["router_aux_loss_coef"] / config["num_experts_per_tok"],
        "output_router_logits": False,
    }
    if target is NativeFormat.MIXTRAL:
        return native | {
            "intermediate_size": config["intermediate_size"],
            "num_local_experts": config["num_experts"],
            "sliding_window": config.get("sliding_window"),
            "router_jitter_noise": 0.0,
        }
    native |= {
        "intermediate_size": config["intermediate_size"],  # the dense layers' MLP
        "moe_intermediate_size": config["intermediate_size"],
        "num_experts": config["num_experts"],
        "norm_topk_prob": bool(config.get("norm_topk_prob")),
        "decoder_sparse_step": 1,
        "mlp_only_layers": _dense_layers(config),
    }
    if target is NativeFormat.QWEN3_MOE:
        return native | {
            "attention_bias": bool(config.get("attention_bias")),
            "use_sliding_window": bool(config.get("use_sliding_window")),
            "sliding_window": config.get("sliding_window"),
        }
    if family == "qwen2":
        layer_types = config["layer_types"]
    else:  # Llama has no window; Mistral's applies to every layer
        window = config.get("sliding_window")
        layer_types = ["sliding_attention" if window else "full_attention"] * config["num_hidden_layers"]
    return native | {
        "qkv_bias": family == "qwen2",
        "shared_expert_intermediate_size": 0,
        "layer_types": layer_types,
        "use_sliding_window": "sliding_attention" in layer_types,
        "sliding_window": config.get("sliding_window"),
        "max_window_layers": config.get("max_window_layers", config["num_hidden_layers"]),
    }


def zero_width_shared_expert(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Qwen2-MoE's shared expert of width 0 in every MoE layer (name -> shape; all zeros):
    its MLP adds exactly 0, whatever its sigmoid gate says."""
    hidden = config["hidden_size"]
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in sorted(config["moe_layers"]):
        prefix = f"{LAYERS_PREFIX}.{layer}.mlp"
        shapes |= {
            f"{prefix}.shared_expert.gate_proj.weight": (0, hidden),
            f"{prefix}.shared_expert.up_proj.weight": (0, hidden),
            f"{prefix}.shared_expert.down_proj.weight": (hidden, 0),
            f"{prefix}.shared_expert_gate.weight": (1, hidden),
        }
    return shapes


def per_expert_names(
    name: str, shape: tuple[int, ...], target: NativeFormat
) -> list[tuple[str, tuple[int, ...]]]:
    """The hub layout's tensors (name, shape) whose bytes, back to back, are tensor ``name``'s.

    Expert e's slice of ``gate_up_proj`` [E, 2F, H] is its gate rows then its up rows, and
    ``down_proj`` [E, H, F] holds one [H, F] block per expert, so the per-expert tensors are
    consecutive byte ranges of the fused one: renaming, never recomputing. Mixtral's hub names
    are ``block_sparse_moe.experts.E.w1/w3/w2``, the Qwen MoEs' ``mlp.experts.E.gate/up/down_proj``.
    """
    match = match_moe(name)
    mixtral = target is NativeFormat.MIXTRAL
    if match is None:
        return [(name, shape)]
    mlp, tensor = match
    prefix = mlp.prefix.removesuffix(".mlp") + ".block_sparse_moe" if mixtral else mlp.prefix
    if tensor is MoETensor.ROUTER:
        return [(f"{prefix}.gate.weight", shape)]
    experts = shape[0]
    if tensor is MoETensor.GATE_UP:
        width, hidden = shape[1] // 2, shape[2]
        parts = ("w1", "w3") if mixtral else ("gate_proj", "up_proj")
        return [
            (f"{prefix}.experts.{e}.{part}.weight", (width, hidden)) for e in range(experts) for part in parts
        ]
    down = "w2" if mixtral else "down_proj"
    return [(f"{prefix}.experts.{e}.{down}.weight", tuple(shape[1:])) for e in range(experts)]
