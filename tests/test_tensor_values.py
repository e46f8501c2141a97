"""Values checked while streaming: NaN / inf refused (inputs, overflowing sums, out-of-range options),
and a graft refused when CPT's untouched tensors are not BASE's. Nothing complete-looking is left."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pdmoe.cli import main
from pdmoe.errors import Option, Problem, TensorValueError, UsageError
from pdmoe.graft import GraftOptions, graft
from pdmoe.io.outputs import MARKER
from pdmoe.io.writer import ShardWriter
from pdmoe.tiny import build_tiny_dense
from pdmoe.upcycle import upcycle
from tests.graft_checkpoints import graft_command, load_dir, make, reference_graft, save_checkpoint


def digest(directory: Path) -> str:
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    return hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in files)).hexdigest()


def run(capsys, *args: str) -> tuple[int, str]:
    code = main([str(arg) for arg in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def edit(directory: Path, change) -> Path:
    """Rewrite the single-file checkpoint in ``directory`` with ``change`` applied to its tensors."""
    tensors = load_file(directory / "model.safetensors")
    change(tensors)
    save_file(tensors, directory / "model.safetensors", {"format": "pt"})
    return directory


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    return build_tiny_dense(tmp_path_factory.mktemp("values") / "dense")


def poisoned(tensors: dict) -> None:
    weight = tensors["model.layers.1.mlp.up_proj.weight"]
    weight.view(-1)[[3, 5, 7]] = float("nan")
    weight.view(-1)[11] = float("-inf")


def test_upcycle_refuses_nan_weights_and_leaves_nothing(tmp_path: Path, dense: Path, capsys) -> None:
    model = tmp_path / "model"
    save_checkpoint(
        model, load_file(dense / "model.safetensors"), json.loads((dense / "config.json").read_text())
    )
    edit(model, poisoned)
    before = digest(model)
    code, err = run(capsys, "upcycle", "--model", model, "--out", tmp_path / "out")
    assert code == 2
    assert err == (
        f"pdmoe upcycle: error: {model}: model.layers.1.mlp.up_proj.weight holds 3 NaN and 1 infinite values "
        "(of 6144); upcycling would copy them into the MoE. Fix or re-download the checkpoint, or pass "
        "--allow-non-finite to copy them as they are\n"
    )
    assert not (tmp_path / "out").exists() and digest(model) == before
    assert run(capsys, "upcycle", "--model", model, "--out", tmp_path / "out", "--allow-non-finite")[0] == 0
    experts = load_file(tmp_path / "out" / "model.safetensors")["model.layers.1.mlp.experts.gate_up_proj"]
    assert int(experts.isnan().sum()) == 3 * 4 and int(experts.isinf().sum()) == 4


def test_upcycle_refuses_a_dtype_that_overflows(tmp_path: Path, dense: Path, capsys) -> None:
    model = tmp_path / "model"
    save_checkpoint(
        model, load_file(dense / "model.safetensors"), json.loads((dense / "config.json").read_text())
    )
    edit(model, lambda tensors: tensors["model.norm.weight"].__setitem__(0, 1e6))
    code, err = run(capsys, "upcycle", "--model", model, "--out", tmp_path / "out", "--dtype", "fp16")
    assert code == 2
    assert "model.norm.weight: 1 infinite values appear when converting torch.float32 to torch.float16" in err
    assert "choose a wider --dtype" in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--router-init-std", "nan"], "--router-init-std must be a finite number in [0, 1], got nan"),
        (["--router-init-std", "inf"], "--router-init-std must be a finite number in [0, 1], got inf"),
        (["--router-init-std", "-0.1"], "--router-init-std must be a finite number in [0, 1], got -0.1"),
        (["--shard-size", "inf"], "--shard-size must be a finite size like 5GB, got 'inf'"),
        (["--shard-size", "1e300GB"], "--shard-size must be a finite size like 5GB, got '1e300GB'"),
        (["--shard-size", "nan"], "--shard-size must be a finite size like 5GB, got 'nan'"),
        (["--shard-size", "0.4"], "--shard-size must be positive, got '0.4'"),
        (["--seed", str(2**64)], f"--seed must be an integer in 0..4294967295, got {2**64}"),
    ],
)
def test_upcycle_numbers_out_of_range(tmp_path: Path, dense: Path, capsys, option, message) -> None:
    code, err = run(capsys, "upcycle", "--model", dense, "--out", tmp_path / "out", *option)
    assert code == 2 and err.startswith(f"pdmoe upcycle: error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_seed_that_is_not_an_integer_is_an_argument_error(tmp_path: Path, dense: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["upcycle", "--model", str(dense), "--out", str(tmp_path / "out"), "--seed", "1e23"])
    assert exit_info.value.code == 2
    assert "pdmoe upcycle: error: argument --seed: invalid int value: '1e23'" in capsys.readouterr().err
    with pytest.raises(UsageError) as caught:
        upcycle(dense, tmp_path / "out", seed=1e23)
    assert (caught.value.problem, caught.value.options) == (Problem.INVALID, (Option("seed"),))


def test_graft_refuses_nan_in_an_input(tmp_path: Path, capsys) -> None:
    base, instruct, cpt = make(tmp_path, moe=True)
    edit(instruct, lambda tensors: tensors["model.norm.weight"].__setitem__(2, float("nan")))
    code, err = run(capsys, *graft_command(base, instruct, cpt, tmp_path / "out"))
    assert code == 2
    assert (
        "non-finite values in the inputs of model.norm.weight:\n  INSTRUCT model.norm.weight: 1 NaN values of 8\n"
        in err
    )
    assert "--allow-non-finite" in err and not (tmp_path / "out").exists()


def test_graft_scale_that_overflows(tmp_path: Path, capsys) -> None:
    inputs = make(tmp_path, moe=True, dtype=torch.bfloat16)
    args = graft_command(*inputs, tmp_path / "out")
    code, err = run(capsys, *args, "--scale", "1e308")
    assert code == 2
    assert "CPT + SCALE * (INSTRUCT - BASE) with SCALE=1e+308 gives" in err and "Lower --scale" in err
    assert not (tmp_path / "out").exists()
    code, err = run(capsys, *args, "--scale", "nan")
    assert code == 2 and "--scale must be a finite number, got nan" in err


def test_graft_refuses_a_cpt_of_another_base(tmp_path: Path, capsys) -> None:
    _, instruct, cpt = make(tmp_path, moe=True)
    sibling = make(tmp_path / "other", moe=False)[1]  # same shapes, other values
    before = {path: digest(path) for path in (sibling, instruct, cpt)}
    code, err = run(capsys, *graft_command(sibling, instruct, cpt, tmp_path / "out"))
    assert code == 2
    assert "error: CPT is not a descendant of BASE: " in err and "differs from BASE by up to " in err
    assert "pass --allow-modified-base" in err and not (tmp_path / "out").exists()
    assert {path: digest(path) for path in before} == before


def test_graft_refuses_base_and_instruct_swapped(tmp_path: Path, capsys) -> None:
    base, instruct, cpt = make(tmp_path, moe=True)
    code, err = run(capsys, *graft_command(instruct, base, cpt, tmp_path / "out"))
    assert (
        code == 2 and "CPT is not a descendant of BASE" in err and "are --base and --instruct swapped?" in err
    )
    assert not (tmp_path / "out").exists()


def test_graft_of_a_cpt_that_trained_more_needs_the_override(tmp_path: Path, capsys) -> None:
    inputs = make(tmp_path, moe=True, cpt_trained_shared=True)
    args = graft_command(*inputs, tmp_path / "out")
    assert run(capsys, *args)[0] == 2
    assert run(capsys, *args, "--allow-modified-base")[0] == 0
    expected = reference_graft(*inputs)
    got = load_dir(tmp_path / "out")
    assert all(torch.equal(got[name], tensor) for name, tensor in expected.items())


def test_lineage_failure_found_late_leaves_nothing_complete_looking(tmp_path: Path, monkeypatch) -> None:
    base, instruct, cpt = make(tmp_path, moe=True, shard_bytes=2000)
    index = json.loads((cpt / "model.safetensors.index.json").read_text())["weight_map"]
    late = "model.layers.1.mlp.experts.down_proj"
    assert index[late] == max(index.values())  # written last
    base_tensors = load_dir(base)
    base_tensors["model.layers.1.mlp.down_proj.weight"][3, 5] += 1e-3
    for path in base.glob("model*.safetensors*"):
        path.unlink()
    save_checkpoint(base, base_tensors, json.loads((base / "config.json").read_text()), shard_bytes=2000)
    committed: list[str] = []
    commit = ShardWriter.commit
    monkeypatch.setattr(
        ShardWriter, "commit", lambda self: (committed.append(self.path.name), commit(self))[1]
    )
    with pytest.raises(
        TensorValueError,
        match=rf"CPT is not a descendant of BASE: expert 0 of {late}, rows 0..7, differs from BASE \(BASE's model.layers.1.mlp.down_proj.weight\) by up to 0.001",
    ):
        graft(base, instruct, cpt, tmp_path / "out", GraftOptions(shard_size=2000))
    assert committed, "the mismatch must be found after earlier shards were complete"
    assert not (tmp_path / "out").exists()  # a fresh output of refused inputs is removed whole
    assert not (tmp_path / "out" / MARKER).exists()
