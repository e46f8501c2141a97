"""``pdmoe cpt`` / ``python -m pdmoe.cpt`` options and ``pdmoe eval`` output (tiny model, CPU)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
from dataclasses import fields

import pytest
import torch

from pdmoe.cli import options_from_args
from pdmoe.cli.cpt import add_cpt_parser
from pdmoe.cli.eval import add_eval_parser
from pdmoe.cpt.__main__ import main as cpt_main
from pdmoe.cpt.settings import TrainConfig
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
    assert args.func.__name__ == "run_cpt"


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
    from pdmoe.errors import UsageError

    (tmp_path / "fr.txt").write_text("bonjour")
    corpus = corpus_spec([tmp_path / "fr.txt"], ["fr"], [], ["fr"])
    with pytest.raises(
        UsageError, match=r"--seq-len 300 is larger than the model's maximum \(256 positions\)"
    ):
        evaluate_model(moe, corpus, seq_len=300, cache_dir=tmp_path / "cache")


def test_eval_heatmap_with_the_plot_extra(moe, tmp_path):
    pytest.importorskip("matplotlib")
    from pdmoe.cpt.evaluate import EvalResult, save_heatmap

    counts = torch.tensor([[[6, 2, 0, 0], [1, 1, 1, 1]]] * 3)
    result = EvalResult(("en", "fr"), [0, 1, 2], torch.ones(2, dtype=torch.float64), torch.ones(2), counts)
    assert save_heatmap(result, tmp_path / "heat.png") and (tmp_path / "heat.png").stat().st_size > 0
