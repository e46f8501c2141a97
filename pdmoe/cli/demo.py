"""``pdmoe demo``: the whole pipeline on tiny models it builds itself, with its invariants checked.

base (random tiny Llama) -> instruct (base moved by a small random "post-training" delta)
-> upcycle(base) -> CPT on a small built-in corpus in a "new language" -> graft -> generate.
It needs no download and runs in a minute or two on a laptop CPU, so a new user sees every step
work: it ends with the perplexity of every model on held-out text of the new and the original
language, the invariants, and commands to try next on the models it made.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pdmoe.cli import options_from_args
from pdmoe.families import DEFAULT_FAMILY, FAMILIES
from pdmoe.io.outputs import Command, check_output
from pdmoe.layout import MoETensor, match_moe

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# A stand-in "new language" corpus: short Swahili sentences, repeated into a learnable text.
NEW_LANGUAGE_TEXT = (
    "Habari za asubuhi. Jina langu ni Amani na ninaishi karibu na bahari.",
    "Ninapenda kusoma vitabu na kunywa chai jioni pamoja na familia yangu.",
    "Mvua inanyesha leo, kwa hivyo watoto wanacheza ndani ya nyumba.",
    "Soko la kijiji linafunguliwa kila Jumamosi asubuhi na watu wengi hufika.",
    "Mwalimu anafundisha hesabu na lugha kwa wanafunzi thelathini darasani.",
    "Tunapika wali, maharage na samaki kwa chakula cha mchana.",
)
# Held out from CPT: the new language, and the original language the model must keep.
HELD_OUT = {
    "sw": (
        "Asubuhi tunakunywa chai na kusoma vitabu pamoja na watoto.",
        "Soko linafunguliwa leo na watu wengi wanafika karibu na bahari.",
        "Mwalimu anapika wali kwa wanafunzi wa darasani jioni.",
    ),
    "en": (
        "Good morning. My name is Amani and I live near the sea.",
        "The village market opens every Saturday morning and many people come.",
        "The teacher teaches mathematics and languages to thirty pupils.",
    ),
}
# Held-out perplexity is `pdmoe eval`'s, on sequences of this many tokens (the suggested eval
# command passes it too, so it prints the demo's numbers).
EVAL_SEQ_LEN = 64
MODELS = ("base", "instruct", "moe", "cpt", "final")
MODEL_LABELS = {
    "base": "dense base",
    "instruct": "dense instruct",
    "moe": "upcycled MoE",
    "cpt": "MoE after CPT",
    "final": "grafted (final)",
}


@dataclass
class DemoReport:
    out: Path
    dense_vs_upcycled_max_diff: float = float("nan")
    cpt_loss_first: float = float("nan")
    cpt_loss_last: float = float("nan")
    instruct_tensors_equal: int = 0
    instruct_tensors_checked: int = 0
    routers_equal_cpt: int = 0
    routers_checked: int = 0
    sample: str = ""
    perplexity: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> language -> ppl
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return (
            self.dense_vs_upcycled_max_diff <= 1e-5
            and self.cpt_loss_last < self.cpt_loss_first
            and self.instruct_tensors_equal == self.instruct_tensors_checked > 0
            and self.routers_equal_cpt == self.routers_checked > 0
        )

    def render(self) -> str:
        from pdmoe.cpt.evaluate import PERPLEXITY_DEFINITION

        steps = ", ".join(f"{name} {secs:.1f}s" for name, secs in self.seconds.items())
        verdict = "all checks passed" if self.ok else "SOME CHECKS FAILED"
        table = [f"  {'model':<17} {'ppl sw (new)':>13} {'ppl en (original)':>18}"]
        table += [
            f"  {MODEL_LABELS[name]:<17} {ppl['sw']:>13.1f} {ppl['en']:>18.1f}"
            for name, ppl in self.perplexity.items()
        ]
        out = self.out
        return "\n".join(
            [
                f"pdmoe demo in {out} ({steps})",
                "",
                f"Perplexity on held-out text, as pdmoe eval computes it: {PERPLEXITY_DEFINITION}",
                "(random tiny models: only the changes mean something)",
                *table,
                "",
                f"  upcycled MoE vs dense logits, max |diff|:   {self.dense_vs_upcycled_max_diff:.2e}  (invariant 1: <= 1e-5)",
                f"  CPT loss, first -> last logged step:       {self.cpt_loss_first:.3f} -> {self.cpt_loss_last:.3f}",
                f"  grafted shared weights + expert 0 == instruct: {self.instruct_tensors_equal}/{self.instruct_tensors_checked}  (invariant 2)",
                f"  grafted routers == CPT routers:            {self.routers_equal_cpt}/{self.routers_checked}",
                f"  sample from the grafted model:             {self.sample!r}",
                f"  {verdict}",
                "",
                "Next, on the models the demo made:",
                f"  pdmoe eval --model {out}/final --data {out}/data/heldout.jsonl --original-langs en --new-langs sw "
                f"--seq-len {EVAL_SEQ_LEN}",
                f"  pdmoe export --model {out}/final --out {out}/final-native   # a Qwen2-MoE/Mixtral that plain transformers loads",
                f"  pdmoe cpt --model {out}/moe --data {out}/data/new_language.jsonl --new-langs sw --out {out}/cpt-2 "
                "--seq-len 64 --max-steps 50 --lr 1e-2",
            ]
        )


def _write_corpus(path: Path, repeats: int = 40) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        for index in range(repeats):
            sentence = NEW_LANGUAGE_TEXT[index % len(NEW_LANGUAGE_TEXT)]
            handle.write(json.dumps({"text": " ".join([sentence] * 3), "lang": "sw"}) + "\n")
    return path


def _write_held_out(path: Path) -> Path:
    with path.open("w") as handle:
        for lang, sentences in HELD_OUT.items():
            for sentence in sentences:
                handle.write(json.dumps({"text": sentence, "lang": lang}) + "\n")
    return path


def _decode_whole_characters(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    """``ids`` decoded without a trailing replacement character: a byte-level token may end in the
    middle of a UTF-8 character, whose remaining bytes were not generated (up to 3)."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    for cut in range(1, min(3, len(ids)) + 1):
        if not text.endswith("\ufffd"):
            break
        text = tokenizer.decode(ids[:-cut], skip_special_tokens=True)
    return text


