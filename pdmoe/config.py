"""`MoEConfig`: a dense family's config, unchanged, plus the fields of the upcycled MoE.

Every field of the dense config stays at the top level of ``config.json`` (docs/method.md's on-disk
contract), so the dense family's own modules (attention, norms, rotary embeddings) read the very
same object they would read in the dense model.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

from transformers import AutoConfig, PreTrainedConfig

from pdmoe.errors import Option, Problem, UsageError
from pdmoe.families import DEFAULT_FAMILY, get_family
from pdmoe.io.model_config import MOE_MODEL_TYPE

# The fields an MoE config adds to the dense one (besides ``base_model_type``).
MOE_FIELDS = (
    "num_experts",
    "num_experts_per_tok",
    "moe_layers",
    "original_experts",
    "router_aux_loss_coef",
    "norm_topk_prob",
    "output_router_logits",
)
# The load-balancing coefficient of the reference recipe (MoE-LPR, DeltaMoE) in its own k-slot form;
# pdmoe's loss is the Switch form, 1/k of that (see pdmoe.load_balancing).
REFERENCE_AUX_COEF = 0.01


def reference_aux_coef(top_k: int) -> float:
    """The load-balancing coefficient that gives pdmoe's loss the reference recipe's strength at top-k."""
    return REFERENCE_AUX_COEF * top_k


# pdmoe's names of the experts implementations -> the keys of transformers' experts interface that
# pdmoe.kernels.transformers_experts registers ("pdmoe_auto", "pdmoe") or transformers has ("eager").
# All three read the (frozen, trainable) pair of experts trained with frozen originals; transformers'
# other implementations (grouped_mm, ...) read fused weights only. Never written to config.json.
EXPERTS_IMPLS = {"auto": "pdmoe_auto", "torch": "eager", "triton": "pdmoe"}


def experts_implementation(name: str | None) -> str:
    """transformers' experts-interface key for ``name``: pdmoe's name or the key itself (None: "auto")."""
    key = EXPERTS_IMPLS.get("auto" if name is None else name, name)
    if key not in EXPERTS_IMPLS.values():
        raise UsageError(f"unknown experts implementation {name!r}; use one of {', '.join(EXPERTS_IMPLS)}")
    return key


def experts_impl_name(key: str | None) -> str:
    """pdmoe's name ("auto", "torch" or "triton") of an experts-interface key (None: "auto")."""
    return {value: name for name, value in EXPERTS_IMPLS.items()}[experts_implementation(key)]


def parse_layers(spec: str | list[int] | None, num_layers: int) -> list[int]:
    """Which layers become MoE: None/'all', a list or '0,2,5', or 'every:N' (layers 0, N, 2N, ...)."""
    if spec is None or spec == "all":
        return list(range(num_layers))
    if isinstance(spec, str):
        text = spec.replace(" ", "")
        try:
            if text.startswith("every:"):
                step = int(text.removeprefix("every:"))
                if step < 1:
                    raise ValueError
                return list(range(0, num_layers, step))
            spec = [int(part) for part in text.split(",") if part]
        except ValueError:
            raise UsageError(
                "cannot read {layers} {spec!r}; use 'all', a list like '0,2,5' or 'every:N'",
                problem=Problem.INVALID,
                layers=Option("layers"),
                spec=spec,
            ) from None
    layers = sorted(set(spec))
    if not layers or layers[0] < 0 or layers[-1] >= num_layers:
        raise UsageError(
            "{layers} {spec!r} must name layers in 0..{last}",
            problem=Problem.INVALID,
            layers=Option("layers"),
            spec=spec,
            last=num_layers - 1,
        )
    return layers


