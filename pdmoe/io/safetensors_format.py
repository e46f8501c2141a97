"""The safetensors file format, read and written by hand.

We parse headers ourselves (instead of only going through ``safetensors.safe_open``) so that a
checkpoint can be validated and planned without touching tensor data, truncated files are caught
before any work starts, and shards can be written tensor by tensor with a header computed up front.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from pdmoe.errors import CheckpointError
from pdmoe.io.strict_json import json_type, parse_json

_TORCH_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_DTYPE_NAMES = {dtype: name for name, dtype in _TORCH_DTYPES.items()}
# Dtypes the format defines that pdmoe does not process (sub-byte, scale, complex, unsigned wide).
_FORMAT_ONLY_DTYPES = ("F4", "F6_E2M3", "F6_E3M2", "F8_E8M0", "C64", "U16", "U32", "U64")
# The reference implementation's limits: header size, and offsets that fit an unsigned 64-bit int.
MAX_HEADER_BYTES = 100_000_000
_MAX_OFFSET = 2**64 - 1
METADATA_KEY = "__metadata__"


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise CheckpointError(f"dtype {dtype} cannot be stored in safetensors") from None


@dataclass(frozen=True)
class TensorMeta:
    """Where a tensor lives and what it looks like, known from the header alone."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True)
class ShardHeader:
    """A parsed safetensors header: tensors with their byte ranges, and where the data starts."""

    path: Path
    tensors: dict[str, TensorMeta]
    offsets: dict[str, tuple[int, int]]
    metadata: dict[str, str]
    data_start: int
    digest: str

    @property
    def data_end(self) -> int:
        return self.data_start + max((end for _, end in self.offsets.values()), default=0)


def _is_count(value: object) -> bool:
    """A JSON integer that fits an unsigned 64-bit count (booleans and floats are not)."""
    return type(value) is int and 0 <= value <= _MAX_OFFSET


def _tensor_meta(path: Path, name: str, info: object) -> tuple[TensorMeta, tuple[int, int]]:
    """One entry of the header, checked field by field as the reference library reads it."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict):
        raise CheckpointError(f"{where} is described by {json_type(info)}, not an object")
    missing = [key for key in ("dtype", "shape", "data_offsets") if key not in info]
    if missing:
        raise CheckpointError(f"{where} has no {missing[0]!r}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype in _FORMAT_ONLY_DTYPES:
        raise CheckpointError(f"{where} has dtype {dtype}, which pdmoe does not process")
    if not isinstance(dtype, str) or dtype not in _TORCH_DTYPES:
        raise CheckpointError(f"{where} has an unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(dim) for dim in shape):
        raise CheckpointError(f"{where} has shape {shape!r}; a shape is a list of integers >= 0")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(x) for x in offsets)):
        raise CheckpointError(f"{where} has data_offsets {offsets!r}; they are two integers >= 0")
    meta = TensorMeta(name, _TORCH_DTYPES[dtype], tuple(shape))
    if meta.nbytes > _MAX_OFFSET:
        raise CheckpointError(f"{where} has shape {shape}, too large to address")
    return meta, (offsets[0], offsets[1])


def _read_raw_header(path: Path) -> tuple[bytes, int]:
    """The header bytes and the file size; refuses sizes that cannot hold the header."""
    if not path.is_file():
        raise CheckpointError(f"missing shard {path}")
    with path.open("rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path} is truncated (no safetensors header); re-download or re-create it")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > MAX_HEADER_BYTES:
            raise CheckpointError(
                f"{path} declares a header of {header_len} bytes (the format allows {MAX_HEADER_BYTES}); "
                "it is corrupt or not a safetensors file"
            )
        if 8 + header_len > size:
            raise CheckpointError(
                f"{path} is truncated or not a safetensors file (header of {header_len} bytes)"
            )
        return handle.read(header_len), size


def read_header(path: Path) -> ShardHeader:
    """Parse and validate a shard's header, at least as strictly as the ``safetensors`` library.

    Refused: a header that is not a UTF-8 JSON object or holds a key twice; ``__metadata__`` that
    is not a map of strings to strings; a tensor without dtype, shape or data_offsets, or with an
    unknown dtype; shape dimensions or offsets that are not integers >= 0; byte ranges that are
    not laid out back to back from 0, do not match shape x dtype, or do not end exactly at the end
    of the file (truncated, or trailing bytes). Every refusal is a CheckpointError naming the file.
    """
    path = Path(path)
    raw, size = _read_raw_header(path)
    header = parse_json(raw, f"{path} (safetensors header)")
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{path} has a safetensors header that is {json_type(header)}, not an object; "
            "it is corrupt or not a safetensors file"
        )
    metadata = header.pop(METADATA_KEY, None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: {METADATA_KEY} must map strings to strings, got {metadata!r}")
    entries = sorted(
        (_tensor_meta(path, name, info) for name, info in header.items()), key=lambda entry: entry[1]
    )
    end = 0
    for meta, (begin, stop) in entries:
        if begin != end or stop < begin:
            raise CheckpointError(
                f"{path}: tensor {meta.name!r} has data_offsets [{begin}, {stop}], but the data of the "
                f"tensors before it ends at {end}; byte ranges must follow each other without gaps or overlaps"
            )
        if stop - begin != meta.nbytes:
            raise CheckpointError(
                f"{path}: tensor {meta.name!r} has {stop - begin} bytes for {dtype_name(meta.dtype)} {list(meta.shape)} "
                f"({meta.nbytes} bytes)"
            )
        end = stop
    data_start = 8 + len(raw)
    if data_start + end > size:
        raise CheckpointError(
            f"{path} is truncated: its header promises {data_start + end} bytes, the file has {size}; "
            "re-download or re-create it"
        )
    if data_start + end < size:
        raise CheckpointError(
            f"{path} has {size - data_start - end} bytes after its last tensor; the header does not "
            "describe the whole file, so it is corrupt or was altered"
        )
    return ShardHeader(
        path=path,
        tensors={meta.name: meta for meta, _ in entries},
        offsets={meta.name: offsets for meta, offsets in entries},
        metadata=metadata,
        data_start=data_start,
        digest=hashlib.sha256(raw).hexdigest(),
    )


def encode_header(entries: list[TensorMeta], metadata: dict[str, str] | None = None) -> bytes:
    """The header bytes (length prefix included) for tensors laid out back to back in this order."""
    header: dict[str, object] = {METADATA_KEY: {"format": "pt", **(metadata or {})}}
    offset = 0
    for meta in entries:
        header[meta.name] = {
            "dtype": dtype_name(meta.dtype),
            "shape": list(meta.shape),
            "data_offsets": [offset, offset + meta.nbytes],
        }
        offset += meta.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw
