"""How much memory each process of a CPT run needs, from the model's config alone.

The model is built on the meta device (no weights read, no memory taken) and its parts frozen as
the run would freeze them; then each process's bytes follow from how the trainer holds them:

* one process, or DDP: every tensor whole; weights in float32 (the training copy), frozen ones too;
* FSDP2 on N processes (``sharding.shard_model``): every parameter split in N (expert tensors along
  their rows, the rest along dim 0; the largest piece is counted), frozen weights in the compute
  dtype under mixed precision, plus the whole weights of the units being gathered for compute;
* trainable weights, their gradients and AdamW's two moments in float32, for trainable weights only;
* activations (not sharded: each process has its own micro-batch): the tensors the forward keeps
  for backward, counted per token from the layer structure (PyTorch reference experts, SDPA
  attention; coefficients read off saved-tensor hooks on CPU, see tests/test_cpt_memory.py), with
  ``--gradient-checkpointing`` each layer's input plus one layer recomputed in backward.

Not counted: the CUDA context, the allocator's fragmentation and the communication buffers:
keep a few GB spare.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pdmoe.config import MoEConfig
from pdmoe.errors import Option, Problem, Spelling, UsageError, fill, keyword_spelling
from pdmoe.modeling import MoEForCausalLM

from .freezing import Part, apply_trainable
from .sharding import expert_tensors, shard_dim

FLOAT32 = 4
ADAM_MOMENTS = 2
GB = 10**9
MAX_PROCESSES = 4096  # the search for the fewest processes that fit stops here
DEFAULT_GPU_MEMORY = "80GB"
# Families whose attention normalises queries and keys per head (more tensors kept for backward).
QK_NORM_FAMILIES = frozenset({"qwen3"})


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per process (the largest share where pieces differ) of a run on ``num_processes``."""

    num_processes: int
    sharded: bool
    frozen_weights: int
    trainable_weights: int
    buffers: int
    gradients: int
    optimizer_state: int
    gathered_for_compute: int
    activations: int

    @property
    def total(self) -> int:
        return sum(getattr(self, name) for name in LABELS)

    def fits(self, gpu_memory: int) -> bool:
        return self.total <= gpu_memory

    def table(self) -> str:
        """The plan as aligned lines, in GB."""
        rows = [(label, getattr(self, name)) for name, label in LABELS.items()] + [("total", self.total)]
        width = max(len(label) for label, _ in rows)
        return "\n".join(f"  {label:<{width}}  {size / GB:10.2f} GB" for label, size in rows)


# The fields of a plan that add up to its total, and how the report names them.
LABELS = {
    "frozen_weights": "frozen weights",
    "trainable_weights": "trainable weights",
    "buffers": "buffers",
    "gradients": "gradients",
    "optimizer_state": "optimizer state (AdamW)",
    "gathered_for_compute": "weights gathered for compute",
    "activations": "activations",
}


@dataclass(frozen=True)
class RunShape:
    """What the plan depends on besides the model and the number of processes."""

    parts: tuple[Part, ...]
    micro_batch_size: int
    seq_len: int
    gradient_checkpointing: bool
    mixed_precision: bool  # bf16 compute


def meta_model(config: dict[str, Any] | MoEConfig, parts: Sequence[Part]) -> MoEForCausalLM:
    """The MoE of ``config`` on the meta device, with only ``parts`` trainable, as a run freezes it."""
    moe = config if isinstance(config, MoEConfig) else MoEConfig(**config)
    with torch.device("meta"):
        model = MoEForCausalLM(moe)
    apply_trainable(model, parts)
    return model


