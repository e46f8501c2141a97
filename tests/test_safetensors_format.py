"""The safetensors header validator: each rule of the format refused with a CheckpointError.

Every malformed file is also given to the reference ``safetensors`` library: pdmoe must refuse at
least what it refuses (and, stricter, a tensor named twice, where the library lets the last win).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from pdmoe.errors import CheckpointError
from pdmoe.io.reader import CheckpointReader
from pdmoe.io.safetensors_format import read_header

F32_PAIR = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def shard_bytes(header: object, data: bytes = b"", *, raw: bytes | None = None) -> bytes:
    text = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def reference_refuses(path: Path) -> bool:
    try:
        with safe_open(str(path), "pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                handle.get_slice(name).get_shape()
    except SafetensorError:
        return True
    return False


CASES = {
    "overlapping-offsets": (
        shard_bytes({"a": F32_PAIR, "b": F32_PAIR}, b"\0" * 8),
        r"tensor 'b' has data_offsets \[0, 8\], but the data of the tensors before it ends at 8",
    ),
    "gap-before-data": (
        shard_bytes({"a": {**F32_PAIR, "data_offsets": [8, 16]}}, b"\0" * 16),
        r"tensor 'a' has data_offsets \[8, 16\], but the data of the tensors before it ends at 0",
    ),
    "negative-offset": (
        shard_bytes({"a": {**F32_PAIR, "data_offsets": [-8, 0]}}),
        r"data_offsets \[-8, 0\]; they are two integers >= 0",
    ),
    "three-offsets": (
        shard_bytes({"a": {**F32_PAIR, "data_offsets": [0, 8, 8]}}, b"\0" * 8),
        r"they are two integers >= 0",
    ),
    "end-before-start": (
        shard_bytes(
            {
                "a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]},
                "b": {**F32_PAIR, "data_offsets": [8, 0]},
            },
            b"\0" * 8,
        ),
        r"tensor 'b' has data_offsets \[8, 0\]",
    ),
    "size-does-not-match-shape": (
        shard_bytes({"a": {**F32_PAIR, "shape": [3]}}, b"\0" * 8),
        r"tensor 'a' has 8 bytes for F32 \[3\] \(12 bytes\)",
    ),
    "shape-as-string": (
        shard_bytes({"a": {**F32_PAIR, "shape": "22"}}, b"\0" * 8),
        r"has shape '22'; a shape is a list of integers >= 0",
    ),
    "negative-dimension": (
        shard_bytes({"a": {**F32_PAIR, "shape": [-2], "data_offsets": [0, 0]}}),
        r"has shape \[-2\]",
    ),
    "float-dimension": (shard_bytes({"a": {**F32_PAIR, "shape": [2.0]}}, b"\0" * 8), r"has shape \[2.0\]"),
    "boolean-dimension": (
        shard_bytes({"a": {"dtype": "U8", "shape": [True], "data_offsets": [0, 1]}}, b"\0"),
        r"has shape \[True\]",
    ),
    "unknown-dtype": (shard_bytes({"a": {**F32_PAIR, "dtype": "f32"}}, b"\0" * 8), r"unknown dtype 'f32'"),
    "missing-dtype": (
        shard_bytes({"a": {"shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
        r"tensor 'a' has no 'dtype'",
    ),
    "tensor-info-is-a-number": (shard_bytes({"a": 3}), r"tensor 'a' is described by a number, not an object"),
    "header-is-an-array": (shard_bytes([]), r"header that is an array, not an object"),
    "header-is-null": (shard_bytes(None), r"header that is null, not an object"),
    "header-not-json": (shard_bytes(None, raw=b"{not json}"), r"is not valid JSON"),
    "header-not-utf8": (shard_bytes(None, raw=b'{"\xff": 1}'), r"is not UTF-8"),
    "deep-nesting": (
        shard_bytes(None, raw=b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}"),
        r"nests JSON too deeply",
    ),
    "metadata-not-strings": (
        shard_bytes({"__metadata__": {"format": 1}, "a": F32_PAIR}, b"\0" * 8),
        r"__metadata__ must map strings to strings",
    ),
    "duplicate-field": (
        shard_bytes(
            None, b"\0" * 8, raw=b'{"a":{"dtype":"F32","dtype":"F64","shape":[2],"data_offsets":[0,8]}}'
        ),
        r"the key 'dtype' appears twice",
    ),
    "trailing-bytes": (shard_bytes({"a": F32_PAIR}, b"\0" * 9), r"has 1 bytes after its last tensor"),
    "truncated-data": (shard_bytes({"a": F32_PAIR}, b"\0" * 7), r"is truncated: its header promises"),
    "header-longer-than-file": (struct.pack("<Q", 64) + b"{}", r"is truncated or not a safetensors file"),
    "header-too-large": (struct.pack("<Q", 100_000_001) + b"{}", r"declares a header of 100000001 bytes"),
    "no-length-prefix": (b"\x01\x02", r"no safetensors header"),
}


@pytest.mark.parametrize(("raw", "message"), CASES.values(), ids=CASES.keys())
def test_malformed_header_is_refused_like_the_reference(tmp_path: Path, raw: bytes, message: str) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(raw)
    with pytest.raises(CheckpointError, match=message):
        read_header(path)
    assert reference_refuses(path)


def test_tensor_named_twice_is_refused(tmp_path: Path) -> None:
    """The reference library keeps the last of two equal names; pdmoe refuses the ambiguity."""
    pair = json.dumps(F32_PAIR).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(shard_bytes(None, b"\0" * 8, raw=b'{"a":' + pair + b',"a":' + pair + b"}"))
    with pytest.raises(CheckpointError, match=r"the key 'a' appears twice"):
        read_header(path)


def test_offsets_in_any_order_and_zero_element_tensors_are_valid(tmp_path: Path) -> None:
    header = {
        "__metadata__": None,
        "b": {**F32_PAIR, "data_offsets": [8, 16]},
        "empty": {"dtype": "BF16", "shape": [0, 4], "data_offsets": [8, 8]},
        "a": F32_PAIR,
        "scalar": {"dtype": "I64", "shape": [], "data_offsets": [16, 24]},
    }
    path = tmp_path / "model.safetensors"
    path.write_bytes(shard_bytes(header, b"\0" * 24))
    shard = read_header(path)
    assert {name: meta.shape for name, meta in shard.tensors.items()} == {
        "a": (2,),
        "b": (2,),
        "empty": (0, 4),
        "scalar": (),
    }
    assert shard.offsets["empty"] == (8, 8) and shard.metadata == {}
    assert not reference_refuses(path)


def test_format_dtype_that_pdmoe_does_not_process(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(shard_bytes({"a": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}, b"\0"))
    with pytest.raises(CheckpointError, match=r"tensor 'a' has dtype F4, which pdmoe does not process"):
        read_header(path)


def _sharded(directory: Path) -> tuple[Path, dict]:
    directory.mkdir()
    save_file({"a": torch.zeros(2), "b": torch.ones(3)}, str(directory / "one.safetensors"))
    save_file({"c": torch.zeros(4)}, str(directory / "two.safetensors"))
    weight_map = {"a": "one.safetensors", "b": "one.safetensors", "c": "two.safetensors"}
    return directory / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda index: index["weight_map"].pop("b"),
            r"one.safetensors holds 1 tensor\(s\) that .* does not list there \(b\)",
        ),
        (
            lambda index: index["weight_map"].update(b="two.safetensors"),
            r"maps 'b' to two.safetensors, which does not contain it",
        ),
        (lambda index: index.update(weight_map=list(index["weight_map"])), r"has no weight_map object"),
        (lambda index: index["weight_map"].update(b=7), r"maps 'b' to a number, not to a shard file name"),
        (lambda index: index["weight_map"].update(b=["one.safetensors"]), r"maps 'b' to an array"),
        (lambda index: index["weight_map"].update(b=""), r"names shard '', which lies outside"),
    ],
    ids=[
        "shard-tensor-missing-from-index",
        "index-points-to-wrong-shard",
        "weight-map-list",
        "value-number",
        "value-list",
        "empty-name",
    ],
)
def test_index_and_shards_must_agree(tmp_path: Path, change, message: str) -> None:
    index_path, index = _sharded(tmp_path / "model")
    index_path.write_text(json.dumps(index))
    CheckpointReader(index_path.parent).close()  # consistent as written
    change(index)
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=message):
        CheckpointReader(index_path.parent)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[]", r"must hold a JSON object \(\{...\}\), not an array"),
        ('{"weight_map": {}, "weight_map": 1}', "appears twice"),
    ],
    ids=["array", "duplicate-key"],
)
def test_index_file_itself_must_be_one_object(tmp_path: Path, text: str, message: str) -> None:
    index_path, _ = _sharded(tmp_path / "model")
    index_path.write_text(text)
    with pytest.raises(CheckpointError, match=message):
        CheckpointReader(index_path.parent)
