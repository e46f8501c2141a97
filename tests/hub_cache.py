"""A Hugging Face cache built on disk, laid out as huggingface_hub writes it, for tests without network.

HF_HOME/hub/models--ORG--NAME/blobs/<sha256>            file contents
HF_HOME/hub/models--ORG--NAME/snapshots/<commit>/FILE   symlinks to ../../blobs/<sha256>
HF_HOME/hub/models--ORG--NAME/refs/<branch or tag>      the commit it points to
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_model(hf_home: Path, repo_id: str, folder: Path, refs: tuple[str, ...] = ("main",)) -> str:
    """Put the files of ``folder`` into the cache as ``repo_id`` at a new commit; returns the commit."""
    repo = Path(hf_home) / "hub" / f"models--{repo_id.replace('/', '--')}"
    files = sorted(path for path in Path(folder).iterdir() if path.is_file())
    digests = {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in files}
    commit = hashlib.sha1(repr(sorted(digests.items())).encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for path in files:
        digest = digests[path.name]
        blob = repo / "blobs" / digest
        if not blob.exists():
            blob.write_bytes(path.read_bytes())
        os.symlink(f"../../blobs/{digest}", snapshot / path.name)
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return commit
