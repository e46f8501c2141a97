"""Corpora as they ship: JSONL compressed with gzip or zstd, and Parquet, streamed into the same token
cache as plain JSONL; damaged files and missing extras are one-line errors that say where and why."""

from __future__ import annotations

import gzip
import importlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from pdmoe.cpt import corpus_formats, data
from pdmoe.cpt.data import DataError, TokenCache, corpus_spec, data_files
from pdmoe.errors import Option, Problem, UsageError
from pdmoe.tiny import byte_tokenizer

# Tagged and untagged documents, one longer than the (shrunk) piece length, non-ASCII text.
ROWS = [
    {"text": "ab cd", "lang": "fr"},
    {"text": "efg"},
    {"text": "un document assez long pour être coupé en morceaux " * 3, "lang": "fr"},
    {"text": "zürich ünd ħ", "lang": "en"},
    {"text": "last one"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(autouse=True)
def small_pieces(monkeypatch):
    monkeypatch.setattr(corpus_formats, "MAX_PIECE_CHARS", 16)


def _jsonl_bytes(rows) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()


def _write(path, rows, **parquet_options):
    """``rows`` as the file ``path`` names: JSONL, gzip- or zstd-compressed JSONL, or Parquet."""
    if path.suffix == ".parquet":
        table = pa.table({"text": [r["text"] for r in rows], "lang": [r.get("lang") for r in rows]})
        pq.write_table(table, path, **parquet_options)
    elif path.suffix == ".gz":
        path.write_bytes(gzip.compress(_jsonl_bytes(rows)))
    elif path.suffix == ".zst":
        path.write_bytes(zstandard.ZstdCompressor().compress(_jsonl_bytes(rows)))
    else:
        path.write_bytes(_jsonl_bytes(rows))
    return path


def _build(tmp_path, tokenizer, *paths, langs=("en",)):
    spec = corpus_spec(paths, langs, ("en",), ("fr",))
    return TokenCache.build(spec, tokenizer, tmp_path / "cache")


@pytest.mark.parametrize("name", ["rows.jsonl.gz", "rows.jsonl.zst", "rows.parquet"])
def test_compressed_and_parquet_give_the_token_ids_of_plain_jsonl(tmp_path, tokenizer, name):
    plain = _build(tmp_path, tokenizer, _write(tmp_path / "rows.jsonl", ROWS))
    shipped = _build(tmp_path, tokenizer, _write(tmp_path / name, ROWS, row_group_size=2))
    assert shipped.directory != plain.directory
    assert shipped.tokens.tolist() == plain.tokens.tolist()
    assert shipped.langs.tolist() == plain.langs.tolist()
    assert shipped.num_documents == plain.num_documents == len(ROWS)
    assert plain.num_tokens == sum(len(r["text"].encode()) + 1 for r in ROWS)  # bytes + EOS each


def test_formats_and_compression_come_from_the_file_name(tmp_path):
    paths = [tmp_path / n for n in ("a.jsonl.gz", "b.ndjson.zst", "c.txt.gz", "d.parquet", "e.md", "f.JSONL")]
    for path in paths:
        path.write_bytes(b"x")
    found = [(f.format, f.compression) for f in data_files(paths, ["en"])]
    assert found == [
        ("jsonl", ".gz"),
        ("jsonl", ".zst"),
        ("text", ".gz"),
        ("parquet", None),
        ("text", None),
        ("jsonl", None),
    ]
    assert data.DATA_FORMATS == ("auto", "jsonl", "text", "parquet")
    (tmp_path / "g.parquet.gz").write_bytes(b"x")
    with pytest.raises(
        DataError, match=r"g.parquet.gz: parquet files are read as they are, not gzip-compressed"
    ):
        data_files([tmp_path / "g.parquet.gz"], ["en"])


def test_compressed_plain_text_and_several_zstd_frames(tmp_path, tokenizer):
    text = "premier paragraphe\n\nsecond\nparagraphe\n"
    (tmp_path / "t.txt").write_text(text)
    (tmp_path / "t.txt.gz").write_bytes(gzip.compress(text.encode()))
    plain = _build(tmp_path, tokenizer, tmp_path / "t.txt")
    assert _build(tmp_path, tokenizer, tmp_path / "t.txt.gz").tokens.tolist() == plain.tokens.tolist()
    compressor = zstandard.ZstdCompressor()
    frames = compressor.compress(_jsonl_bytes(ROWS[:2])) + compressor.compress(_jsonl_bytes(ROWS[2:]))
    (tmp_path / "frames.jsonl.zst").write_bytes(frames)
    whole = _build(tmp_path, tokenizer, _write(tmp_path / "rows.jsonl", ROWS))
    assert _build(tmp_path, tokenizer, tmp_path / "frames.jsonl.zst").tokens.tolist() == whole.tokens.tolist()


def test_parquet_is_read_in_batches_of_row_groups_without_a_language_column(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(corpus_formats, "PARQUET_BATCH_ROWS", 3)
    texts = [f"document {i}" for i in range(20)]
    pq.write_table(pa.table({"id": list(range(20)), "text": texts}), tmp_path / "t.parquet", row_group_size=7)
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    cache = _build(tmp_path, tokenizer, tmp_path / "t.parquet", langs=("fr",))
    assert (
        cache.tokens.tolist()
        == _build(tmp_path, tokenizer, tmp_path / "t.jsonl", langs=("fr",)).tokens.tolist()
    )
    assert set(cache.langs.tolist()) == {1} and cache.num_documents == 20
    with pytest.raises(DataError, match=r"t.parquet row 1 has no 'lang' field") as caught:
        _build(tmp_path / "untagged", tokenizer, tmp_path / "t.parquet", langs=None)
    assert caught.value.problem is Problem.MISSING and caught.value.options == (Option("langs"),)


def _truncated(path, keep: float):
    content = path.read_bytes()
    path.write_bytes(content[: int(len(content) * keep)])
    return path


def _many_rows(count: int = 5000):
    letters = np.frombuffer(b"abcdefgh ", np.uint8)  # random: the compressed data is long
    texts = letters[np.random.default_rng(0).integers(0, len(letters), (count, 40))]
    return [{"text": row.tobytes().decode(), "lang": "fr"} for row in texts]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "big.jsonl.gz",
            r"big.jsonl.gz is damaged: its gzip data stops decoding after line \d+ \(.*\); check or",
        ),
        (
            "big.jsonl.zst",
            r"big.jsonl.zst is damaged: its zstd data stops decoding after line \d+ \(.*truncated",
        ),
        ("big.parquet", r"big.parquet is not a readable Parquet file \(.*\); check or download it again"),
    ],
)
def test_truncated_files_say_where_they_break(tmp_path, tokenizer, name, message):
    path = _truncated(_write(tmp_path / name, _many_rows()), 0.5)
    with pytest.raises(DataError, match=message) as caught:
        _build(tmp_path, tokenizer, path)
    assert "\n" not in str(caught.value)
    if not name.endswith(".parquet"):  # it broke in the middle, not at the start
        assert int(str(caught.value).split("after line ")[1].split()[0]) > 1000
    assert not list((tmp_path / "cache").iterdir()), "a failed tokenisation must leave nothing behind"


