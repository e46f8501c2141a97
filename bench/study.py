"""DeltaMoE against its baselines on real bilingual text: ``python bench/study.py --out DIR [--quick]``.

A tiny Llama base model B (English with 15 % Spanish) and its instruct model I (SFT on an English
cloze task mixed with ordinary text) are trained here; then every arm continues pre-training on
Spanish from B and is measured on held-out books in both languages. Writes DIR/study.md (tables),
DIR/study.json (every number, per arm and seed) and DIR/study.png (trade-off curves).

--quick runs the whole pipeline on a bundled excerpt with toy sizes (a smoke test, not a result);
--pilot is for changing the protocol: validation books, CPT models only, a wider lr grid.
The full study reads Debian's public-domain Bibles (see bilingual_study/corpus.py for the packages).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

from bilingual_study.corpus import EXCERPT, DataMissing, read_excerpt, read_sword, write_excerpt
from bilingual_study.pipeline import run_study
from bilingual_study.plot import plot
from bilingual_study.protocol import FULL, QUICK
from bilingual_study.report import aggregate
from bilingual_study.writeup import write_markdown

from pdmoe.errors import PdmoeError
from pdmoe.io.outputs import Command, claim_output

PILOT_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, help="output directory (kept work lets a rerun continue)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="smoke test on the bundled excerpt (toy sizes)")
    mode.add_argument(
        "--pilot",
        action="store_true",
        help="a pilot for protocol changes (validation books, no grafted models, a wider lr grid)",
    )
    parser.add_argument(
        "--keep-models", action="store_true", help="keep every trained checkpoint under DIR/work"
    )
    parser.add_argument(
        "--write-excerpt",
        action="store_true",
        help="regenerate the bundled excerpt from the SWORD modules, then exit",
    )
    args = parser.parse_args(argv)
    if args.write_excerpt:
        size = write_excerpt(read_sword())
        print(f"wrote {EXCERPT} ({size:,} bytes)")
        return 0
    if args.out is None:
        parser.error("--out DIR is required")

    start = time.perf_counter()
    try:
        verses = read_excerpt() if args.quick else read_sword()
    except DataMissing as error:
        print(f"study: {error}", file=sys.stderr)
        return 2
    protocol = QUICK if args.quick else FULL
    if args.pilot:
        protocol = replace(FULL, name="pilot", dense_lrs=PILOT_LRS, moe_lrs=PILOT_LRS, seeds=(0,))
    # DIR is pdmoe's output folder: a folder pdmoe did not write is refused before anything in it
    # changes; the study's own folder is continued (its finished stages reused), one run at a time.
    try:
        folder = claim_output(
            args.out, Command.STUDY, resume=True, keep_partial=True, settings={"protocol": protocol.name}
        )
    except PdmoeError as error:
        print(f"study: error: {error}", file=sys.stderr)
        return 2

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f} s] {message}", flush=True)

    middle = protocol.dense_lrs[len(protocol.dense_lrs) // 2]
    result = run_study(
        verses,
        protocol,
        args.out,
        split="valid" if args.pilot else "test",
        grafts=not args.pilot,
        matched_lr=None if args.pilot else middle,
        keep_models=args.keep_models,
        log=log,
    )
    result["rows"] = aggregate(result["records"])
    result["seconds"]["total"] = time.perf_counter() - start
    # CPU time of this process and its workers: what the run costs whatever else the machine runs
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    result["seconds"]["cpu"] = sum(u.ru_utime + u.ru_stime for u in usage)
    (args.out / "study.json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    plotted = plot(
        result["rows"], args.out / "study.png", f"pdmoe study ({protocol.name}), mean ± std over seeds"
    )
    write_markdown(result, protocol, args.out / "study.md", plotted)
    log(f"wrote {args.out / 'study.md'}, study.json" + (", study.png" if plotted else ""))
    folder.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