def plan_memory(model: MoEForCausalLM, num_processes: int, shape: RunShape, *, sharded: bool) -> MemoryPlan:
    """The plan of ``model`` (e.g. ``meta_model``) trained on ``num_processes`` processes."""
    world = num_processes if sharded else 1
    compute = torch.bfloat16 if shape.mixed_precision else torch.float32
    frozen_bytes = compute.itemsize if sharded else FLOAT32
    experts = expert_tensors(model)
    frozen = trainable = 0
    steps = 0
    for param in model.parameters():
        local = _largest_shard(param, shard_dim(param, experts), world)
        if param.requires_grad:
            trainable += local
            steps += 1
        else:
            frozen += local
    tokens = shape.micro_batch_size * shape.seq_len
    return MemoryPlan(
        num_processes=num_processes,
        sharded=sharded,
        frozen_weights=frozen * frozen_bytes,
        trainable_weights=trainable * FLOAT32,
        buffers=sum(b.numel() * b.element_size() for b in model.buffers()),
        gradients=trainable * FLOAT32,
        optimizer_state=(ADAM_MOMENTS * trainable + steps) * FLOAT32,
        gathered_for_compute=_gathered(model, compute) if sharded and num_processes > 1 else 0,
        activations=tokens * activation_bytes_per_token(model, shape),
    )


def fewest_processes(model: MoEForCausalLM, shape: RunShape, gpu_memory: int) -> MemoryPlan | None:
    """The plan on the fewest processes that fits ``gpu_memory``: one process, else FSDP2 on N."""
    single = plan_memory(model, 1, shape, sharded=False)
    if single.fits(gpu_memory):
        return single
    low, high = 2, MAX_PROCESSES  # the total only falls with N: bisect
    if not plan_memory(model, high, shape, sharded=True).fits(gpu_memory):
        return None
    while low < high:
        middle = (low + high) // 2
        if plan_memory(model, middle, shape, sharded=True).fits(gpu_memory):
            high = middle
        else:
            low = middle + 1
    return plan_memory(model, low, shape, sharded=True)


