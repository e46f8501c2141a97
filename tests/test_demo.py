"""`pdmoe demo` (README's main command) runs every step, its invariant checks pass, and the
commands it suggests next work on the models it made."""

from __future__ import annotations

import shlex

from pdmoe.cli import main


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

    suggested = [line.strip() for line in printed.split("Next, on the models the demo made:")[1].splitlines()]
    suggested = [line for line in suggested if line]
    assert [line.split()[1] for line in suggested] == ["eval", "export", "cpt"]
    for line in suggested:
        argv = shlex.split(line.split("#")[0])[1:]
        if argv[0] == "cpt":
            argv[argv.index("--max-steps") + 1] = "2"
        assert main(argv) == 0, line