def test_damaged_gzip_and_parquet_row_group(tmp_path, tokenizer):
    gz = _write(tmp_path / "bad.jsonl.gz", _many_rows())
    content = bytearray(gz.read_bytes())
    content[-8] ^= 0xFF  # the CRC of the decompressed data
    gz.write_bytes(bytes(content))
    with pytest.raises(
        DataError, match=r"bad.jsonl.gz is damaged: its gzip data stops decoding after line 5000 \(CRC"
    ):
        _build(tmp_path, tokenizer, gz)

    path = _write(tmp_path / "bad.parquet", _many_rows(3000), row_group_size=1000, compression="zstd")
    column = pq.ParquetFile(path).metadata.row_group(1).column(0)
    content = bytearray(path.read_bytes())
    start = column.dictionary_page_offset or column.data_page_offset
    content[start : start + 32] = b"\xff" * 32  # the header of its first page
    path.write_bytes(bytes(content))
    with pytest.raises(
        DataError, match=r"bad.parquet is damaged: row group 1 of 3 \(0-based\) cannot be read"
    ):
        _build(tmp_path, tokenizer, path)


def test_bad_parquet_columns_and_rows(tmp_path, tokenizer):
    pq.write_table(pa.table({"body": ["x"], "n": [1]}), tmp_path / "nocol.parquet")
    with pytest.raises(
        DataError, match=r"no string column 'text' \(found: body: string, n: int64\); name the text column"
    ) as caught:
        _build(tmp_path, tokenizer, tmp_path / "nocol.parquet")
    assert caught.value.options == (Option("text_field"),)
    pq.write_table(pa.table({"text": ["ok", None]}), tmp_path / "null.parquet")
    with pytest.raises(DataError, match=r"null.parquet row 2 has no text \(null in column 'text'\)"):
        _build(tmp_path, tokenizer, tmp_path / "null.parquet")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    with pytest.raises(DataError, match=r"empty.parquet holds no documents \(no rows\)"):
        _build(tmp_path, tokenizer, tmp_path / "empty.parquet")


