"""``pdmoe export``: a pdmoe MoE as a native transformers checkpoint (Mixtral, Qwen2-MoE, Qwen3-MoE).

The export loads in stock transformers, without pdmoe, and in serving stacks that know those
classes (README's compatibility matrix says which run it exactly, checked how). No tensor is
recomputed (``formats`` says why none needs to be; a Qwen2-MoE export adds a shared expert that
adds 0 and, for a Llama/Mistral source, zero q/k/v biases):

* ``per-expert`` layout (default): every shard gets a new header naming the hub's per-expert
  tensors, and its data bytes are copied unchanged by the kernel (``copy_file_range``: a reflink
  on copy-on-write file systems, an in-kernel copy elsewhere). What transformers' ``save_pretrained``
  writes, and what vLLM, llama.cpp's converter and transformers 4.x read.
* ``fused`` layout: the shards are hard links to the input's (no extra disk space; copies where
  the file system cannot link), only ``config.json`` differs. For transformers >= 5, which keeps
  experts fused in memory. Every pdmoe writer replaces files by renaming, so a later pdmoe command
  never changes a linked shard in place under the other folder.

The output is written like every pdmoe output: shards appear under their names only when whole,
the index comes last, and a failed export leaves no folder that looks complete.
torch and the checkpoint readers load when an export runs: the command line parses and checks
its options with this package (``cli``, ``formats``) before they load.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pdmoe.errors import CheckpointError, UsageError
from pdmoe.export.formats import (
    ExpertLayout,
    NativeFormat,
    ServingStack,
    choose_format,
    native_config,
    per_expert_names,
    qwen2_moe_extras,
    stacks_not_exact,
)
from pdmoe.hub import resolve_model
from pdmoe.io.atomic import Staged
from pdmoe.io.outputs import Command

if TYPE_CHECKING:
    from pdmoe.io.reader import CheckpointReader
    from pdmoe.io.safetensors_format import ShardHeader, TensorMeta

__all__ = ["ExpertLayout", "ExportOptions", "ExportReport", "NativeFormat", "check_export", "export"]

_COPY_CHUNK = 1 << 30


@dataclass(frozen=True)
class ExportOptions:
    """How to export, written once: ``pdmoe export`` (and ``pdmoe graft --export``) build them from
    their flags, whose defaults and help defaults read from here. The output marker records the
    format and the layout as ``export`` resolved them."""

    format: str | NativeFormat = NativeFormat.AUTO  # AUTO: the exact one the most serving stacks run exactly
    layout: str | ExpertLayout = ExpertLayout.PER_EXPERT
    overwrite: bool = False


DEFAULT_OPTIONS = ExportOptions()


@dataclass(frozen=True)
class ExportReport:
    out_dir: Path
    format: NativeFormat
    layout: ExpertLayout
    tensors: int
    linked_shards: int
    not_exact_in: dict[ServingStack, str]

    def summary(self) -> str:
        how = f"{self.linked_shards} shard(s) hard-linked" if self.linked_shards else "data copied unchanged"
        caveats = "".join(f"; not exact in {stack.value}: {why}" for stack, why in self.not_exact_in.items())
        return (
            f"exported {self.out_dir} as {self.format.value} ({self.layout.value} experts, "
            f"{self.tensors} tensors, {how}); load it with transformers' AutoModelForCausalLM, "
            f"no pdmoe needed{caveats}"
        )


def _normalised_config(reader: CheckpointReader) -> dict:
    """The pdmoe config with every field the dense family derives (head_dim, layer_types, RoPE),
    after the checks graft makes: every size (experts included) agrees with the tensors."""
    raw = reader.config
    if raw.get("model_type") != "pdmoe":
        raise UsageError(
            f"{reader.directory} is a {raw.get('model_type')!r} model, not a pdmoe MoE; "
            "pdmoe export takes the output of pdmoe upcycle, cpt or graft"
        )
    reader.check_config()
    from pdmoe.config import MoEConfig

    return MoEConfig(**{k: v for k, v in raw.items() if k != "model_type"}).to_dict()


def check_export(
    model: str | os.PathLike[str], format: str | NativeFormat = DEFAULT_OPTIONS.format
) -> NativeFormat:
    """The format ``model`` would be exported to, or the UsageError saying why it has none (reads the config only)."""
    from pdmoe.io.reader import CheckpointReader

    with CheckpointReader(resolve_model(model)) as reader:
        config = _normalised_config(reader)
    return choose_format(config, NativeFormat(format))


def _copy_range(source: int, offset: int, count: int, target) -> None:
    """``count`` bytes of file descriptor ``source`` from ``offset`` appended to the unbuffered file
    ``target`` by the kernel."""
    destination = target.fileno()
    while count:
        try:
            done = os.copy_file_range(source, destination, min(count, _COPY_CHUNK), offset)
        except OSError:  # file systems or kernels without it: an ordinary read/write
            done = os.write(destination, os.pread(source, min(count, 64 << 20), offset))
        if done == 0:
            raise CheckpointError("an input shard was truncated while being exported")
        offset, count = offset + done, count - done


def _rewrite_shard(source: ShardHeader, target: Path, names: list[TensorMeta], order: list[str]) -> None:
    """``target``: a new header for ``names`` and ``source``'s data bytes, tensor by tensor in ``order``."""
    from pdmoe.io.safetensors_format import encode_header

    with Staged(target) as staged, staged.open("wb", buffering=0) as handle:
        handle.write(encode_header(names, {k: v for k, v in source.metadata.items() if k != "format"}))
        fd = os.open(source.path, os.O_RDONLY)
        try:
            for name in order:
                begin, end = source.offsets[name]
                _copy_range(fd, source.data_start + begin, end - begin, handle)
        finally:
            os.close(fd)
        os.fsync(handle.fileno())


