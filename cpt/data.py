"""Training text: read the corpus files (``corpus_formats``), tokenise once into a memory-mapped cache, pack, order.

Corpora larger than RAM work because documents are streamed file by file, tokenised in chunks and
appended to two flat files (token ids, language ids) that are then memory-mapped; a restart with
the same inputs, tokenizer and settings finds the finished cache by its key and reuses it.
Packed sequence i is tokens[i·L : (i+1)·L] of that flat stream (EOS after every document, the
incomplete tail dropped); each token carries the language id of its document, so the LPR loss and
the routing statistics know which tokens are original-language ones. The order of sequences is a
seeded permutation per epoch: a position (sequences consumed so far) is all a resume needs.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import queue
import shutil
import socket
import threading
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pdmoe.errors import DataError, Option, Problem, UsageError
from pdmoe.io.atomic import Staged
from pdmoe.options import check_choice

from .corpus_formats import COMPRESSIONS, FORMATS, compression_of, detect_format, read_records

if TYPE_CHECKING:
    import torch

DATA_FORMATS = ("auto", *FORMATS)
_TOKENIZE_CHUNK_DOCS = 1024
_TOKENIZE_CHUNK_CHARS = 2**20
_READ_AHEAD_BATCHES = 2
_CACHE_VERSION = 2  # 2: documents longer than corpus_formats.MAX_PIECE_CHARS are tokenised in pieces


@dataclass(frozen=True)
class DataFile:
    """One input file, its format (a key of ``corpus_formats.FORMATS``), the language of documents
    without a tag and its compression (a key of ``corpus_formats.COMPRESSIONS``, from its name)."""

    path: Path
    format: str
    lang: str | None = None
    compression: str | None = None


@dataclass(frozen=True)
class CorpusSpec:
    """Everything that decides the token stream: files, field names and the declared languages.

    ``languages`` lists the original languages first; a token's language id is its index here.
    """

    files: tuple[DataFile, ...]
    languages: tuple[str, ...]
    num_original_languages: int
    text_field: str = "text"
    lang_field: str = "lang"

    @property
    def original_languages(self) -> tuple[str, ...]:
        return self.languages[: self.num_original_languages]


def default_cache_dir() -> Path:
    """``$PDMOE_CACHE_DIR`` or ``$XDG_CACHE_HOME/pdmoe/tokens`` (``~/.cache/pdmoe/tokens``)."""
    if os.environ.get("PDMOE_CACHE_DIR"):
        return Path(os.environ["PDMOE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pdmoe" / "tokens"


def declare_languages(original: Sequence[str], new: Sequence[str]) -> tuple[tuple[str, ...], int]:
    """The declared languages (originals first) and how many are original; each declared once."""
    languages = (*original, *new)
    repeated = sorted({lang for lang in languages if languages.count(lang) > 1})
    if repeated:
        raise UsageError(
            "language(s) {repeated} declared more than once in {original_langs}/{new_langs}",
            problem=Problem.INVALID,
            repeated=", ".join(repeated),
            original_langs=Option("original_langs"),
            new_langs=Option("new_langs"),
        )
    if not languages:
        raise UsageError(
            "declare the languages of the data with {original_langs} and/or {new_langs}",
            problem=Problem.MISSING,
            original_langs=Option("original_langs"),
            new_langs=Option("new_langs"),
        )
    return languages, len(original)


def data_files(
    paths: Sequence[str | Path], langs: Sequence[str] | None, data_format: str = "auto"
) -> tuple[DataFile, ...]:
    """Pair every path with its format and language of ``langs`` (one for all files, or one per file)."""
    check_choice("data_format", data_format, DATA_FORMATS)
    if not paths:
        raise UsageError("give at least one data file")
    langs = list(langs or [])
    if len(langs) == 1:
        langs = langs * len(paths)
    if langs and len(langs) != len(paths):
        raise UsageError(
            "{option} takes one language for all files or one per file: got {langs} for {files} files",
            problem=Problem.INVALID,
            option=Option("langs"),
            langs=len(langs),
            files=len(paths),
        )
    files = []
    for index, raw in enumerate(paths):
        path = Path(raw)
        if not path.is_file():
            raise DataError(f"data file {path} does not exist (or is not a file); check the path")
        if path.stat().st_size == 0:
            raise DataError(f"data file {path} is empty")
        fmt = detect_format(path) if data_format == "auto" else data_format
        compression = compression_of(path)
        if compression is not None and not FORMATS[fmt].compressible:
            raise DataError(
                f"data file {path}: {fmt} files are read as they are, not {COMPRESSIONS[compression].name}-"
                f"compressed; decompress it (the format compresses its own data)"
            )
        files.append(DataFile(path, fmt, langs[index] if langs else None, compression))
    return tuple(files)


def corpus_spec(
    paths: Sequence[str | Path],
    langs: Sequence[str] | None,
    original_langs: Sequence[str],
    new_langs: Sequence[str],
    data_format: str = "auto",
    text_field: str = "text",
    lang_field: str = "lang",
) -> CorpusSpec:
    """The corpus of command-line style options: files, their ``--lang`` and the declared languages."""
    languages, num_original = declare_languages(original_langs, new_langs)
    return CorpusSpec(data_files(paths, langs, data_format), languages, num_original, text_field, lang_field)


@dataclass(frozen=True)
class Piece:
    """Text of one document, or a part of a long one; ``ends`` marks a document's last piece (EOS after it)."""

    text: str
    lang: int
    ends: bool


