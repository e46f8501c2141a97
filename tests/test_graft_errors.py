"""Bad input: a clear message, and nothing in OUT that looks like a finished output."""

from __future__ import annotations

import json
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from pdmoe.cli import main
from pdmoe.errors import CheckpointError, Option, Problem, UsageError
from pdmoe.graft import GraftOptions, graft
from tests.graft_checkpoints import (
    dense_config,
    dense_tensors,
    graft_command,
    load_dir,
    make,
    save_checkpoint,
)


def assert_nothing_finished(out: Path) -> None:
    assert not out.exists() or (not any(out.glob("*.safetensors")) and not (out / "graft.json").exists())


def rewrite(directory: Path, change) -> Path:
    tensors = load_dir(directory)
    change(tensors)
    (directory / "model.safetensors").unlink()
    return save_checkpoint(directory, tensors, json.loads((directory / "config.json").read_text()))


def test_base_and_instruct_of_different_architectures(tmp_path: Path) -> None:
    base, instruct, cpt = make(tmp_path, moe=True)

    def change(tensors: dict) -> None:
        tensors["model.layers.1.self_attn.q_proj.weight"] = torch.zeros(4, 8)
        del tensors["model.norm.weight"]

    rewrite(instruct, change)
    with pytest.raises(CheckpointError, match="BASE and INSTRUCT are not the same architecture") as info:
        graft(base, instruct, cpt, tmp_path / "out")
    message = str(info.value)
    assert (
        "model.layers.1.self_attn.q_proj.weight: torch.float32 [8, 8] in BASE, torch.float32 [4, 8] in INSTRUCT"
        in message
    )
    assert "model.norm.weight: in BASE, missing in INSTRUCT" in message
    assert_nothing_finished(tmp_path / "out")


def test_instruct_of_another_family(tmp_path: Path) -> None:
    base, instruct, cpt = make(tmp_path)
    (instruct / "config.json").write_text(
        json.dumps(dense_config() | {"model_type": "qwen2", "hidden_size": 16})
    )
    with pytest.raises(
        CheckpointError, match="config model_type: 'llama' in BASE, 'qwen2' in INSTRUCT"
    ) as info:
        graft(base, instruct, cpt, tmp_path / "out")
    assert "config hidden_size: 8 in BASE, 16 in INSTRUCT" in str(info.value)


def test_many_mismatches_are_cut_short(tmp_path: Path) -> None:
    base, instruct, cpt = make(tmp_path)
    rewrite(instruct, lambda tensors: [tensors.pop(name) for name in list(tensors)[:-1]])
    with pytest.raises(CheckpointError, match=r"\.\.\. and \d+ more"):
        graft(base, instruct, cpt, tmp_path / "out")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            lambda t: t.__setitem__("model.layers.0.self_attn.o_proj.weight", torch.zeros(8, 9)),
            "model.layers.0.self_attn.o_proj.weight: torch.float32 [8, 8] in BASE, torch.float32 [8, 9] in CPT",
        ),
        (
            lambda t: t.pop("model.layers.1.input_layernorm.weight"),
            "model.layers.1.input_layernorm.weight: in BASE, missing in CPT",
        ),
        (
            lambda t: t.__setitem__("model.layers.0.mlp.experts.gate_up_proj", torch.zeros(4, 20, 8)),
            "model.layers.0.mlp.experts.gate_up_proj: [4, 20, 8] in CPT, expected [4, 24, 8] from BASE",
        ),
        (
            lambda t: t.__setitem__("model.layers.1.mlp.experts.down_proj", torch.zeros(3, 8, 12)),
            "model.layers.1.mlp.experts.down_proj: [3, 8, 12] in CPT, expected [4, 8, 12] from BASE",
        ),
        (
            lambda t: t.__setitem__("lm_head.weight", torch.zeros(19, 8)),
            "lm_head.weight: torch.float32 [20, 8] in BASE, torch.float32 [19, 8] in CPT",
        ),
        (
            lambda t: t.pop("model.layers.1.mlp.experts.down_proj"),
            "model.layers.1.mlp.experts.gate_up_proj: MoE layer in CPT, but no model.layers.1.mlp.experts.down_proj in CPT",
        ),
        (
            lambda t: t.pop("lm_head.weight"),
            "lm_head.weight: in BASE, missing in CPT (CPT ties lm_head to the embeddings, BASE does not)",
        ),
    ],
    ids=[
        "shape",
        "missing",
        "experts-gate-up",
        "experts-down",
        "fewer-vocab-rows",
        "no-experts-down",
        "tied-cpt",
    ],
)
def test_cpt_whose_dense_part_does_not_match_base(tmp_path: Path, change, expected: str) -> None:
    base, instruct, cpt = make(tmp_path, moe=True)
    rewrite(cpt, change)
    with pytest.raises(CheckpointError, match="CPT does not match BASE") as info:
        graft(base, instruct, cpt, tmp_path / "out")
    assert expected in str(info.value)
    assert_nothing_finished(tmp_path / "out")


