"""Upcycle a dense checkpoint into the MoE checkpoint of docs/method.md, streaming tensor by tensor.

The plan (every output tensor's name, dtype and shape, and its shard) is made from headers alone;
then each dense tensor is read, turned into its MoE form and written straight into its shard.
Tensors kept as they are stream in blocks of elements; peak memory is one layer's dense FFN plus
one expert block, whatever the model size.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from pdmoe.config import moe_config_dict, parse_layers
from pdmoe.errors import CheckpointError, Option, Problem, TensorValueError, UsageError
from pdmoe.families import get_family
from pdmoe.finite import ALLOW_NON_FINITE, all_finite, count_non_finite, describe_counts
from pdmoe.hub import resolve_model
from pdmoe.io import CheckpointReader, Command, TensorMeta, plan_shards
from pdmoe.io.model_config import without_remote_code
from pdmoe.io.streaming import ShardBlock, claim_checkpoint
from pdmoe.layout import DenseProjection, MLPKeys, MoETensor, match_dense
from pdmoe.options import check_number, check_seed, parse_dtype, parse_size
from pdmoe.upcycle_options import DEFAULT_OPTIONS, UpcycleOptions


class UpcycleRule(Enum):
    """How an output tensor is made from the dense checkpoint."""

    COPY = "copy"  # the dense tensor of the same key, as it is
    ROUTER = "router"  # a new seeded N(0, std) router
    EXPERTS = "experts"  # E copies of the layer's dense projections, fused (``layout.FUSED_FROM``)


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor and how it is made; ``mlp`` and ``tensor`` name the MoE tensor it is."""

    meta: TensorMeta
    rule: UpcycleRule
    mlp: MLPKeys | None = None
    tensor: MoETensor | None = None


@dataclass(frozen=True)
class UpcyclePlan:
    """What will be written: the MoE ``config.json`` and the ordered output tensors."""

    config: dict[str, Any]
    tensors: list[PlannedTensor]

    @property
    def entries(self) -> list[TensorMeta]:
        return [tensor.meta for tensor in self.tensors]


def _check_dense_config(dense: dict) -> None:
    if dense.get("model_type") == "pdmoe" or "num_experts" in dense:
        raise UsageError("the model is already an MoE; pdmoe upcycle takes a dense checkpoint")
    get_family(dense.get("model_type"))
    if dense.get("hidden_act", "silu") != "silu":
        raise UsageError(f"pdmoe experts are SwiGLU (silu); this model uses {dense['hidden_act']!r}")
    if dense.get("mlp_bias"):
        raise UsageError("MLPs with biases (mlp_bias=true) are not supported by the fused expert layout")


def plan_upcycle(
    reader: CheckpointReader,
    num_experts: int,
    top_k: int,
    layers: str | list[int] | None = None,
    dtype: torch.dtype | None = None,
) -> UpcyclePlan:
    """Validate the dense checkpoint and lay out the MoE checkpoint, reading headers only."""
    dense = reader.config
    _check_dense_config(dense)
    reader.check_config()
    moe_layers = parse_layers(layers, dense["num_hidden_layers"])
    config = moe_config_dict(
        dense, num_experts=num_experts, num_experts_per_tok=top_k, moe_layers=moe_layers, original_experts=[0]
    )
    if dtype is not None:
        config.pop("torch_dtype", None)
        config["dtype"] = str(dtype).removeprefix("torch.")
    for layer in moe_layers:
        keys = MLPKeys.of_layer(layer)
        missing = [keys.dense(p) for p in DenseProjection if keys.dense(p) not in reader]
        if missing:
            raise CheckpointError(
                f"{reader.directory} lacks {', '.join(missing)}; is it a complete dense checkpoint?"
            )

    moe = {MLPKeys.of_layer(layer) for layer in moe_layers}
    tensors: list[PlannedTensor] = []
    for name in reader:
        meta = reader.meta(name)
        out_dtype = dtype if dtype is not None and meta.dtype.is_floating_point else meta.dtype
        match = match_dense(name)
        if match is None or match[0] not in moe:
            tensors.append(PlannedTensor(TensorMeta(name, out_dtype, meta.shape), UpcycleRule.COPY))
            continue
        mlp, projection = match
        if projection is not DenseProjection.GATE:
            continue  # the MoE tensors of a layer are emitted once, where its gate_proj was
        inter, hidden = meta.shape
        shapes = {
            MoETensor.ROUTER: (num_experts, hidden),
            MoETensor.GATE_UP: (num_experts, 2 * inter, hidden),
            MoETensor.DOWN: (num_experts, hidden, inter),
        }
        for tensor, shape in shapes.items():
            rule = UpcycleRule.ROUTER if tensor is MoETensor.ROUTER else UpcycleRule.EXPERTS
            tensors.append(PlannedTensor(TensorMeta(mlp.moe(tensor), out_dtype, shape), rule, mlp, tensor))
    return UpcyclePlan(config=config, tensors=tensors)


def _router_weight(meta: TensorMeta, layer: int, seed: int, std: float) -> torch.Tensor:
    """A seeded N(0, std) router, reproducible per layer whatever the write order."""
    generator = torch.Generator().manual_seed(seed * 100_003 + layer)
    return (torch.randn(meta.shape, generator=generator) * std).to(meta.dtype)