def iter_documents(spec: CorpusSpec) -> Iterator[Piece]:
    """Every document, as pieces of bounded length, in file order, checking every language tag."""
    lang_ids = {lang: index for index, lang in enumerate(spec.languages)}
    declared = ", ".join(spec.languages)
    for file in spec.files:
        unit = FORMATS[file.format].unit
        count = 0
        records = read_records(file.path, file.format, file.compression, spec.text_field, spec.lang_field)
        for text, tag, number, ends in records:
            lang = tag if tag is not None else file.lang
            if lang is None:
                raise DataError(
                    "{path} {unit} {number} has no {field!r} field and {langs} gives the file no language; "
                    "tag the documents or pass {langs}",
                    problem=Problem.MISSING,
                    path=file.path,
                    unit=unit,
                    number=number,
                    field=spec.lang_field,
                    langs=Option("langs"),
                )
            if lang not in lang_ids:
                raise DataError(
                    "{path} {unit} {number}: language {lang!r} is not declared (declared: {declared}); "
                    "add it to {original_langs} or {new_langs}",
                    problem=Problem.MISSING,
                    path=file.path,
                    unit=unit,
                    number=number,
                    lang=lang,
                    declared=declared,
                    original_langs=Option("original_langs"),
                    new_langs=Option("new_langs"),
                )
            count += ends
            yield Piece(text, lang_ids[lang], ends)
        if count == 0:
            raise DataError(f"data file {file.path} holds no documents ({FORMATS[file.format].nothing})")


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides token ids: the serialised tokenizer and its EOS id."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{text}\0{tokenizer.eos_token_id}".encode()).hexdigest()


