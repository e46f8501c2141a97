"""The file formats of ``--data``, as a registry: how each is recognised, opened and read, streamed.

A file's name decides its format: a compression suffix (``.gz``, ``.zst``) is peeled off first,
then ``.parquet`` is Parquet, ``.jsonl`` / ``.json`` / ``.ndjson`` JSONL and anything else plain text.
Text is decompressed and decoded as it is read and Parquet is read one batch of one row group at a
time, so no file is ever held whole in memory. zstandard and pyarrow are optional: they are
imported only when a file needs them, and their absence is an error naming the extra to install.
Every reader yields the documents as pieces of bounded length (see ``pieces``).
"""

from __future__ import annotations

import codecs
import gzip
import importlib
import io
import json
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import BinaryIO, TextIO

from pdmoe.errors import DataError, Option, UsageError

MAX_PIECE_CHARS = 2**20
MAX_JSONL_LINE_CHARS = 2**26
PARQUET_BATCH_ROWS = 1024
_READ_BYTES = 2**20
_ZSTD_INPUT_BYTES = 2**16

# A piece of a document: (text, language tag or None, line or row number, ends the document)
Record = tuple[str, str | None, int, bool]


def optional_module(name: str, extra: str, needed_for: str) -> ModuleType:
    """Import an optional dependency, or say which extra of pdmoe installs it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise UsageError(
            f"{needed_for} need the {name.split('.')[0]} package: pip install 'pdmoe[{extra}]'"
        ) from None


@dataclass(frozen=True)
class Compression:
    """A compressed file: how to read it decompressed, and which exceptions mean its data is damaged."""

    name: str
    open: Callable[[Path], BinaryIO]
    damage: Callable[[], tuple[type[Exception], ...]]


def _zstandard() -> ModuleType:
    return optional_module("zstandard", "zstd", ".zst files")


class _ZstdStream(io.RawIOBase):
    """A zstd file decompressed as it is read, frame after frame (``zstd -T`` and ``pzstd`` write
    several). A file that ends inside a frame is an EOFError: zstandard's own stream reader ends such a
    truncated file silently. Input is fed in small chunks, which bounds the output of each."""

    def __init__(self, raw: BinaryIO) -> None:
        super().__init__()
        self._raw = raw
        self._decompressor = _zstandard().ZstdDecompressor()
        self._frame = self._decompressor.decompressobj()
        self._in_frame = False
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            chunk = self._raw.read(_ZSTD_INPUT_BYTES)
            if not chunk:
                if self._in_frame:
                    raise EOFError("the file ends inside a zstd frame: it is truncated")
                return 0
            self._pending = memoryview(self._decompress(chunk))
        count = min(len(buffer), len(self._pending))
        buffer[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        return count

    def _decompress(self, chunk: bytes) -> bytes:
        output = []
        while chunk:
            self._in_frame = True
            output.append(self._frame.decompress(chunk))
            if not self._frame.eof:
                break
            chunk = self._frame.unused_data
            self._frame = self._decompressor.decompressobj()
            self._in_frame = False
        return b"".join(output)

    def close(self) -> None:
        self._raw.close()
        super().close()


def _open_zstd(path: Path) -> BinaryIO:
    return io.BufferedReader(_ZstdStream(path.open("rb")), _READ_BYTES)


COMPRESSIONS: dict[str, Compression] = {
    ".gz": Compression(
        "gzip",
        lambda path: gzip.open(path, "rb"),  # noqa: SIM115 (the caller closes it)
        lambda: (gzip.BadGzipFile, EOFError, zlib.error),
    ),
    ".zst": Compression("zstd", _open_zstd, lambda: (_zstandard().ZstdError, EOFError)),
}


def compression_of(path: Path) -> str | None:
    """The compression suffix of ``path`` (a key of ``COMPRESSIONS``), or None."""
    suffix = path.suffix.lower()
    return suffix if suffix in COMPRESSIONS else None


def _one_line(error: Exception) -> str:
    """A library's message on one line (pyarrow's span several)."""
    return " ".join(str(error).split())


def _damaged(path: Path, compression: Compression, error: Exception, after: int) -> DataError:
    where = f"after line {after}" if after else "before its first line"
    return DataError(
        f"{path} is damaged: its {compression.name} data stops decoding {where} ({_one_line(error)}); "
        "check or download the file again"
    )


def pieces(text: str) -> Iterator[tuple[str, bool]]:
    """A document as pieces of at most ``MAX_PIECE_CHARS`` characters: the tokenizer's memory grows
    with the length of what it is given (about 100 bytes per character), so a 200 MB document must
    not reach it whole. Pieces are cut before a whitespace, where tokenizers split words anyway."""
    start = 0
    while len(text) - start > MAX_PIECE_CHARS:
        window = text[start : start + MAX_PIECE_CHARS]
        cut = max(window.rfind(" "), window.rfind("\n"), window.rfind("\t"))
        stop = start + (cut if cut > 0 else MAX_PIECE_CHARS)
        yield text[start:stop], False
        start = stop
    yield text[start:], True


def _open_binary(path: Path, compression: Compression | None) -> BinaryIO:
    return path.open("rb") if compression is None else compression.open(path)


def _open_text(path: Path, compression: Compression | None) -> TextIO:
    if compression is None:
        return path.open(encoding="utf-8")
    return io.TextIOWrapper(_open_binary(path, compression), encoding="utf-8")


def _not_utf8(path: Path, compression: Compression | None) -> DataError:
    """Where ``path`` stops being UTF-8 (byte offset and line), found by a binary pass in bounded memory."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = newlines = 0
    decompressed = "" if compression is None else f" of the {compression.name}-decompressed text"
    damage = () if compression is None else compression.damage()
    with _open_binary(path, compression) as handle:
        while True:
            try:
                chunk = handle.read(_READ_BYTES)
            except damage as error:
                return _damaged(path, compression, error, newlines)
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as error:
                position = offset - pending + error.start
                line = newlines + chunk.count(b"\n", 0, max(position - offset, 0)) + 1
                return DataError(
                    f"{path} is not UTF-8 text ({error.reason} at byte {position}{decompressed}, line {line}); "
                    "is it the right file? (convert it with iconv -t utf-8)"
                )
            if not chunk:
                raise AssertionError(f"{path} decoded as UTF-8 on a second reading")
            offset += len(chunk)
            newlines += chunk.count(b"\n")