def _link_shard(source: Path, target: Path) -> bool:
    """Hard-link ``source`` (a symlink in the Hugging Face cache is followed) as ``target``; copy when
    the file system cannot link. True when linked."""
    with Staged(target) as staged:
        try:
            os.link(source, staged, follow_symlinks=True)
            return True
        except OSError:
            shutil.copyfile(source, staged)
            with staged.open("rb+") as handle:
                os.fsync(handle.fileno())
            return False


def export(
    model: str | os.PathLike[str],
    out: str | os.PathLike[str],
    options: ExportOptions = DEFAULT_OPTIONS,
    **changes: Any,
) -> ExportReport:
    """Write the pdmoe MoE ``model`` (folder or hub id) to ``out`` as a native transformers checkpoint;
    ``changes`` replace fields of ``options`` (``export(model, out, layout="fused")``)."""
    import torch

    from pdmoe.io.reader import CheckpointReader
    from pdmoe.io.safetensors_format import TensorMeta
    from pdmoe.io.streaming import claim_checkpoint
    from pdmoe.io.writer import ShardWriter, shard_file_names, write_index

    options = replace(options, **changes)
    model_dir, out_dir, layout = resolve_model(model), Path(out), ExpertLayout(options.layout)
    with CheckpointReader(model_dir) as reader:
        config = _normalised_config(reader)
        target = choose_format(config, NativeFormat(options.format))
        native = native_config(config, target)
        extras = qwen2_moe_extras(config) if target is NativeFormat.QWEN2_MOE else {}
        dtype = next(reader.meta(name).dtype for name in reader if reader.meta(name).dtype.is_floating_point)
        shards = sorted(reader.shards.items())
        names = shard_file_names(len(shards) + bool(extras))
        settings = {"format": target.value, "layout": layout.value}
        with claim_checkpoint(
            out_dir, Command.EXPORT, inputs=(model_dir,), overwrite=options.overwrite, settings=settings
        ) as checkpoint:  # the shards are linked or re-headed here, not streamed
            if layout is ExpertLayout.PER_EXPERT:
                checkpoint.ensure_space(reader.total_bytes)
            checkpoint.write_config(native)
            checkpoint.copy_side_files(model_dir)
            weight_map: dict[str, str] = {}
            linked = 0
            for (_, header), name in zip(shards, names, strict=False):
                order = sorted(header.tensors, key=lambda tensor: header.offsets[tensor][0])
                if layout is ExpertLayout.FUSED:
                    linked += _link_shard(header.path, out_dir / name)
                    weight_map |= dict.fromkeys(order, name)
                    continue
                renamed = [
                    TensorMeta(new, header.tensors[tensor].dtype, shape)
                    for tensor in order
                    for new, shape in per_expert_names(tensor, header.tensors[tensor].shape, target)
                ]
                _rewrite_shard(header, out_dir / name, renamed, order)
                weight_map |= dict.fromkeys((meta.name for meta in renamed), name)
            if extras:
                entries = [TensorMeta(key, dtype, shape) for key, (shape, _) in extras.items()]
                with ShardWriter(out_dir / names[-1], entries, None) as writer:
                    for meta in entries:
                        writer.write(meta.name, torch.full(meta.shape, extras[meta.name][1], dtype=dtype))
                weight_map |= dict.fromkeys(extras, names[-1])
            if len(names) > 1:
                total = (
                    reader.total_bytes + sum(meta.nbytes for meta in entries)
                    if extras
                    else reader.total_bytes
                )
                write_index(out_dir, weight_map, total)
            checkpoint.finish()
    return ExportReport(out_dir, target, layout, len(weight_map), linked, stacks_not_exact(config, target))
