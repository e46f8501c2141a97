"""The safetensors file format, read and written by hand.

We parse headers ourselves (instead of only going through ``safetensors.safe_open``) so that a
checkpoint can be validated and planned without touching tensor data, truncated files are caught
before any work starts, and shards can be written tensor by tensor with a header computed up front.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from pdmoe.errors import CheckpointError

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
_MAX_HEADER_BYTES = 100 * 1024 * 1024


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _TORCH_DTYPES[name]
    except KeyError:
        raise CheckpointError(f"unsupported safetensors dtype {name!r}") from None


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


def read_header(path: Path) -> ShardHeader:
    """Parse and validate a shard's header; a truncated or corrupt file raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing shard {path}")
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path} is truncated (no safetensors header); re-download or re-create it")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
            raise CheckpointError(
                f"{path} is truncated or not a safetensors file (header of {header_len} bytes)"
            )
        raw = handle.read(header_len)
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise CheckpointError(f"{path} has a corrupt safetensors header: {exc}") from None
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, TensorMeta] = {}
    offsets: dict[str, tuple[int, int]] = {}
    for name, info in header.items():
        meta = TensorMeta(name, dtype_from_name(info["dtype"]), tuple(int(d) for d in info["shape"]))
        begin, end = (int(x) for x in info["data_offsets"])
        if end - begin != meta.nbytes:
            raise CheckpointError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {meta.shape}")
        tensors[name] = meta
        offsets[name] = (begin, end)
    shard = ShardHeader(
        path=path,
        tensors=tensors,
        offsets=offsets,
        metadata=metadata,
        data_start=8 + header_len,
        digest=hashlib.sha256(raw).hexdigest(),
    )
    if shard.data_end > size:
        raise CheckpointError(
            f"{path} is truncated: its header promises {shard.data_end} bytes, the file has {size}; "
            "re-download or re-create it"
        )
    return shard


def encode_header(entries: list[TensorMeta], metadata: dict[str, str] | None = None) -> bytes:
    """The header bytes (length prefix included) for tensors laid out back to back in this order."""
    header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
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