@contextlib.contextmanager
def _no_loading_bars() -> Iterator[None]:
    """transformers' "Loading weights" / "Writing model shards" bars off: one line per demo step."""
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


def _max_logit_diff(dense: Path, moe: Path) -> float:
    import torch

    from pdmoe.io.hf_loading import load_causal_lm

    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = load_causal_lm(dense).eval()(tokens).logits
        b = load_causal_lm(moe).eval()(tokens).logits
    return (a - b).abs().max().item()


def _check_graft(report: DemoReport, instruct: Path, cpt: Path, final: Path) -> None:
    """Invariant 2: shared tensors and expert 0 equal INSTRUCT's; routers keep CPT's values."""
    import torch

    from pdmoe.io.reader import CheckpointReader

    with (
        CheckpointReader(instruct) as dense,
        CheckpointReader(final) as grafted,
        CheckpointReader(cpt) as trained,
    ):
        for name in grafted:
            tensor = grafted.get(name)
            match = match_moe(name)
            if match is not None and match[1] is MoETensor.ROUTER:
                report.routers_checked += 1
                report.routers_equal_cpt += torch.equal(tensor, trained.get(name))
                continue
            if match is not None:  # expert 0 of a fused expert tensor: the dense projections, fused
                mlp, fused = match
                expected, tensor = torch.cat([dense.get(key) for key in mlp.fused_sources(fused)]), tensor[0]
            else:
                expected = dense.get(name)
            report.instruct_tensors_checked += 1
            report.instruct_tensors_equal += torch.equal(tensor, expected)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class DemoOptions:
    """How to run the demo: ``pdmoe demo`` builds them from its flags, which default to these."""

    out: Path = Path("demo-run")
    steps: int = 150  # CPT steps
    family: str = DEFAULT_FAMILY
    overwrite: bool = False


DEFAULT_OPTIONS = DemoOptions()


