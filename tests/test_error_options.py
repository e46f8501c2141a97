"""Errors name options as ``Option`` values, which each caller spells its own way: the Python API by
keyword (``allow_modified_base=True``), the command line by flag (``--allow-modified-base``). The
library outside ``pdmoe/cli`` spells no flag; tests assert on an error's kind and options, and the
wording of each message is checked once, at the command line."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from pdmoe.cli import _command_parser as command_parser
from pdmoe.cli import build_parser, flag_spelling, main
from pdmoe.errors import Option, PdmoeError, Problem, UsageError, keyword_spelling

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = [path for part in ("pdmoe", "cpt", "kernels") for path in sorted((ROOT / part).rglob("*.py"))]
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
COMMAND_LINE = re.compile(r"`(pdmoe|python -m pdmoe\S*|accelerate launch) [^`]*`")  # a whole invocation


def _docstrings(tree: ast.AST) -> set[int]:
    """The ids of the docstring nodes of ``tree``."""
    owners = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, owners)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }


def _spelled_flags(path: Path) -> list[str]:
    """The flags in ``path``'s string literals (docstrings and whole command lines in backticks aside)."""
    tree = ast.parse(path.read_text())
    skipped = _docstrings(tree)
    texts = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):  # an f-string: its literal parts joined around the fields
            parts = [part.value if isinstance(part, ast.Constant) else "{}" for part in node.values]
            texts.append((node.lineno, "".join(parts)))
            skipped |= {id(part) for part in node.values}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skipped:
            texts.append((node.lineno, node.value))
    return [
        f"{path.relative_to(ROOT)}:{line}: {flag}"
        for line, text in texts
        for flag in FLAG.findall(COMMAND_LINE.sub("", text))
    ]


def test_the_library_spells_no_command_line_flag() -> None:
    """Only pdmoe/cli knows the flags: a message elsewhere names ``Option``s instead."""
    outside_cli = [path for path in LIBRARY if "cli" not in path.relative_to(ROOT).parts]
    assert [hit for path in outside_cli for hit in _spelled_flags(path)] == []


def _option_names(path: Path) -> set[str]:
    """The names of every ``Option("name", ...)`` written in ``path``."""
    return {
        node.args[0].value
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "Option"
        and node.args
        and isinstance(node.args[0], ast.Constant)
    }


def test_every_option_an_error_names_is_a_flag_of_some_command() -> None:
    """A misspelt Option name would show the Python keyword at the command line."""
    parser = build_parser()
    destinations = {
        action.dest
        for command in ("upcycle", "cpt", "graft", "eval", "export", "demo")
        for action in command_parser(parser, command)._actions
    }
    named = {name for path in LIBRARY for name in _option_names(path)}
    assert named and named - destinations == set()


def test_one_error_spelled_for_python_and_for_the_command_line() -> None:
    error = UsageError(
        "{method} needs {density} ({value!r} given); or pass {allow}",
        problem=Problem.MISSING,
        method=Option("method", "ties"),
        density=Option("density"),
        allow=Option("allow_non_finite", True),
        value="{not a field}",
    )
    assert str(error) == "method='ties' needs density ('{not a field}' given); or pass allow_non_finite=True"
    graft = command_parser(build_parser("graft"), "graft")
    assert error.render(flag_spelling(graft)) == (
        "--method ties needs --density ('{not a field}' given); or pass --allow-non-finite"
    )
    assert error.problem is Problem.MISSING
    assert error.options == (Option("method", "ties"), Option("density"), Option("allow_non_finite", True))
    # graft's --export writes ExportOptions.format: the flag is found by destination, not by name
    assert flag_spelling(graft)(Option("format", "mixtral")) == "--export mixtral"
    assert keyword_spelling(Option("format", "mixtral")) == "format='mixtral'"


def test_a_plain_message_is_not_a_template() -> None:
    assert str(PdmoeError("{braces} stay as they are")) == "{braces} stay as they are"
    assert PdmoeError("plain").options == () and PdmoeError("plain").problem is None