def test_non_utf8_inside_a_compressed_file(tmp_path, tokenizer):
    path = tmp_path / "latin1.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"text": "ok"}\n{"text": "caf\xe9"}\n'))
    with pytest.raises(
        DataError, match=r"not UTF-8 text \(.* at byte 28 of the gzip-decompressed text, line 2\)"
    ):
        _build(tmp_path, tokenizer, path)


@pytest.mark.parametrize(("name", "extra"), [("x.jsonl.zst", "zstd"), ("x.parquet", "parquet")])
def test_a_missing_extra_is_named(tmp_path, tokenizer, monkeypatch, name, extra):
    path = _write(tmp_path / name, ROWS)
    real_import = importlib.import_module

    def without_extras(module, *args):
        if module.split(".")[0] in ("zstandard", "pyarrow"):
            raise ImportError(module)
        return real_import(module, *args)

    monkeypatch.setattr(importlib, "import_module", without_extras)
    with pytest.raises(UsageError, match=rf"need the \w+ package: pip install 'pdmoe\[{extra}\]'$"):
        _build(tmp_path, tokenizer, path)


def test_reader_errors_reach_the_build_and_stop_the_reader(tmp_path, tokenizer, monkeypatch):
    """Reading runs ahead in a thread: its error is raised in the build, nothing is left running."""
    import threading

    monkeypatch.setattr(data, "_TOKENIZE_CHUNK_DOCS", 2)
    rows = [*ROWS, {"text": 3}]
    with pytest.raises(DataError, match=r"line 6 has no string field 'text'"):
        _build(tmp_path, tokenizer, _write(tmp_path / "late.jsonl", rows))
    assert not [t for t in threading.enumerate() if t.name == "pdmoe-corpus-reader"]


def test_cache_ids_are_the_tokenizers_own_whatever_its_backend_settings(tmp_path):
    """The cache encodes through a copy of the Rust backend: the ids of ``tokenizer(text)``, even when
    the tokenizer file asks for truncation and padding, and the caller's tokenizer is left as it was."""
    tokenizer = byte_tokenizer()
    tokenizer.backend_tokenizer.enable_truncation(max_length=4)
    tokenizer.backend_tokenizer.enable_padding(length=64)
    settings = tokenizer.backend_tokenizer.to_str()
    texts = ["a text longer than four tokens", "with </s> inside", "é"]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    cache = _build(tmp_path, tokenizer, path)
    assert tokenizer.backend_tokenizer.to_str() == settings
    expected = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        expected += [*ids, tokenizer.eos_token_id]
    assert cache.tokens.tolist() == expected and len(expected) > 3 * 5


def test_the_command_line_reports_a_damaged_file_in_one_line(tmp_path, capsys):
    from pdmoe.cli import main
    from pdmoe.tiny import build_tiny_dense
    from pdmoe.upcycle import upcycle

    moe = upcycle(build_tiny_dense(tmp_path / "dense"), tmp_path / "moe", num_experts=2, top_k=1)
    path = _truncated(_write(tmp_path / "cut.jsonl.zst", _many_rows()), 0.5)
    args = [
        "eval",
        "--model",
        str(moe),
        "--data",
        str(path),
        "--new-langs",
        "fr",
        "--cache-dir",
        str(tmp_path / "c"),
    ]
    capsys.readouterr()  # the progress bars of building the model
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pdmoe eval: error: ") and "cut.jsonl.zst is damaged" in err and "\n" not in err
