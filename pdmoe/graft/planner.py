"""The graft plan: every output tensor, where its rows come from, and its output shard.

Built from the three checkpoints' headers and configs only (no tensor data), so every check
happens before anything is written. Rules, per output tensor (the output has CPT's keys):

* ``shared_delta``   a tensor of BASE, INSTRUCT and CPT: CPT + SCALE * (INSTRUCT - BASE);
* ``expert_delta``   ``experts.gate_up_proj`` / ``experts.down_proj`` of an MoE layer: every expert
  gets the delta of that layer's dense FFN (gate rows then up rows, or down);
* ``router``         ``mlp.gate.weight`` of an MoE layer: CPT value;
* ``cpt_only``       no dense counterpart (or not floating point): CPT value;
* ``embedding_kept`` embeddings / lm_head under ``skip_embeddings``: CPT value.

Vocabulary (embed_tokens / lm_head rows). Rows are token ids, so a delta only makes sense for
ids that BASE and INSTRUCT share: the first ``V_base`` rows get the delta.

* CPT with more rows than BASE (new-language tokens): those rows keep CPT's values, and the
  tokenizer comes from CPT (it knows the new tokens) with INSTRUCT's chat template.
* INSTRUCT with more rows than BASE (tokens added in post-training, e.g. chat markers): the output
  gets those rows with INSTRUCT's values (no other checkpoint has them, and INSTRUCT's tokenizer,
  which is used, gives them meaning); ``vocab_size`` in the config follows.
* Both at once would give the same ids to different tokens: refused, with how to fix it.

Tied embeddings: a checkpoint without ``lm_head.weight`` ties it to the embeddings, so nothing
is planned for it. When CPT has an ``lm_head`` but BASE / INSTRUCT tie theirs, its delta is their
embeddings' delta; a CPT that ties a head BASE has separately is refused (the head's delta would
be lost).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from pdmoe.errors import CheckpointError
from pdmoe.graft.methods import MergeSpec
from pdmoe.io.model_config import moe_layers_problem, without_remote_code
from pdmoe.io.reader import CheckpointReader
from pdmoe.io.safetensors_format import TensorMeta
from pdmoe.io.writer import plan_shards, shard_file_names
from pdmoe.layout import (
    EMBED_TOKENS,
    FUSED_EXPERT_TENSORS,
    FUSED_FROM,
    LM_HEAD,
    VOCABULARY_TENSOR,
    DenseProjection,
    MLPKeys,
    MoETensor,
    match_moe,
)


class Role(Enum):
    """The three input checkpoints of a graft."""

    BASE = "base"
    INSTRUCT = "instruct"
    CPT = "cpt"


class GraftRule(Enum):
    """How an output tensor is made (see the module docstring)."""

    SHARED_DELTA = "shared_delta"
    EXPERT_DELTA = "expert_delta"
    ROUTER = "router"
    CPT_ONLY = "cpt_only"
    EMBEDDING_KEPT = "embedding_kept"


class RowSource(Enum):
    """Where a piece of rows comes from."""

    DELTA = "delta"  # CPT's rows plus the delta of BASE / INSTRUCT's ``dense`` rows
    CPT = "cpt"  # CPT's rows as they are
    INSTRUCT = "instruct"  # INSTRUCT's ``dense`` rows, for tokens only INSTRUCT has


_STRUCTURE = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)
_SHOWN_MISMATCHES = 5


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of the output (of each expert) and where they come from.

    ``dense`` rows are read from ``dense_start`` on (``RowSource.DELTA`` and ``INSTRUCT``).
    """

    start: int
    stop: int
    source: RowSource
    dense: str | None = None
    dense_start: int = 0


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: its rule, layout (``experts`` leading slices, 0 for a plain tensor) and rows."""

    out: TensorMeta
    rule: GraftRule
    experts: int
    pieces: tuple[Piece, ...]
    shard: int

    @property
    def rows(self) -> int:
        """Rows per expert (dim 1 of a fused expert tensor), or dim 0 of a plain tensor."""
        shape = self.out.shape
        return shape[1] if self.experts else (shape[0] if shape else 1)

    @property
    def width(self) -> int:
        """Elements per row."""
        return self.out.numel // max(self.rows * max(self.experts, 1), 1)


@dataclass(frozen=True)
class VocabRows:
    """Embedding rows of each checkpoint; ``output`` is what the grafted model gets."""

    base: int
    instruct: int
    cpt: int
    output: int


@dataclass
class GraftPlan:
    """Everything the runner needs; ``describe()`` is what ``--dry-run`` prints."""

    tensors: list[TensorPlan]
    shards: list[list[TensorMeta]]
    scale: float
    merge: MergeSpec
    skip_embeddings: bool
    config: dict[str, Any]
    tokenizer_source: Role
    vocab: VocabRows | None
    moe_layers: list[int]
    num_experts: int
    frozen_experts: int  # leading experts a pdmoe CPT keeps frozen (its ``original_experts``)

    @property
    def total_bytes(self) -> int:
        return sum(plan.out.nbytes for plan in self.tensors)

    def counts(self) -> dict[str, int]:
        found = Counter(plan.rule for plan in self.tensors)
        return {rule.value: found.get(rule, 0) for rule in GraftRule}

    def fingerprint(self, inputs: dict[str, Any]) -> str:
        """Identifies this plan on these inputs: a resumed run reuses only shards that carry it."""
        payload = {
            "inputs": inputs,
            "alpha": self.scale,  # the key as earlier outputs' shards carry it, so they still resume
            "merge": self.merge.fingerprint_fields(),
            "skip_embeddings": self.skip_embeddings,
            "tensors": [
                (
                    p.out.name,
                    str(p.out.dtype),
                    p.out.shape,
                    p.rule.value,
                    p.shard,
                    [(x.start, x.stop, x.source.value, x.dense, x.dense_start) for x in p.pieces],
                )
                for p in self.tensors
            ],
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def describe(self) -> str:
        names = shard_file_names(len(self.shards))
        lines = [
            f"graft plan: {len(self.tensors)} tensors, {self.total_bytes / 2**30:.3f} GiB in {len(names)} shard(s), "
            f"SCALE={self.scale:g}, {self.merge.describe()}, tokenizer from {self.tokenizer_source.value.upper()}",
            "counts: " + ", ".join(f"{rule}={count}" for rule, count in self.counts().items()),
        ]
        if self.moe_layers:
            lines.append(
                f"MoE layers {self.moe_layers}, {self.num_experts} experts each, "
                f"experts 0..{self.frozen_experts - 1} and shared tensors checked equal to BASE's in CPT"
            )
        if self.vocab is not None:
            v = self.vocab
            lines.append(
                f"vocabulary rows: BASE {v.base}, INSTRUCT {v.instruct}, CPT {v.cpt} -> output {v.output}"
            )
        for plan in self.tensors:
            sources = " + ".join(
                f"[{p.start}:{p.stop}] {p.source.value}"
                + (f"({p.dense})" if p.dense and p.dense != plan.out.name else "")
                for p in plan.pieces
            )
            lines.append(
                f"{plan.out.name}  {plan.rule.value}  {str(plan.out.dtype).removeprefix('torch.')}{list(plan.out.shape)}"
                f"  -> {names[plan.shard]}  {sources}"
            )
        return "\n".join(lines)


def _mismatch_error(title: str, problems: list[str], hint: str) -> CheckpointError:
    shown = "\n  ".join(problems[:_SHOWN_MISMATCHES])
    more = (
        f"\n  ... and {len(problems) - _SHOWN_MISMATCHES} more" if len(problems) > _SHOWN_MISMATCHES else ""
    )
    return CheckpointError(f"{title}; first mismatches:\n  {shown}{more}\n{hint}")


def _rows_may_grow(name: str, small: TensorMeta, big: TensorMeta) -> bool:
    """Embedding-like tensors may have more rows (tokens) in a later checkpoint, nothing else."""
    return (
        VOCABULARY_TENSOR.search(name) is not None
        and len(small.shape) == len(big.shape) >= 1
        and small.shape[1:] == big.shape[1:]
        and big.shape[0] >= small.shape[0]
        and small.dtype.is_floating_point == big.dtype.is_floating_point
    )


def _shape_problem(name: str, a: TensorMeta, b: TensorMeta, a_label: str, b_label: str) -> str | None:
    if a.shape == b.shape and a.dtype.is_floating_point == b.dtype.is_floating_point:
        return None
    if _rows_may_grow(name, a, b):
        return None
    return f"{name}: {a.dtype} {list(a.shape)} in {a_label}, {b.dtype} {list(b.shape)} in {b_label}"


def _config_problems(a: dict, b: dict, a_label: str, b_label: str, b_type: str | None) -> list[str]:
    problems = []
    if a.get("model_type") != b_type:
        problems.append(f"config model_type: {a.get('model_type')!r} in {a_label}, {b_type!r} in {b_label}")
    for key in _STRUCTURE:  # a field only one side spells out (e.g. a derived head_dim) is no mismatch
        if key in a and key in b and a[key] != b[key]:
            problems.append(f"config {key}: {a.get(key)!r} in {a_label}, {b.get(key)!r} in {b_label}")
    return problems


def _check_base_instruct(base: CheckpointReader, instruct: CheckpointReader) -> None:
    problems = _config_problems(
        base.config, instruct.config, "BASE", "INSTRUCT", instruct.config.get("model_type")
    )
    for name in sorted(set(base) | set(instruct)):
        if name not in instruct:
            problems.append(f"{name}: in BASE, missing in INSTRUCT")
        elif name not in base:
            problems.append(f"{name}: in INSTRUCT, missing in BASE")
        elif problem := _shape_problem(name, base.meta(name), instruct.meta(name), "BASE", "INSTRUCT"):
            problems.append(problem)
    if problems:
        raise _mismatch_error(
            "BASE and INSTRUCT are not the same architecture",
            problems,
            "INSTRUCT must be the post-trained version of BASE (same family, sizes and tensors).",
        )


def _tied_counterpart(name: str, base: CheckpointReader) -> str | None:
    """BASE's embeddings stand for a head that CPT has and BASE lacks (a model without one ties it)."""
    if not name.endswith(LM_HEAD):
        return None
    embeddings = [key for key in base if key.endswith(EMBED_TOKENS)]
    return embeddings[0] if len(embeddings) == 1 else None


