"""`MoEForCausalLM`: a dense decoder family with chosen MLPs turned into MoE blocks.

Everything but the MLPs is the dense family's own transformers module (attention backends, KV
cache, rotary variants, q/k norms, biases), built from the same config object, so the upcycled
model behaves exactly like the dense one wherever the MoE does not differ.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import dataclass, fields

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import MoeCausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaModel

from pdmoe.config import MoEConfig, experts_implementation
from pdmoe.experts import MoEExperts, StateDictLayout
from pdmoe.families import FAMILIES, get_family
from pdmoe.load_balancing import load_balancing_loss
from pdmoe.moe_block import MoEBlock
from pdmoe.router import TopKRouter

# The KV cache's keyword (forward argument and output field): ``cache`` since transformers 5.24,
# ``past_key_values`` before (now deprecated). The cache travels in ``**kwargs`` under whichever
# name this transformers uses, so no call pdmoe makes ever warns (every family's forward, here
# Llama's, takes the same keyword).
CACHE_ARGUMENT = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"
CACHE_FIELD = "cache" if "cache" in {f.name for f in fields(MoeCausalLMOutputWithPast)} else "past_key_values"


@dataclass
class MoECausalLMOutput(MoeCausalLMOutputWithPast):
    """transformers' MoE output plus the next-token loss alone (``loss`` = lm_loss + coef · aux_loss)."""

    lm_loss: torch.FloatTensor | None = None


class MoEPreTrainedModel(PreTrainedModel):
    config_class = MoEConfig
    config: MoEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = [family.decoder_layer_class for family in FAMILIES.values()]
    _skip_keys_device_placement = [CACHE_ARGUMENT]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        init_moe_module(module, self.config.initializer_range)

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        """transformers' key of the requested experts implementation, pdmoe's "auto" unless asked otherwise."""
        return experts_implementation(requested_experts)

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        return True  # the experts (pdmoe.experts.MoEExperts) use transformers' experts interface


@torch.no_grad()
def init_moe_module(module: nn.Module, std: float) -> None:
    """N(0, std) for routers and experts; transformers' init helpers skip tensors already loaded."""
    if isinstance(module, TopKRouter):
        init.normal_(module.weight, mean=0.0, std=std)
    elif isinstance(module, MoEExperts) and not module.num_frozen:
        init.normal_(module.gate_up_proj, mean=0.0, std=std)
        init.normal_(module.down_proj, mean=0.0, std=std)


class MoEForCausalLM(MoEPreTrainedModel, GenerationMixin):
    """Causal LM over an upcycled MoE; ``forward(labels=...)`` adds the load-balancing loss."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        self.model = get_family(config.base_model_type).dense_model_class()(config)
        # The decoder layer class of this family only: FSDP's transformer wrap policy (accelerate)
        # refuses classes the model does not contain.
        self._no_split_modules = [type(self.model.layers[0]).__name__]
        for index in config.moe_layers:
            self.model.layers[index].mlp = MoEBlock(config)
        # transformers initialises a nested PreTrainedModel with that model's own _init_weights,
        # which knows nothing of MoE modules: extend it for this instance.
        dense_init = self.model._init_weights

        def init_dense_and_moe(module: nn.Module) -> None:
            dense_init(module)
            init_moe_module(module, config.initializer_range)

        self.model._init_weights = init_dense_and_moe
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def moe_blocks(self) -> Iterator[tuple[int, MoEBlock]]:
        """(layer index, block) for every MoE layer, in layer order."""
        for index in self.config.moe_layers:
            yield index, self.model.layers[index].mlp

    def freeze_original_experts(self) -> None:
        """Split every MoE layer's storage so the original experts get no gradients (CPT stage)."""
        frozen = self.config.num_original_experts
        for _, block in self.moe_blocks():
            block.experts.freeze_experts(frozen)

    def unfreeze_experts(self) -> None:
        for _, block in self.moe_blocks():
            block.experts.unfreeze_experts()

    def set_experts_state_dict_layout(self, layout: StateDictLayout) -> None:
        """How the state dict shows experts with frozen originals (see ``StateDictLayout``)."""
        for _, block in self.moe_blocks():
            block.experts.state_dict_layout = layout

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> MoECausalLMOutput:
        """``kwargs`` carries the KV cache (``CACHE_ARGUMENT``) and transformers' attention options."""
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        router_logits = tuple(block.pop_router_logits() for _, block in self.moe_blocks())
        hidden = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])

        loss = lm_loss = aux_loss = None
        if router_logits and (labels is not None or output_router_logits):
            aux_loss = load_balancing_loss(router_logits, self.config.num_experts_per_tok, attention_mask)
        if labels is not None:
            lm_loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)
            loss = lm_loss
            if aux_loss is not None:
                loss = lm_loss + self.config.router_aux_loss_coef * aux_loss.to(lm_loss.device)
        return MoECausalLMOutput(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=router_logits if output_router_logits else None,
            lm_loss=lm_loss,
        )


AutoModelForCausalLM.register(MoEConfig, MoEForCausalLM, exist_ok=True)
