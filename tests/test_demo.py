"""`pdmoe demo` (README's main command) runs every step and its invariant checks pass."""

from __future__ import annotations

from pdmoe.cli import main


def test_demo_runs_the_whole_pipeline(tmp_path, capsys):
    code = main(["demo", "--out", str(tmp_path / "demo"), "--steps", "15"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "all checks passed" in printed
    assert "27/27" in printed and "3/3" in printed
    for step in ("base", "instruct", "moe", "cpt", "final"):
        assert (tmp_path / "demo" / step / "config.json").is_file()
