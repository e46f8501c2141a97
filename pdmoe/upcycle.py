"""Upcycle a dense checkpoint into the MoE checkpoint of METHOD.md, streaming tensor by tensor.

The plan (every output tensor's name, dtype and shape, and its shard) is made from headers alone;
then each dense tensor is read, turned into its MoE form and written straight into its shard.
Tensors kept as they are stream in blocks of elements; peak memory is one layer's dense FFN plus
one expert block, whatever the model size.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from pdmoe.config import MoEConfig, check_supported_family, parse_layers
from pdmoe.dtypes import parse_dtype
from pdmoe.errors import CheckpointError, UsageError
from pdmoe.io import CheckpointReader, CheckpointWriter, TensorMeta, plan_shards, prepare_output_dir
from pdmoe.io.background import BackgroundShardWriter
from pdmoe.io.reader import BLOCK_ELEMENTS
from pdmoe.io.writer import copy_side_files, ensure_free_space, parse_size, write_json

_DENSE_MLP = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")
_MLP_PARTS = ("gate_proj", "up_proj", "down_proj")


def router_key(layer: int) -> str:
    return f"model.layers.{layer}.mlp.gate.weight"


def gate_up_key(layer: int) -> str:
    return f"model.layers.{layer}.mlp.experts.gate_up_proj"


def down_key(layer: int) -> str:
    return f"model.layers.{layer}.mlp.experts.down_proj"


def dense_mlp_key(layer: int, part: str) -> str:
    return f"model.layers.{layer}.mlp.{part}.weight"


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor and how it is made: 'copy' of the same key, 'router', 'gate_up' or 'down'."""

    meta: TensorMeta
    rule: str
    layer: int = -1


@dataclass(frozen=True)
class UpcyclePlan:
    """What will be written: the MoE config and the ordered output tensors."""

    config: MoEConfig
    tensors: list[PlannedTensor]

    @property
    def entries(self) -> list[TensorMeta]:
        return [tensor.meta for tensor in self.tensors]


def _check_dense_config(dense: dict) -> None:
    if dense.get("model_type") == "pdmoe" or "num_experts" in dense:
        raise UsageError("the model is already an MoE; pdmoe upcycle takes a dense checkpoint")
    check_supported_family(dense.get("model_type"))
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
    moe_layers = parse_layers(layers, dense["num_hidden_layers"])
    config = MoEConfig.from_dense(
        dense, num_experts=num_experts, num_experts_per_tok=top_k, moe_layers=moe_layers, original_experts=[0]
    )
    if dtype is not None:
        config.dtype = dtype
    for layer in moe_layers:
        missing = [dense_mlp_key(layer, p) for p in _MLP_PARTS if dense_mlp_key(layer, p) not in reader]
        if missing:
            raise CheckpointError(
                f"{reader.directory} lacks {', '.join(missing)}; is it a complete dense checkpoint?"
            )

    moe = set(moe_layers)
    tensors: list[PlannedTensor] = []
    for name in reader:
        meta = reader.meta(name)
        out_dtype = dtype if dtype is not None and meta.dtype.is_floating_point else meta.dtype
        match = _DENSE_MLP.match(name)
        if match is None or int(match[1]) not in moe:
            tensors.append(PlannedTensor(TensorMeta(name, out_dtype, meta.shape), "copy"))
            continue
        layer, part = int(match[1]), match[2]
        if part != "gate_proj":
            continue  # the three MoE tensors of a layer are emitted once, where its gate_proj was
        inter, hidden = meta.shape
        tensors += [
            PlannedTensor(TensorMeta(router_key(layer), out_dtype, (num_experts, hidden)), "router", layer),
            PlannedTensor(
                TensorMeta(gate_up_key(layer), out_dtype, (num_experts, 2 * inter, hidden)), "gate_up", layer
            ),
            PlannedTensor(
                TensorMeta(down_key(layer), out_dtype, (num_experts, hidden, inter)), "down", layer
            ),
        ]
    return UpcyclePlan(config=config, tensors=tensors)


def _router_weight(meta: TensorMeta, layer: int, seed: int, std: float) -> torch.Tensor:
    """A seeded N(0, std) router, reproducible per layer whatever the write order."""
    generator = torch.Generator().manual_seed(seed * 100_003 + layer)
    return (torch.randn(meta.shape, generator=generator) * std).to(meta.dtype)


def _output_blocks(
    reader: CheckpointReader, planned: PlannedTensor, seed: int, std: float
) -> Iterator[torch.Tensor]:
    """The blocks of one planned output tensor, in C order: a copy, a router, or E copies of the dense FFN."""
    meta, layer = planned.meta, planned.layer
    if planned.rule == "copy":
        for start in range(0, meta.numel, BLOCK_ELEMENTS):
            count = min(BLOCK_ELEMENTS, meta.numel - start)
            yield reader.read_elements(meta.name, start, count).to(meta.dtype)
        return
    if planned.rule == "router":
        yield _router_weight(meta, layer, seed, std)
        return
    if planned.rule == "gate_up":
        parts = [reader.get(dense_mlp_key(layer, "gate_proj")), reader.get(dense_mlp_key(layer, "up_proj"))]
    else:
        parts = [reader.get(dense_mlp_key(layer, "down_proj"))]
    expert = torch.cat(parts).to(meta.dtype)
    del parts
    for _ in range(meta.shape[0]):
        yield expert  # the same block E times: queued writes share it, nothing is copied


def upcycle(
    model: str | Path,
    out: str | Path,
    *,
    num_experts: int = 4,
    top_k: int = 2,
    layers: str | list[int] | None = None,
    router_init_std: float | None = None,
    seed: int = 0,
    dtype: str | torch.dtype | None = None,
    shard_size: str | int = "5GB",
    overwrite: bool = False,
) -> Path:
    """Turn the dense checkpoint ``model`` into an MoE checkpoint in ``out``; returns ``out``.

    Expert 0 is the dense FFN and experts 1..E-1 are exact copies of it; routers are N(0, std)
    with std = ``router_init_std`` or the dense config's ``initializer_range`` (0.02 for all
    supported families). With identical experts and renormalised top-k the MoE computes exactly
    what the dense model computes, whatever the routers are.
    """
    out = Path(out)
    reader = CheckpointReader(model)
    plan = plan_upcycle(reader, num_experts, top_k, layers, parse_dtype(dtype))
    std = router_init_std if router_init_std is not None else plan.config.initializer_range
    if std < 0:
        raise UsageError(f"--router-init-std must be non-negative, got {std}")
    shards = plan_shards(plan.entries, parse_size(shard_size))
    planned = {tensor.meta.name: tensor for tensor in plan.tensors}
    prepare_output_dir(out, overwrite=overwrite, inputs=(Path(model),))
    try:
        writer = CheckpointWriter(out, shards)
        ensure_free_space(out, writer.total_bytes)
        write_json(out / "config.json", plan.config.to_dict())
        copy_side_files(Path(model), out)
        with BackgroundShardWriter(writer) as background:  # reads and writes overlap
            for index, shard in enumerate(shards):
                for meta in shard:
                    for block in _output_blocks(reader, planned[meta.name], seed, std):
                        background.write(index, meta.name, block)
        writer.finish()
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        reader.close()
    return out
