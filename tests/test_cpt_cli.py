"""``pdmoe cpt`` / ``python -m pdmoe.cpt`` options and ``pdmoe eval`` output (tiny model, CPU)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
from dataclasses import fields, replace

import pytest
import torch

from pdmoe.cli import flag_spelling, main, options_from_args
from pdmoe.cli.cpt import add_cpt_arguments, add_cpt_parser
from pdmoe.cli.eval import add_eval_parser
from pdmoe.cpt.__main__ import main as cpt_main
from pdmoe.cpt.settings import TrainConfig
from pdmoe.errors import Option, PdmoeError, Problem, UsageError
from pdmoe.tiny import build_tiny_dense
from pdmoe.upcycle import upcycle

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    root = tmp_path_factory.mktemp("cpt-cli")
    return upcycle(build_tiny_dense(root / "dense"), root / "moe", num_experts=4, top_k=2)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdmoe")
    subparsers = parser.add_subparsers(dest="command")
    add_cpt_parser(subparsers)
    add_eval_parser(subparsers)
    return parser


def test_cpt_options_default_to_the_method(tmp_path):
    args = _parser().parse_args(
        ["cpt", "--model", "m", "--data", "a.jsonl", "b.txt", "--out", "o", "--resume"]
    )
    config = options_from_args(TrainConfig, args)
    assert (config.stage, config.lr, config.lpr_coef) == ("cpt", 5e-5, 0.02)
    assert config.seq_len is None  # 1024, or the model's maximum when smaller
    assert config.resume == "latest" and config.bf16 == "auto" and config.aux_loss_coef is None
    assert args.func.func.__name__ == "run_cpt"  # with the parser's flag spelling bound


def test_every_numeric_option_has_a_range():
    """A new int or float option cannot slip past ``check_options``: its field must say its range."""
    numeric = {"int", "int | None", "float", "float | None"}
    unchecked = [
        spec.name for spec in fields(TrainConfig) if spec.type in numeric and not spec.metadata.get("check")
    ]
    assert unchecked == []
    assert {spec.name for spec in fields(TrainConfig) if spec.type in numeric} >= {"lr", "seed", "max_steps"}


def test_bad_numbers_are_refused_before_torch_loads(tmp_path):
    """The option checks read the fields' metadata (``settings``), which loads no torch: a mistyped
    number costs a blink, not the seconds of torch's import."""
    program = """
        import contextlib, io, json, sys
        from pdmoe.cli import main
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(["cpt", "--model", "m", "--data", "d.jsonl", "--out", "o", *sys.argv[1:]])
        print(json.dumps([code, err.getvalue(), "torch" in sys.modules]))
        """
    for option, value, message in (
        ("--lr", "nan", "--lr must be a finite number > 0, got nan"),
        ("--min-lr-ratio", "2", "--min-lr-ratio must be at most 1, got 2.0"),
        ("--warmup-steps", "-1", "--warmup-steps must be a whole number from 0 to 2**63-1, got -1"),
    ):
        done = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(program), option, value],
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )
        code, err, torch_loaded = json.loads(done.stdout.strip().splitlines()[-1])
        assert (code, err, torch_loaded) == (2, f"pdmoe cpt: error: {message}\n", False), done.stderr[-2000:]


def test_module_entry_point_reports_bad_input_without_traceback(moe, tmp_path, capsys):
    code = cpt_main(
        [
            "--model",
            str(moe),
            "--data",
            str(tmp_path / "nope.jsonl"),
            "--out",
            str(tmp_path / "out"),
            "--new-langs",
            "fr",
            "--seq-len",
            "32",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert (
        "pdmoe cpt: error: data file" in err and "nope.jsonl does not exist" in err and "Traceback" not in err
    )


def test_eval_prints_perplexity_and_expert_shares_per_language(moe, tmp_path, capsys, monkeypatch):
    data = tmp_path / "mixed.jsonl"
    lines = [{"text": "bonjour le monde " * 6, "lang": "fr"}, {"text": "hello world " * 8, "lang": "en"}] * 6
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # the plot extra is missing
    args = _parser().parse_args(
        [
            "eval",
            "--model",
            str(moe),
            "--data",
            str(data),
            "--original-langs",
            "en",
            "--new-langs",
            "fr",
            "--seq-len",
            "32",
            "--json",
            str(tmp_path / "eval.json"),
            "--plot",
            str(tmp_path / "heat.png"),
            "--cache-dir",
            str(tmp_path / "cache"),
        ]
    )
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert (
        "perplexity" in out
        and "heatmap skipped: matplotlib is not installed (pip install 'pdmoe[plot]')" in out
    )
    layer_rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["0"], ["1"], ["2"])]
    assert [row[1] for row in layer_rows] == ["en", "fr"] * 3
    assert all(sum(float(x) for x in row[2:]) == pytest.approx(100, abs=0.2) for row in layer_rows)
    numbers = json.loads((tmp_path / "eval.json").read_text())
    assert set(numbers["perplexity"]) == {"en", "fr"} and all(p > 1 for p in numbers["perplexity"].values())
    assert not (tmp_path / "heat.png").exists()


