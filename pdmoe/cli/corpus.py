"""The data options shared by ``pdmoe cpt`` and ``pdmoe eval``, checked before torch loads."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path
from typing import Any

from pdmoe.cpt.data import DATA_FORMATS, CorpusSpec, corpus_spec
from pdmoe.cpt.settings import TrainConfig

# Option defaults are read from ``TrainConfig``, so the command line and the Python API cannot drift.
TRAIN_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(TrainConfig)}


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Data options shared by cpt and eval."""
    parser.add_argument(
        "--data",
        nargs="+",
        required=True,
        metavar="PATH",
        help="JSONL files (.jsonl/.json/.ndjson: one object per line), Parquet files (.parquet) or plain-text "
        "files (documents separated by blank lines); JSONL and text may be compressed (.gz, .zst)",
    )
    parser.add_argument(
        "--lang",
        dest="langs",
        nargs="+",
        metavar="LANG",
        help="language of the documents of each --data file (one for all, or one per file); "
        "a JSONL record's own lang field wins",
    )
    parser.add_argument(
        "--original-langs",
        nargs="+",
        default=[],
        metavar="LANG",
        help="languages the base model already knows (routed to expert 0 by the review stage)",
    )
    parser.add_argument("--new-langs", nargs="+", default=[], metavar="LANG", help="languages being added")
    parser.add_argument(
        "--data-format",
        choices=DATA_FORMATS,
        default=TRAIN_DEFAULTS["data_format"],
        help="format of every --data file; auto: by extension (after .gz/.zst), else plain text (default: %(default)s)",
    )
    parser.add_argument(
        "--text-field",
        default=TRAIN_DEFAULTS["text_field"],
        help="JSONL text field, Parquet text column (default: %(default)s)",
    )
    parser.add_argument(
        "--lang-field",
        default=TRAIN_DEFAULTS["lang_field"],
        help="JSONL language field, Parquet language column (default: %(default)s)",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        help="where tokenised corpora are cached (default: $PDMOE_CACHE_DIR or ~/.cache/pdmoe/tokens)",
    )


def corpus_from_args(args: argparse.Namespace, paths: list, langs: list[str] | None) -> CorpusSpec:
    """The corpus of ``paths``: the files exist and are not empty, the languages are declared."""
    return corpus_spec(
        paths,
        langs,
        args.original_langs,
        args.new_langs,
        args.data_format,
        args.text_field,
        args.lang_field,
    )
