"""pdmoe.cpt data: reading, packing with EOS and language tags, the token cache, the order, bad files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pdmoe.cpt import data
from pdmoe.cpt.data import (
    DataError,
    PackedSequences,
    SequenceOrder,
    TokenCache,
    corpus_spec,
    data_files,
    declare_languages,
    micro_batch_slice,
)
from pdmoe.errors import Option, Problem, UsageError
from pdmoe.tiny import byte_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def _corpus(tmp_path, files, langs=None, original=("en",), new=("fr",)):
    return corpus_spec(files, langs, original, new)


def test_packing_puts_eos_between_documents_and_tags_every_token(tmp_path, tokenizer):
    jsonl = tmp_path / "mixed.jsonl"
    jsonl.write_text(json.dumps({"text": "ab", "lang": "fr"}) + "\n\n" + json.dumps({"text": "cde"}) + "\n")
    text = tmp_path / "en.txt"
    text.write_text("xy\nz\n\n\nuvw\n")
    spec = _corpus(tmp_path, [jsonl, text], langs=["en"])
    cache = TokenCache.build(spec, tokenizer, tmp_path / "cache")
    eos = tokenizer.eos_token_id
    ids = [tokenizer.convert_tokens_to_ids(c) for c in "ab"] + [eos]
    ids += [tokenizer.convert_tokens_to_ids(c) for c in "cde"] + [eos]
    ids += tokenizer("xy\nz", add_special_tokens=False)["input_ids"] + [eos]
    ids += tokenizer("uvw", add_special_tokens=False)["input_ids"] + [eos]
    assert cache.tokens.tolist() == ids
    # fr = 1 (declared after the original en = 0); the JSONL record without a tag takes --lang en.
    assert cache.langs.tolist() == [1] * 3 + [0] * 4 + [0] * 5 + [0] * 4
    assert cache.num_documents == 4

    sequences = PackedSequences(cache, seq_len=5)
    assert len(sequences) == len(ids) // 5
    input_ids, langs = sequences.batch([1, 0])
    assert input_ids.tolist() == [ids[5:10], ids[0:5]]
    assert langs.tolist() == [cache.langs[5:10].tolist(), cache.langs[0:5].tolist()]


def test_cache_is_reused_and_keyed_by_inputs(tmp_path, tokenizer, monkeypatch):
    path = tmp_path / "fr.txt"
    path.write_text("bonjour\n\nau revoir\n")
    spec = _corpus(tmp_path, [path], langs=["fr"])
    first = TokenCache.build(spec, tokenizer, tmp_path / "cache")
    with monkeypatch.context() as patch:
        patch.setattr(data, "iter_documents", lambda spec: pytest.fail("the cache was not reused"))
        again = TokenCache.build(spec, tokenizer, tmp_path / "cache")
    assert again.directory == first.directory
    path.write_text("bonjour\n\nau revoir, et merci\n")  # new size and mtime: a new key
    changed = TokenCache.build(_corpus(tmp_path, [path], langs=["fr"]), tokenizer, tmp_path / "cache")
    assert changed.directory != first.directory and changed.num_tokens > first.num_tokens
    assert not list((tmp_path / "cache").glob(".*partial"))


def test_order_is_seeded_deterministic_and_crosses_epochs():
    order = SequenceOrder(10, seed=3)
    first_epoch = order.take(0, 10)
    assert sorted(first_epoch) == list(range(10))
    assert SequenceOrder(10, seed=3).take(4, 9) == first_epoch[4:] + SequenceOrder(10, seed=3).take(10, 3)
    assert SequenceOrder(10, seed=4).take(0, 10) != first_epoch
    assert sorted(order.take(10, 10)) == list(range(10))


def test_micro_batches_of_two_processes_equal_those_of_one_with_accumulation():
    step = list(range(100, 108))
    one_process = [micro_batch_slice(step, micro, 0, 1, 2) for micro in range(4)]
    two_processes = [micro_batch_slice(step, micro, rank, 2, 2) for micro in range(2) for rank in range(2)]
    assert one_process == two_processes
    assert [i for batch in one_process for i in batch] == step


@pytest.mark.parametrize(
    ("content", "name", "message", "problem", "options"),
    [
        (
            '{"text": "ok"}\nnot json at all\n',
            "bad.jsonl",
            r"bad.jsonl line 2 is not JSON",
            None,
            (Option("data_format", "text"),),
        ),
        (
            '{"body": "no text field"}\n',
            "nofield.jsonl",
            r"no string field 'text' \(found: body\); name the text field with",
            None,
            (Option("text_field"),),
        ),
        (b"\xff\xfe\x00binary", "blob.txt", r"blob.txt is not UTF-8 text", None, ()),
        (
            '{"text": "hola", "lang": "es"}\n',
            "es.jsonl",
            r"language 'es' is not declared \(declared: en, fr\); add it to",
            Problem.MISSING,
            (Option("original_langs"), Option("new_langs")),
        ),
        ("\n\n\n", "blank.txt", r"holds no documents", None, ()),
    ],
)
def test_bad_data_files_say_what_is_wrong(tmp_path, tokenizer, content, name, message, problem, options):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=message) as caught:
        TokenCache.build(_corpus(tmp_path, [path], langs=["en"]), tokenizer, tmp_path / "cache")
    assert (caught.value.problem, caught.value.options) == (problem, options)
    assert not list((tmp_path / "cache").iterdir()), "a failed tokenisation must leave nothing behind"


def test_untagged_document_without_lang(tmp_path, tokenizer):
    path = tmp_path / "untagged.jsonl"
    path.write_text('{"text": "which language?"}\n')
    with pytest.raises(DataError, match=r"untagged.jsonl line 1 has no 'lang' field") as caught:
        TokenCache.build(_corpus(tmp_path, [path]), tokenizer, tmp_path / "cache")
    assert caught.value.problem is Problem.MISSING and caught.value.options == (Option("langs"),)


def test_missing_empty_and_declaration_errors(tmp_path):
    with pytest.raises(DataError, match=r"missing.jsonl does not exist"):
        data_files([tmp_path / "missing.jsonl"], None)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match=r"empty.txt is empty"):
        data_files([tmp_path / "empty.txt"], ["en"])
    (tmp_path / "a.txt").write_text("a")
    with pytest.raises(
        UsageError, match=r"one language for all files or one per file: got 2 for 3"
    ) as caught:
        data_files([tmp_path / "a.txt"] * 3, ["en", "fr"])
    assert caught.value.problem is Problem.INVALID and caught.value.options == (Option("langs"),)
    with pytest.raises(UsageError, match=r"must be one of auto, jsonl, text, parquet, not 'xml'") as caught:
        data_files([tmp_path / "a.txt"], ["en"], "xml")
    assert caught.value.problem is Problem.INVALID and caught.value.options == (Option("data_format"),)
    languages = (Option("original_langs"), Option("new_langs"))
    with pytest.raises(UsageError, match=r"language\(s\) en declared more than once") as caught:
        declare_languages(["en"], ["en"])
    assert caught.value.problem is Problem.INVALID and caught.value.options == languages
    with pytest.raises(UsageError, match=r"declare the languages of the data") as caught:
        declare_languages([], [])
    assert caught.value.problem is Problem.MISSING and caught.value.options == languages


def test_corpus_shorter_than_one_sequence(tmp_path, tokenizer):
    path = tmp_path / "short.txt"
    path.write_text("tiny")
    cache = TokenCache.build(_corpus(tmp_path, [path], langs=["fr"]), tokenizer, tmp_path / "cache")
    with pytest.raises(
        DataError, match=r"5 tokens, fewer than one sequence of 64; add data or lower"
    ) as caught:
        PackedSequences(cache, 64)
    assert caught.value.problem is Problem.INVALID and caught.value.options == (Option("seq_len"),)
    with pytest.raises(UsageError, match=r"must be at least 2, got 1") as caught:
        PackedSequences(cache, 1)
    assert caught.value.problem is Problem.INVALID and caught.value.options == (Option("seq_len"),)
    assert np.asarray(cache.tokens).dtype == np.uint32


def test_eval_sequences_spread_over_the_corpus():
    from pdmoe.cpt.evaluate import spread_indices

    assert spread_indices(10, 4) == [0, 2, 5, 7]
    assert spread_indices(3, 8) == [0, 1, 2]
