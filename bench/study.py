"""DeltaMoE against its baselines on real bilingual text: ``python bench/study.py --out DIR [--quick]``.

A tiny Llama base model B (English with 15 % Spanish) and its instruct model I (SFT on an English
cloze task mixed with ordinary text) are trained here; then every arm continues pre-training on
Spanish from B and is measured on held-out books in both languages. Writes DIR/study.md (tables),
DIR/study.json (every number, per arm and seed) and DIR/study.png (trade-off curves).

--quick runs the whole pipeline on a bundled excerpt with toy sizes (a smoke test, not a result);
--pilot chooses the design (bilingual_study/pilot.py): validation books, B and I only, no arm.
The full study reads Debian's public-domain Bibles (see bilingual_study/corpus.py for the packages).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

from bilingual_study.corpus import EXCERPT, DataMissing, read_excerpt, read_sword, write_excerpt
from bilingual_study.pilot import run_pilot, write_pilot
from bilingual_study.pipeline import run_study
from bilingual_study.plot import plot
from bilingual_study.protocol import FIRST_EDITION, FULL, QUICK
from bilingual_study.report import aggregate
from bilingual_study.writeup import write_markdown

from pdmoe.cli import flag_spelling
from pdmoe.errors import PdmoeError
from pdmoe.io.outputs import Command, claim_output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, help="output directory (kept work lets a rerun continue)")
    parser.add_argument("--quick", action="store_true", help="smoke test on the bundled excerpt (toy sizes)")
    parser.add_argument(
        "--pilot",
        action="store_true",
        help="choose the design: candidate SFT recipes and task forms, validation books, no arm compared",
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
    mode = {
        (False, False): "full",
        (True, False): "quick",
        (False, True): "pilot",
        (True, True): "quick-pilot",
    }
    # DIR is pdmoe's output folder: a folder pdmoe did not write is refused before anything in it
    # changes; the study's own folder is continued (its finished stages reused), one run at a time.
    try:
        folder = claim_output(
            args.out,
            Command.STUDY,
            resume=True,
            keep_partial=True,
            settings={"protocol": mode[args.quick, args.pilot]},
        )
    except PdmoeError as error:
        print(f"study: error: {error.render(flag_spelling(parser))}", file=sys.stderr)
        return 2

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f} s] {message}", flush=True)

    if args.pilot:
        pilot = run_pilot(verses, QUICK if args.quick else FIRST_EDITION, args.out, log)
        pilot["seconds"]["total"] = time.perf_counter() - start
        write_pilot(pilot, args.out / "pilot.md")
        log(f"wrote {args.out / 'pilot.md'}, pilot.json; chosen: {pilot['chosen'] or 'none passes'}")
        folder.finish()
        return 0
    result = run_study(verses, protocol, args.out, keep_models=args.keep_models, log=log)
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
