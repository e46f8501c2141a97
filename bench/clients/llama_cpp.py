"""llama.cpp runs pdmoe's exports exactly, or where export says it does not, indeed does not.

Builds llama-cpp-python (CPU only) from its PyPI sdist into a cache folder when absent (about
20 min on 2 cores, reused afterwards), converts the per-expert export of every model of
tests/export_cases.py (experts and routers perturbed, so they differ) to an f32 GGUF with the
sdist's own vendored ``convert_hf_to_gguf.py`` and ``gguf-py``, runs it with an f32 KV cache,
generates 16 greedy tokens, and compares with transformers 5 on the same tokens: logits of every
position (max |diff| <= 1e-4), and each greedy token must be transformers' top token too (or tie
with it within 1e-4: tiny random models have near-ties that the last bit decides).

The tiny models' byte-level tokenizer is unknown to the converter's list of pre-tokenizers and has
no BPE merges, which llama.cpp requires: the converter is told "gpt-2" (byte-level BPE) and given
one merge. Both sides are fed token ids, so the tokenizer plays no part in what is compared.

    python bench/clients/llama_cpp.py [--cache DIR] [--build-only]

Exit 0 when every export that ``pdmoe export`` calls exact in llama.cpp is, and every one it
calls not exact is not (converts, loads and computes other logits, or is refused by llama.cpp).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pdmoe.export import export
from pdmoe.export.formats import ServingStack
from tests.export_cases import CASES, build_cases

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
DEFAULT_CACHE = Path(os.environ.get("PDMOE_LLAMA_CPP_CACHE", "~/.cache/pdmoe/llama-cpp")).expanduser()
# CPU only, no network at run time, nothing but the library.
CMAKE_ARGS = (
    "-DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_BLAS=OFF -DLLAMA_CURL=OFF "
    "-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF"
)


class Build:
    """Where the cached build lives: the sdist's source tree and the installed package."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache
        self.sdist_dir = cache / "sdist"
        self.src_root = cache / "src"
        self.site = cache / "site"
        self.stamp = cache / "BUILT"

    @property
    def source(self) -> Path:
        (tree,) = [p for p in self.src_root.iterdir() if p.is_dir()]
        return tree

    @property
    def converter(self) -> Path:
        return self.source / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"

    @property
    def gguf_py(self) -> Path:
        return self.source / "vendor" / "llama.cpp" / "gguf-py"

    def ensure(self) -> None:
        """Build once; a finished build (stamp file) is reused as it is."""
        if self.stamp.is_file() and self.stamp.read_text().strip() == LLAMA_CPP_PYTHON:
            return
        self.cache.mkdir(parents=True, exist_ok=True)
        pip = [sys.executable, "-m", "pip"]
        if not any(self.sdist_dir.glob("*.tar.gz")):
            subprocess.run(
                [
                    *pip,
                    "download",
                    "--no-deps",
                    "--no-binary",
                    ":all:",
                    LLAMA_CPP_PYTHON,
                    "-d",
                    str(self.sdist_dir),
                ],
                check=True,
            )
        if not self.src_root.is_dir():
            (archive,) = self.sdist_dir.glob("*.tar.gz")
            with tarfile.open(archive) as tar:
                tar.extractall(self.src_root, filter="data")
        env = {**os.environ, "CMAKE_ARGS": CMAKE_ARGS}
        env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", "2")
        subprocess.run(
            ["nice", "-n", "15", *pip, "install", "--no-deps", "--target", str(self.site), str(self.source)],
            check=True,
            env=env,
        )
        # What llama_cpp and the converter need beyond the project's environment.
        subprocess.run(
            [*pip, "install", "--no-deps", "--target", str(self.site), "diskcache", "sentencepiece"],
            check=True,
        )
        self.stamp.write_text(LLAMA_CPP_PYTHON + "\n")


TOLERANCE = 1e-4
GREEDY_TOKENS = 16
TOKENS = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(0)).tolist()
# Run by the converter's python: the vendored converter, told the tiny tokenizer's pre-tokenizer.
_CONVERT = """
import runpy, sys
sys.path.insert(0, sys.argv[1])
import conversion.base, gguf
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
add_to_gguf = gguf.SpecialVocab.add_to_gguf
def with_a_merge(self, writer, quiet=False):
    self.merges = self.merges or ["\u0120 \u0120"]
    add_to_gguf(self, writer, quiet)
gguf.SpecialVocab.add_to_gguf = with_a_merge
script = sys.argv[1] + "/convert_hf_to_gguf.py"
sys.argv = [script, *sys.argv[2:]]
runpy.run_path(script, run_name="__main__")
"""