def test_cpt_config_of_another_family(tmp_path: Path) -> None:
    base, instruct, cpt = make(tmp_path, moe=True)
    config = json.loads((cpt / "config.json").read_text())
    (cpt / "config.json").write_text(json.dumps(config | {"base_model_type": "qwen3", "moe_layers": [0]}))
    with pytest.raises(CheckpointError, match="CPT does not match BASE") as info:
        graft(base, instruct, cpt, tmp_path / "out")
    assert "config model_type: 'llama' in BASE, 'qwen3' in CPT" in str(info.value)
    assert "CPT's config: moe_layers is [0], but the tensors have MoE layers [0, 1]" in str(info.value)


def test_both_instruct_and_cpt_add_tokens(tmp_path: Path) -> None:
    base, instruct, cpt = make(tmp_path, moe=True, instruct_vocab=22, cpt_vocab=25)
    with pytest.raises(CheckpointError, match="the same token ids would mean different tokens"):
        graft(base, instruct, cpt, tmp_path / "out")


@pytest.fixture()
def sharded(tmp_path: Path) -> tuple[Path, Path, Path]:
    return make(tmp_path, shard_bytes=2000)


def test_missing_shard(tmp_path: Path, sharded) -> None:
    base, instruct, cpt = sharded
    shard = sorted(cpt.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"missing shard .*{shard.name}"):
        graft(base, instruct, cpt, tmp_path / "out")
    assert_nothing_finished(tmp_path / "out")


def test_truncated_shard(tmp_path: Path, sharded) -> None:
    base, instruct, cpt = sharded
    shard = sorted(base.glob("model-*.safetensors"))[2]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=f"{shard.name} is truncated"):
        graft(base, instruct, cpt, tmp_path / "out")


def test_index_escaping_the_checkpoint(tmp_path: Path, sharded) -> None:
    base, instruct, cpt = sharded
    index_path = cpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = next(iter(index["weight_map"]))
    shutil.copy(cpt / index["weight_map"][name], tmp_path / "outside.safetensors")
    index["weight_map"][name] = "../outside.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="lies outside the checkpoint directory"):
        graft(base, instruct, cpt, tmp_path / "out")


