"""transformers 4.x reads pdmoe's exports right: a side environment, and the logits it computes.

pdmoe itself needs transformers 5, so transformers 4.x lives in a virtual environment of its own
(torch first, as everywhere, so pip takes the CPU build, then ``transformers<5`` and safetensors):

    python bench/clients/transformers4.py create VENV          # once; .ci/run does it in CI
    VENV/bin/python bench/clients/transformers4.py logits OUT.safetensors TOKENS.json FOLDER...

``logits`` loads every export FOLDER in float32 with AutoModelForCausalLM, saves its logits on
TOKENS (a JSON list of token-id lists) under the folder's path, and prints one JSON line with the
loaded class and any missing, unexpected or mismatched keys per folder. It never imports pdmoe
(it could not: the side environment has none). tests/test_export.py compares those logits with
transformers 5's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

TORCH = "torch==2.13.0"
TRANSFORMERS_4 = "transformers<5"


def create(venv: Path) -> None:
    """The side environment; an existing one whose transformers is 4.x is kept as it is."""
    python = venv / "bin" / "python"
    probe = [
        str(python),
        "-c",
        "import torch, safetensors, transformers; assert transformers.__version__ < '5'",
    ]
    if python.is_file() and subprocess.run(probe, capture_output=True).returncode == 0:
        return
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, TORCH], check=True)
    subprocess.run([*pip, TRANSFORMERS_4, "safetensors"], check=True)


def logits(out: Path, tokens_file: Path, folders: list[str]) -> None:
    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    tokens = torch.tensor(json.loads(tokens_file.read_text()))
    found, report = {}, {"transformers": transformers.__version__}
    for folder in folders:
        model, info = AutoModelForCausalLM.from_pretrained(
            folder, torch_dtype=torch.float32, output_loading_info=True, trust_remote_code=False
        )
        with torch.no_grad():
            found[folder] = model.eval()(tokens).logits.contiguous()
        report[folder] = {"class": type(model).__name__, **{k: sorted(map(str, v)) for k, v in info.items()}}
    if any(name.split(".")[0] == "pdmoe" for name in sys.modules):
        raise SystemExit("pdmoe was imported")
    save_file(found, str(out))
    print(json.dumps(report))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("create", help="create the side environment").add_argument("venv", type=Path)
    run = commands.add_parser("logits", help="logits of exports (run with the side environment's python)")
    run.add_argument("out", type=Path)
    run.add_argument("tokens", type=Path)
    run.add_argument("folders", nargs="+")
    args = parser.parse_args(argv)
    if args.command == "create":
        create(args.venv)
    else:
        logits(args.out, args.tokens, args.folders)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
