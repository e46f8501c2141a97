"""The command line and the streaming commands never load transformers' models; `import pdmoe`
still makes pdmoe's models loadable through transformers' Auto classes and experts interface."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pdmoe.tiny import build_tiny_dense, perturb_checkpoint

REPOSITORY = Path(__file__).resolve().parents[1]
HEAVY = ("transformers.modeling_utils", "pdmoe.modeling", "accelerate", "triton")


def _python(code: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True, cwd=REPOSITORY
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lazy")
    base = build_tiny_dense(root / "base", "llama")
    return {"base": base, "instruct": perturb_checkpoint(base, root / "instruct", seed=1), "root": root}


def test_help_upcycle_graft_and_export_stay_light(models) -> None:
    root, base, instruct = models["root"], models["base"], models["instruct"]
    out = _python(
        f"""
        import contextlib, io, sys
        from pdmoe.cli import main
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                main(["--help"])
            except SystemExit:
                pass
            assert main(["upcycle", "--model", sys.argv[1], "--out", sys.argv[3] + "/moe", "--layers", "0"]) == 0
            assert main(["graft", "--base", sys.argv[1], "--instruct", sys.argv[2], "--cpt", sys.argv[3] + "/moe",
                         "--out", sys.argv[3] + "/final"]) == 0
        print(sorted(name for name in {HEAVY!r} if name in sys.modules))
        """,
        str(base),
        str(instruct),
        str(root),
    )
    assert out.strip().splitlines()[-1] == "[]"


def test_usage_and_path_errors_come_before_torch(models, tmp_path) -> None:
    """Mistyped options, abbreviations, missing paths, a dense model where an MoE is needed and an
    unusable --out are refused (exit 2, one line, the subcommand's usage for options) before torch,
    transformers or accelerate load: in a blink, not after seconds of imports."""
    base, data = str(models["base"]), tmp_path / "text.jsonl"
    data.write_text('{"text": "hello", "lang": "en"}\n')
    not_empty = tmp_path / "not-empty"
    not_empty.mkdir()
    (not_empty / "mine.txt").write_text("a user's file")
    cases = {
        "usage: pdmoe upcycle": ["upcycle", "--model", base, "--out", "x", "--bogus"],
        "--num-exp": ["upcycle", "--model", base, "--out", "x", "--num-exp", "3"],
        "usage: pdmoe graft": ["graft", "--bas", base],
        "usage: pdmoe cpt": ["cpt", "--modle", base, "--data", str(data), "--out", "x"],
        "usage: pdmoe eval": ["eval", "--model", base, "--data", str(data), "--nope"],
        "usage: pdmoe export": ["export", "--model", base, "--out", "x", "--formt", "auto"],
        "does not exist": ["upcycle", "--model", str(tmp_path / "missing"), "--out", "x"],
        "not an upcycled MoE": [
            "cpt",
            "--model",
            base,
            "--data",
            str(data),
            "--new-langs",
            "en",
            "--out",
            "x",
        ],
        "data file": ["eval", "--model", base, "--data", str(tmp_path / "no.jsonl"), "--new-langs", "en"],
        "is not empty": ["graft", "--base", base, "--instruct", base, "--cpt", base, "--out", str(not_empty)],
        "has no config.json": ["export", "--model", str(tmp_path), "--out", "y"],
    }
    out = _python(
        """
        import contextlib, io, json, sys
        from pdmoe.cli import main
        results = {}
        for expected, argv in json.loads(sys.argv[1]).items():
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                try:
                    code = main(argv)
                except SystemExit as exit:
                    code = exit.code
            results[expected] = [code, err.getvalue()]
        heavy = ("torch", "transformers", "accelerate")
        print(json.dumps([results, sorted(name for name in heavy if name in sys.modules)]))
        """,
        json.dumps(cases),
    )
    results, heavy = json.loads(out.strip().splitlines()[-1])
    assert heavy == []
    for expected, (code, err) in results.items():
        assert code == 2 and expected in err and "Traceback" not in err, (expected, err)


def test_import_pdmoe_registers_with_transformers(models) -> None:
    """Both orders: pdmoe first (registration when transformers loads), transformers first (at once)."""
    moe = models["root"] / "moe-for-auto"
    from pdmoe.upcycle import upcycle

    upcycle(models["base"], moe)
    for first, second in (("import pdmoe", "import transformers"), ("import transformers", "import pdmoe")):
        out = _python(
            f"""
            import sys
            {first}
            {second}
            from transformers import AutoConfig, AutoModelForCausalLM
            from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
            model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
            print(type(AutoConfig.from_pretrained(sys.argv[1])).__name__, type(model).__name__,
                  "pdmoe" in ALL_EXPERTS_FUNCTIONS)
            """,
            str(moe),
        )
        assert out.split() == ["MoEConfig", "MoEForCausalLM", "True"], (first, out)


def test_version() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pdmoe.cli", "--version"], capture_output=True, text=True, cwd=REPOSITORY
    )
    assert out.returncode == 0 and out.stdout.startswith("pdmoe ") and out.stdout.split()[1][0].isdigit()
