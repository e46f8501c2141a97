"""Crash safety and --resume: an interrupted graft finishes into the same bytes as an uninterrupted one."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from pdmoe.graft import GraftOptions, graft
from pdmoe.graft.methods import MergeMethod, MergeSpec
from pdmoe.io.outputs import MARKER, OutputState, read_marker
from pdmoe.io.writer import ShardWriter
from tests.graft_checkpoints import make

SHARD_SIZE = 3000


def files(directory: Path) -> dict[str, bytes]:
    """The output's files but the two that record the run (options, times): manifest and marker."""
    return {
        p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.name not in ("graft.json", MARKER)
    }


def interrupt_after_first_shard(monkeypatch: pytest.MonkeyPatch) -> None:
    commit = ShardWriter.commit
    calls = []

    def failing_commit(self: ShardWriter) -> None:
        calls.append(self.path.name)
        if len(calls) == 2:
            raise OSError("simulated crash while writing the second shard")
        commit(self)

    monkeypatch.setattr(ShardWriter, "commit", failing_commit)


@pytest.fixture()
def inputs(tmp_path: Path) -> tuple[Path, Path, Path]:
    return make(tmp_path, moe=True)


def test_interrupted_run_leaves_nothing_that_looks_finished(tmp_path: Path, inputs, monkeypatch) -> None:
    interrupt_after_first_shard(monkeypatch)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="simulated crash"):
        graft(*inputs, out, GraftOptions(shard_size=SHARD_SIZE))
    assert not (out / "model.safetensors.index.json").exists()
    assert not (out / "graft.json").exists()
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) == 1 and shards[0].startswith("model-00001-of-")
    assert not list(out.glob(".*.partial"))
    assert read_marker(out).state is OutputState.WRITING


def test_resume_gives_the_same_bytes(tmp_path: Path, inputs, monkeypatch) -> None:
    clean = tmp_path / "clean"
    graft(*inputs, clean, GraftOptions(shard_size=SHARD_SIZE))

    out = tmp_path / "out"
    interrupt_after_first_shard(monkeypatch)
    with pytest.raises(OSError):
        graft(*inputs, out, GraftOptions(shard_size=SHARD_SIZE))
    monkeypatch.undo()
    report = graft(*inputs, out, GraftOptions(shard_size=SHARD_SIZE, resume=True))
    assert report.shards_skipped == 1
    assert report.shards_written == len(report.plan.shards) - 1
    assert files(out) == files(clean)
    manifest, clean_manifest = (json.loads((d / "graft.json").read_text()) for d in (out, clean))
    assert manifest["options"].pop("resume") and not clean_manifest["options"].pop("resume")
    assert manifest == clean_manifest
    assert read_marker(out).state is read_marker(clean).state is OutputState.COMPLETE

    again = graft(
        *inputs, out, GraftOptions(shard_size=SHARD_SIZE, resume=True)
    )  # a finished output: nothing to redo
    assert again.shards_written == 0 and files(out) == files(clean)


def test_resume_with_other_options_rewrites_every_shard(tmp_path: Path, inputs) -> None:
    out = tmp_path / "out"
    graft(*inputs, out, GraftOptions(shard_size=SHARD_SIZE))
    report = graft(*inputs, out, GraftOptions(shard_size=SHARD_SIZE, scale=0.5, resume=True))
    assert report.shards_skipped == 0
    fresh = tmp_path / "fresh"
    graft(*inputs, fresh, GraftOptions(shard_size=SHARD_SIZE, scale=0.5))
    assert files(out) == files(fresh)


def test_resume_with_another_shard_size_drops_stale_shards(tmp_path: Path, inputs) -> None:
    out = tmp_path / "out"
    graft(*inputs, out, GraftOptions(shard_size=SHARD_SIZE))
    graft(*inputs, out, GraftOptions(shard_size="1MB", resume=True))
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()


def test_resume_after_an_input_changed_rewrites_every_shard(tmp_path: Path, inputs) -> None:
    out = tmp_path / "out"
    graft(*inputs, out, GraftOptions(shard_size=SHARD_SIZE))
    cpt_file = inputs[2] / "model.safetensors"
    stamp = cpt_file.stat().st_mtime_ns
    os.utime(cpt_file, ns=(stamp + 10**9, stamp + 10**9))  # same header, maybe new values: not trusted
    assert graft(*inputs, out, GraftOptions(shard_size=SHARD_SIZE, resume=True)).shards_skipped == 0


def test_resume_with_other_merge_options_rewrites_every_shard(tmp_path: Path, inputs) -> None:
    out = tmp_path / "out"
    graft(*inputs, out, GraftOptions(shard_size=SHARD_SIZE, method="dare", density=0.5, seed=1))
    report = graft(
        *inputs, out, GraftOptions(shard_size=SHARD_SIZE, method="dare", density=0.5, seed=2, resume=True)
    )
    assert report.shards_skipped == 0
    fresh = tmp_path / "fresh"
    graft(*inputs, fresh, GraftOptions(shard_size=SHARD_SIZE, method="dare", density=0.5, seed=2))
    assert files(out) == files(fresh)


def test_every_merge_option_is_in_the_fingerprint(tmp_path: Path, inputs) -> None:
    """The fingerprint takes the spec's fields as declared: an option added to ``MergeSpec`` later
    (here a subclass with one more field) changes it without anyone listing it."""
    plan = graft(
        *inputs, tmp_path / "out", GraftOptions(method="dare", density=0.5, seed=1), dry_run=True
    ).plan
    extended = dataclasses.make_dataclass(
        "ExtendedSpec", [("new_option", int, dataclasses.field(default=0))], bases=(MergeSpec,), frozen=True
    )
    variants = [
        MergeSpec(MergeMethod.DARE, 0.5, 1),
        MergeSpec(MergeMethod.DARE, 0.25, 1),
        MergeSpec(MergeMethod.DARE, 0.5, 2),
        MergeSpec(MergeMethod.TIES, 0.5, 1),
        extended(MergeMethod.DARE, 0.5, 1, new_option=0),
        extended(MergeMethod.DARE, 0.5, 1, new_option=1),
    ]
    fingerprints = [dataclasses.replace(plan, merge=spec).fingerprint({}) for spec in variants]
    assert len(set(fingerprints)) == len(variants)
    assert fingerprints[0] == plan.fingerprint({})