def _check_input(reader: CheckpointReader, name: str, block: torch.Tensor) -> None:
    """Refuse a dense tensor holding NaN or inf (counted over the whole tensor on the way to the error)."""
    if not all_finite(block):
        nan, inf = count_non_finite(reader.blocks(name))
        raise TensorValueError(
            "{directory}: {name} holds {counts} values (of {numel}); upcycling would copy them into the MoE. "
            "Fix or re-download the checkpoint, or pass {allow} to copy them as they are",
            problem=Problem.REFUSED,
            directory=reader.directory,
            name=name,
            counts=describe_counts(nan, inf),
            numel=reader.meta(name).numel,
            allow=ALLOW_NON_FINITE,
        )


def _converted(block: torch.Tensor, meta: TensorMeta, check: bool) -> torch.Tensor:
    """``block`` in the output dtype; refused when the conversion overflows it."""
    out = block.to(meta.dtype)
    if check and out.dtype != block.dtype and not all_finite(out):
        nan, inf = count_non_finite([out])
        raise TensorValueError(
            "{name}: {counts} values appear when converting {source} to {target} (the values exceed its "
            "range); choose a wider {dtype}, or pass {allow}",
            problem=Problem.REFUSED,
            name=meta.name,
            counts=describe_counts(nan, inf),
            source=block.dtype,
            target=meta.dtype,
            dtype=Option("dtype"),
            allow=ALLOW_NON_FINITE,
        )
    return out


def _output_blocks(
    reader: CheckpointReader, planned: PlannedTensor, seed: int, std: float, check_finite: bool
) -> Iterator[torch.Tensor]:
    """The blocks of one planned output tensor, in C order: a copy, a router, or E copies of the dense FFN.

    Unless ``check_finite`` is off, every dense value is checked as it streams by (see ``pdmoe.finite``).
    """
    meta = planned.meta
    if planned.rule is UpcycleRule.COPY:
        for block in reader.blocks(meta.name):
            if check_finite:
                _check_input(reader, meta.name, block)
            yield _converted(block, meta, check_finite)
    elif planned.rule is UpcycleRule.ROUTER:
        yield _router_weight(meta, planned.mlp.layer, seed, std)
    elif planned.rule is UpcycleRule.EXPERTS:
        sources = {key: reader.get(key) for key in planned.mlp.fused_sources(planned.tensor)}
        for key, source in sources.items():
            if check_finite:
                _check_input(reader, key, source)
        expert = _converted(torch.cat(list(sources.values())), meta, check_finite)
        for _ in range(meta.shape[0]):
            yield expert  # the same block E times: queued writes share it, nothing is copied
    else:
        raise AssertionError(f"unhandled upcycle rule {planned.rule}")


def upcycle(
    model: str | Path, out: str | Path, options: UpcycleOptions = DEFAULT_OPTIONS, **changes: Any
) -> Path:
    """Turn the dense checkpoint ``model`` into an MoE checkpoint in ``out``; returns ``out``.

    ``changes`` replace fields of ``options`` (``upcycle(model, out, num_experts=8)``).
    Expert 0 is the dense FFN and experts 1..E-1 are exact copies of it; routers are N(0, std)
    with std = ``router_init_std`` or the dense config's ``initializer_range`` (0.02 for all
    supported families). With identical experts and renormalised top-k the MoE computes exactly
    what the dense model computes, whatever the routers are. NaN or inf in the dense checkpoint,
    or values the output dtype cannot hold, are refused unless ``allow_non_finite``.
    """
    options = replace(options, **changes)
    model, out = resolve_model(model), Path(out)
    with CheckpointReader(model) as reader:
        plan = plan_upcycle(
            reader, options.num_experts, options.top_k, options.layers, parse_dtype(options.dtype)
        )
        std = check_number(
            "router_init_std",
            options.router_init_std
            if options.router_init_std is not None
            else plan.config.get("initializer_range", 0.02),
            low=0,
            high=1,
            hint="routers start near zero; the default is the model's initializer_range, 0.02",
        )
        seed = check_seed(options.seed)
        shards = plan_shards(plan.entries, parse_size(options.shard_size))
        planned = {tensor.meta.name: tensor for tensor in plan.tensors}
        settings = {
            "num_experts": options.num_experts,
            "top_k": options.top_k,
            "moe_layers": plan.config["moe_layers"],
            "router_init_std": std,
            "seed": seed,
            "dtype": str(plan.config.get("dtype")),
            "shard_size": options.shard_size,
        }
        with claim_checkpoint(
            out,
            Command.UPCYCLE,
            shards,
            inputs=(Path(model),),
            overwrite=options.overwrite,
            settings=settings,
        ) as checkpoint:
            checkpoint.ensure_space()
            checkpoint.write_config(without_remote_code(plan.config))
            checkpoint.copy_side_files(Path(model))
            check_finite = not options.allow_non_finite

            def blocks() -> Iterator[ShardBlock]:  # read and converted while the writer thread writes
                for index, shard in enumerate(shards):
                    for meta in shard:
                        for block in _output_blocks(reader, planned[meta.name], seed, std, check_finite):
                            yield index, meta.name, block

            checkpoint.stream(blocks)
            checkpoint.finish()
    return out