def run_demo(options: DemoOptions = DEFAULT_OPTIONS, **changes: Any) -> DemoReport:
    """Run every pipeline step under ``options.out`` and check docs/method.md's two invariants on
    the way; ``changes`` replace fields of ``options`` (``run_demo(out="x", steps=15)``)."""
    options = replace(options, **changes)
    check_output(options.out, Command.DEMO, overwrite=options.overwrite)  # before the imports below (seconds)
    with _no_loading_bars():
        return _run_steps(Path(options.out), options.steps, options.overwrite, options.family)


def _run_steps(out: Path, steps: int, overwrite: bool, family: str) -> DemoReport:
    from pdmoe.cpt import TrainConfig, corpus_spec, evaluate_model, train
    from pdmoe.graft import graft
    from pdmoe.io.hf_loading import load_causal_lm, load_tokenizer
    from pdmoe.io.outputs import claim_output
    from pdmoe.tiny import build_tiny_dense, perturb_checkpoint
    from pdmoe.upcycle import upcycle

    folder = claim_output(out, Command.DEMO, overwrite=overwrite, settings={"steps": steps, "family": family})
    report = DemoReport(out=out)
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        report.seconds[name] = now - clock
        clock = now

    _say(f"[1/6] building a tiny random {family} base model and a stand-in instruct model in {out}")
    base = build_tiny_dense(out / "base", family, seed=0)
    instruct = perturb_checkpoint(base, out / "instruct", scale=0.02, seed=1)
    lap("models")
    _say("[2/6] upcycling the base model: 4 experts, top-2, every layer")
    moe = upcycle(base, out / "moe", num_experts=4, top_k=2)
    report.dense_vs_upcycled_max_diff = _max_logit_diff(base, moe)
    lap("upcycle")
    _say(f"[3/6] continued pre-training of the new experts and routers on Swahili text ({steps} steps)")
    corpus = _write_corpus(out / "data" / "new_language.jsonl")
    held_out = _write_held_out(out / "data" / "heldout.jsonl")
    cpt = train(
        TrainConfig(
            model=moe,
            data=[corpus],
            out=out / "cpt",
            cache_dir=out / "token-cache",
            new_langs=["sw"],
            seq_len=64,
            micro_batch_size=4,
            max_steps=steps,
            lr=1e-2,
            warmup_steps=5,
            log_every=5,
            save_every=10**9,
            progress=True,
        )
    )
    losses = [
        json.loads(line)["loss"]
        for line in (cpt / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in line
    ]
    report.cpt_loss_first, report.cpt_loss_last = losses[0], losses[-1]
    lap("cpt")
    _say("[4/6] grafting the post-training delta (instruct - base) onto the CPT model")
    final = graft(base, instruct, cpt, out / "final").out_dir
    _check_graft(report, instruct, cpt, final)
    lap("graft")
    _say(f"[5/6] perplexity of every model on held-out text ({held_out}), as pdmoe eval computes it")
    held_out_corpus = corpus_spec([held_out], None, ["en"], ["sw"])
    for name in MODELS:
        result = evaluate_model(
            out / name, held_out_corpus, seq_len=EVAL_SEQ_LEN, cache_dir=out / "token-cache"
        )
        report.perplexity[name] = result.perplexity()
    lap("perplexity")
    _say("[6/6] generating from the grafted model")
    tokenizer = load_tokenizer(final)
    model = load_causal_lm(final).eval()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Habari"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    generated = model.generate(
        **prompt, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    report.sample = _decode_whole_characters(tokenizer, generated[0, prompt["input_ids"].shape[1] :].tolist())
    lap("generate")
    folder.finish()
    return report


def _run(args: argparse.Namespace) -> int:
    report = run_demo(options_from_args(DemoOptions, args))
    print(report.render())
    return 0 if report.ok else 1


def add_demo_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        description="base -> instruct stand-in -> upcycle -> CPT on a built-in corpus -> graft -> generate.",
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OPTIONS.out, help="working directory (default %(default)s)"
    )
    parser.add_argument(
        "--steps", type=int, default=DEFAULT_OPTIONS.steps, help="CPT steps (default %(default)s)"
    )
    parser.add_argument("--family", default=DEFAULT_OPTIONS.family, choices=list(FAMILIES))
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.set_defaults(func=_run)
