"""A Hugging Face checkpoint directory, read lazily.

Opening validates the whole layout from headers alone (index, shard names, truncation), so a
command fails before it writes anything; tensor data is read only when asked for, whole or a block
of elements at a time, with positioned reads that keep the resident set small.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from pdmoe.errors import CheckpointError
from pdmoe.io.model_config import (
    INDEX_FILE,
    SINGLE_FILE,
    check_config_matches_tensors,
    check_model_folder,
    read_config,
)
from pdmoe.io.outputs import refuse_unfinished
from pdmoe.io.safetensors_format import ShardHeader, TensorMeta, read_header
from pdmoe.io.strict_json import json_type, read_json_object

# Elements per block when a tensor is streamed (16 MiB of fp32): bounds memory, amortises calls.
BLOCK_ELEMENTS = 4 * 2**20
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


class CheckpointReader:
    """Tensors of one checkpoint directory by name, with their metadata known up front."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        check_model_folder(self.directory)
        refuse_unfinished(self.directory)
        self.shards: dict[str, ShardHeader] = {}
        self.weight_map: dict[str, str] = {}
        self._fds: dict[str, int] = {}
        index_path = self.directory / INDEX_FILE
        if index_path.is_file():
            self._open_index(index_path)
        elif (self.directory / SINGLE_FILE).is_file():
            shard = read_header(self.directory / SINGLE_FILE)
            self.shards[SINGLE_FILE] = shard
            self.weight_map = dict.fromkeys(shard.tensors, SINGLE_FILE)
        else:
            self._refuse_missing_safetensors()

    def _open_index(self, index_path: Path) -> None:
        """Shards named by the index; index and shards must agree both ways, tensor by tensor."""
        weight_map = read_json_object(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(
                f"{index_path} has no weight_map object (tensor name -> shard file); re-download or re-create it"
            )
        for name, shard_name in weight_map.items():
            if not isinstance(shard_name, str):
                raise CheckpointError(
                    f"{index_path} maps {name!r} to {json_type(shard_name)}, not to a shard file name"
                )
            if Path(shard_name).name != shard_name or shard_name in ("", ".", ".."):
                raise CheckpointError(
                    f"{index_path} names shard {shard_name!r}, which lies outside the checkpoint directory; "
                    "shard names must be plain file names"
                )
        for shard_name in sorted(set(weight_map.values())):
            self.shards[shard_name] = read_header(self.directory / shard_name)
        for name, shard_name in weight_map.items():
            if name not in self.shards[shard_name].tensors:
                raise CheckpointError(
                    f"{index_path} maps {name!r} to {shard_name}, which does not contain it"
                )
        for shard_name, shard in self.shards.items():
            unlisted = sorted(name for name in shard.tensors if weight_map.get(name) != shard_name)
            if unlisted:
                raise CheckpointError(
                    f"{shard_name} holds {len(unlisted)} tensor(s) that {index_path.name} does not list there "
                    f"({', '.join(unlisted[:3])}); the index and the shards disagree: re-download or re-create them"
                )
        self.weight_map = dict(weight_map)

    def _refuse_missing_safetensors(self) -> None:
        pickles = sorted(p.name for p in self.directory.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"{self.directory} holds pickle checkpoints ({', '.join(pickles[:3])}); pdmoe reads safetensors only, "
                "because pickles can run arbitrary code. Convert with "
                "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)`"
            )
        raise CheckpointError(f"{self.directory} has neither {SINGLE_FILE} nor {INDEX_FILE}")

    @property
    def config(self) -> dict[str, Any]:
        """``config.json``, refused when it is not an object, lacks a model_type or names remote code."""
        return read_config(self.directory)

    def check_config(self) -> dict[str, Any]:
        """``config``, after checking its sizes against the tensor shapes."""
        config = self.config
        check_config_matches_tensors(config, ((name, self.meta(name).shape) for name in self), self.directory)
        return config

    def __contains__(self, name: object) -> bool:
        return name in self.weight_map

    def __iter__(self) -> Iterator[str]:
        return iter(self.weight_map)

    def __len__(self) -> int:
        return len(self.weight_map)

    def meta(self, name: str) -> TensorMeta:
        return self.shards[self.weight_map[name]].tensors[name]

    @property
    def total_bytes(self) -> int:
        return sum(self.meta(name).nbytes for name in self.weight_map)

    def header_digests(self) -> dict[str, str]:
        """SHA-256 of each shard's header: identifies the inputs cheaply in manifests."""
        return {name: shard.digest for name, shard in sorted(self.shards.items())}

    def blocks(self, name: str) -> Iterator[torch.Tensor]:
        """Tensor ``name`` as consecutive 1-D blocks of at most ``BLOCK_ELEMENTS`` elements."""
        numel = self.meta(name).numel
        for start in range(0, numel, BLOCK_ELEMENTS):
            yield self.read_elements(name, start, min(BLOCK_ELEMENTS, numel - start))

    def get(self, name: str) -> torch.Tensor:
        """The whole tensor, read with positioned reads (see ``read_elements``)."""
        meta = self.meta(name)
        return self.read_elements(name, 0, meta.numel).view(meta.shape)

    def read_elements(
        self, name: str, start: int, count: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Elements [start, start + count) of tensor ``name`` in C order, as a 1-D tensor of its dtype
        (into ``out``, a contiguous tensor of ``count`` elements of that dtype, when given: saves
        the page faults of a fresh allocation per block).

        A positioned read of the page cache rather than a memory map: pages read this way do not
        pile up in the process's resident set (a mapped 70B checkpoint would), and the read
        releases the GIL, so another thread can compute or write meanwhile.
        """
        shard_name = self.weight_map[name]
        shard = self.shards[shard_name]
        meta = shard.tensors[name]
        if start < 0 or count < 0 or start + count > meta.numel:
            raise ValueError(
                f"elements [{start}, {start + count}) are outside {name!r} ({meta.numel} elements)"
            )
        if out is None:
            out = torch.empty(count, dtype=meta.dtype)
        elif out.dtype != meta.dtype or out.numel() != count or not out.is_contiguous():
            raise ValueError(f"out must be {count} contiguous {meta.dtype} elements for {name!r}")
        buffer = memoryview(out.view(torch.uint8).numpy()) if count else memoryview(b"")
        position = shard.data_start + shard.offsets[name][0] + start * meta.dtype.itemsize
        fd = self._fds.get(shard_name)
        if fd is None:
            try:
                fd = self._fds[shard_name] = os.open(self.directory / shard_name, os.O_RDONLY)
            except FileNotFoundError:
                raise CheckpointError(
                    f"shard {self.directory / shard_name} disappeared while being read"
                ) from None
        done = 0
        while done < len(buffer):
            got = os.preadv(fd, [buffer[done:]], position + done)
            if got == 0:
                raise CheckpointError(f"{self.directory / shard_name} was truncated while being read")
            done += got
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