@dataclass
class _Builder:
    base: CheckpointReader
    instruct: CheckpointReader
    cpt: CheckpointReader
    skip_embeddings: bool
    dtype: torch.dtype | None
    problems: list[str] = field(default_factory=list)
    vocab: list[VocabRows] = field(default_factory=list)

    def moe_mlps(self) -> dict[MLPKeys, int]:
        """MoE blocks of CPT (``model.layers.3.mlp`` -> number of experts), checked against BASE's FFN."""
        found: dict[MLPKeys, int] = {}
        for name in self.cpt:
            match = match_moe(name)
            if match is None or match[1] is not MoETensor.GATE_UP:
                continue
            mlp = match[0]
            missing = [f"{mlp.dense(p)} in BASE" for p in DenseProjection if mlp.dense(p) not in self.base]
            missing += [f"{mlp.moe(t)} in CPT" for t in FUSED_EXPERT_TENSORS if mlp.moe(t) not in self.cpt]
            if missing:
                self.problems.append(f"{name}: MoE layer in CPT, but no {missing[0]}")
                continue
            experts = self.cpt.meta(name).shape[0] if self.cpt.meta(name).shape else 0
            for tensor in FUSED_EXPERT_TENSORS:
                key, sources = mlp.moe(tensor), [self.base.meta(k) for k in mlp.fused_sources(tensor)]
                have = self.cpt.meta(key).shape
                want = (experts, sum(s.shape[0] for s in sources), *sources[0].shape[1:])
                if have != want or any(s.shape[1:] != sources[0].shape[1:] for s in sources):
                    self.problems.append(f"{key}: {list(have)} in CPT, expected {list(want)} from BASE")
            found[mlp] = experts
        return found

    def check_cpt_covers_base(self, moe: dict[MLPKeys, int]) -> None:
        replaced = {mlp.dense(projection) for mlp in moe for projection in DenseProjection}
        for name in sorted(self.base):
            if name in replaced and name not in self.cpt:
                continue
            if name not in self.cpt:
                hint = (
                    " (CPT ties lm_head to the embeddings, BASE does not)" if name.endswith(LM_HEAD) else ""
                )
                self.problems.append(f"{name}: in BASE, missing in CPT{hint}")
            elif problem := _shape_problem(name, self.base.meta(name), self.cpt.meta(name), "BASE", "CPT"):
                self.problems.append(problem)

    def out_meta(self, name: str, rows: int | None = None) -> TensorMeta:
        meta = self.cpt.meta(name)
        dtype = self.dtype if self.dtype is not None and meta.dtype.is_floating_point else meta.dtype
        shape = meta.shape if rows is None else (rows, *meta.shape[1:])
        return TensorMeta(name, dtype, shape)

    def plain(self, name: str, dense: str) -> tuple[TensorMeta, str, tuple[Piece, ...]]:
        meta = self.cpt.meta(name)
        if dense != name and (
            problem := _shape_problem(name, self.base.meta(dense), meta, f"BASE ({dense})", "CPT")
        ):
            self.problems.append(problem)
        base_rows = self.base.meta(dense).shape[0] if meta.shape else 1
        cpt_rows = meta.shape[0] if meta.shape else 1
        instruct_rows = self.instruct.meta(dense).shape[0] if meta.shape else 1
        keep = self.skip_embeddings and VOCABULARY_TENSOR.search(name) is not None
        pieces = (
            [Piece(0, cpt_rows, RowSource.CPT)] if keep else [Piece(0, base_rows, RowSource.DELTA, dense)]
        )
        if not keep and cpt_rows > base_rows:
            pieces.append(Piece(base_rows, cpt_rows, RowSource.CPT))
        out_rows = cpt_rows
        if instruct_rows > base_rows:
            if cpt_rows > base_rows:
                self.problems.append(
                    f"{name}: INSTRUCT adds rows {base_rows}..{instruct_rows - 1} and CPT adds rows "
                    f"{base_rows}..{cpt_rows - 1} to BASE's {base_rows}: the same token ids would mean different "
                    "tokens. Extend CPT's vocabulary after INSTRUCT's added tokens (resize CPT to include them) "
                    "and graft again"
                )
            out_rows = cpt_rows + instruct_rows - base_rows
            pieces.append(Piece(cpt_rows, out_rows, RowSource.INSTRUCT, dense, base_rows))
        if VOCABULARY_TENSOR.search(name):
            self.vocab.append(VocabRows(base_rows, instruct_rows, cpt_rows, out_rows))
        rule = GraftRule.EMBEDDING_KEPT if keep else GraftRule.SHARED_DELTA
        return self.out_meta(name, out_rows if meta.shape else None), rule, tuple(pieces)


