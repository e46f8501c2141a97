"""The output-folder guard of every command: inputs never deleted, only pdmoe's own folders replaced
or resumed, one run per folder, and an interrupted output never read as a finished one."""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import pytest

from pdmoe.cli import main
from pdmoe.errors import CheckpointError, Option, Problem, UsageError
from pdmoe.graft import GraftOptions, graft
from pdmoe.io.outputs import LOCK, MARKER, Command, OutputState, claim_output, read_marker
from pdmoe.io.reader import CheckpointReader
from tests.graft_checkpoints import graft_command, make


def tree_hash(directory: Path) -> dict[str, str]:
    """Every file below ``directory`` by relative path, with the SHA-256 of its bytes."""
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


@pytest.fixture()
def inputs(tmp_path: Path) -> tuple[Path, Path, Path]:
    """BASE, INSTRUCT and CPT side by side in ``tmp_path/par``."""
    return make(tmp_path / "par", moe=True)


def run_cli(capsys: pytest.CaptureFixture, args: list[str]) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def test_overwrite_of_a_parent_of_the_inputs_is_refused(tmp_path: Path, inputs, capsys) -> None:
    par = tmp_path / "par"
    before = tree_hash(par)
    code, err = run_cli(capsys, graft_command(*inputs, par, "--overwrite"))
    assert code == 2
    assert (
        err
        == f"pdmoe graft: error: output directory {par} contains the input {par / 'base'}; choose another --out\n"
    )
    code, err = run_cli(capsys, ["upcycle", "--model", str(inputs[0]), "--out", str(par), "--overwrite"])
    assert code == 2 and f"contains the input {par / 'base'}" in err
    assert tree_hash(par) == before and not (par / MARKER).exists()


def test_out_inside_an_input_or_the_same_folder_through_a_symlink(tmp_path: Path, inputs, capsys) -> None:
    before = tree_hash(tmp_path / "par")
    code, err = run_cli(capsys, graft_command(*inputs, inputs[2] / "sub", "--overwrite"))
    assert code == 2 and f"lies inside the input {inputs[2]}" in err
    (tmp_path / "link").symlink_to(inputs[1])
    code, err = run_cli(capsys, graft_command(*inputs, tmp_path / "link", "--overwrite"))
    assert code == 2 and "is also an input" in err
    assert tree_hash(tmp_path / "par") == before and not (inputs[2] / "sub").exists()


def test_cpt_overwrite_of_a_folder_holding_its_data_is_refused(tmp_path: Path) -> None:
    from pdmoe.cpt import TrainConfig, train
    from pdmoe.tiny import build_tiny_dense
    from pdmoe.upcycle import upcycle

    moe = upcycle(build_tiny_dense(tmp_path / "dense"), tmp_path / "moe")
    par = tmp_path / "par"
    par.mkdir()
    data = par / "corpus.txt"
    data.write_text("habari za asubuhi\n" * 50)
    before = tree_hash(par)
    config = TrainConfig(model=moe, data=[data], out=par, new_langs=["sw"], langs=["sw"], seq_len=16)
    with pytest.raises(CheckpointError, match=rf"output directory {par} contains the input {data}"):
        train(TrainConfig(**{**config.__dict__, "overwrite": True, "cache_dir": tmp_path / "cache"}))
    assert tree_hash(par) == before
    other = upcycle(tmp_path / "dense", tmp_path / "other-moe")
    before = tree_hash(other)
    with pytest.raises(UsageError, match=r"holds no training checkpoint yet") as caught:
        train(
            TrainConfig(
                **{**config.__dict__, "out": other, "resume": "latest", "cache_dir": tmp_path / "cache"}
            )
        )
    assert (caught.value.problem, caught.value.options) == (Problem.INVALID, (Option("resume"),))
    assert tree_hash(other) == before


def test_graft_resume_into_an_upcycle_output_touches_nothing(tmp_path: Path, inputs, capsys) -> None:
    moe = tmp_path / "moe"
    assert run_cli(capsys, ["upcycle", "--model", str(inputs[0]), "--out", str(moe)])[0] == 0
    before = tree_hash(moe)
    code, err = run_cli(capsys, graft_command(*inputs, moe, "--resume"))
    assert code == 2
    assert f"--resume: {moe} is a `pdmoe upcycle` output, not a `pdmoe graft` one" in err
    assert tree_hash(moe) == before and read_marker(moe).state is OutputState.COMPLETE