def test_graft_from_python_names_the_keyword_and_from_the_command_line_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A graft with BASE and INSTRUCT swapped is refused: a Python caller is told
    ``allow_modified_base=True``, a command-line user ``--allow-modified-base``."""
    from pdmoe.errors import TensorValueError
    from pdmoe.graft import graft
    from tests.graft_checkpoints import graft_command, make

    base, instruct, cpt = make(tmp_path, moe=True)
    with pytest.raises(TensorValueError) as caught:
        graft(instruct, base, cpt, tmp_path / "py", allow_modified_base=False)
    assert caught.value.problem is Problem.REFUSED
    assert caught.value.options == (Option("base"), Option("instruct"), Option("allow_modified_base", True))
    message = str(caught.value)
    assert "Check base (is it the model CPT was upcycled from? are base and instruct swapped?)" in message
    assert "pass allow_modified_base=True: the graft is then the plain sum" in message and "--" not in message
    code = main([str(arg) for arg in graft_command(instruct, base, cpt, tmp_path / "cli")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("pdmoe graft: error: CPT is not a descendant of BASE: ")
    assert "Check --base (is it the model CPT was upcycled from? are --base and --instruct swapped?)" in err
    assert "pass --allow-modified-base: the graft is then the plain sum" in err and err.count("\n") == 1


def _graft_wording(error: PdmoeError) -> str:
    graft = command_parser(build_parser("graft"), "graft")
    return error.render(flag_spelling(graft))


def test_wording_of_the_output_refusals_at_the_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each refusal of an output path, as ``pdmoe graft`` words it (``--out``, ``--overwrite``, ...)."""
    import errno
    import os

    from pdmoe.errors import CheckpointError
    from pdmoe.io.outputs import LOCK, Command, Output, check_outputs, claim_output

    def refusal(out: Path, **claim: object) -> PdmoeError:
        with pytest.raises(PdmoeError) as caught:
            claim_output(out, Command.GRAFT, **claim).release()
        return caught.value

    broken = tmp_path / "broken"
    broken.symlink_to(tmp_path / "nowhere")
    assert _graft_wording(refusal(broken)) == f"--out {broken} is a broken link; choose another --out"
    plain = tmp_path / "plain"
    plain.write_text("x")
    assert _graft_wording(refusal(plain)) == f"{plain} exists and is not a directory; choose another --out"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert _graft_wording(refusal(foreign)) == (
        f"output directory {foreign} is not empty; choose another --out (pdmoe replaces only folders it wrote)"
    )
    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / LOCK).symlink_to(tmp_path / "target")
    error = refusal(planted)
    assert isinstance(error, CheckpointError) and _graft_wording(error) == (
        f"{planted / LOCK} is not a regular file (a link, a folder, ...) and pdmoe did not make it; "
        "remove it, or choose another --out"
    )
    assert not (tmp_path / "target").exists()

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr("pdmoe.io.outputs.fcntl.flock", no_locks)
    lockless = tmp_path / "lockless"
    assert _graft_wording(refusal(lockless)) == (
        f"cannot lock {lockless / LOCK} ({os.strerror(errno.ENOLCK)}); pdmoe needs a file system with file "
        "locks for its outputs: choose another --out"
    )
    monkeypatch.undo()

    folder = tmp_path / "folder.json"
    folder.mkdir()
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    for path, problem in (
        (folder, "is a directory; give a file path"),
        (fifo, "is not a regular file; give a file path"),
    ):
        with pytest.raises(UsageError) as caught:
            check_outputs([Output(path, "export_out")])
        assert _graft_wording(caught.value) == f"--export-out {path} {problem}"


def test_wording_of_the_refusals_only_python_can_reach() -> None:
    """The command line's own parser refuses these values first; a Python caller meets them."""
    from pdmoe.options import check_number, parse_dtype

    with pytest.raises(UsageError) as caught:
        parse_dtype("int8")
    assert str(caught.value) == (
        "unsupported output dtype 'int8' for dtype; choose one of float32, fp32, bfloat16, bf16, float16, fp16"
    )
    with pytest.raises(UsageError) as caught:
        check_number("scale", "0.5")
    assert str(caught.value) == "scale must be a number, got '0.5'"
