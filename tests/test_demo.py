"""`pdmoe demo` (README's main command) runs every step, its invariant checks pass, and the
commands it suggests next work on the models it made."""

from __future__ import annotations

import json
import shlex

from pdmoe.cli import main


def _row(printed: str, label: str) -> list[str]:
    """The perplexity cells of the demo's table row ``label``."""
    line = next(line for line in printed.splitlines() if line.strip().startswith(label))
    return line.removeprefix(f"  {label}").split()


def test_demo_runs_the_whole_pipeline(tmp_path, capsys):
    code = main(["demo", "--out", str(tmp_path / "demo"), "--steps", "15"])
    captured = capsys.readouterr()
    printed = captured.out
    assert code == 0, printed
    assert "all checks passed" in printed
    assert "27/27" in printed and "3/3" in printed
    for step in ("base", "instruct", "moe", "cpt", "final"):
        assert (tmp_path / "demo" / step / "config.json").is_file()
    for label in ("dense base", "upcycled MoE", "MoE after CPT", "grafted (final)"):
        assert label in printed
    assert "[6/6]" in captured.err  # progress of every step
    assert "Loading weights" not in captured.err  # one line per step, not a bar per model load
    sample = next(line for line in printed.splitlines() if "sample from the grafted model" in line)
    assert not sample.rstrip().removesuffix("'").endswith("\ufffd")  # ends on a whole character
    # One perplexity: the language-model loss alone, so the upcycled MoE is the dense model.
    assert "no router loss" in printed
    assert _row(printed, "upcycled MoE") == _row(printed, "dense base")

    suggested = [line.strip() for line in printed.split("Next, on the models the demo made:")[1].splitlines()]
    suggested = [line for line in suggested if line]
    assert [line.split()[1] for line in suggested] == ["eval", "export", "cpt"]
    for line in suggested:
        argv = shlex.split(line.split("#")[0])[1:]
        if argv[0] == "cpt":
            argv[argv.index("--max-steps") + 1] = "2"
        if argv[0] == "eval":  # prints the demo's numbers for the final model
            argv += ["--json", str(tmp_path / "eval.json")]
        assert main(argv) == 0, line
    evaluated = json.loads((tmp_path / "eval.json").read_text())["perplexity"]
    assert _row(printed, "grafted (final)") == [f"{evaluated['sw']:.1f}", f"{evaluated['en']:.1f}"]
    # a dense model gives the baseline
    heldout = str(tmp_path / "demo" / "data" / "heldout.jsonl")
    dense = ["eval", "--model", str(tmp_path / "demo" / "base"), "--data", heldout, "--original-langs", "en"]
    assert main([*dense, "--new-langs", "sw", "--seq-len", "64", "--json", str(tmp_path / "base.json")]) == 0
    base = json.loads((tmp_path / "base.json").read_text())["perplexity"]
    assert _row(printed, "dense base") == [f"{base['sw']:.1f}", f"{base['en']:.1f}"]


def test_sample_is_cut_to_whole_characters() -> None:
    from pdmoe.cli.demo import _decode_whole_characters
    from pdmoe.tiny import byte_tokenizer

    tokenizer = byte_tokenizer()
    ids = tokenizer("Habari é", add_special_tokens=False).input_ids  # é is two byte tokens
    assert _decode_whole_characters(tokenizer, ids) == "Habari é"
    assert _decode_whole_characters(tokenizer, ids[:-1]) == "Habari "
