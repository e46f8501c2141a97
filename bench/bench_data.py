"""Building the token cache from corpora as they ship: throughput against the tokenizer itself, and
peak memory that does not grow with the corpus.

The tokenizer is a byte-level BPE (GPT-2 style pre-tokenizer, 8192 tokens) trained here on the
synthetic corpus: Zipf-distributed pseudo-words in documents of 50 to 800 words, written as
``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst`` and ``.parquet``. Throughput: tokens per second of
``TokenCache.build`` (reading, decompressing, parsing, encoding, writing the cache) from each file,
against the tokenizer's own batch encoding (``backend_tokenizer.encode_batch``: Rust, on every
core) of the same documents already in memory, alternating, seven rounds; target >= 0.8x.
Memory: the working set (peak RSS over the RSS after imports, in a process of its own) of a cache
build from a corpus (3000 documents, 8.5 M characters) and from one four times larger, for the
zstd-compressed and the Parquet file; target: the larger within 12 MiB of the smaller (bounded:
reading streams, tokenising goes in bounded batches; holding the larger corpus's text would cost 25
MiB more). Smaller corpora would not do: allocators (Arrow's above all) reach their steady size only
after a few MiB of text (Parquet, measured while developing this: 81 MiB at 1500 documents, 104 at
3000, 112 at 24 000).
"""

from __future__ import annotations

import gzip
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from harness import MiB, Row, interleaved, peak_memory, record
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from pdmoe.cpt.data import TokenCache, corpus_spec

THROUGHPUT_DOCUMENTS = 1000
MEMORY_DOCUMENTS = (3000, 12_000)
ROUNDS = 7
THROUGHPUT_TARGET = 0.8
MEMORY_TOLERANCE = 12 * MiB
SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
MEMORY_SUFFIXES = (".jsonl.zst", ".parquet")
SYLLABLES = [
    "ka",
    "ri",
    "to",
    "ma",
    "ne",
    "su",
    "lo",
    "pa",
    "de",
    "vi",
    "ga",
    "mo",
    "chi",
    "ra",
    "zu",
    "e",
    "a",
    "o",
    "i",
    "u",
    "ban",
    "tor",
    "mel",
    "qui",
    "sha",
]


def synthetic_documents(count: int, seed: int = 0) -> list[str]:
    """Documents of 50 to 800 Zipf-distributed pseudo-words (a 20 000-word vocabulary)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 5, 20_000)
    words = np.array(["".join(rng.choice(SYLLABLES, n)) for n in lengths])
    rank = 1 / np.arange(1, len(words) + 1)
    doc_words = rng.integers(50, 800, count)
    picks = rng.choice(len(words), int(doc_words.sum()), p=rank / rank.sum())
    starts = np.concatenate([[0], np.cumsum(doc_words)])
    return [" ".join(words[picks[a:b]]) + "." for a, b in itertools.pairwise(starts)]


def write_corpus(documents: list[str], path: Path) -> Path:
    """``documents`` as the file ``path`` names (JSONL, gzip/zstd-compressed JSONL or Parquet)."""
    if path.suffix == ".parquet":
        pq.write_table(pa.table({"text": documents}), path, row_group_size=2048)
        return path
    lines = "".join(json.dumps({"text": text}) + "\n" for text in documents).encode()
    compress = {".gz": gzip.compress, ".zst": zstandard.ZstdCompressor().compress}.get(path.suffix)
    path.write_bytes(lines if compress is None else compress(lines))
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bench-data")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=8192,
        special_tokens=["</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(synthetic_documents(2000, seed=1), trainer)
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>").save_pretrained(root / "tokenizer")
    return root


def _spec(path: Path):
    return corpus_spec([path], ["fr"], [], ["fr"])


def test_cache_build_tokens_per_second_against_batch_encoding(workspace: Path, tmp_path: Path) -> None:
    tokenizer = PreTrainedTokenizerFast.from_pretrained(workspace / "tokenizer", trust_remote_code=False)
    documents = synthetic_documents(THROUGHPUT_DOCUMENTS)
    files = {suffix: write_corpus(documents, tmp_path / f"corpus{suffix}") for suffix in SUFFIXES}
    counted: dict[str, int] = {}

    def encode_in_memory() -> None:
        encodings = tokenizer.backend_tokenizer.encode_batch(documents, add_special_tokens=False)
        counted["encode_batch"] = sum(len(encoding) for encoding in encodings)

    def build(suffix: str):
        def run() -> None:
            cache = TokenCache.build(_spec(files[suffix]), tokenizer, tmp_path / "cache")
            counted[suffix] = cache.num_tokens - cache.num_documents  # without the EOS tokens
            shutil.rmtree(cache.directory)

        return run

    seconds = interleaved({"encode_batch": encode_in_memory, **{s: build(s) for s in SUFFIXES}}, ROUNDS)
    assert len({counted[name] for name in seconds}) == 1, f"different token counts: {counted}"
    rates = {name: tuple(counted[name] / s / 1e6 for s in times) for name, times in seconds.items()}
    group = f"cache build, {counted['encode_batch'] / 1e6:.1f} M tokens"
    for suffix in SUFFIXES:
        row = record(
            Row(
                group,
                f"{suffix} tokens/s",
                rates[suffix],
                "encode_batch in memory",
                rates["encode_batch"],
                "Mtok/s",
                f">= {THROUGHPUT_TARGET}x",
            )
        )
        assert row.ratio >= THROUGHPUT_TARGET, f"{suffix}: {row.ratio:.2f}x of the tokenizer's batch encoding"


_BUILD = (
    "TokenCache.build(corpus_spec([sys.argv[2]], ['fr'], [], ['fr']), "
    "PreTrainedTokenizerFast.from_pretrained(sys.argv[3], trust_remote_code=False), sys.argv[4])"
)


@pytest.mark.parametrize("suffix", MEMORY_SUFFIXES)
def test_cache_build_memory_does_not_grow_with_the_corpus(
    workspace: Path, tmp_path: Path, suffix: str
) -> None:
    working_sets = []
    for count in MEMORY_DOCUMENTS:
        corpus = write_corpus(synthetic_documents(count), tmp_path / f"corpus-{count}{suffix}")
        memory = peak_memory(
            "import pyarrow.parquet, zstandard\n"
            "from pdmoe.cpt.data import TokenCache, corpus_spec\n"
            "from transformers import PreTrainedTokenizerFast",
            _BUILD,
            str(corpus),
            str(workspace / "tokenizer"),
            str(tmp_path / f"cache-{count}"),
        )
        working_sets.append((memory["peak_rss"] - memory["rss_after_imports"]) / MiB)
    small, large = working_sets
    record(
        Row(
            f"cache build {suffix}: working set",
            f"{MEMORY_DOCUMENTS[1]} documents",
            (large,),
            f"{MEMORY_DOCUMENTS[0]} documents",
            (small,),
            "MiB",
            f"<= +{MEMORY_TOLERANCE / MiB:.0f} MiB",
        )
    )
    assert large <= small + MEMORY_TOLERANCE / MiB, (
        f"{large:.0f} MiB for 4x the corpus, {small:.0f} MiB for 1x"
    )