def test_eval_refuses_sequences_longer_than_the_model(moe, tmp_path):
    from pdmoe.cpt import corpus_spec, evaluate_model

    (tmp_path / "fr.txt").write_text("bonjour")
    corpus = corpus_spec([tmp_path / "fr.txt"], ["fr"], [], ["fr"])
    with pytest.raises(
        UsageError, match=r"300 is larger than the model's maximum \(256 positions\)"
    ) as caught:
        evaluate_model(moe, corpus, seq_len=300, cache_dir=tmp_path / "cache")
    assert caught.value.problem is Problem.INVALID and caught.value.options == (Option("seq_len"),)
    with pytest.raises(UsageError, match=r"must be at least 1, got 0") as caught:
        evaluate_model(moe, corpus, batch_size=0, cache_dir=tmp_path / "cache")
    assert caught.value.problem is Problem.INVALID and caught.value.options == (Option("batch_size"),)


def test_eval_heatmap_with_the_plot_extra(moe, tmp_path):
    pytest.importorskip("matplotlib")
    from pdmoe.cpt.evaluate import EvalResult, save_heatmap

    counts = torch.tensor([[[6, 2, 0, 0], [1, 1, 1, 1]]] * 3)
    result = EvalResult(("en", "fr"), [0, 1, 2], torch.ones(2, dtype=torch.float64), torch.ones(2), counts)
    assert save_heatmap(result, tmp_path / "heat.png") and (tmp_path / "heat.png").stat().st_size > 0


# --- the command line names options by its flags (the Python API by keywords: see the tests of each part)


def _run(capsys, *args) -> tuple[int, str]:
    code = main([str(arg) for arg in args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            ["--new-langs", "fr", "--max-steps", "2", "--max-tokens", "9"],
            "give --max-steps or --max-tokens, not both",
        ),
        (
            ["--original-langs", "en", "--new-langs", "fr", "en"],
            "language(s) en declared more than once in --original-langs/--new-langs",
        ),
        ([], "declare the languages of the data with --original-langs and/or --new-langs"),
        (
            ["--data", "a.txt", "b.txt", "c.txt", "--lang", "en", "fr", "--new-langs", "en", "fr"],
            "--lang takes one language for all files or one per file: got 2 for 3 files",
        ),
    ],
)
def test_option_errors_before_any_file_is_read_name_the_flags(
    tmp_path, monkeypatch, capsys, options, message
):
    monkeypatch.chdir(tmp_path)
    code, err = _run(capsys, "cpt", "--model", "m", "--out", "o", "--data", "d.jsonl", *options)
    assert (code, err) == (2, f"pdmoe cpt: error: {message}\n")


def test_cpt_errors_before_any_weight_is_read_name_the_flags(moe, tmp_path, capsys):
    (tmp_path / "fr.txt").write_text("bonjour le monde\n")
    out, absent = tmp_path / "out", tmp_path / "absent"
    command = ["cpt", "--model", moe, "--data", tmp_path / "fr.txt", "--lang", "fr", "--new-langs", "fr"]
    command += ["--out", out, "--cache-dir", tmp_path / "cache", "--seq-len"]
    for options, message in (
        (["300", "--dry-run"], "--seq-len 300 is larger than the model's maximum (256 positions)"),
        (
            ["32", "--trainable", "attention", "--dry-run"],
            "--trainable takes a comma list of routers, new_experts, original_experts, non_moe; got 'attention'",
        ),
        (
            ["32", "--trainable", "original_experts", "--dry-run"],
            "--trainable original_experts needs new_experts too (only a prefix of experts can be frozen)",
        ),
        (
            ["32", "--stage", "review"],
            "the review stage needs original-language text: declare it with --original-langs",
        ),
        (["32", "--resume"], f"--resume: {out} holds no training checkpoint yet; start without --resume"),
        (
            ["32", "--resume", absent],
            f"--resume {absent} is not a directory; pass a checkpoints/step-* directory or 'latest'",
        ),
    ):
        assert _run(capsys, *command, *options) == (2, f"pdmoe cpt: error: {message}\n")
    assert not out.exists()


