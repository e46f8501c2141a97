"""Every path pdmoe writes is a declared output, checked before any work against every input (the
real files behind its links too) and the other outputs; no link pdmoe did not make is followed
when writing; bad option values are one-line errors. One test per mechanism, then the cases of
the reliability report as regressions."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pdmoe.cli import _command_parser as command_parser
from pdmoe.cli import build_parser, flag_spelling, main
from pdmoe.errors import CheckpointError, UsageError
from pdmoe.io.atomic import Staged, open_to_append
from pdmoe.io.outputs import (
    LOCK,
    MARKER,
    Command,
    Output,
    OutputState,
    check_outputs,
    claim_output,
    read_marker,
)
from pdmoe.io.safetensors_format import TensorMeta
from pdmoe.io.side_files import copy_side_files
from pdmoe.io.writer import ShardWriter
from pdmoe.tiny import build_tiny_dense, perturb_checkpoint
from pdmoe.upcycle import upcycle
from tests.hub_cache import cache_model

REPOSITORY = Path(__file__).resolve().parents[1]


def tree_hash(directory: Path) -> dict[str, str]:
    """Every file below ``directory`` (links followed) by relative path, with the SHA-256 of its bytes."""
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def run(capsys: pytest.CaptureFixture, *args: object) -> tuple[int, str]:
    code = main([str(arg) for arg in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") <= 1, err
    return code, err


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny dense BASE, its INSTRUCT, and an upcycled CPT (MoE in layers 0 and 2: exportable)."""
    root = tmp_path_factory.mktemp("paths")
    base = build_tiny_dense(root / "base", "llama", seed=3)
    instruct = perturb_checkpoint(base, root / "instruct", scale=0.02, seed=4)
    cpt = upcycle(base, root / "cpt", layers="0,2")
    return {"base": base, "instruct": instruct, "cpt": cpt}


def graft_args(models: dict[str, Path], out: Path, *options: object) -> list[object]:
    return ["graft", "--base", models["base"], "--instruct", models["instruct"], "--cpt", models["cpt"], "--out", out, *options]  # fmt: skip


def eval_args(model: Path, data: Path, *options: object) -> list[object]:
    return ["eval", "--model", model, "--data", data, "--lang", "fr", "--new-langs", "fr", *options]


# --- the mechanism: every output checked against every input and every other output -----------


def test_outputs_are_checked_against_inputs_and_each_other(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    data = tmp_path / "held.jsonl"
    data.write_text('{"text": "x"}\n')
    inputs = (model, data)

    def refusal(*outputs: Output, overwrite: bool = False) -> str:
        """The refusal as the command line that has these outputs (eval's --json, graft's others) words it."""
        with pytest.raises((CheckpointError, UsageError)) as caught:
            check_outputs(outputs, inputs=inputs, overwrite=overwrite)
        command = "eval" if outputs[0].option == "json" else "graft"
        return caught.value.render(flag_spelling(command_parser(build_parser(command), command)))

    assert refusal(Output(data, "json"), overwrite=True) == (
        f"--json {data} is also an input; choose another --json"
    )
    assert f"lies inside the input {model}" in refusal(Output(model / "eval.json", "json"), overwrite=True)
    assert "contains the input" in refusal(Output(tmp_path, "export_out", Command.EXPORT))
    out = tmp_path / "out"
    assert refusal(Output(out, "out", Command.GRAFT), Output(out, "export_out", Command.EXPORT)) == (
        f"output directory {out} is also --export-out {out}; choose another --out"
    )
    assert f"output directory {out} contains --export-out {out / 'native'}" in refusal(
        Output(out, "out", Command.GRAFT), Output(out / "native", "export_out", Command.EXPORT)
    )
    (tmp_path / "report.json").write_text("mine")
    assert "exists; pass --overwrite to replace it" in refusal(Output(tmp_path / "report.json", "json"))
    (tmp_path / "link.json").symlink_to(tmp_path / "report.json")
    assert "is a link; pdmoe never writes through links" in refusal(
        Output(tmp_path / "link.json", "json"), overwrite=True
    )
    other = tmp_path / "other-model"
    other.mkdir()
    (other / "config.json").write_text("{}")
    assert f"lies inside the model or pdmoe output folder {other}" in refusal(
        Output(other / "config.json", "json"), overwrite=True
    )
    # what may be written: a new file, an existing one under --overwrite, disjoint folders
    check_outputs([Output(tmp_path / "new.json", "json")], inputs=inputs)
    check_outputs([Output(tmp_path / "report.json", "json")], inputs=inputs, overwrite=True)
    check_outputs(
        [Output(out, "out", Command.GRAFT), Output(tmp_path / "native", "export_out", Command.EXPORT)],
        inputs=inputs,
    )
    assert (tmp_path / "report.json").read_text() == "mine" and not out.exists()


def test_overlap_is_decided_on_the_files_an_input_links_to(tmp_path: Path) -> None:
    """A Hugging Face snapshot is links into blobs/: an OUT holding those blobs contains the input."""
    blobs = tmp_path / "out" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / "abc").write_text("weights")
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / "model.safetensors").symlink_to(blobs / "abc")
    with pytest.raises(
        CheckpointError, match=rf"contains {blobs / 'abc'}, a file that the input {snapshot} links to"
    ):
        check_outputs([Output(tmp_path / "out", "out", Command.EXPORT)], inputs=[snapshot], overwrite=True)
    with pytest.raises(CheckpointError, match="a file that the input"):
        check_outputs([Output(blobs / "abc", "json")], inputs=[snapshot], overwrite=True)