def convert(build: Build, folder: Path, gguf: Path) -> str | None:
    """``folder`` as an f32 GGUF; None, or the converter's last error line."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join((str(build.gguf_py), str(build.site)))}
    command = [sys.executable, "-c", _CONVERT, str(build.converter.parent), str(folder)]
    done = subprocess.run(
        [*command, "--outfile", str(gguf), "--outtype", "f32"], capture_output=True, text=True, env=env
    )
    if done.returncode == 0:
        return None
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else f"exit {done.returncode}"


def transformers_logits(folder: Path, tokens: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=False).eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0]


def llama_cpp_run(gguf: Path) -> tuple[torch.Tensor, list[int]]:
    """Greedy tokens one at a time after the prompt, and the logits of every position before the
    last (f32 weights and KV cache)."""
    from llama_cpp import GGML_TYPE_F32, Llama

    model = Llama(
        str(gguf),
        n_ctx=128,
        n_threads=2,
        logits_all=True,
        type_k=GGML_TYPE_F32,
        type_v=GGML_TYPE_F32,
        verbose=False,
    )
    model.eval(TOKENS)
    greedy: list[int] = []
    for _ in range(GREEDY_TOKENS):
        greedy.append(int(torch.from_numpy(model.scores[model.n_tokens - 1].copy()).argmax()))
        if len(greedy) < GREEDY_TOKENS:
            model.eval([greedy[-1]])
    return torch.from_numpy(model.scores[: model.n_tokens].copy()), greedy


def compare(reference: torch.Tensor, ours: torch.Tensor, greedy: list[int]) -> tuple[bool, str]:
    """transformers' logits on the prompt and llama.cpp's greedy tokens against llama.cpp's; each
    greedy token must be transformers' top token too, or tie with it within the tolerance (tiny
    random models have near-ties that a last-bit difference breaks either way)."""
    diff = (ours - reference).abs().max().item()
    steps = reference[len(TOKENS) - 1 :]
    gaps = [(step.max() - step[token]).item() for step, token in zip(steps, greedy, strict=True)]
    differ, ties = sum(gap > TOLERANCE for gap in gaps), sum(0 < gap <= TOLERANCE for gap in gaps)
    finite = bool(torch.isfinite(ours).all())
    tokens = (
        f"{GREEDY_TOKENS} greedy tokens equal"
        if not differ
        else f"{differ} of {GREEDY_TOKENS} greedy tokens differ"
    )
    if ties:
        tokens += f" ({ties} near-tie(s) within {TOLERANCE:g}, taken the other way)"
    summary = f"max |dlogit| {diff:.2e}, {tokens}" + ("" if finite else ", NOT FINITE")
    return finite and diff <= TOLERANCE and not differ, summary


def check_all(build: Build) -> int:
    sys.path.insert(0, str(build.site))
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        moes = build_cases(root / "in")
        for name, moe in moes.items():
            report = export(moe, root / "out" / name)
            caveat = report.not_exact_in.get(ServingStack.LLAMA_CPP)
            gguf = root / f"{name}.gguf"
            error = convert(build, report.out_dir, gguf)
            if error is None:
                try:
                    ours, greedy = llama_cpp_run(gguf)
                except (ValueError, RuntimeError) as exc:  # llama.cpp refused to load it
                    error = f"does not load: {exc}"
            if error is not None:
                outcome, exact = f"does not convert or load: {error}", False
            else:
                reference = transformers_logits(report.out_dir, TOKENS + greedy[:-1])
                exact, outcome = compare(reference, ours, greedy)
            said = "not exact" if caveat else "exact"
            agrees = exact != bool(caveat)
            failures += not agrees
            print(
                f"{name:24} {CASES[name].layers:4} -> {report.format.value:10} export says {said}: {outcome}"
            )
            if caveat:
                print(f"    ({caveat})")
            if not agrees:
                print("    MISMATCH: pdmoe export's claim does not hold")
    print(f"{len(moes) - failures} of {len(moes)} exports behave in llama.cpp as pdmoe export says")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="build cache folder")
    parser.add_argument("--build-only", action="store_true", help="build (or find) llama-cpp-python and stop")
    args = parser.parse_args(argv)
    build = Build(args.cache.expanduser().resolve())
    build.ensure()
    if args.build_only:
        print(f"llama-cpp-python ready in {build.site}")
        return 0
    return check_all(build)


if __name__ == "__main__":
    raise SystemExit(main())
