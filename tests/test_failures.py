"""Expected failures as one line `pdmoe CMD: error: ... (fix)` with exit 2, nothing complete-looking
left: full disks, permissions, unwritable result paths, bad data files, documents too long for memory."""

from __future__ import annotations

import errno
import json
import os
import socket
from pathlib import Path

import pytest
import torch

from pdmoe.cli import main
from pdmoe.cpt import corpus_formats, data
from pdmoe.cpt.data import DataError, TokenCache, cache_key, corpus_spec
from pdmoe.graft import GraftOptions, graft
from pdmoe.io.outputs import MARKER, OutputState, read_marker
from pdmoe.io.writer import ShardWriter
from pdmoe.tiny import build_tiny_dense, byte_tokenizer
from pdmoe.upcycle import upcycle
from tests.graft_checkpoints import graft_command, make

NO_SPACE = "No space left on device"


def run(capsys, *args: object) -> tuple[int, str]:
    code = main([str(arg) for arg in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def full_disk_after(monkeypatch: pytest.MonkeyPatch, shards: int) -> None:
    """The device fills up while writing the shard after the first ``shards`` ones."""
    commit = ShardWriter.commit
    done: list[str] = []

    def write_elements(self: ShardWriter, name: str, block: torch.Tensor) -> None:
        if len(done) >= shards:
            raise OSError(errno.ENOSPC, NO_SPACE, str(self._staged.path))
        ShardWriter.write_elements.__wrapped__(self, name, block)

    def counting_commit(self: ShardWriter) -> None:
        commit(self)
        done.append(self.path.name)

    write_elements.__wrapped__ = ShardWriter.write_elements
    monkeypatch.setattr(ShardWriter, "write_elements", write_elements)
    monkeypatch.setattr(ShardWriter, "commit", counting_commit)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("failures")
    dense = build_tiny_dense(root / "dense")
    return dense, upcycle(dense, root / "moe")


def test_disk_full_during_upcycle(tmp_path: Path, models, capsys, monkeypatch) -> None:
    full_disk_after(monkeypatch, shards=1)
    out = tmp_path / "out"
    code, err = run(capsys, "upcycle", "--model", models[0], "--out", out, "--shard-size", "200KB")
    assert code == 2
    assert err.startswith(f"pdmoe upcycle: error: {NO_SPACE}: {out}/.model-0000")
    assert err.endswith("; free some space, or write somewhere else\n") and err.count("\n") == 1
    assert not out.exists()


def test_disk_full_during_graft_keeps_complete_shards_for_resume(tmp_path: Path, capsys, monkeypatch) -> None:
    base, instruct, cpt = make(tmp_path, moe=True)
    out = tmp_path / "out"
    args = graft_command(base, instruct, cpt, out, "--shard-size", "3000")
    with monkeypatch.context() as patch:
        full_disk_after(patch, shards=1)
        code, err = run(capsys, *args)
    assert code == 2 and f"pdmoe graft: error: {NO_SPACE}: {out}/.model-00002-of-" in err
    assert read_marker(out).state is OutputState.WRITING
    assert not (out / "model.safetensors.index.json").exists() and not (out / "graft.json").exists()
    code, err = run(capsys, *args)
    assert code == 2 and "pass --resume to finish the interrupted run" in err
    assert run(capsys, *args, "--resume")[0] == 0
    assert read_marker(out).state is OutputState.COMPLETE


def test_disk_full_before_the_first_graft_shard_leaves_no_folder(tmp_path: Path, capsys, monkeypatch) -> None:
    base, instruct, cpt = make(tmp_path, moe=True)
    full_disk_after(monkeypatch, shards=0)
    code, err = run(capsys, *graft_command(base, instruct, cpt, tmp_path / "o"))
    assert code == 2 and NO_SPACE in err and not (tmp_path / "o").exists()


def test_unreadable_data_file(tmp_path: Path, models, capsys, monkeypatch) -> None:
    path = tmp_path / "fr.txt"
    path.write_text("bonjour\n")
    opened = Path.open

    def refuse(self: Path, *args, **kwargs):
        if self == path:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return opened(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refuse)
    args = [
        "eval",
        "--model",
        models[1],
        "--data",
        path,
        "--lang",
        "fr",
        "--new-langs",
        "fr",
        "--cache-dir",
        tmp_path / "c",
    ]
    code, err = run(capsys, *args)
    assert (code, err) == (
        2,
        f"pdmoe eval: error: Permission denied: {path}; check the permissions of that path\n",
    )
    assert not list((tmp_path / "c").glob("*"))


def test_eval_json_to_an_unwritable_path_is_refused_before_evaluating(
    tmp_path: Path, models, capsys, monkeypatch
) -> None:
    monkeypatch.setattr("pdmoe.cpt.evaluate.evaluate_model", lambda *a, **k: pytest.fail("evaluated anyway"))
    (tmp_path / "fr.txt").write_text("bonjour\n")
    common = [
        "eval",
        "--model",
        models[1],
        "--data",
        tmp_path / "fr.txt",
        "--lang",
        "fr",
        "--new-langs",
        "fr",
    ]
    code, err = run(capsys, *common, "--json", "/nonexistent/x.json")
    assert (code, err) == (2, "pdmoe eval: error: --json /nonexistent/x.json: the folder /nonexistent does not exist; create it or choose another path\n")  # fmt: skip
    code, err = run(capsys, *common, "--plot", tmp_path)
    assert code == 2 and f"--plot {tmp_path} is a directory" in err


def test_disk_full_while_tokenising_leaves_no_partial_cache(
    tmp_path: Path, models, capsys, monkeypatch
) -> None:
    (tmp_path / "fr.txt").write_text("bonjour le monde\n" * 20)

    def full_after_some_tokens(cls, directory: Path, spec, tokenizer) -> dict:
        (directory / cls.TOKENS).write_bytes(b"\0" * 64)
        raise OSError(errno.ENOSPC, NO_SPACE, str(directory / cls.TOKENS))

    monkeypatch.setattr(TokenCache, "_tokenize_into", classmethod(full_after_some_tokens))
    args = ["eval", "--model", models[1], "--data", tmp_path / "fr.txt", "--lang", "fr", "--new-langs", "fr", "--cache-dir", tmp_path / "c"]  # fmt: skip
    code, err = run(capsys, *args)
    assert code == 2 and f"pdmoe eval: error: {NO_SPACE}: {tmp_path / 'c'}/." in err and "tokens.u32" in err
    assert list((tmp_path / "c").iterdir()) == []


def write_bytes(path: Path, chunks: list[bytes]) -> Path:
    path.write_bytes(b"".join(chunks))
    return path


@pytest.mark.parametrize("read_bytes", [7, 2**20], ids=["small-reads", "one-read"])
@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_non_utf8_data_reports_byte_and_line(
    tmp_path: Path, monkeypatch, read_bytes: int, suffix: str
) -> None:
    monkeypatch.setattr(corpus_formats, "_READ_BYTES", read_bytes)
    lines = [b'{"text": "h\xc3\xa9llo w\xc3\xb6rld"}\n'] * 3 + [b'{"text": "bad \xff here"}\n']
    path = write_bytes(tmp_path / f"data{suffix}", lines)
    position = len(b"".join(lines[:3])) + len(b'{"text": "bad ')
    spec = corpus_spec([path], ["fr"], [], ["fr"])
    with pytest.raises(
        DataError, match=rf"is not UTF-8 text \(invalid start byte at byte {position}, line 4\)"
    ):
        TokenCache.build(spec, byte_tokenizer(), tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_truncated_utf8_at_the_end_of_a_file(tmp_path: Path) -> None:
    path = write_bytes(tmp_path / "cut.txt", [b"ok\n", b"caf\xc3"])
    with pytest.raises(DataError, match=r"\(unexpected end of data at byte 6, line 2\)"):
        TokenCache.build(corpus_spec([path], ["fr"], [], ["fr"]), byte_tokenizer(), tmp_path / "cache")


def test_very_long_document_reaches_the_tokenizer_in_pieces(tmp_path: Path, monkeypatch) -> None:
    """A single-line document far longer than a tokenizer call may hold: bounded pieces, same tokens."""
    monkeypatch.setattr(corpus_formats, "MAX_PIECE_CHARS", 64)
    monkeypatch.setattr(data, "_TOKENIZE_CHUNK_CHARS", 200)
    words = " ".join(f"w{i}" for i in range(3000))
    (tmp_path / "long.txt").write_text(f"short one\n\n{words}\n\nlast\n")
    tokenizer = byte_tokenizer()
    seen: list[int] = []
    batch_encoder = data._batch_encoder

    def recording(tokenizer):
        encode = batch_encoder(tokenizer)

        def recorded(texts):
            seen.append(max(len(text) for text in texts))
            seen.append(sum(len(text) for text in texts))
            return encode(texts)

        return recorded

    monkeypatch.setattr(data, "_batch_encoder", recording)
    cache = TokenCache.build(
        corpus_spec([tmp_path / "long.txt"], ["fr"], [], ["fr"]), tokenizer, tmp_path / "c"
    )
    monkeypatch.undo()
    assert max(seen[0::2]) <= 64 and max(seen[1::2]) < 200 + 64
    expected = []
    for document in ("short one", words, "last"):
        expected += tokenizer(document, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert cache.tokens.tolist() == expected and cache.num_documents == 3


def test_jsonl_line_longer_than_the_limit(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(corpus_formats, "MAX_JSONL_LINE_CHARS", 100)
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"text": "x" * 300}) + "\n")
    with pytest.raises(
        DataError, match=r"long.jsonl line 2 is longer than 100 characters; split such documents"
    ):
        TokenCache.build(corpus_spec([path], ["fr"], [], ["fr"]), byte_tokenizer(), tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_staging_folder_of_a_dead_process_is_removed(tmp_path: Path) -> None:
    path = tmp_path / "fr.txt"
    path.write_text("bonjour\n")
    spec = corpus_spec([path], ["fr"], [], ["fr"])
    tokenizer = byte_tokenizer()
    root = tmp_path / "cache"
    key = cache_key(spec, tokenizer)
    dead, alive = 2**22 + 12345, os.getppid()
    for pid in (dead, alive):
        (root / f".{key}.{socket.gethostname()}.{pid}.partial").mkdir(parents=True)
    with pytest.raises(ProcessLookupError):
        os.kill(dead, 0)
    TokenCache.build(spec, tokenizer, root)
    assert sorted(p.name for p in root.iterdir()) == sorted(
        [key, f".{key}.{socket.gethostname()}.{alive}.partial"]
    )


def test_killed_graft_folder_is_refused_by_eval_and_graft(tmp_path: Path, capsys, monkeypatch) -> None:
    base, instruct, cpt = make(tmp_path, moe=True)
    out = tmp_path / "out"
    with monkeypatch.context() as patch, pytest.raises(OSError):
        full_disk_after(patch, shards=1)
        graft(base, instruct, cpt, out, GraftOptions(shard_size=3000))
    assert json.loads((out / MARKER).read_text())["state"] == "writing"
    (tmp_path / "fr.txt").write_text("bonjour\n")
    code, err = run(
        capsys, "eval", "--model", out, "--data", tmp_path / "fr.txt", "--lang", "fr", "--new-langs", "fr"
    )
    assert code == 2 and f"{out} is an unfinished `pdmoe graft` output" in err
