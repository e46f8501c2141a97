"""`pdmoe upcycle` refuses bad input with a message that names the problem, and writes nothing."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pdmoe.cli import main
from pdmoe.tiny import build_tiny_dense


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory) -> Path:
    return build_tiny_dense(tmp_path_factory.mktemp("dense") / "llama", "llama")


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def _upcycle(capsys, model: Path, out: Path, *extra: str) -> tuple[int, str]:
    code = main(["upcycle", "--model", str(model), "--out", str(out), *extra])
    return code, capsys.readouterr().err


def _sharded(source: Path, target: Path) -> Path:
    """The same model written as two shards with an index."""
    from safetensors.torch import load_file

    target.mkdir()
    shutil.copy(source / "config.json", target / "config.json")
    tensors = load_file(source / "model.safetensors")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, keys in halves.items():
        save_file({key: tensors[key] for key in keys}, target / shard)
        weight_map.update(dict.fromkeys(keys, shard))
    (target / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return target


def test_cli_upcycle_succeeds(capsys, dense_dir, tmp_path):
    code, err = _upcycle(
        capsys, dense_dir, tmp_path / "out", "--num-experts", "3", "--top-k", "1", "--layers", "every:2"
    )
    assert code == 0, err
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["num_experts"], config["num_experts_per_tok"], config["moe_layers"]) == (3, 1, [0, 2])


def test_sharded_input_is_read(capsys, dense_dir, tmp_path):
    code, err = _upcycle(capsys, _sharded(dense_dir, tmp_path / "sharded"), tmp_path / "out")
    assert code == 0, err


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--num-experts", "1", "--top-k", "1"], "num_experts must be at least 2"),
        (["--top-k", "5"], "top-k (5) must be between 1 and the number of experts (4)"),
        (["--layers", "0,7"], "must name layers in 0..2"),
        (["--layers", "every:x"], "cannot read --layers"),
    ],
)
def test_bad_options(capsys, dense_dir, tmp_path, options, message):
    code, err = _upcycle(capsys, dense_dir, tmp_path / "out", *options)
    assert code == 2 and message in err
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture_lists_supported(capsys, dense_dir, tmp_path):
    model = _copy(dense_dir, tmp_path / "gpt2")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    code, err = _upcycle(capsys, model, tmp_path / "out")
    assert code == 2 and "unsupported architecture 'gpt2'" in err
    assert "llama, mistral, qwen2, qwen3" in err


def test_already_moe_is_refused(capsys, dense_dir, tmp_path):
    assert _upcycle(capsys, dense_dir, tmp_path / "moe")[0] == 0
    code, err = _upcycle(capsys, tmp_path / "moe", tmp_path / "again")
    assert code == 2 and "already an MoE" in err


def test_missing_shard(capsys, dense_dir, tmp_path):
    model = _sharded(dense_dir, tmp_path / "sharded")
    (model / "model-00002-of-00002.safetensors").unlink()
    code, err = _upcycle(capsys, model, tmp_path / "out")
    assert code == 2 and "missing shard" in err and "model-00002-of-00002" in err
    assert not (tmp_path / "out").exists()


def test_truncated_shard(capsys, dense_dir, tmp_path):
    model = _copy(dense_dir, tmp_path / "truncated")
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) - 100])
    code, err = _upcycle(capsys, model, tmp_path / "out")
    assert code == 2 and "is truncated" in err
    assert not (tmp_path / "out").exists()


def test_index_escaping_the_directory(capsys, dense_dir, tmp_path):
    model = _sharded(dense_dir, tmp_path / "escape")
    index = json.loads((model / "model.safetensors.index.json").read_text())
    index["weight_map"] = {key: f"../{shard}" for key, shard in index["weight_map"].items()}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    code, err = _upcycle(capsys, model, tmp_path / "out")
    assert code == 2 and "outside the checkpoint directory" in err


def test_pickle_checkpoint_is_refused(capsys, dense_dir, tmp_path):
    model = tmp_path / "pickle"
    model.mkdir()
    shutil.copy(dense_dir / "config.json", model / "config.json")
    torch.save({"w": torch.zeros(1)}, model / "pytorch_model.bin")
    code, err = _upcycle(capsys, model, tmp_path / "out")
    assert code == 2 and "pickle" in err and "safetensors" in err


def test_non_empty_output_is_replaced_only_when_pdmoe_wrote_it(capsys, dense_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    code, err = _upcycle(capsys, dense_dir, out)
    assert code == 2 and "is not empty; choose another --out" in err
    code, err = _upcycle(capsys, dense_dir, out, "--overwrite")
    assert code == 2 and "holds files pdmoe did not write" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "user data"
    (out / "keep.txt").unlink()
    assert _upcycle(capsys, dense_dir, out)[0] == 0
    code, err = _upcycle(capsys, dense_dir, out)
    assert code == 2 and "is not empty; pass --overwrite to replace it" in err
    code, err = _upcycle(capsys, dense_dir, out, "--overwrite", "--num-experts", "3")
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["num_experts"] == 3


def test_failure_mid_write_leaves_no_output(dense_dir, tmp_path, monkeypatch):
    from pdmoe import upcycle as upcycle_module

    def fail(*args, **kwargs):
        raise OSError("disk went away")

    monkeypatch.setattr(upcycle_module, "_router_weight", fail)
    with pytest.raises(OSError, match="disk went away"):
        upcycle_module.upcycle(dense_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_zero_element_tensors_are_copied(capsys, dense_dir, tmp_path):
    from safetensors.torch import load_file

    model = _copy(dense_dir, tmp_path / "with-empty")
    tensors = load_file(model / "model.safetensors")
    tensors |= {"a_empty_first": torch.zeros(0), "model.empty_buffer": torch.zeros(0, 64)}
    save_file(tensors, model / "model.safetensors", {"format": "pt"})
    code, err = _upcycle(capsys, model, tmp_path / "out", "--shard-size", "100KB")
    assert code == 0, err
    out = {}
    for shard in (tmp_path / "out").glob("*.safetensors"):
        out |= load_file(shard)
    assert out["a_empty_first"].shape == (0,) and out["model.empty_buffer"].shape == (0, 64)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda config: [config], r"config.json must hold a JSON object \({...}\), not an array"),
        (
            lambda config: {k: v for k, v in config.items() if k != "hidden_size"},
            r"has no positive integer hidden_size \(None\)",
        ),
        (
            lambda config: config | {"num_hidden_layers": "3"},
            r"has no positive integer num_hidden_layers \('3'\)",
        ),
        (
            lambda config: config | {"hidden_size": 32},
            r"model.embed_tokens.weight is \[264, 64\], but vocab_size x hidden_size is \[264, 32\]",
        ),
        (
            lambda config: config | {"num_hidden_layers": 2},
            r"num_hidden_layers is 2, but the tensors have layers 0..2 \(3 of them\)",
        ),
        (
            lambda config: config | {"intermediate_size": 48},
            r"model.layers.0.mlp.gate_proj.weight is \[96, 64\], the config implies \[48, 64\]",
        ),
        (lambda config: config | {"vocab_size": 300}, r"vocab_size x hidden_size is \[300, 64\]"),
    ],
    ids=[
        "list",
        "no-hidden-size",
        "string-layers",
        "hidden-size",
        "layers",
        "intermediate-size",
        "vocab-size",
    ],
)
def test_config_that_does_not_describe_the_tensors(capsys, dense_dir, tmp_path, change, message):
    model = _copy(dense_dir, tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(change(config)))
    code, err = _upcycle(capsys, model, tmp_path / "out")
    assert code == 2 and re.search(message, err), err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