def _largest_shard(param: torch.Tensor, dim: int, world: int) -> int:
    """Elements of the largest piece FSDP2 gives a process (chunks of ceil(size / N) along ``dim``)."""
    if param.dim() == 0 or world == 1:
        return param.numel()
    size = param.shape[dim]
    return math.ceil(size / world) * (param.numel() // size)


def _gathered(model: MoEForCausalLM, compute: torch.dtype) -> int:
    """Whole weights in the compute dtype while FSDP2 computes: the largest decoder layer twice (the
    current one and the next, prefetched) and its trainable part's unsharded gradients, plus the
    final norm and lm_head (and tied embeddings), kept gathered from the end of forward into backward."""
    layers = [sum(p.numel() for p in layer.parameters()) for layer in model.model.layers]
    layer_grads = [
        sum(p.numel() for p in layer.parameters() if p.requires_grad) for layer in model.model.layers
    ]
    tail = {
        id(p): p.numel() for m in (model.model.norm, model.get_output_embeddings()) for p in m.parameters()
    }
    return (2 * max(layers) + max(layer_grads) + sum(tail.values())) * compute.itemsize


def activation_bytes_per_token(model: MoEForCausalLM, shape: RunShape) -> int:
    """Bytes kept for backward per token of a micro-batch (see the module docstring)."""
    config = model.config
    b = torch.bfloat16.itemsize if shape.mixed_precision else FLOAT32
    hidden, vocab = config.hidden_size, config.vocab_size
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    experts, top_k = config.num_experts, config.num_experts_per_tok
    norm = FLOAT32 * hidden + FLOAT32  # float32 input and its reciprocal RMS
    attention = b * (2 * q_dim + 2 * kv_dim) + FLOAT32 * heads  # q, k (rotated), v, output, log-sum-exp
    if config.base_model_type in QK_NORM_FAMILIES:
        attention += FLOAT32 * (q_dim + kv_dim + heads + kv_heads)
    routing = FLOAT32 * experts + 12 * top_k + FLOAT32  # probabilities, top-k ids and weights
    aux = FLOAT32 * experts + 8 * top_k  # the load-balancing loss's share of each MoE layer
    per_slot = 4 * b * config.intermediate_size + 2 * b * hidden + b + 8  # gate_up, act, product; rows
    moe_mlp = b * hidden + routing + top_k * per_slot + aux
    dense_mlp = 3 * b * config.intermediate_size
    trains_everything = Part.NON_MOE in shape.parts
    if trains_everything:  # trainable weights also keep their inputs: norm outputs, projection inputs
        norm += b * hidden
        attention += b * (hidden + q_dim)
        if config.base_model_type in QK_NORM_FAMILIES:
            attention += b * (q_dim + kv_dim)
        dense_mlp += b * (hidden + config.intermediate_size)
    moe_layers = set(config.moe_layers)
    first = 0 if trains_everything else min(moe_layers)  # no gradient flows below the first MoE layer
    layers = []
    for index in range(config.num_hidden_layers):
        mlp = moe_mlp if index in moe_layers else dense_mlp
        if index < first:
            layers.append(0)
        elif index == first and not trains_everything:
            layers.append(mlp)  # its attention and norms see no gradient yet
        else:
            layers.append(2 * norm + attention + mlp)
    # Final norm, lm_head's logits (compute dtype) and their float32 log-softmax, ids and labels,
    # the rotary cos/sin.
    outside = norm + (b + FLOAT32) * vocab + 16 + 2 * b * head_dim
    if not shape.gradient_checkpointing:
        return sum(layers) + outside
    kept = b * hidden + 2 * experts + 8 * top_k  # each layer's input (and its routing side output)
    return config.num_hidden_layers * kept + max(layers) + outside


def check_fits(model: MoEForCausalLM, plan: MemoryPlan, shape: RunShape, gpu_memory: int) -> None:
    """A ``UsageError`` when ``plan`` does not fit: what, by how much, the fewest processes that fit."""
    if plan.fits(gpu_memory):
        return
    largest = max(LABELS, key=lambda name: getattr(plan, name))
    fewest, values = _fewest(fewest_processes(model, shape, gpu_memory), gpu_memory)
    raise UsageError(
        "the run needs {needed} per process on {num_processes} process(es), more than the {capacity} of "
        "{gpu_memory} (largest part: {largest}, {largest_size}); " + fewest,
        problem=Problem.INVALID,
        needed=_gb(plan.total),
        num_processes=plan.num_processes,
        capacity=_gb(gpu_memory),
        gpu_memory=Option("gpu_memory"),
        largest=LABELS[largest],
        largest_size=_gb(getattr(plan, largest)),
        **values,
    )


def describe_fewest(best: MemoryPlan | None, gpu_memory: int, spell: Spelling = keyword_spelling) -> str:
    """The fewest processes that fit ``gpu_memory``, or what to change when none does (the options
    named by ``spell``)."""
    return fill(*_fewest(best, gpu_memory), spell)


def _fewest(best: MemoryPlan | None, gpu_memory: int) -> tuple[str, dict[str, Any]]:
    """What ``describe_fewest`` says, as a ``str.format`` template and its values."""
    if best is None:
        return (
            "no number of processes up to {max_processes} fits {fits}: lower {micro_batch_size} or "
            "{seq_len}, or add {gradient_checkpointing}",
            {
                "max_processes": MAX_PROCESSES,
                "fits": _gb(gpu_memory),
                "micro_batch_size": Option("micro_batch_size"),
                "seq_len": Option("seq_len"),
                "gradient_checkpointing": Option("gradient_checkpointing", True),
            },
        )
    how = "FSDP2 (cpt/accelerate_configs/fsdp2.yaml)" if best.sharded else "one process"
    return (
        "the fewest processes that fit: {fewest}, {how}, {each} each",
        {"fewest": best.num_processes, "how": how, "each": _gb(best.total)},
    )


def _gb(size: int) -> str:
    """A size in GB, or in MB below 1 GB."""
    return f"{size / GB:.1f} GB" if size >= GB else f"{size / 10**6:.1f} MB"