def test_pickle_checkpoint_is_refused(tmp_path: Path) -> None:
    base, instruct, cpt = make(tmp_path)
    (instruct / "model.safetensors").unlink()
    torch.save(dense_tensors(), instruct / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pickle checkpoints \(pytorch_model.bin\).*safetensors only"):
        graft(base, instruct, cpt, tmp_path / "out")


def test_non_empty_out_is_replaced_only_when_pdmoe_wrote_it(tmp_path: Path) -> None:
    base, instruct, cpt = make(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="is not empty; choose another out") as caught:
        graft(base, instruct, cpt, out)
    assert (caught.value.problem, caught.value.options[:1]) == (Problem.REFUSED, (Option("out"),))
    with pytest.raises(
        CheckpointError, match=r"holds files pdmoe did not write .* pdmoe deletes only its own"
    ):
        graft(base, instruct, cpt, out, GraftOptions(overwrite=True))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()
    graft(base, instruct, cpt, out)
    with pytest.raises(CheckpointError, match="is not empty; pass overwrite=True to replace it"):
        graft(base, instruct, cpt, out)
    (out / "stale.txt").write_text("inside a pdmoe output")
    graft(base, instruct, cpt, out, GraftOptions(overwrite=True))
    assert not (out / "stale.txt").exists() and (out / "graft.json").is_file()


def test_out_is_an_input(tmp_path: Path) -> None:
    base, instruct, cpt = make(tmp_path)
    with pytest.raises(CheckpointError, match="is also an input"):
        graft(base, instruct, cpt, cpt, GraftOptions(overwrite=True))
    assert (cpt / "model.safetensors").is_file()


def test_out_on_a_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, instruct, cpt = make(tmp_path)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("pdmoe.io.outputs.shutil.disk_usage", lambda path: usage(10**9, 10**9, 1000))
    with pytest.raises(CheckpointError, match="GiB free but the output needs"):
        graft(base, instruct, cpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before writing: no empty folder left behind


@pytest.mark.parametrize(
    ("options", "problem", "named"),
    [
        ({"resume": True, "overwrite": True}, Problem.CONFLICT, ("resume", "overwrite")),
        ({"dtype": "int8"}, Problem.INVALID, ("dtype",)),
        ({"shard_size": "lots"}, Problem.INVALID, ("shard_size",)),
        ({"scale": float("nan")}, Problem.INVALID, ("scale",)),
    ],
)
def test_bad_options(tmp_path: Path, options: dict, problem: Problem, named: tuple[str, ...]) -> None:
    base, instruct, cpt = make(tmp_path)
    with pytest.raises(UsageError) as caught:
        graft(base, instruct, cpt, tmp_path / "out", GraftOptions(**options))
    assert (caught.value.problem, [option.name for option in caught.value.options]) == (problem, list(named))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            ["--resume", "--overwrite"],
            "--resume continues what is in OUT and --overwrite deletes it; pass only one",
        ),
        (["--dtype", "int8"], "argument --dtype: invalid choice"),
        (["--shard-size", "lots"], "cannot read --shard-size 'lots'; write it like 5GB, 500MB or 2GiB"),
        (["--scale", "nan"], "--scale must be a finite number, got nan"),
    ],
)
def test_bad_options_at_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, options: list[str], message: str
) -> None:
    base, instruct, cpt = make(tmp_path)
    try:
        code = main(graft_command(base, instruct, cpt, tmp_path / "out", *options))
    except SystemExit as exit_info:  # argparse's own refusals
        code = exit_info.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.strip().splitlines()[-1].startswith("pdmoe graft: error: "), (
        err
    )
    assert not (tmp_path / "out").exists()


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`pdmoe graft` through the real entry point: plan, run, and bad input as a one-line error, exit 2."""
    base, instruct, cpt = make(tmp_path, moe=True)
    out = tmp_path / "o"
    common = ["graft", "--base", str(base), "--instruct", str(instruct), "--cpt", str(cpt), "--out", str(out)]
    assert main([*common, "--dry-run", "--scale", "0.5", "--dtype", "bf16"]) == 0
    assert "SCALE=0.5" in capsys.readouterr().out and not out.exists()
    assert main([*common, "--skip-embeddings", "--shard-size", "2KB"]) == 0
    assert "embedding_kept=2" in capsys.readouterr().out
    assert (out / "model.safetensors.index.json").is_file()
    assert main(common) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("pdmoe graft: error: output directory") and "--overwrite" in captured.err
    assert "Traceback" not in captured.err


def test_configs_that_do_not_describe_the_tensors(tmp_path: Path) -> None:
    """BASE, INSTRUCT and CPT agree with each other, but not with their tensors."""
    inputs = make(tmp_path, moe=True)
    for directory in inputs:
        config = json.loads((directory / "config.json").read_text())
        (directory / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 3}))
    with pytest.raises(
        CheckpointError, match=r"num_hidden_layers is 3, but the tensors have layers 0..1 \(2 of them\)"
    ):
        graft(*inputs, tmp_path / "out")
    for directory in inputs:
        config = json.loads((directory / "config.json").read_text())
        (directory / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 2}))
    config = json.loads((inputs[2] / "config.json").read_text())
    (inputs[2] / "config.json").write_text(
        json.dumps(
            config
            | {"model_type": "pdmoe", "base_model_type": "llama", "moe_layers": [0, 1], "num_experts": 3}
        )
    )
    with pytest.raises(
        CheckpointError,
        match=r"model.layers.0.mlp.experts.gate_up_proj is \[4, 24, 8\], the config implies \[3, 24, 8\]",
    ):
        graft(*inputs, tmp_path / "out")
    assert not (tmp_path / "out").exists()