def _text_documents(path: Path, handle: TextIO, text_field: str, lang_field: str) -> Iterator[Record]:
    """Pieces of the documents of a plain-text file (paragraphs separated by blank lines), with the
    number of the line where the document starts. Lines are read in bounded pieces too."""
    paragraph: list[str] = []
    size, start, number, continued = 0, 1, 0, False
    while chunk := handle.readline(MAX_PIECE_CHARS):
        if not continued:
            number += 1
        complete = chunk.endswith("\n") or len(chunk) < MAX_PIECE_CHARS
        if not continued and complete and not chunk.strip():
            if paragraph:
                yield "".join(paragraph).rstrip("\n"), None, start, True
                paragraph, size = [], 0
            continue
        if not paragraph:
            start = number
        paragraph.append(chunk)
        size += len(chunk)
        continued = not complete
        if size > MAX_PIECE_CHARS:
            *heads, (rest, _) = pieces("".join(paragraph))
            for head, _ in heads:
                yield head, None, start, False
            paragraph, size = [rest], len(rest)
    if paragraph:
        yield "".join(paragraph).rstrip("\n"), None, start, True


def _jsonl_documents(path: Path, handle: TextIO, text_field: str, lang_field: str) -> Iterator[Record]:
    """Pieces of every record of a JSONL file, with its language tag and line number."""
    number = 0
    while line := handle.readline(MAX_JSONL_LINE_CHARS):
        number += 1
        if len(line) == MAX_JSONL_LINE_CHARS and not line.endswith("\n"):
            raise DataError(
                "{path} line {number} is longer than {limit} characters; split such documents into "
                "several records, or give them as plain text ({data_format})",
                path=path,
                number=number,
                limit=MAX_JSONL_LINE_CHARS,
                data_format=Option("data_format", "text"),
            )
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(
                "{path} line {number} is not JSON; JSONL needs one object per line "
                "(for plain text use a .txt file or {data_format})",
                path=path,
                number=number,
                data_format=Option("data_format", "text"),
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(
                "{path} line {number} has no string field {field!r} (found: {keys}); "
                "name the text field with {text_field}",
                path=path,
                number=number,
                field=text_field,
                keys=keys,
                text_field=Option("text_field"),
            )
        lang = record.get(lang_field)
        tag = None if lang is None else str(lang)
        for piece, ends in pieces(record[text_field]):
            yield piece, tag, number, ends


def _line_format(documents: Callable[[Path, TextIO, str, str], Iterator[Record]]):
    """A reader of a line-based format, plain or compressed: decoding and damage become DataErrors."""

    def read(
        path: Path, compression: Compression | None, text_field: str, lang_field: str
    ) -> Iterator[Record]:
        damage = () if compression is None else compression.damage()
        last = 0
        try:
            with _open_text(path, compression) as handle:
                for record in documents(path, handle, text_field, lang_field):
                    last = record[2]
                    yield record
        except UnicodeDecodeError:
            raise _not_utf8(path, compression) from None
        except damage as error:
            raise _damaged(path, compression, error, last) from None

    return read


def _parquet_documents(
    path: Path, compression: Compression | None, text_field: str, lang_field: str
) -> Iterator[Record]:
    """Pieces of every row of a Parquet file: its text column and, when present, its language column,
    read one batch of one row group at a time."""
    parquet = optional_module("pyarrow.parquet", "parquet", "Parquet files")
    arrow = optional_module("pyarrow", "parquet", "Parquet files")
    try:
        source = parquet.ParquetFile(path, buffer_size=_READ_BYTES)
    except (arrow.ArrowException, OSError) as error:
        raise DataError(
            f"{path} is not a readable Parquet file ({_one_line(error)}); check or download it again"
        ) from None
    schema = source.schema_arrow
    text_type = schema.field(text_field).type if text_field in schema.names else None
    if text_type is None or not (arrow.types.is_string(text_type) or arrow.types.is_large_string(text_type)):
        found = ", ".join(f"{field.name}: {field.type}" for field in schema)
        raise DataError(
            "{path} has no string column {column!r} (found: {found}); name the text column with {text_field}",
            path=path,
            column=text_field,
            found=found,
            text_field=Option("text_field"),
        )
    columns = [text_field, *([lang_field] if lang_field in schema.names else [])]
    row = 0
    groups = source.num_row_groups
    for group in range(groups):
        try:
            for batch in source.iter_batches(
                batch_size=PARQUET_BATCH_ROWS, row_groups=[group], columns=columns, use_threads=False
            ):
                texts = batch.column(0).to_pylist()
                langs = batch.column(1).to_pylist() if len(columns) == 2 else [None] * len(texts)
                for text, lang in zip(texts, langs, strict=True):
                    row += 1
                    if text is None:
                        raise DataError(
                            f"{path} row {row} has no text (null in column {text_field!r}); "
                            "drop such rows or fill them"
                        )
                    tag = None if lang is None else str(lang)
                    for piece, ends in pieces(text):
                        yield piece, tag, row, ends
        except (arrow.ArrowException, OSError, UnicodeDecodeError) as error:
            raise DataError(
                f"{path} is damaged: row group {group} of {groups} (0-based) cannot be read "
                f"({_one_line(error)}); "
                "check or download the file again"
            ) from None
        # Arrow's allocator keeps what a row group's pages used: measured on reading alone, 67 MiB
        # of working set for a 17 MB corpus without this, 37 MiB with it.
        arrow.default_memory_pool().release_unused()


@dataclass(frozen=True)
class CorpusFormat:
    """How one format is read. For messages: ``unit`` names what a record's number counts and
    ``nothing`` what a file without a document holds. Parquet is not ``compressible``: it compresses
    its own pages."""

    read: Callable[[Path, Compression | None, str, str], Iterator[Record]]
    unit: str
    nothing: str
    compressible: bool
    suffixes: tuple[str, ...] = ()


FORMATS: dict[str, CorpusFormat] = {
    "jsonl": CorpusFormat(
        _line_format(_jsonl_documents), "line", "only blank lines", True, (".jsonl", ".json", ".ndjson")
    ),
    "text": CorpusFormat(_line_format(_text_documents), "line", "only blank lines", True),
    "parquet": CorpusFormat(_parquet_documents, "row", "no rows", False, (".parquet",)),
}
_DEFAULT_FORMAT = "text"


def detect_format(path: Path) -> str:
    """The format a file's name says (after its compression suffix); plain text when it says none."""
    name = Path(path.stem) if compression_of(path) else path
    suffix = name.suffix.lower()
    return next((fmt for fmt, spec in FORMATS.items() if suffix in spec.suffixes), _DEFAULT_FORMAT)


def read_records(
    path: Path, fmt: str, compression: str | None, text_field: str, lang_field: str
) -> Iterator[Record]:
    """Every piece of every document of one file, streamed."""
    return FORMATS[fmt].read(
        path, None if compression is None else COMPRESSIONS[compression], text_field, lang_field
    )
