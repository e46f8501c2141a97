"""The I/O pieces the graft added to pdmoe.io: positioned reads, element-wise writes, the writer thread."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pdmoe.errors import CheckpointError
from pdmoe.io import CheckpointReader, CheckpointWriter, TensorMeta
from pdmoe.io.background import BackgroundShardWriter, BlockPool


def test_read_elements(tmp_path: Path) -> None:
    tensors = {"a": torch.arange(24, dtype=torch.bfloat16).reshape(2, 3, 4), "b": torch.ones(5)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with CheckpointReader(tmp_path) as reader:
        assert torch.equal(reader.read_elements("a", 13, 6), tensors["a"].reshape(-1)[13:19])
        buffer = torch.empty(4, dtype=torch.bfloat16)
        assert reader.read_elements("a", 20, 4, out=buffer).data_ptr() == buffer.data_ptr()
        assert torch.equal(buffer, tensors["a"].reshape(-1)[20:])
        with pytest.raises(ValueError, match="outside 'a'"):
            reader.read_elements("a", 20, 5)
        with pytest.raises(ValueError, match=r"out must be 4 contiguous torch\.bfloat16"):
            reader.read_elements("a", 0, 4, out=torch.empty(4))


def plan(*names: str) -> list[list[TensorMeta]]:
    return [[TensorMeta(name, torch.float32, (2, 3))] for name in names]


def test_background_writer_streams_elements_and_commits_shards_in_order(tmp_path: Path) -> None:
    writer = CheckpointWriter(tmp_path, plan("x", "y"), metadata={"run": "1"})
    x, y = torch.randn(2, 3), torch.randn(2, 3)
    with BackgroundShardWriter(writer, max_pending=1) as sink:
        for value in x.reshape(-1):  # pieces smaller than a row
            sink.write(0, "x", value.reshape(1))
        sink.write(1, "y", y)
    writer.finish()
    assert torch.equal(load_file(str(tmp_path / "model-00001-of-00002.safetensors"))["x"], x)
    assert torch.equal(load_file(str(tmp_path / "model-00002-of-00002.safetensors"))["y"], y)
    assert writer.shard_is_complete(0)
    assert not CheckpointWriter(tmp_path, plan("x", "y"), metadata={"run": "2"}).shard_is_complete(0)


def test_background_writer_error_discards_the_shard(tmp_path: Path) -> None:
    writer = CheckpointWriter(tmp_path, plan("x"))
    sink = BackgroundShardWriter(writer)
    sink.write(0, "not-x", torch.zeros(2, 3))
    with pytest.raises(CheckpointError, match="expected 'x' next, got 'not-x'"):
        sink.close()
    assert list(tmp_path.iterdir()) == []


def test_written_blocks_return_to_the_pool(tmp_path: Path) -> None:
    """A long stream allocates only the blocks in flight at once (queue + writer + producer), each
    reused once written; the file holds every block's values."""
    rows = 64
    writer = CheckpointWriter(tmp_path, [[TensorMeta("w", torch.bfloat16, (rows, 1000))]])
    expected = torch.randn(rows, 1000).to(torch.bfloat16)
    pool = BlockPool()
    with BackgroundShardWriter(writer, max_pending=2, pool=pool) as sink:
        for row in expected:
            block = pool.take(row.numel(), torch.bfloat16)
            sink.write(0, "w", block.copy_(row))
    writer.finish()
    assert torch.equal(load_file(str(tmp_path / "model.safetensors"))["w"], expected)
    assert 1 <= pool.buffers <= 2 + 2
    pool.give(torch.empty(3))  # not the pool's: ignored
    assert pool.buffers <= 4
