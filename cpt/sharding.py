"""FSDP2 sharding of the MoE being trained: every tensor split evenly over the processes.

accelerate's FSDP2 set-up shards every parameter along its first dimension. For the expert stacks
(``[E, 2F, H]`` and ``[E, H, F]``) that is the expert dimension: the 3 new experts of a 4-expert
upcycle on 8 processes would give three processes a whole expert each and five none. pdmoe shards
the model itself with torch's ``fully_shard``, in the units accelerate makes (every decoder layer,
the input embeddings, the final norm with lm_head, the root) and with the accelerate config's
settings (resharding after forward, CPU offload, RAM-efficient loading, mixed precision), and puts
the shards of every expert tensor on its second dimension: each process holds 1/N of the rows of
every expert. accelerate then takes the sharded model as it is (an FSDP module is not wrapped
again): its optimizer handling, clipping and state dicts apply unchanged.

Frozen weights (the shared weights and the original experts) are parameters without gradient:
sharded and gathered for compute like the rest, never given a gradient or optimizer state, and
under mixed precision held in the compute dtype, as the forward reads them, not as float32 copies.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Shard

from pdmoe.experts import MoEExperts
from pdmoe.modeling import MoEForCausalLM

EXPERT_SHARD_DIM = 1  # the rows of every expert (2F of gate_up_proj, H of down_proj), not the experts


def expert_tensors(model: nn.Module) -> set[nn.Parameter]:
    """The parameters of every experts module (fused, or the frozen / trainable pair)."""
    return {
        param for module in model.modules() if isinstance(module, MoEExperts) for param in module.parameters()
    }


def shard_dim(param: nn.Parameter, experts: set[nn.Parameter]) -> int:
    """The dimension FSDP2 splits ``param`` along: the rows of every expert, else the first."""
    return EXPERT_SHARD_DIM if param in experts else 0


def shard_model(accelerator: Accelerator, model: MoEForCausalLM) -> MoEForCausalLM:
    """Shard ``model`` (its trainable parts already chosen) in place with FSDP2; every process calls this."""
    plugin = accelerator.state.fsdp_plugin
    policy = plugin.mixed_precision_policy or MixedPrecisionPolicy()
    if policy.param_dtype is not None:  # frozen weights in the compute dtype
        for param in model.parameters():
            if not param.requires_grad:
                param.data = param.data.to(policy.param_dtype)
    ram_efficient = plugin.cpu_ram_efficient_loading
    if ram_efficient:
        # Process 0 alone holds the weights (the others may hold placeholders): shard on the meta
        # device, then distribute process 0's tensors. Non-persistent buffers (rotary frequencies)
        # are not in the state dict: they are kept and put back.
        full_state = model.state_dict() if accelerator.is_main_process else {}
        persistent = set(model.state_dict(keep_vars=True))
        buffers = {name: b.clone() for name, b in model.named_buffers() if name not in persistent}
        model.to(torch.device("meta"))
        model.tie_weights()
    experts = expert_tensors(model)

    def placement(param: nn.Parameter) -> Shard:
        return Shard(shard_dim(param, experts))

    settings = {
        "mesh": _mesh(accelerator),
        "mp_policy": policy,
        "offload_policy": plugin.cpu_offload,
        "shard_placement_fn": placement,
    }
    for layer in model.model.layers:
        fully_shard(layer, reshard_after_forward=plugin.reshard_after_forward, **settings)
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = embeddings.weight is head.weight
    if not tied:
        fully_shard(embeddings, reshard_after_forward=plugin.reshard_after_forward, **settings)
    # The tail is used at the end of forward and the start of backward: resharding it between them
    # would gather it again at once. Tied embeddings join it (one group per shared tensor).
    tail = [module for module in (embeddings if tied else None, model.model.norm, head) if module is not None]
    fully_shard(tail, reshard_after_forward=False, **settings)
    fully_shard(model, **settings)
    if ram_efficient:
        offloaded = isinstance(plugin.cpu_offload, CPUOffloadPolicy)  # the shards then live on the CPU
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, cpu_offload=offloaded)
        set_model_state_dict(model, full_state, options=options)
        for name, buffer in buffers.items():
            parent, _, attribute = name.rpartition(".")
            model.get_submodule(parent).register_buffer(
                attribute, buffer.to(accelerator.device), persistent=False
            )
        model.tie_weights()
    return model


def _mesh(accelerator: Accelerator):
    """The data-parallel mesh of accelerate's parallelism config, or None (FSDP's default: all processes)."""
    mesh = getattr(accelerator, "torch_device_mesh", None)
    if mesh is None:
        return None
    return mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)]