def cache_key(spec: CorpusSpec, tokenizer) -> str:
    """Inputs (resolved path, size, mtime), tokenizer and settings: what a cached token stream depends on."""
    files = [
        {
            "path": str(f.path.resolve()),
            "size": f.path.stat().st_size,
            "mtime_ns": f.path.stat().st_mtime_ns,
            "format": f.format,
            "lang": f.lang,
        }
        for f in spec.files
    ]
    payload = {
        "version": _CACHE_VERSION,
        "files": files,
        "languages": spec.languages,
        "text_field": spec.text_field,
        "lang_field": spec.lang_field,
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


class TokenCache:
    """The memory-mapped token stream of a corpus: ``tokens`` (uint32) and ``langs`` (uint8) per token."""

    TOKENS = "tokens.u32"
    LANGS = "langs.u8"
    META = "meta.json"

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        meta = json.loads((self.directory / self.META).read_text())
        self.key: str = meta["key"]
        self.languages: tuple[str, ...] = tuple(meta["languages"])
        self.num_tokens: int = meta["num_tokens"]
        self.num_documents: int = meta["num_documents"]
        self.tokens = np.memmap(
            self.directory / self.TOKENS, dtype=np.uint32, mode="r", shape=(self.num_tokens,)
        )
        self.langs = np.memmap(
            self.directory / self.LANGS, dtype=np.uint8, mode="r", shape=(self.num_tokens,)
        )

    @classmethod
    def _tokenize_into(cls, directory: Path, spec: CorpusSpec, tokenizer) -> dict:
        """Stream every document through the tokenizer into the two flat files of ``directory``."""
        num_tokens = num_documents = 0
        eos = tokenizer.eos_token_id
        encode = _batch_encoder(tokenizer)
        with (
            (directory / cls.TOKENS).open("wb") as tokens_out,
            (directory / cls.LANGS).open("wb") as langs_out,
        ):
            for pieces in _read_ahead(_batches(iter_documents(spec))):
                encoded = encode([piece.text for piece in pieces])
                ends = np.fromiter((piece.ends for piece in pieces), dtype=bool, count=len(pieces))
                lengths = (
                    np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(encoded)) + ends
                )
                stops = np.cumsum(lengths)
                tokens = np.full(int(stops[-1]), eos, dtype=np.uint32)
                is_text = np.ones(len(tokens), dtype=bool)
                is_text[stops[ends] - 1] = False  # one EOS after the last piece of every document
                tokens[is_text] = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.uint32)
                tokens.tofile(tokens_out)
                langs = np.asarray([piece.lang for piece in pieces], dtype=np.uint8)
                np.repeat(langs, lengths).tofile(langs_out)
                num_tokens += len(tokens)
                num_documents += int(ends.sum())
        return {
            "languages": list(spec.languages),
            "num_tokens": num_tokens,
            "num_documents": num_documents,
            "spec": _spec_summary(spec),
        }

    @classmethod
    def build(cls, spec: CorpusSpec, tokenizer, cache_dir: str | Path | None = None) -> TokenCache:
        """The cache of ``spec`` under ``cache_dir``: reused when complete, otherwise tokenised now.

        Written into a ``.partial`` directory renamed when complete, so a killed tokenisation is
        redone, never half-used. In a multi-process run call it on each node's main process first.
        """
        if len(spec.languages) > 255:
            raise UsageError("at most 255 languages can be declared")
        if tokenizer.eos_token_id is None:
            raise UsageError("the model's tokenizer has no EOS token to put between documents")
        root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        key = cache_key(spec, tokenizer)
        final = root / key
        if final.is_symlink() or final.exists():
            if cls._is_whole(final, key):
                return cls(final)
            _discard(final)  # damaged (cut short, edited, half-deleted): tokenised again below
        # One staging directory per process: nodes that share the cache may tokenise at once.
        _remove_stale_stagings(final)
        try:
            with Staged(final, tag=f".{socket.gethostname()}.{os.getpid()}") as partial:
                partial.mkdir(parents=True)
                meta = cls._tokenize_into(partial, spec, tokenizer)
                (partial / cls.META).write_text(json.dumps({"key": key, **meta}, indent=2) + "\n")
        except OSError:
            if not (final / cls.META).is_file():
                raise
            # else another process finished the same cache first: use theirs
        return cls(final)

    @classmethod
    def _is_whole(cls, directory: Path, key: str) -> bool:
        """Whether the cache folder ``directory`` is usable: a real folder whose meta file reads as the
        cache of ``key`` and whose two token files are regular files of the sizes it records."""
        try:
            meta = json.loads((directory / cls.META).read_text())
            num_tokens = meta["num_tokens"]
            usable = (
                meta["key"] == key
                and isinstance(num_tokens, int)
                and isinstance(meta["num_documents"], int)
                and isinstance(meta["languages"], list)
            )
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
            return False
        if not usable or directory.is_symlink():
            return False
        files = ((directory / cls.TOKENS, 4 * num_tokens), (directory / cls.LANGS, num_tokens))
        return all(
            path.is_file() and not path.is_symlink() and path.stat().st_size == size for path, size in files
        )


def _discard(path: Path) -> None:
    """Remove a damaged cache folder (a link in its place is unlinked, never followed); another
    process may be removing it too."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _remove_stale_stagings(final: Path) -> None:
    """Staging folders of ``final`` left by processes of this host that are gone (killed, e.g. for
    memory): nothing else would ever remove them."""
    host = socket.gethostname()
    for path in final.parent.glob(f".{final.name}.{host}.*.partial"):
        pid = path.name.removesuffix(".partial").rsplit(".", 1)[-1]
        if pid.isdigit() and not _process_exists(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _spec_summary(spec: CorpusSpec) -> dict:
    summary = asdict(spec)
    summary["files"] = [{**asdict(f), "path": str(f.path)} for f in spec.files]
    return summary


_CALL_METHODS = ("__call__", "encode_plus", "batch_encode_plus", "_encode_plus", "_batch_encode_plus")


def _batch_encoder(tokenizer) -> Callable[[list[str]], list[list[int]]]:
    """The token ids of each text, as ``tokenizer(texts, add_special_tokens=False)`` gives them.

    A fast tokenizer's class that does not change how transformers calls it is run through a copy of
    its Rust backend: the ids are the same (transformers only switches truncation and padding off
    and sets ``encode_special_tokens``), without transformers' per-text conversion of the results,
    which measured 35 % of the encoding time itself. The copy leaves the caller's tokenizer as it is.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    plain_call = isinstance(tokenizer, PreTrainedTokenizerFast) and all(
        getattr(type(tokenizer), name, None) is getattr(PreTrainedTokenizerFast, name, None)
        for name in _CALL_METHODS
    )
    if not plain_call:
        return lambda texts: tokenizer(texts, add_special_tokens=False, return_attention_mask=False)[
            "input_ids"
        ]
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_truncation()
    backend.no_padding()
    backend.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
    encode_batch = getattr(backend, "encode_batch_fast", backend.encode_batch)  # fast: no offsets
    return lambda texts: [encoding.ids for encoding in encode_batch(texts, add_special_tokens=False)]


