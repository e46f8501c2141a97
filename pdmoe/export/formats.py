"""The native transformers MoE classes a pdmoe checkpoint maps onto exactly, and how.

pdmoe's tensors already have the keys and fused expert layout of Mixtral, Qwen2-MoE and Qwen3-MoE
in transformers >= 5; what differs is ``config.json``, and for serving stacks that read the hub's
per-expert layout (one tensor per expert and projection, as ``save_pretrained`` writes by default),
the tensor names. Each target below computes what pdmoe computes, to the last bit in float32:

* Mixtral: Llama or Mistral with every layer MoE and renormalised top-k (RoPE scaling, tied
  embeddings and Mistral's sliding window carry over).
* Qwen3-MoE: Qwen3; dense layers through ``mlp_only_layers``.
* Qwen2-MoE: Qwen2, or Llama/Mistral (then with explicit zero q/k/v biases: every Qwen2-MoE
  implementation but transformers 5's builds them). Its shared expert, which every implementation
  adds, gets a nonzero width with all-zero weights and an all-ones gate, so it adds exactly 0 and
  stays finite everywhere (a zero width reads as "unset" in llama.cpp and vLLM; an all-zero gate
  gives NaN in llama.cpp, whose sigmoid is silu(x)/x).

Anything else has no exact target and is refused with the reason, never approximated. Where
several targets are exact in transformers, ``--format auto`` takes the one the most serving stacks
also run exactly (``NOT_EXACT_IN`` lists what each target loses where).
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import Any

from pdmoe.errors import Option, Problem, UsageError
from pdmoe.families import FAMILIES, SlidingWindow, get_family
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


class ServingStack(Enum):
    """Programs that run an export, beyond the transformers 5 it is written for."""

    TRANSFORMERS_4 = "transformers 4.x"
    VLLM = "vLLM"
    SGLANG = "SGLang"
    LLAMA_CPP = "llama.cpp"


ARCHITECTURES = {
    NativeFormat.MIXTRAL: "MixtralForCausalLM",
    NativeFormat.QWEN2_MOE: "Qwen2MoeForCausalLM",
    NativeFormat.QWEN3_MOE: "Qwen3MoeForCausalLM",
}
# Preference among targets that are equally served: the family's own MoE class first.
_TARGETS = (NativeFormat.MIXTRAL, NativeFormat.QWEN3_MOE, NativeFormat.QWEN2_MOE)
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
# Which dense families each target can express exactly (pdmoe.families: each family's targets).
_SOURCES = {
    target: tuple(name for name, family in FAMILIES.items() if target.value in family.export_targets)
    for target in _TARGETS
}
# The shared expert's width in a Qwen2-MoE export: nonzero, and divisible by every tensor-parallel
# degree and by GGUF's 256-value quantisation blocks, so no stack splits or packs it unevenly.
SHARED_EXPERT_WIDTH = 256
_ATTENTION_BIASES = ("q_proj", "k_proj", "v_proj")


def _dense_layers(config: dict[str, Any]) -> list[int]:
    return sorted(set(range(config["num_hidden_layers"])) - set(config["moe_layers"]))


def _not_exact(config: dict[str, Any], target: NativeFormat) -> str | None:
    """Why ``target`` cannot compute what the pdmoe model computes in transformers, or None."""
    family = get_family(config["base_model_type"])
    if family.attention_bias_not_exact and config.get("attention_bias"):
        return family.attention_bias_not_exact
    if family.model_type not in _SOURCES[target]:
        why = f" ({family.why_not_other_targets})" if family.why_not_other_targets else ""
        return f"a {family.model_type} MoE has no exact {target.value} form{why}"
    if target is NativeFormat.MIXTRAL:
        if _dense_layers(config):
            return f"Mixtral has no dense layers, but layers {_dense_layers(config)} are dense"
        if not config.get("norm_topk_prob"):
            return (
                "Mixtral always renormalises the top-k routing weights and this model does not "
                "(norm_topk_prob=false)"
            )
    if target is NativeFormat.QWEN2_MOE:
        head_size = config["hidden_size"] // config["num_attention_heads"]
        if config.get("head_dim", head_size) != head_size:
            return (
                f"Qwen2-MoE's head size is hidden_size / num_attention_heads ({head_size}) in vLLM and "
                f"llama.cpp, and this model's head_dim is {config['head_dim']}"
            )
    windowed = set(config.get("layer_types") or [])
    if (
        target is NativeFormat.QWEN3_MOE
        and config.get("use_sliding_window")
        and windowed != {"sliding_attention"}
    ):
        return (
            "Qwen3-MoE applies its sliding window to every layer, this Qwen3 only to some (max_window_layers)"
        )
    return None


def _qwen2_moe_layer_types(config: dict[str, Any]) -> list[str]:
    if get_family(config["base_model_type"]).sliding_window is SlidingWindow.PER_LAYER:
        return config["layer_types"]
    # No window, or one on every layer.
    window = config.get("sliding_window")
    return ["sliding_attention" if window else "full_attention"] * config["num_hidden_layers"]


def _first_windowed_layer(layer_types: list[str]) -> int:
    return next((i for i, kind in enumerate(layer_types) if kind == "sliding_attention"), len(layer_types))


def _transformers_4_window(config: dict[str, Any]) -> str | None:
    layer_types = _qwen2_moe_layer_types(config)
    if len(set(layer_types)) > 1:
        return (
            "its Qwen2-MoE applies the sliding window to every layer, this model only from layer "
            f"{_first_windowed_layer(layer_types)} on"
        )
    return None


def _llama_cpp_dense_layers(config: dict[str, Any]) -> str | None:
    return "its Qwen MoEs have no dense FFN layers" if _dense_layers(config) else None


def _llama_cpp_renormalisation(config: dict[str, Any]) -> str | None:
    if config.get("norm_topk_prob"):
        return "its Qwen2-MoE never renormalises the top-k routing weights, and this model does"
    return None


def _llama_cpp_window(config: dict[str, Any]) -> str | None:
    every_layer = get_family(config["base_model_type"]).sliding_window is SlidingWindow.EVERY_LAYER
    windowed = every_layer or config.get("use_sliding_window")
    if windowed and config.get("sliding_window"):
        return f"it applies no sliding window (this model's: {config['sliding_window']} tokens)"
    return None


def _vllm_output_bias(config: dict[str, Any]) -> str | None:
    if config.get("attention_bias"):
        return "its Qwen3-MoE has no o_proj bias and drops the checkpoint's without a word"
    return None


def _llama_cpp_output_bias(config: dict[str, Any]) -> str | None:
    return "its Qwen3-MoE has no o_proj bias (refuses to load one)" if config.get("attention_bias") else None


Reason = Callable[[dict[str, Any]], str | None]
# Where a target that transformers 5 runs exactly is known not to run exactly in a serving stack,
# and why; each found by running that stack on exports, or for vLLM by bench/clients/vllm_static.py
# (README's compatibility matrix).
NOT_EXACT_IN: dict[NativeFormat, dict[ServingStack, tuple[Reason, ...]]] = {
    NativeFormat.MIXTRAL: {ServingStack.LLAMA_CPP: (_llama_cpp_window,)},
    NativeFormat.QWEN2_MOE: {
        ServingStack.TRANSFORMERS_4: (_transformers_4_window,),
        ServingStack.LLAMA_CPP: (_llama_cpp_dense_layers, _llama_cpp_renormalisation, _llama_cpp_window),
    },
    NativeFormat.QWEN3_MOE: {
        ServingStack.VLLM: (_vllm_output_bias,),
        ServingStack.LLAMA_CPP: (_llama_cpp_dense_layers, _llama_cpp_window, _llama_cpp_output_bias),
    },
}


def stacks_not_exact(config: dict[str, Any], target: NativeFormat) -> dict[ServingStack, str]:
    """The serving stacks known not to run ``target`` exactly for this model, with the reason."""
    found = {
        stack: [reason for why in reasons if (reason := why(config)) is not None]
        for stack, reasons in NOT_EXACT_IN[target].items()
    }
    return {stack: "; ".join(reasons) for stack, reasons in found.items() if reasons}


def _exact_targets(config: dict[str, Any]) -> list[NativeFormat]:
    """The exact targets, the best served first."""
    exact = [target for target in _TARGETS if _not_exact(config, target) is None]
    return sorted(exact, key=lambda target: len(stacks_not_exact(config, target)))


def choose_format(config: dict[str, Any], requested: NativeFormat) -> NativeFormat:
    """The target for a (normalised) pdmoe config: ``requested`` when exact, for AUTO the exact one
    the most serving stacks run exactly; else a UsageError with the reason and what works instead."""
    exact = _exact_targets(config)
    if requested is NativeFormat.AUTO:
        if exact:
            return exact[0]
        candidates = [target for target in _TARGETS if config["base_model_type"] in _SOURCES[target]]
        reasons = {target: _not_exact(config, target) for target in candidates}
        shown = (
            [next(iter(reasons.values()))]
            if len(set(reasons.values())) == 1
            else [f"{target.value}: {reason}" for target, reason in reasons.items()]
        )
        raise UsageError(
            f"no native MoE class computes this model exactly ({'; '.join(shown)}); use it through pdmoe"
        )
    reason = _not_exact(config, requested)
    if reason is None:
        return requested
    if not exact:
        raise UsageError("{reason}; no native format is exact for it", problem=Problem.INVALID, reason=reason)
    raise UsageError(
        "{reason}; use {format} (or auto)",
        problem=Problem.INVALID,
        reason=reason,
        format=Option("format", exact[0].value),
    )


def _transformers_4_fields(config: dict[str, Any]) -> dict[str, Any]:
    """RoPE as transformers 4.x reads it (``rope_theta``, ``rope_scaling``); transformers 5 reads
    ``rope_parameters``, which says the same, and builds the very same model from both."""
    rope = dict(config.get("rope_parameters") or {})
    fields: dict[str, Any] = {}
    if "rope_theta" in rope:
        fields["rope_theta"] = rope.pop("rope_theta")
    if rope.get("rope_type", "default") != "default":
        fields["rope_scaling"] = rope
    return fields


def native_config(config: dict[str, Any], target: NativeFormat) -> dict[str, Any]:
    """The ``config.json`` of ``target`` (from ``choose_format``) for a normalised pdmoe config."""
    native = {name: config[name] for name in _SHARED_FIELDS if name in config}
    native |= _transformers_4_fields(config)
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
    layer_types = _qwen2_moe_layer_types(config)
    return native | {
        "qkv_bias": True,  # Qwen2's own, or the zero biases of ``qwen2_moe_extras``
        "shared_expert_intermediate_size": SHARED_EXPERT_WIDTH,
        "layer_types": layer_types,
        "use_sliding_window": "sliding_attention" in layer_types,
        "sliding_window": config.get("sliding_window"),
        # transformers 4.x and vLLM read the window's layers from here: the first one that has it.
        "max_window_layers": _first_windowed_layer(layer_types),
    }


def qwen2_moe_extras(config: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], float]]:
    """The tensors a Qwen2-MoE export adds (name -> (shape, fill value)): in every MoE layer a shared
    expert with zero MLP weights and an all-ones gate (its output is sigmoid(sum x) * 0 = 0), and
    for a Llama/Mistral source zero q/k/v biases."""
    hidden, width = config["hidden_size"], SHARED_EXPERT_WIDTH
    head_size = hidden // config["num_attention_heads"]  # ``choose_format`` refuses any other head_dim
    extras: dict[str, tuple[tuple[int, ...], float]] = {}
    for layer in range(config["num_hidden_layers"]):
        prefix = f"{LAYERS_PREFIX}.{layer}"
        if not get_family(config["base_model_type"]).qkv_bias:
            heads = {"q_proj": config["num_attention_heads"]} | dict.fromkeys(
                ("k_proj", "v_proj"), config["num_key_value_heads"]
            )
            for projection in _ATTENTION_BIASES:
                extras[f"{prefix}.self_attn.{projection}.bias"] = (
                    (heads[projection] * head_size,),
                    0.0,
                )
        if layer in config["moe_layers"]:
            extras |= {
                f"{prefix}.mlp.shared_expert.gate_proj.weight": ((width, hidden), 0.0),
                f"{prefix}.mlp.shared_expert.up_proj.weight": ((width, hidden), 0.0),
                f"{prefix}.mlp.shared_expert.down_proj.weight": ((hidden, width), 0.0),
                f"{prefix}.mlp.shared_expert_gate.weight": ((1, hidden), 1.0),
            }
    return extras


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
