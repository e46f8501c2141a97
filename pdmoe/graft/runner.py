"""Executing a graft plan: stream blocks of rows from the inputs through the math into the shards.

Memory stays bounded by a few blocks of ``BLOCK_ELEMENTS`` elements (independent of model and
tensor size): inputs are read with positioned reads a block at a time, and a writer thread takes
finished blocks from a short queue, so reading and arithmetic (main thread) overlap with writing
and fsync (writer thread). Crash safety comes from ``CheckpointWriter``: each shard appears under
its final name only when complete, ``graft.json`` and then the index come last. Every shard
carries the plan's fingerprint (plan, options, input header hashes, pdmoe version) in its metadata, and the
run records each input file's size and mtime (``.graft-inputs.json`` while it runs, then in
``graft.json``), so ``resume`` reuses exactly the shards that a run of the same plan on unchanged
inputs finished, and rewrites everything else.

Side files: ``config.json`` is CPT's (vocabulary size and dtype adjusted to what is written),
``generation_config.json`` INSTRUCT's; tokenizer files and chat template are INSTRUCT's, unless
CPT extended the vocabulary: then the tokenizer is CPT's (only it knows the new tokens) and the
chat template INSTRUCT's (file, and ``chat_template`` of ``tokenizer_config.json``).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path

import torch

from pdmoe.errors import Option, Problem, TensorValueError
from pdmoe.finite import ALLOW_NON_FINITE, all_finite, count_non_finite, describe_counts
from pdmoe.graft.delta import apply_delta, param_delta, work_dtype
from pdmoe.graft.lineage import LineageCheck
from pdmoe.graft.merge_stream import MergedTensor, Span
from pdmoe.graft.methods import MergeSpec, TaskVectorMerge
from pdmoe.graft.options import GraftOptions
from pdmoe.graft.planner import GraftPlan, Piece, Role, RowSource, TensorPlan
from pdmoe.io.background import BlockPool
from pdmoe.io.outputs import OutputFolder
from pdmoe.io.reader import BLOCK_ELEMENTS, INDEX_FILE, CheckpointReader
from pdmoe.io.side_files import (
    CHAT_TEMPLATE_FILES,
    GENERATION_CONFIG,
    TOKENIZER_CONFIG,
    TOKENIZER_FILES,
)
from pdmoe.io.streaming import ShardBlock, StreamingCheckpoint
from pdmoe.io.strict_json import read_json_object
from pdmoe.io.writer import CheckpointWriter
from pdmoe.version import pdmoe_version

MANIFEST = "graft.json"
RUN_STAMPS = ".graft-inputs.json"
_SHARD_FILE = re.compile(r"^\.?model(-\d{5}-of-\d{5})?\.safetensors(\.partial)?$")


@dataclass
class GraftReport:
    """What a graft did (or, for a dry run, would do)."""

    out_dir: Path
    plan: GraftPlan
    dry_run: bool = False
    shards_written: int = 0
    shards_skipped: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        if self.dry_run:
            return self.plan.describe()
        counts = ", ".join(f"{rule}={count}" for rule, count in self.plan.counts().items())
        rate = (self.bytes_read + self.bytes_written) / max(self.seconds, 1e-9) / 2**20
        resumed = f" ({self.shards_skipped} already complete)" if self.shards_skipped else ""
        return (
            f"grafted {len(self.plan.tensors)} tensors into {self.out_dir}: {self.shards_written} shard(s) written"
            f"{resumed}, {counts}; {self.seconds:.1f} s, {rate:.0f} MiB/s read+written"
        )


class _Work(Enum):
    """Scratch buffers of the arithmetic (input blocks have one buffer per ``Role``)."""

    DELTA = "delta"
    SUM = "sum"
    KEPT_DELTA = "kept_delta"  # a fused expert tensor's delta, one per span, kept while its experts go by


class Streamer:
    """Produces the output blocks of one tensor plan, in file order, from the three readers.

    Each block is checked on the way: its values finite (unless ``check_finite`` is off), and,
    with a ``lineage`` check, CPT's rows that a pdmoe CPT leaves untouched equal BASE's.
    """

    def __init__(
        self,
        readers: dict[Role, CheckpointReader],
        scale: float,
        merge: MergeSpec,
        *,
        lineage: LineageCheck | None,
        check_finite: bool,
    ) -> None:
        self.readers, self.scale, self.merge = readers, scale, merge
        self.lineage, self.check_finite = lineage, check_finite
        self.bytes_read = 0
        self.pool = BlockPool()  # output blocks, given back by the writer thread once written
        self._buffers: dict[Role | _Work | tuple[_Work, int], torch.Tensor] = {}
        self._base_block: tuple[tuple[str, int, int], torch.Tensor] | None = None  # BASE's last read

    def _scratch(self, key: Role | _Work | tuple[_Work, int], count: int, dtype: torch.dtype) -> torch.Tensor:
        """A reusable buffer per use: a fresh allocation per block would cost a page fault per 4 KiB."""
        buffer = self._buffers.get(key)
        if buffer is None or buffer.dtype != dtype or buffer.numel() < count:
            buffer = self._buffers[key] = torch.empty(max(count, BLOCK_ELEMENTS), dtype=dtype)
        return buffer[:count]

    def _read(self, role: Role, name: str, start: int, count: int) -> torch.Tensor:
        """Elements of tensor ``name`` of input ``role``, in that role's buffer: valid until its next read."""
        reader = self.readers[role]
        block = reader.read_elements(
            name, start, count, out=self._scratch(role, count, reader.meta(name).dtype)
        )
        self.bytes_read += block.nbytes
        if role is Role.BASE:
            self._base_block = ((name, start, count), block)
        return block

    def _base(self, name: str, start: int, count: int) -> torch.Tensor:
        """BASE's elements, from its buffer when they were the last read (no second read)."""
        if self._base_block is not None and self._base_block[0] == (name, start, count):
            return self._base_block[1]
        return self._read(Role.BASE, name, start, count)

    def blocks(self, plan: TensorPlan) -> Iterator[torch.Tensor]:
        """The output blocks of ``plan`` in file order: expert by expert, piece by piece, rows in
        steps; the merge method's strategy computes the delta pieces."""
        if plan.out.numel == 0:
            yield torch.empty(0, dtype=plan.out.dtype)
            return
        step = max(1, BLOCK_ELEMENTS // plan.width)
        spans = [
            (piece, start, min(start + step, piece.stop))
            for piece in plan.pieces
            for start in range(piece.start, piece.stop, step)
        ]
        if any(piece.source is RowSource.DELTA for piece in plan.pieces):
            yield from self.merge.strategy.stream(self, plan, spans)
        else:  # nothing to merge: rows copied from CPT / INSTRUCT
            yield from self.delta_blocks(plan, spans)

    def delta_blocks(self, plan: TensorPlan, spans: list[Span]) -> Iterator[torch.Tensor]:
        """``blocks`` for the graft's own arithmetic, CPT + SCALE * (INSTRUCT - BASE): every expert
        of a fused expert tensor gets the same delta, so it is computed once per tensor, while
        expert 0 goes by, and kept (at most one expert's slice, in the working dtype) for the others."""
        shared: dict[int, torch.Tensor] = {}
        for expert in range(max(plan.experts, 1)):
            for index, span in enumerate(spans):
                if plan.experts and span[0].source is RowSource.DELTA and index not in shared:
                    shared[index] = self._delta(plan, *span, kept=index)
                yield self._block(plan, expert, *span, shared.get(index))

    def _delta(
        self, plan: TensorPlan, piece: Piece, start: int, stop: int, *, kept: int | None = None
    ) -> torch.Tensor:
        """The delta of these rows, in a scratch buffer: the per-block one, or when the delta is
        ``kept`` across experts, that span's own one."""
        count, offset = (stop - start) * plan.width, (piece.dense_start + start - piece.start) * plan.width
        base = self._read(Role.BASE, piece.dense, offset, count)
        instruct = self._read(Role.INSTRUCT, piece.dense, offset, count)
        work = self._work_dtype(plan, piece)
        key = _Work.DELTA if kept is None else (_Work.KEPT_DELTA, kept)
        out, scratch = self._scratch(key, count, work), self._scratch(_Work.SUM, count, work)
        return param_delta(base, instruct, self.scale, out=out, scratch=scratch)

    def _work_dtype(self, plan: TensorPlan, piece: Piece) -> torch.dtype:
        return work_dtype(
            self.readers[Role.BASE].meta(piece.dense).dtype,
            self.readers[Role.INSTRUCT].meta(piece.dense).dtype,
            self.readers[Role.CPT].meta(plan.out.name).dtype,
        )

    def merged_blocks(
        self, plan: TensorPlan, spans: list[Span], strategy: TaskVectorMerge
    ) -> Iterator[torch.Tensor]:
        """``blocks`` for a task-vector merge: delta pieces from ``MergedTensor``, checked like the others."""
        work = self._work_dtype(plan, next(piece for piece in plan.pieces if piece.source is RowSource.DELTA))
        merged = MergedTensor(plan, spans, self._read, strategy, self.merge, self.scale, work)
        for expert in range(max(plan.experts, 1)):
            for index, (piece, start, stop) in enumerate(spans):
                if piece.source is not RowSource.DELTA:
                    yield self._block(plan, expert, piece, start, stop, None)
                    continue
                count = (stop - start) * plan.width
                out = self._checked(plan, merged.block(expert, index, self.pool.take(count, plan.out.dtype)))
                if self.lineage is not None and self.lineage.applies(plan, expert, piece):
                    dense_offset = (piece.dense_start + start - piece.start) * plan.width
                    cpt = self._read(
                        Role.CPT, plan.out.name, (expert * plan.rows + start) * plan.width, count
                    )
                    base = self._base(piece.dense, dense_offset, count)
                    self.lineage.compare(plan, expert, piece, range(start, stop), cpt, base)
                yield out

    def _block(
        self, plan: TensorPlan, expert: int, piece: Piece, start: int, stop: int, delta: torch.Tensor | None
    ) -> torch.Tensor:
        """Output rows [start, stop) of ``expert`` in a block of the pool (the writer thread gives it back)."""
        width = plan.width
        count = (stop - start) * width
        dense_offset = (piece.dense_start + start - piece.start) * width
        out = self.pool.take(count, plan.out.dtype)
        if piece.source is RowSource.INSTRUCT:
            return self._checked(plan, out.copy_(self._read(Role.INSTRUCT, piece.dense, dense_offset, count)))
        cpt = self._read(Role.CPT, plan.out.name, (expert * plan.rows + start) * width, count)
        if piece.source is RowSource.CPT:
            return self._checked(plan, out.copy_(cpt))
        if piece.source is not RowSource.DELTA:
            raise AssertionError(f"unhandled row source {piece.source}")
        if delta is None:
            delta = self._delta(plan, piece, start, stop)
        out = self._checked(
            plan, apply_delta(cpt, delta, out, scratch=self._scratch(_Work.SUM, count, delta.dtype))
        )
        if self.lineage is not None and self.lineage.applies(plan, expert, piece):
            base = self._base(piece.dense, dense_offset, count)
            self.lineage.compare(plan, expert, piece, range(start, stop), cpt, base)
        return out

    def _checked(self, plan: TensorPlan, block: torch.Tensor) -> torch.Tensor:
        if self.check_finite and not all_finite(block):
            raise self._non_finite_error(plan, block)
        return block

    def _non_finite_error(self, plan: TensorPlan, block: torch.Tensor) -> TensorValueError:
        """Which input holds NaN / inf (counted over its whole tensor), or else the sum overflowed."""
        sources = {(Role.CPT, plan.out.name)} | {
            (role, piece.dense)
            for piece in plan.pieces
            if piece.dense is not None
            for role in (
                (Role.INSTRUCT,) if piece.source is RowSource.INSTRUCT else (Role.BASE, Role.INSTRUCT)
            )
        }
        found = []
        for role, name in sorted(sources, key=lambda source: (source[0].value, source[1])):
            nan, inf = count_non_finite(self.readers[role].blocks(name))
            if nan or inf:
                numel = self.readers[role].meta(name).numel
                found.append(f"{role.value.upper()} {name}: {describe_counts(nan, inf)} values of {numel}")
        if found:
            return TensorValueError(
                "non-finite values in the inputs of {name}:\n  {found}\nThey would spread into the grafted "
                "model. Fix or re-download the checkpoint, or pass {allow} to write them as they are",
                problem=Problem.REFUSED,
                name=plan.out.name,
                found="\n  ".join(found),
                allow=ALLOW_NON_FINITE,
            )
        nan, inf = count_non_finite([block])
        return TensorValueError(
            "{name}: CPT + SCALE * (INSTRUCT - BASE) with SCALE={value:g} gives {counts} values in {target}: "
            "the result exceeds its range. Lower {scale} or choose a wider {dtype} (or pass {allow})",
            problem=Problem.REFUSED,
            name=plan.out.name,
            value=self.scale,
            counts=describe_counts(nan, inf),
            target=plan.out.dtype,
            scale=Option("scale"),
            dtype=Option("dtype"),
            allow=ALLOW_NON_FINITE,
        )


def _inputs_manifest(readers: dict[Role, CheckpointReader]) -> dict[str, dict]:
    return {
        role.value: {"path": str(reader.directory.resolve()), "header_sha256": reader.header_digests()}
        for role, reader in readers.items()
    }


def _file_stamps(readers: dict[Role, CheckpointReader]) -> dict[str, list[list]]:
    """Name, size and mtime of every input shard: header hashes cannot see values rewritten in place."""
    return {
        role.value: [
            [name, (stat := shard.path.stat()).st_size, stat.st_mtime_ns]
            for name, shard in sorted(reader.shards.items())
        ]
        for role, reader in readers.items()
    }


def _earlier_file_stamps(out_dir: Path) -> dict | None:
    """The input stamps of the run that left ``out_dir`` as it is: interrupted, or finished."""
    try:
        if (out_dir / RUN_STAMPS).is_file():
            return json.loads((out_dir / RUN_STAMPS).read_text())
        if (out_dir / MANIFEST).is_file():
            inputs = json.loads((out_dir / MANIFEST).read_text())["inputs"]
            return {role: entry["files"] for role, entry in inputs.items()}
    except (ValueError, KeyError, TypeError):
        pass  # unreadable: trust no shard
    return None


def _forget_earlier_run(out_dir: Path, writer: CheckpointWriter) -> None:
    """From here on OUT must not look finished: drop an earlier run's index, manifest and stray shards."""
    for name in (INDEX_FILE, MANIFEST):
        (out_dir / name).unlink(missing_ok=True)
    for path in out_dir.iterdir():
        if _SHARD_FILE.match(path.name) and path.name not in writer.file_names:
            path.unlink()


def _write_side_files(plan: GraftPlan, instruct: Path, cpt: Path, checkpoint: StreamingCheckpoint) -> None:
    out_dir = checkpoint.path
    checkpoint.write_config(plan.config)
    checkpoint.copy_side_files(instruct, (GENERATION_CONFIG,))
    if plan.tokenizer_source is Role.INSTRUCT:
        checkpoint.copy_side_files(instruct, TOKENIZER_FILES)
        return
    checkpoint.copy_side_files(
        cpt, tuple(name for name in TOKENIZER_FILES if name not in CHAT_TEMPLATE_FILES)
    )
    checkpoint.copy_side_files(instruct, CHAT_TEMPLATE_FILES)
    template = (
        read_json_object(instruct / TOKENIZER_CONFIG).get("chat_template")
        if (instruct / TOKENIZER_CONFIG).is_file()
        else None
    )
    if template is not None and (out_dir / TOKENIZER_CONFIG).is_file():
        tokenizer_config = read_json_object(out_dir / TOKENIZER_CONFIG)
        checkpoint.write_json(TOKENIZER_CONFIG, {**tokenizer_config, "chat_template": template})


def execute(
    plan: GraftPlan,
    base: CheckpointReader,
    instruct: CheckpointReader,
    cpt: CheckpointReader,
    folder: OutputFolder,
    *,
    options: GraftOptions,
) -> GraftReport:
    """Write the grafted checkpoint described by ``plan`` into the claimed ``folder`` and mark it
    complete. On failure the shards already complete stay for ``--resume``, unless there are none
    or the inputs' values were refused: then what this run wrote is removed."""
    started = time.perf_counter()
    out_dir = folder.path
    readers = {Role.BASE: base, Role.INSTRUCT: instruct, Role.CPT: cpt}
    inputs = _inputs_manifest(readers)
    fingerprint = plan.fingerprint(
        {"version": pdmoe_version(), **{role: e["header_sha256"] for role, e in inputs.items()}}
    )
    checkpoint = StreamingCheckpoint(folder, plan.shards, metadata={"pdmoe_graft_plan": fingerprint})
    writer = checkpoint.writer
    stamps = _file_stamps(readers)
    trusted = options.resume and _earlier_file_stamps(out_dir) == stamps
    complete = {index for index in range(len(plan.shards)) if trusted and writer.shard_is_complete(index)}
    todo = [index for index in range(len(plan.shards)) if index not in complete]
    lineage = (
        LineageCheck(plan.frozen_experts) if plan.moe_layers and not options.allow_modified_base else None
    )
    streamer = Streamer(
        readers, plan.scale, plan.merge, lineage=lineage, check_finite=not options.allow_non_finite
    )

    def blocks() -> Iterator[ShardBlock]:  # the shards a resumed run did not finish
        for tensor in plan.tensors:
            if tensor.shard not in complete:
                for block in streamer.blocks(tensor):
                    yield tensor.shard, tensor.out.name, block

    try:
        checkpoint.ensure_space(sum(meta.nbytes for index in todo for meta in plan.shards[index]))
        _forget_earlier_run(out_dir, writer)
        checkpoint.write_json(RUN_STAMPS, stamps)
        _write_side_files(plan, instruct.directory, cpt.directory, checkpoint)
        written = checkpoint.stream(blocks, pool=streamer.pool)
        manifest = {
            "pdmoe_version": pdmoe_version(),
            "inputs": {role: {**entry, "files": stamps[role]} for role, entry in inputs.items()},
            "alpha": plan.scale,  # graft.json's key since its first version (options.scale too)
            "merge": plan.merge.describe(),
            "options": asdict(options),
            "counts": plan.counts(),
            "tokenizer_from": plan.tokenizer_source.value,
            "vocabulary": asdict(plan.vocab) if plan.vocab is not None else None,
            "moe_layers": plan.moe_layers,
            "num_experts": plan.num_experts,
            "output": {"tensors": len(plan.tensors), "bytes": plan.total_bytes, "shards": writer.file_names},
            "plan_sha256": fingerprint,
        }
        checkpoint.write_json(MANIFEST, manifest)
        checkpoint.finish(drop=(RUN_STAMPS,))
    except BaseException as error:
        resumable = any((out_dir / name).is_file() for name in writer.file_names)
        if isinstance(error, TensorValueError) or not resumable:
            folder.discard()
        raise
    return GraftReport(
        out_dir=out_dir,
        plan=plan,
        shards_written=len(todo),
        shards_skipped=len(complete),
        bytes_read=streamer.bytes_read,
        bytes_written=written,
        seconds=time.perf_counter() - started,
    )