# --- regressions: graft --export-out -------------------------------------------------------


def test_export_out_equal_to_the_cpt_input_is_refused_before_anything(tmp_path, models, capsys) -> None:
    before = tree_hash(models["cpt"])
    out = tmp_path / "final"
    code, err = run(
        capsys, *graft_args(models, out, "--export", "auto", "--export-out", models["cpt"], "--overwrite")
    )
    assert (code, err) == (
        2,
        f"pdmoe graft: error: output directory {models['cpt']} is also an input; choose another --export-out\n",
    )
    assert tree_hash(models["cpt"]) == before and not out.exists()


def test_export_out_equal_to_out_or_base_fails_before_the_graft(tmp_path, models, capsys) -> None:
    out = tmp_path / "final"
    code, err = run(capsys, *graft_args(models, out, "--export", "auto", "--export-out", out))
    assert code == 2 and f"output directory {out} is also --export-out {out}" in err
    code, err = run(capsys, *graft_args(models, out, "--export", "auto", "--export-out", models["base"]))
    assert code == 2 and f"output directory {models['base']} is also an input" in err
    assert not out.exists()


def test_export_out_without_export_is_a_usage_error(tmp_path, models, capsys) -> None:
    code, err = run(capsys, *graft_args(models, tmp_path / "final", "--export-out", tmp_path / "native"))
    assert code == 2 and "--export-out names where --export writes; pass --export FORMAT too" in err
    assert not (tmp_path / "final").exists()