def test_eval_errors_name_the_flags(moe, tmp_path, capsys, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pdmoe.cpt import corpus_formats

    monkeypatch.setattr(corpus_formats, "MAX_JSONL_LINE_CHARS", 100)
    files = {
        "fr.txt": "bonjour",
        "untagged.jsonl": '{"text": "bonjour"}\n',
        "notjson.jsonl": '{"text": "ok"}\nbonjour\n',
        "nofield.jsonl": '{"body": "bonjour"}\n',
        "long.jsonl": json.dumps({"text": "mot " * 50}) + "\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "nocol.parquet")
    fr = ["--data", tmp_path / "fr.txt", "--lang", "fr"]
    for options, message in (
        ([*fr, "--seq-len", "300"], "--seq-len 300 is larger than the model's maximum (256 positions)"),
        ([*fr, "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        ([*fr, "--seq-len", "1"], "--seq-len must be at least 2, got 1"),
        (
            [*fr, "--seq-len", "64"],
            "the data has 8 tokens, fewer than one sequence of 64; add data or lower --seq-len",
        ),
        (
            ["--data", tmp_path / "untagged.jsonl"],
            f"{tmp_path / 'untagged.jsonl'} line 1 has no 'lang' field and --lang gives the file no language; "
            "tag the documents or pass --lang",
        ),
        (
            ["--data", tmp_path / "fr.txt", "--lang", "es"],
            f"{tmp_path / 'fr.txt'} line 1: language 'es' is not declared (declared: fr); "
            "add it to --original-langs or --new-langs",
        ),
        (
            ["--data", tmp_path / "notjson.jsonl", "--lang", "fr"],
            f"{tmp_path / 'notjson.jsonl'} line 2 is not JSON; JSONL needs one object per line "
            "(for plain text use a .txt file or --data-format text)",
        ),
        (
            ["--data", tmp_path / "nofield.jsonl", "--lang", "fr"],
            f"{tmp_path / 'nofield.jsonl'} line 1 has no string field 'text' (found: body); "
            "name the text field with --text-field",
        ),
        (
            ["--data", tmp_path / "nocol.parquet", "--lang", "fr"],
            f"{tmp_path / 'nocol.parquet'} has no string column 'text' (found: body: string); "
            "name the text column with --text-field",
        ),
        (
            ["--data", tmp_path / "long.jsonl", "--lang", "fr"],
            f"{tmp_path / 'long.jsonl'} line 1 is longer than 100 characters; split such documents into "
            "several records, or give them as plain text (--data-format text)",
        ),
    ):
        command = ["eval", "--model", moe, "--new-langs", "fr", "--cache-dir", tmp_path / "cache", *options]
        assert _run(capsys, *command) == (2, f"pdmoe eval: error: {message}\n")


def test_eval_names_the_plot_flag_of_an_image_format_matplotlib_cannot_write(moe, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    (tmp_path / "fr.txt").write_text("bonjour")
    plot = tmp_path / "heat.docx"
    command = ["eval", "--model", moe, "--data", tmp_path / "fr.txt", "--lang", "fr", "--new-langs", "fr"]
    code, err = _run(capsys, *command, "--plot", plot)
    assert code == 2
    assert err.startswith(
        f"pdmoe eval: error: --plot {plot}: matplotlib cannot write 'docx' files; end the name"
    )
    assert not plot.exists()


def test_errors_the_parser_forestalls_would_name_the_flags(moe, tmp_path, monkeypatch):
    """The parser refuses a bad --stage, --bf16 or --data-format itself (choices), and a list of parts
    always trains something of a real MoE: pdmoe's own errors for them reach Python callers only;
    in the command line's spelling they would name its flags."""
    from pdmoe.cpt import freezing
    from pdmoe.cpt.checkpoints import load_moe_model
    from pdmoe.cpt.data import data_files
    from pdmoe.cpt.trainer import dry_run

    parser = argparse.ArgumentParser()
    add_cpt_arguments(parser)
    spell = flag_spelling(parser)
    config = TrainConfig(model=moe, data=[tmp_path / "d.jsonl"], out=tmp_path / "out")
    monkeypatch.setattr(freezing, "_is_trainable", lambda *args: False)  # a model with no such parameters
    for refused, option, message in (
        (
            lambda: dry_run(replace(config, stage="sft")),
            Option("stage"),
            "--stage must be one of cpt, review, not 'sft'",
        ),
        (
            lambda: dry_run(replace(config, bf16="maybe")),
            Option("bf16"),
            "--bf16 must be auto, yes or no, not 'maybe'",
        ),
        (
            lambda: data_files(["d.jsonl"], None, "xml"),
            Option("data_format"),
            "--data-format must be one of auto, jsonl, text, parquet, not 'xml'",
        ),
        (
            lambda: freezing.apply_trainable(load_moe_model(moe), ("routers",)),
            Option("trainable", "routers"),
            "nothing to train with --trainable routers",
        ),
    ):
        with pytest.raises(PdmoeError) as caught:
            refused()
        assert (caught.value.problem, caught.value.options) == (Problem.INVALID, (option,))
        assert caught.value.render(spell) == message