def test_graft_resume_into_a_foreign_folder_touches_nothing(tmp_path: Path, inputs, capsys) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "model.safetensors").write_bytes(b"someone else's weights")
    (foreign / "config.json").write_text("{}")
    before = tree_hash(foreign)
    code, err = run_cli(capsys, graft_command(*inputs, foreign, "--resume"))
    assert code == 2 and f"--resume: {foreign} was not written by pdmoe (it has no {MARKER})" in err
    assert tree_hash(foreign) == before


def test_a_second_run_on_a_locked_folder_is_refused(tmp_path: Path, inputs) -> None:
    out = tmp_path / "out"
    with claim_output(out, Command.GRAFT, inputs=inputs, keep_partial=True) as held:
        before = tree_hash(out)
        with pytest.raises(
            CheckpointError,
            match=rf"{out} is in use by another pdmoe run \(pdmoe graft, pid {os.getpid()} on ",
        ):
            graft(*inputs, out, GraftOptions(resume=True))
        assert tree_hash(out) == before
        held.finish()
    assert not (out / LOCK).exists()
    graft(*inputs, out, GraftOptions(resume=True))  # released: the folder is free again
    assert read_marker(out).state is OutputState.COMPLETE and not (out / LOCK).exists()


def test_lock_of_a_killed_process_is_stale_and_taken_over(tmp_path: Path, inputs) -> None:
    out = tmp_path / "out"
    child = os.fork()
    if child == 0:  # the child claims the folder, then dies without any chance to clean up
        try:
            held = claim_output(out, Command.GRAFT, keep_partial=True)  # noqa: F841 (held until killed)
            os.kill(os.getpid(), signal.SIGKILL)
        finally:
            os._exit(1)
    _, status = os.waitpid(child, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    holder = json.loads((out / LOCK).read_text())
    assert holder["command"] == "graft" and holder["pid"] != os.getpid()
    assert read_marker(out).state is OutputState.WRITING
    graft(*inputs, out, GraftOptions(resume=True))
    assert read_marker(out).state is OutputState.COMPLETE and not (out / LOCK).exists()


def test_lock_is_released_when_the_run_fails(tmp_path: Path, inputs) -> None:
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"), claim_output(out, Command.UPCYCLE):
        assert (out / LOCK).is_file()
        raise RuntimeError("boom")
    assert not out.exists()  # nothing kept from a failed run that keeps no partial output
    with claim_output(out, Command.GRAFT, keep_partial=True):
        (out / "partial").write_text("x")
        with pytest.raises(RuntimeError, match="boom"):
            raise RuntimeError("boom")
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "partial"])


def test_interrupted_output_is_not_read_as_a_checkpoint(tmp_path: Path, inputs, capsys) -> None:
    out = tmp_path / "out"
    graft(*inputs, out)
    marker = json.loads((out / MARKER).read_text())
    assert (marker["command"], marker["state"], marker["settings"]["scale"]) == ("graft", "complete", 1.0)
    (out / MARKER).write_text(json.dumps({**marker, "state": "writing", "finished": None}))
    message = f"{out} is an unfinished `pdmoe graft` output (interrupted, or still being written); finish it with the same `pdmoe graft` and resume=True, or use a finished checkpoint"
    with pytest.raises(
        CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")
    ):
        CheckpointReader(out)
    code, err = run_cli(capsys, graft_command(inputs[0], inputs[1], out, tmp_path / "again"))
    assert code == 2 and err == f"pdmoe graft: error: {message.replace('resume=True', '--resume')}\n"
    (tmp_path / "fr.txt").write_text("bonjour\n")
    code, err = run_cli(
        capsys,
        [
            "eval",
            "--model",
            str(out),
            "--data",
            str(tmp_path / "fr.txt"),
            "--new-langs",
            "fr",
            "--lang",
            "fr",
        ],
    )
    assert code == 2 and "is an unfinished `pdmoe graft` output" in err


def test_refused_resume_leaves_a_finished_output_finished(tmp_path: Path, inputs) -> None:
    out = tmp_path / "out"
    graft(*inputs, out)
    before = tree_hash(out)
    folder = claim_output(out, Command.GRAFT, resume=True, keep_partial=True)
    assert read_marker(out).state is OutputState.WRITING
    folder.release()  # the run stopped before writing anything
    assert tree_hash(out) == before and read_marker(out).state is OutputState.COMPLETE