def test_graft_out_dot_exports_beside_it(tmp_path, models, capsys, monkeypatch) -> None:
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    code = main([str(arg) for arg in graft_args(models, ".", "--export", "auto")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"exported {tmp_path / 'work-native'} as qwen2_moe" in captured.out
    assert read_marker(tmp_path / "work-native").command is Command.EXPORT


# --- regressions: eval --json / --plot -----------------------------------------------------


@pytest.fixture()
def no_evaluation(monkeypatch) -> None:
    monkeypatch.setattr("pdmoe.cpt.evaluate.evaluate_model", lambda *a, **k: pytest.fail("evaluated anyway"))


def test_eval_json_never_replaces_its_data_or_a_model_file(tmp_path, models, capsys, no_evaluation) -> None:
    held = tmp_path / "held.jsonl"
    held.write_text('{"text": "bonjour"}\n')
    config = models["cpt"] / "config.json"
    before = (held.read_bytes(), config.read_bytes())
    code, err = run(capsys, *eval_args(models["cpt"], held, "--json", held))
    assert (code, err) == (2, f"pdmoe eval: error: --json {held} is also an input; choose another --json\n")
    code, err = run(capsys, *eval_args(models["cpt"], held, "--json", config, "--overwrite"))
    assert code == 2 and f"--json {config} lies inside the input {models['cpt']}" in err
    assert (held.read_bytes(), config.read_bytes()) == before


def test_eval_plot_is_written_where_it_is_named(tmp_path, models, capsys, no_evaluation) -> None:
    data = tmp_path / "fr.txt"
    data.write_text("bonjour\n")
    (tmp_path / "plots").mkdir()
    code, err = run(capsys, *eval_args(models["cpt"], data, "--plot", tmp_path / "plots" / "heatmap"))
    assert (
        code == 2 and "matplotlib cannot write a file without an extension; end the name with one of" in err
    )
    code, err = run(capsys, *eval_args(models["cpt"], data, "--plot", tmp_path / "heatmap.docx"))
    assert code == 2 and "matplotlib cannot write 'docx' files" in err
    existing = tmp_path / "heat.png"
    existing.write_bytes(b"earlier")
    code, err = run(capsys, *eval_args(models["cpt"], data, "--plot", existing))
    assert code == 2 and "exists; pass --overwrite to replace it" in err
    code, err = run(
        capsys, *eval_args(models["cpt"], data, "--json", tmp_path / "a", "--plot", tmp_path / "a")
    )
    assert code == 2 and f"--json {tmp_path / 'a'} is also --plot {tmp_path / 'a'}" in err
    assert (
        sorted(path.name for path in (tmp_path / "plots").iterdir()) == []
        and existing.read_bytes() == b"earlier"
    )


def test_eval_writes_the_named_plot_and_json(tmp_path, models, capsys) -> None:
    pytest.importorskip("matplotlib")
    data = tmp_path / "fr.txt"
    data.write_text("bonjour tout le monde\n" * 40)
    plot, report = tmp_path / "routing.svg", tmp_path / "eval.json"
    report.write_text("an earlier report")
    args = eval_args(
        models["cpt"], data, "--seq-len", 16, "--max-sequences", 4, "--plot", plot, "--json", report
    )
    code, err = run(capsys, *args, "--overwrite", "--cache-dir", tmp_path / "cache")
    assert code == 0, err
    assert plot.read_text().lstrip().startswith("<?xml") and report.read_text().startswith("{")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cache", "eval.json", "fr.txt", "routing.svg"]


# --- regressions: bench/study.py --out -------------------------------------------------------


def test_study_refuses_a_folder_it_did_not_write(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.md").write_text("months of work")
    (mine / "work").mkdir()
    (mine / "work" / "data.json").write_text("{}")
    before = tree_hash(mine)
    child = subprocess.run(
        [sys.executable, "bench/study.py", "--out", str(mine), "--quick"],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
    )
    assert child.returncode == 2 and "Traceback" not in child.stderr
    assert f"{mine} was not written by pdmoe (it has no {MARKER})" in child.stderr
    assert tree_hash(mine) == before


# --- no link followed when writing -----------------------------------------------------------


@pytest.mark.parametrize("planted", ["link", "dangling", "folder"])
def test_a_planted_lock_is_refused_and_its_target_untouched(tmp_path: Path, planted: str) -> None:
    out, target = tmp_path / "out", tmp_path / "precious.txt"
    out.mkdir()
    if planted == "folder":
        (out / LOCK).mkdir()
    else:
        if planted == "link":
            target.write_text("keep me")
        (out / LOCK).symlink_to(target)
    with pytest.raises(
        CheckpointError, match=rf"{out / LOCK} is not a regular file .* pdmoe did not make it"
    ):
        claim_output(out, Command.UPCYCLE)
    assert target.read_text() == "keep me" if planted == "link" else not target.exists()
    assert not (out / MARKER).exists()


def test_files_are_replaced_never_written_through_a_link(tmp_path: Path) -> None:
    source, out, target = tmp_path / "source", tmp_path / "out", tmp_path / "victim.json"
    source.mkdir()
    out.mkdir()
    (source / "tokenizer.json").write_text('{"new": 1}')
    target.write_text("victim")
    (out / "tokenizer.json").symlink_to(target)
    assert copy_side_files(source, out) == ["tokenizer.json"]
    assert not (out / "tokenizer.json").is_symlink() and (out / "tokenizer.json").read_text() == '{"new": 1}'
    assert target.read_text() == "victim"
    (out / "metrics.jsonl").symlink_to(tmp_path / "created-elsewhere")
    with pytest.raises(OSError):
        open_to_append(out / "metrics.jsonl")
    assert not (tmp_path / "created-elsewhere").exists()
    (out / ".model.safetensors.partial").symlink_to(target)  # planted where a shard is staged
    with ShardWriter(out / "model.safetensors", [TensorMeta("w", torch.float32, (2,))], None) as writer:
        writer.write("w", torch.ones(2))
    assert target.read_text() == "victim" and (out / "model.safetensors").stat().st_size > 8
    (out / "config.json").mkdir()
    with (
        pytest.raises(CheckpointError, match="something that is not a file is in its place"),
        Staged(out / "config.json") as staged,
    ):
        staged.write_text("{}")


def test_graft_resume_never_writes_through_a_planted_tokenizer_link(tmp_path, models, capsys) -> None:
    out, victim = tmp_path / "final", tmp_path / "victim.json"
    victim.write_text("victim")
    assert main([str(arg) for arg in graft_args(models, out)]) == 0
    record = replace(read_marker(out), state=OutputState.WRITING)
    (out / MARKER).write_text(record.to_json())  # as a killed run leaves it
    (out / "tokenizer.json").unlink()
    (out / "tokenizer.json").symlink_to(victim)
    code, err = run(capsys, *graft_args(models, out, "--resume"))
    assert code == 0, err
    assert victim.read_text() == "victim" and not (out / "tokenizer.json").is_symlink()


# --- overlap on resolved files: a Hugging Face snapshot linking into OUT ---------------------


def test_export_overwrite_of_the_blobs_of_its_cached_input_is_refused(
    tmp_path, models, capsys, monkeypatch
) -> None:
    """The snapshot (the input) is outside OUT, but its links point into OUT: the real files."""
    from huggingface_hub import constants

    home = tmp_path / "hf"
    commit = cache_model(home, "org/moe", models["cpt"])
    blobs = home / "hub" / "models--org--moe" / "blobs"
    (blobs / MARKER).write_text(read_marker(models["cpt"]).to_json())  # as if pdmoe had written OUT
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    snapshot = blobs.parent / "snapshots" / commit
    before = tree_hash(snapshot)
    code, err = run(capsys, "export", "--model", "org/moe", "--out", blobs, "--overwrite")
    assert code == 2 and f"a file that the input {snapshot} links to; choose another --out" in err
    assert tree_hash(snapshot) == before


# --- hub revisions -----------------------------------------------------------------------------


def test_revisions_follow_git_ref_rules_and_stay_in_the_cache(tmp_path, models, capsys, monkeypatch) -> None:
    from huggingface_hub import constants

    from pdmoe.hub import check_revision, resolve_model

    for good in ("main", "v1.0", "release/2024-05", "pr", "refs/pr/12", "a" * 40, "feature@x"):
        check_revision("org/m", good)
    for bad in ("..", "/etc", "../../../../x", "a..b", "x.lock", ".hidden", "-x", "x/", "x.", "a b", "@", "a@{1}", "a//b", "a\\b", "x~1", "x^", "a:b", "a?", "a*", "a["):  # fmt: skip
        with pytest.raises(CheckpointError, match="is not a revision name; give a branch or tag name"):
            check_revision("org/m", bad)
    home = tmp_path / "hf"
    cache_model(home, "org/dense", models["base"])
    repo = home / "hub" / "models--org--dense"
    (repo / "refs" / "planted").write_text(f"../../../../../../../../..{models['instruct']}")
    (repo / "refs" / "pr").mkdir()  # a cached branch pr/x makes refs/pr a folder
    (repo / "refs" / "pr" / "x").write_text((repo / "refs" / "main").read_text())
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="outside its snapshots in the Hugging Face cache"):
        resolve_model("org/dense@planted")
    for revision in ("..", "/etc", "pr", "../../../../x"):
        code, err = run(capsys, "upcycle", "--model", f"org/dense@{revision}", "--out", tmp_path / "out")
        assert code == 2 and err.startswith("pdmoe upcycle: error: org/dense@"), err
    assert not (tmp_path / "out").exists()


# --- no late or raw failures ---------------------------------------------------------------


def test_a_damaged_token_cache_is_rebuilt(tmp_path, models) -> None:
    from pdmoe.cpt.data import TokenCache, corpus_spec
    from pdmoe.io.hf_loading import load_tokenizer

    data = tmp_path / "fr.txt"
    data.write_text("bonjour le monde\n" * 20)
    spec = corpus_spec([data], ["fr"], [], ["fr"])
    tokenizer = load_tokenizer(models["base"])
    cache = TokenCache.build(spec, tokenizer, tmp_path / "cache")
    tokens = cache.tokens.copy()
    for damage in ("truncate", "meta", "delete-meta", "delete-langs"):
        folder = cache.directory
        if damage == "truncate":
            os.truncate(folder / TokenCache.TOKENS, 6)
        elif damage == "meta":
            (folder / TokenCache.META).write_text('{"key": ')
        else:
            (folder / (TokenCache.META if damage == "delete-meta" else TokenCache.LANGS)).unlink()
        cache = TokenCache.build(spec, tokenizer, tmp_path / "cache")
        assert (cache.tokens == tokens).all(), damage


def test_graft_seed_outside_its_range_is_refused(tmp_path, models, capsys) -> None:
    for seed in (-1, 2**64, 2**32):
        args = graft_args(models, tmp_path / "out", "--method", "dare", "--density", "0.5", "--seed", seed)
        code, err = run(capsys, *args)
        assert (code, err) == (
            2,
            f"pdmoe graft: error: --seed must be an integer in 0..4294967295, got {seed}\n",
        )
    assert not (tmp_path / "out").exists()


def test_unwritable_out_and_a_file_as_model_are_one_line_errors(tmp_path, models, capsys) -> None:
    code, err = run(capsys, "upcycle", "--model", models["base"], "--out", "/proc/pdmoe-x")
    assert code == 2 and err.startswith("pdmoe upcycle: error: cannot create /proc/pdmoe-x (")
    text = tmp_path / "notes.txt"
    text.write_text("not a model")
    code, err = run(capsys, "upcycle", "--model", text, "--out", tmp_path / "out")
    assert (code, err) == (
        2,
        f"pdmoe upcycle: error: {text} is a file, not a model folder; give the checkpoint folder (the one "
        "holding config.json)\n",
    )