class MoEConfig(PreTrainedConfig):
    """Config of an upcycled MoE: the dense family's fields plus the MoE fields below."""

    model_type = MOE_MODEL_TYPE

    base_model_type: str = DEFAULT_FAMILY
    num_experts: int = 4
    num_experts_per_tok: int = 2
    moe_layers: list[int] | None = None
    original_experts: list[int] | None = None
    router_aux_loss_coef: float | None = None  # None: the reference strength, 0.01 x top-k (load_balancing)
    norm_topk_prob: bool = True
    output_router_logits: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        dense_class = get_family(self.base_model_type).dense_config_class()
        dense = dense_class(**kwargs)
        own = {field.name for field in dataclasses.fields(PreTrainedConfig)}
        # Every dense field, with what the dense config derives (head_dim, layer_types, rope_parameters):
        # set after the base class, which would drop some of them (use_cache) as generation settings,
        # and before it too: it standardises legacy RoPE fields (rope_scaling, as Llama 3.1's
        # config.json has them) with the dense sizes (max_position_embeddings).
        dense_fields = {
            field.name: getattr(dense, field.name)
            for field in dataclasses.fields(dense_class)
            if field.name not in own
        }
        for name, value in dense_fields.items():
            setattr(self, name, value)
        super().__post_init__(**kwargs)
        for name, value in dense_fields.items():
            setattr(self, name, value)
        if self.moe_layers is None:
            self.moe_layers = list(range(self.num_hidden_layers))
        if self.original_experts is None:
            self.original_experts = [0]
        if self.router_aux_loss_coef is None:
            self.router_aux_loss_coef = reference_aux_coef(self.num_experts_per_tok)
        self.validate_moe()

    def validate_moe(self) -> None:
        if self.num_experts < 2:
            raise UsageError(
                f"num_experts must be at least 2 (got {self.num_experts}): one expert is the dense model"
            )
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise UsageError(
                f"top-k ({self.num_experts_per_tok}) must be between 1 and the number of experts ({self.num_experts})"
            )
        bad = [i for i in self.moe_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise UsageError(f"moe_layers {bad} are outside 0..{self.num_hidden_layers - 1}")
        if any(not 0 <= e < self.num_experts for e in self.original_experts):
            raise UsageError(
                f"original_experts {self.original_experts} must lie in 0..{self.num_experts - 1}"
            )

    @property
    def experts_impl(self) -> str:
        """The experts implementation: "auto" (the default), "torch" or "triton" (see pdmoe.experts).

        A per-load choice kept in transformers' ``_experts_implementation``, which config.json never holds."""
        return experts_impl_name(self._experts_implementation)

    @experts_impl.setter
    def experts_impl(self, name: str) -> None:
        self._experts_implementation = experts_implementation(name)

    @property
    def num_original_experts(self) -> int:
        """How many leading experts are copies kept frozen in CPT (must be a prefix 0..n-1)."""
        if sorted(self.original_experts) != list(range(len(self.original_experts))):
            raise UsageError(f"original_experts must be a prefix 0..n-1, got {self.original_experts}")
        return len(self.original_experts)


def moe_config_dict(dense: dict[str, Any], **moe_fields: Any) -> dict[str, Any]:
    """The ``config.json`` of the MoE made from a dense ``config.json``: every dense field as it is,
    the MoE fields (``MoEConfig``'s defaults unless given), checked as ``MoEConfig`` checks them.

    Built without transformers' dense config class, which ``MoEConfig`` applies when the file is
    loaded: writing a config must not cost a command the import of transformers' models.
    """
    fields = {
        k: v for k, v in dense.items() if k not in ("model_type", "architectures", "transformers_version")
    }
    defaults = {name: getattr(MoEConfig, name) for name in MOE_FIELDS}
    config = {
        **fields,
        "model_type": MoEConfig.model_type,
        "base_model_type": get_family(dense.get("model_type")).model_type,
        "architectures": ["MoEForCausalLM"],
        **defaults,
        **moe_fields,
    }
    if config["moe_layers"] is None:
        config["moe_layers"] = list(range(config["num_hidden_layers"]))
    if config["original_experts"] is None:
        config["original_experts"] = [0]
    if config["router_aux_loss_coef"] is None:
        config["router_aux_loss_coef"] = reference_aux_coef(config["num_experts_per_tok"])
    MoEConfig.validate_moe(SimpleNamespace(**config))
    return config


AutoConfig.register(MoEConfig.model_type, MoEConfig, exist_ok=True)
