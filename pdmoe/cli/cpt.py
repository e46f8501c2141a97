"""The ``pdmoe cpt`` subcommand, and ``python -m pdmoe.cpt`` (what ``accelerate launch`` runs).

Option defaults are read from ``TrainConfig`` so the command line and the Python API cannot drift.
Options (``settings.check_options``), data files, the model and ``--out`` are checked before
torch, transformers and accelerate load (``pdmoe.preflight``): the training and evaluation modules
are imported after.
"""

from __future__ import annotations

import argparse
import functools
import os
from pathlib import Path

from pdmoe.cli import CommandParser, flag_spelling, options_from_args, run_command
from pdmoe.cli.corpus import TRAIN_DEFAULTS, add_data_arguments, corpus_from_args
from pdmoe.cpt.settings import DEFAULT_SEQ_LEN, PARTS, Stage, TrainConfig, check_options
from pdmoe.errors import Spelling, keyword_spelling
from pdmoe.io.outputs import Command, check_output
from pdmoe.preflight import check_models


def add_cpt_arguments(parser: argparse.ArgumentParser) -> None:
    """Every option of ``pdmoe cpt`` / ``python -m pdmoe.cpt``."""
    d = TRAIN_DEFAULTS
    parser.add_argument(
        "--model",
        required=True,
        type=Path,
        help="upcycled MoE checkpoint (from pdmoe upcycle): folder or hub id ORG/NAME[@REV]",
    )
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        help="output directory: final HF checkpoint, metrics.jsonl, checkpoints/",
    )
    add_data_arguments(parser)
    parser.add_argument(
        "--stage",
        choices=[stage.value for stage in Stage],
        default=Stage(d["stage"]).value,
        help="cpt: train new experts + routers; review: routers only, with the LPR loss (default: %(default)s)",
    )
    parser.add_argument(
        "--trainable",
        metavar="PARTS",
        help=f"override what trains: comma list of {', '.join(PARTS)} "
        "(default: routers,new_experts for cpt; routers for review)",
    )
    parser.add_argument(
        "--seq-len",
        type=int,
        default=d["seq_len"],
        help=f"tokens per packed sequence (default: {DEFAULT_SEQ_LEN}, or the model's maximum when smaller)",
    )
    parser.add_argument(
        "--micro-batch-size",
        type=int,
        default=d["micro_batch_size"],
        help="sequences per process per forward pass (default: %(default)s)",
    )
    parser.add_argument(
        "--grad-accum",
        type=int,
        default=d["grad_accum"],
        help="micro-batches per optimizer step (default: %(default)s)",
    )
    parser.add_argument("--max-steps", type=int, help="optimizer steps (default: one epoch of the data)")
    parser.add_argument("--max-tokens", type=int, help="train on this many tokens instead of --max-steps")
    parser.add_argument("--lr", type=float, default=d["lr"], help="peak learning rate (default: %(default)s)")
    parser.add_argument("--warmup-steps", type=int, help="linear warmup steps (default: 1%% of the steps)")
    parser.add_argument(
        "--min-lr-ratio",
        type=float,
        default=d["min_lr_ratio"],
        help="cosine decays to lr × this (default: %(default)s)",
    )
    parser.add_argument(
        "--weight-decay",
        type=float,
        default=d["weight_decay"],
        help="AdamW weight decay (default: %(default)s)",
    )
    parser.add_argument(
        "--max-grad-norm",
        type=float,
        default=d["max_grad_norm"],
        help="gradient clipping norm, 0 = off (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=d["seed"], help="data order seed (default: %(default)s)")
    parser.add_argument(
        "--bf16",
        choices=("auto", "yes", "no"),
        default=d["bf16"],
        help="bf16 mixed precision; auto = on a bf16-capable GPU (default: %(default)s)",
    )
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute activations in backward"
    )
    parser.add_argument(
        "--aux-loss-coef",
        type=float,
        help="load-balancing loss coefficient, Switch form (default: the model's router_aux_loss_coef, "
        "set at upcycling to 0.01 x top-k: the reference recipe's 0.01 in transformers' / MoE-LPR's form)",
    )
    parser.add_argument(
        "--lpr-coef",
        type=float,
        default=d["lpr_coef"],
        help="language-prior routing loss coefficient of the review stage, on −log p0 "
        "(default: %(default)s, MoE-LPR's 0.1 on its weaker form near p0 = 0.2)",
    )
    parser.add_argument(
        "--save-every",
        type=int,
        default=d["save_every"],
        help="write a resumable checkpoint every N steps (default: %(default)s)",
    )
    parser.add_argument(
        "--keep-checkpoints",
        type=int,
        default=d["keep_checkpoints"],
        help="newest checkpoints kept, 0 = all (default: %(default)s)",
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="DIR",
        help="continue from OUT/checkpoints/step-* (bare --resume: the newest)",
    )
    parser.add_argument(
        "--eval-data", nargs="+", default=[], metavar="PATH", help="held-out files evaluated during training"
    )
    parser.add_argument(
        "--eval-lang", dest="eval_langs", nargs="+", metavar="LANG", help="--lang of the --eval-data files"
    )
    parser.add_argument(
        "--eval-every",
        type=int,
        default=d["eval_every"],
        help="evaluate every N steps and at the end; 0 = at the end only (default: %(default)s)",
    )
    parser.add_argument(
        "--eval-max-sequences",
        type=int,
        default=d["eval_max_sequences"],
        help="eval sequences used, spread evenly over the eval data (default: %(default)s)",
    )
    parser.add_argument(
        "--log-every",
        type=int,
        default=d["log_every"],
        help="steps per metrics.jsonl line (default: %(default)s)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no progress bar or log lines"
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the memory each process needs (from config.json alone: no weights read, nothing "
        "written), whether it fits --gpu-memory and the fewest processes that fit; train nothing",
    )
    parser.add_argument(
        "--num-processes",
        type=int,
        help="processes --dry-run plans for, FSDP2 when more than one (default: the launch's, "
        "1 outside accelerate launch)",
    )
    parser.add_argument(
        "--gpu-memory",
        metavar="SIZE",
        help="memory of one GPU, e.g. 80GB (default: 80GB for --dry-run, the GPU's own in a run); "
        "a run whose plan does not fit stops before loading any weight",
    )


def run_cpt(args: argparse.Namespace, spell: Spelling = keyword_spelling) -> int:
    """``pdmoe cpt``; ``spell`` names options in what it prints (the parser's flags)."""
    config = options_from_args(TrainConfig, args)
    check_options(config)  # before torch loads: a mistyped number is refused in a blink
    if args.dry_run:  # config.json alone: no weights, no data, nothing written
        check_models([config.model], moe=True)
        from pdmoe.cpt.trainer import dry_run

        if int(os.environ.get("RANK", "0")) == 0:  # one report per launch
            print(dry_run(config, args.num_processes, spell))
        return 0
    for paths, langs in ((config.data, config.langs), (config.eval_data, config.eval_langs)):
        if paths:
            corpus_from_args(args, paths, langs)
    (model,) = check_models([config.model], moe=True)
    check_output(
        config.out,
        Command.CPT,
        inputs=(model, *config.data, *config.eval_data),
        overwrite=config.overwrite,
        resume=config.resume is not None,
    )
    from accelerate import PartialState

    from pdmoe.cpt.trainer import train

    out = train(config)
    if PartialState().is_main_process:
        print(f"pdmoe cpt: wrote {out}")
    return 0


def add_cpt_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "cpt",
        description="Train the new experts and routers of an upcycled MoE on new-language text "
        "(--stage review: routers only, with language-prior routing). "
        "For several processes/GPUs: accelerate launch -m pdmoe.cpt ...",
    )
    add_cpt_arguments(parser)
    parser.set_defaults(func=functools.partial(run_cpt, spell=flag_spelling(parser)))
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m pdmoe.cpt``: ``pdmoe cpt`` without the subcommand word."""
    parser = CommandParser(
        prog="python -m pdmoe.cpt", description="Continued pre-training of an upcycled MoE."
    )
    add_cpt_arguments(parser)
    args = parser.parse_args(argv)
    return run_command("cpt", parser, lambda: run_cpt(args, flag_spelling(parser)))