def build_plan(
    base: CheckpointReader,
    instruct: CheckpointReader,
    cpt: CheckpointReader,
    *,
    scale: float = 1.0,
    merge: MergeSpec | None = None,
    skip_embeddings: bool = False,
    dtype: torch.dtype | None = None,
    shard_bytes: int,
) -> GraftPlan:
    """Check that the three checkpoints fit together and plan every output tensor; reads headers only."""
    _check_base_instruct(base, instruct)
    cpt_config = cpt.config
    cpt_type = cpt_config.get("base_model_type", cpt_config.get("model_type"))
    builder = _Builder(base, instruct, cpt, skip_embeddings, dtype)
    builder.problems.extend(_config_problems(base.config, cpt_config, "BASE", "CPT", cpt_type))
    moe = builder.moe_mlps()
    builder.check_cpt_covers_base(moe)
    routers = {mlp.moe(MoETensor.ROUTER) for mlp in moe}
    layers = sorted(mlp.layer for mlp in moe if mlp.layer is not None)
    original = cpt_config.get("original_experts", [0]) if moe else []
    if not isinstance(original, list) or sorted(original) != list(range(len(original))):
        builder.problems.append(f"config original_experts {original!r} in CPT, expected experts 0..n-1")
    if problem := moe_layers_problem(cpt_config, layers):
        builder.problems.append(f"CPT's config: {problem}")
    if builder.problems:
        raise _mismatch_error(
            "CPT does not match BASE",
            builder.problems,
            "CPT must be BASE after continued pre-training, dense or upcycled with `pdmoe upcycle`.",
        )
    for reader in (base, instruct, cpt):
        reader.check_config()

    entries: list[tuple[TensorMeta, GraftRule, int, tuple[Piece, ...]]] = []
    for name in _file_order(cpt):
        meta = cpt.meta(name)
        match = match_moe(name)
        if match and match[0] in moe and match[1] in FUSED_FROM:
            mlp, tensor = match
            pieces, start = [], 0
            for key in mlp.fused_sources(tensor):
                rows = base.meta(key).shape[0]
                pieces.append(Piece(start, start + rows, RowSource.DELTA, key))
                start += rows
            entries.append((builder.out_meta(name), GraftRule.EXPERT_DELTA, moe[mlp], tuple(pieces)))
            continue
        dense = name if name in base else _tied_counterpart(name, base)
        if name in routers or dense is None or not meta.dtype.is_floating_point:
            rows = meta.shape[0] if meta.shape else 1
            entries.append(
                (
                    builder.out_meta(name),
                    GraftRule.ROUTER if name in routers else GraftRule.CPT_ONLY,
                    0,
                    (Piece(0, rows, RowSource.CPT),),
                )
            )
            continue
        out, rule, pieces = builder.plain(name, dense)
        entries.append((out, rule, 0, pieces))
    if builder.problems:
        raise _mismatch_error(
            "the vocabularies cannot be combined", builder.problems, "See `pdmoe graft --help`."
        )

    shards = plan_shards([out for out, *_ in entries], shard_bytes)
    shard_of = {meta.name: index for index, shard in enumerate(shards) for meta in shard}
    tensors = [
        TensorPlan(out, rule, experts, pieces, shard_of[out.name]) for out, rule, experts, pieces in entries
    ]
    vocab = max(builder.vocab, key=lambda v: v.output, default=None)
    return GraftPlan(
        tensors=tensors,
        shards=shards,
        scale=scale,
        merge=merge or MergeSpec(),
        skip_embeddings=skip_embeddings,
        config=_output_config(cpt_config, vocab, dtype),
        tokenizer_source=Role.CPT if vocab is not None and vocab.cpt > vocab.base else Role.INSTRUCT,
        vocab=vocab,
        moe_layers=layers,
        num_experts=max(moe.values(), default=0),
        frozen_experts=len(original),
    )


def _file_order(reader: CheckpointReader) -> list[str]:
    """CPT's tensors in the order they lie on disk, so its shards are read front to back."""
    return sorted(
        reader, key=lambda n: (reader.weight_map[n], reader.shards[reader.weight_map[n]].offsets[n][0])
    )


def _output_config(
    cpt_config: dict[str, Any], vocab: VocabRows | None, dtype: torch.dtype | None
) -> dict[str, Any]:
    """CPT's config, with the vocabulary size and dtype of what is written, and no remote-code field."""
    config = without_remote_code(cpt_config)
    if vocab is not None and vocab.output != vocab.cpt and config.get("vocab_size") == vocab.cpt:
        config["vocab_size"] = vocab.output
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        for key in ("dtype", "torch_dtype"):
            if key in config or key == "dtype":
                config[key] = name
    return config