def _read_ahead(batches: Generator[list[Piece], None, None]) -> Iterator[list[Piece]]:
    """``batches``, read by a thread of their own up to ``_READ_AHEAD_BATCHES`` ahead: reading,
    decompressing and parsing the next batch use one core while the tokenizer encodes this one (its
    Rust code releases the GIL), which matters where the tokenizer has many cores to itself. A reader's
    exception is raised here, after the batches read before it; leaving early stops the reader and
    closes its files."""
    ready: queue.Queue = queue.Queue(_READ_AHEAD_BATCHES)
    stop = threading.Event()
    end = object()

    def hand_over(item: object) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            for batch in batches:
                if not hand_over(batch):
                    return
            hand_over(end)
        except BaseException as error:  # handed to the consumer, which raises it
            hand_over(error)
        finally:
            batches.close()

    reader = threading.Thread(target=read, name="pdmoe-corpus-reader", daemon=True)
    reader.start()
    try:
        while (item := ready.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        reader.join()


def _batches(pieces: Iterator[Piece]) -> Generator[list[Piece], None, None]:
    """Pieces grouped for the tokenizer: up to ``_TOKENIZE_CHUNK_DOCS`` of them, and about
    ``_TOKENIZE_CHUNK_CHARS`` characters, which bounds its memory."""
    batch: list[Piece] = []
    chars = 0
    for piece in pieces:
        batch.append(piece)
        chars += len(piece.text)
        if len(batch) == _TOKENIZE_CHUNK_DOCS or chars >= _TOKENIZE_CHUNK_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


class PackedSequences:
    """Fixed-length sequences over a token cache, read from the memory map on demand."""

    def __init__(self, cache: TokenCache, seq_len: int) -> None:
        if seq_len < 2:
            raise UsageError(
                "{option} must be at least 2, got {seq_len}",
                problem=Problem.INVALID,
                option=Option("seq_len"),
                seq_len=seq_len,
            )
        self.cache = cache
        self.seq_len = seq_len
        self.num_sequences = cache.num_tokens // seq_len
        if self.num_sequences == 0:
            raise DataError(
                "the data has {tokens} tokens, fewer than one sequence of {length}; add data or lower {seq_len}",
                problem=Problem.INVALID,
                tokens=cache.num_tokens,
                length=seq_len,
                seq_len=Option("seq_len"),
            )

    def __len__(self) -> int:
        return self.num_sequences

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input ids [B, L] int64, language ids [B, L] int64) of the sequences ``indices``."""
        import torch  # here: the command line checks data files with this module before torch loads

        length = self.seq_len
        tokens = np.stack([self.cache.tokens[i * length : (i + 1) * length] for i in indices])
        langs = np.stack([self.cache.langs[i * length : (i + 1) * length] for i in indices])
        return torch.from_numpy(tokens.astype(np.int64)), torch.from_numpy(langs.astype(np.int64))


class SequenceOrder:
    """A seeded permutation of the sequences per epoch; ``take(position, n)`` crosses epochs freely."""

    def __init__(self, num_sequences: int, seed: int) -> None:
        self.num_sequences = num_sequences
        self.seed = seed
        self._epoch = -1
        self._permutation = np.empty(0, dtype=np.int64)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._permutation = rng.permutation(self.num_sequences)
            self._epoch = epoch
        return self._permutation

    def take(self, position: int, count: int) -> list[int]:
        """Sequence indices at global positions position .. position+count-1."""
        indices = []
        for pos in range(position, position + count):
            epoch, offset = divmod(pos, self.num_sequences)
            indices.append(int(self._epoch_order(epoch)[offset]))
        return indices


def micro_batch_slice(
    step_indices: Sequence[int], micro_step: int, rank: int, world_size: int, micro_batch_size: int
) -> list[int]:
    """This process's share of one optimizer step's sequences for one accumulation micro-step.

    Laid out micro-step-major, so N processes × A micro-steps see the same sequences in the same
    groups as one process × N·A micro-steps: a multi-process run matches a single-process one.
    """
    start = (micro_step * world_size + rank) * micro_batch_size
    return list(step_indices[start : start + micro_batch_size])
