"""The ``pdmoe eval`` subcommand: checks its options, data and outputs before torch loads."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from pdmoe.cli import options_from_args
from pdmoe.cli.corpus import add_data_arguments, corpus_from_args
from pdmoe.cpt.settings import DEFAULT_EVAL_OPTIONS, DEFAULT_SEQ_LEN, EvalOptions
from pdmoe.io.atomic import write_text_atomic
from pdmoe.io.outputs import Output, check_outputs
from pdmoe.preflight import check_models


def run_eval(args: argparse.Namespace) -> int:
    # --max-sequences 0 is "all", which options spell None
    options = replace(options_from_args(EvalOptions, args), max_sequences=args.max_sequences or None)
    corpus = corpus_from_args(args, args.data, args.langs)
    (model,) = check_models([args.model])
    outputs = [Output(path, option) for option, path in (("json", args.json), ("plot", args.plot)) if path]
    # every output before the evaluation, not after it: clear of the model and the data, writable
    check_outputs(outputs, inputs=(model, *(file.path for file in corpus.files)), overwrite=args.overwrite)
    from pdmoe.cpt.evaluate import evaluate_model, heatmap_format, save_heatmap

    if args.plot:
        heatmap_format(args.plot)  # refuses an extension matplotlib cannot write
    result = evaluate_model(model, corpus, options)
    print(result.table())
    if args.json:
        write_text_atomic(args.json, json.dumps(result.to_dict(), indent=2) + "\n")
    if args.plot:
        if save_heatmap(result, args.plot):
            print(f"pdmoe eval: heatmap written to {args.plot}")
        else:
            print("pdmoe eval: heatmap skipped: matplotlib is not installed (pip install 'pdmoe[plot]')")
    return 0


def add_eval_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "eval",
        description="Per-language perplexity (exp of the mean next-token loss, without the router's "
        "loss) of a dense or MoE checkpoint, and each MoE layer's share of tokens per expert per language.",
    )
    parser.add_argument(
        "--model",
        required=True,
        type=Path,
        help="dense or MoE checkpoint (a dense one gives the baseline): folder or hub id ORG/NAME[@REV]",
    )
    add_data_arguments(parser)
    parser.add_argument(
        "--seq-len",
        type=int,
        default=DEFAULT_EVAL_OPTIONS.seq_len,
        help=f"tokens per sequence (default: min({DEFAULT_SEQ_LEN}, model maximum))",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_EVAL_OPTIONS.batch_size,
        help="sequences per forward pass (default: %(default)s)",
    )
    parser.add_argument(
        "--max-sequences",
        type=int,
        default=DEFAULT_EVAL_OPTIONS.max_sequences,
        help="sequences evaluated, spread evenly over the data; 0 = all (default: %(default)s)",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the numbers as JSON")
    parser.add_argument(
        "--plot",
        type=Path,
        metavar="IMAGE",
        help="also draw a heatmap, in the format its extension names: .png, .pdf, .svg, ... "
        "(needs the plot extra: matplotlib)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing --json / --plot file (never an input)"
    )
    parser.set_defaults(func=run_eval)
    return parser
