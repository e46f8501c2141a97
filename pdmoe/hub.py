"""Model references: a local checkpoint folder, or a Hugging Face Hub id with an optional revision.

Every command and public function that reads a model resolves its reference here, once, at its
entry: ``./llama-moe`` (a folder), ``meta-llama/Llama-3.2-1B`` or ``meta-llama/Llama-3.2-1B@<rev>``
(a branch, tag or commit). A hub id is looked up in the local Hugging Face cache first (``HF_HOME``,
``HF_HUB_CACHE``), so a cached model needs no network; only when it is missing or incomplete there,
and the hub is not switched off (``HF_HUB_OFFLINE=1``), are its files downloaded, and then only
what pdmoe reads: safetensors weights, the config, tokenizer and generation files. Pickled
``.bin`` weights are never fetched. A revision must be a valid branch / tag name, a commit or
``refs/pr/N``, and the snapshot it names must lie in the model's folder of the cache.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

from pdmoe.errors import CheckpointError
from pdmoe.io.model_config import INDEX_FILE, SINGLE_FILE, check_model_folder
from pdmoe.io.side_files import SIDE_FILES

CONFIG_FILE = "config.json"
# What a download fetches: weights (safetensors only), config, tokenizer and generation files.
DOWNLOAD_PATTERNS = ("*.safetensors", INDEX_FILE, CONFIG_FILE, *SIDE_FILES)
_HUB_ID = re.compile(r"^(?P<repo>[\w.-]+(?:/[\w.-]+)?)(?:@(?P<revision>.+))?\Z")
# Revisions: a commit, a hub pull request, or a branch / tag name by git's check-ref-format rules
# (no `..`, `@{`, `//`, control characters, space, ~ ^ : ? * [ or a backslash; no component
# starting with `.` or ending in `.lock`; not starting with `-` or `/`, not ending with `/` or `.`;
# not `@`). None of these can name a path outside the cache.
_COMMIT = re.compile(r"[0-9a-f]{40}")
_PULL_REQUEST = re.compile(r"refs/pr/[0-9]+")
_REF_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|//")


def parse_hub_id(reference: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``reference`` reads as ``ORG/NAME[@REVISION]``, else None."""
    match = _HUB_ID.match(reference)
    if match is None or reference.startswith((".", "~")):
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(match["repo"])
    except HFValidationError:
        return None
    return match["repo"], match["revision"]


def check_revision(reference: str, revision: str) -> None:
    """A CheckpointError unless ``revision`` is a 40-hex commit, ``refs/pr/N`` or a valid git ref name."""
    if _COMMIT.fullmatch(revision) or _PULL_REQUEST.fullmatch(revision):
        return
    if (
        revision == "@"
        or _REF_FORBIDDEN.search(revision)
        or revision.startswith(("-", "/"))
        or revision.endswith(("/", "."))
        or any(part.startswith(".") or part.endswith(".lock") for part in revision.split("/"))
    ):
        raise CheckpointError(
            f"{reference}: {revision!r} is not a revision name; give a branch or tag name (git's ref "
            "rules), a 40-hex commit or refs/pr/N"
        )


def _check_inside_cache(reference: str, repo_id: str, folder: Path) -> Path:
    """``folder`` when it is a snapshot of ``repo_id`` in the cache: a planted ref file cannot send
    pdmoe to another folder."""
    from huggingface_hub import constants

    snapshots = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    if folder.resolve().parent != snapshots.resolve():
        raise CheckpointError(
            f"{reference} resolves to {folder}, outside its snapshots in the Hugging Face cache ({snapshots}); "
            "the cache's ref files are damaged: delete that model from the cache and download it again"
        )
    return folder


def missing_files(folder: Path) -> list[str]:
    """What a checkpoint folder lacks to be read: its config, or the weights its index names."""
    missing = [] if (folder / CONFIG_FILE).is_file() else [CONFIG_FILE]
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        except ValueError:
            return [*missing, f"a readable {INDEX_FILE}"]
        missing += sorted(shard for shard in shards if not (folder / shard).is_file())
    elif not (folder / SINGLE_FILE).is_file():
        missing.append(f"{SINGLE_FILE} or {INDEX_FILE}")
    return missing


def resolve_model(reference: str | os.PathLike[str]) -> Path:
    """The local folder of a model reference (folder or hub id), downloading it when allowed.

    A folder that exists wins over a hub id of the same spelling. Errors are one line naming the
    reference and what to do.
    """
    path = Path(reference).expanduser()
    if path.exists() or (hub_id := parse_hub_id(os.fspath(reference))) is None:
        check_model_folder(path)
        return path
    text = os.fspath(reference)
    repo_id, revision = hub_id
    if revision is not None:
        check_revision(text, revision)

    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    cached: Path | None = None
    # a revision naming a folder of refs/ (`pr` when a branch `pr/x` is cached) is no cached revision
    with contextlib.suppress(
        LocalEntryNotFoundError, FileNotFoundError, IsADirectoryError, NotADirectoryError
    ):
        cached = Path(
            snapshot_download(
                repo_id, revision=revision, allow_patterns=list(DOWNLOAD_PATTERNS), local_files_only=True
            )
        )
    if cached is not None:
        cached = _check_inside_cache(text, repo_id, cached)
        if not missing_files(cached):
            return cached
    if constants.HF_HUB_OFFLINE:
        where = (
            f"is in the Hugging Face cache but lacks {', '.join(missing_files(cached))}"
            if cached
            else (f"is neither a local folder nor in the Hugging Face cache ({constants.HF_HUB_CACHE})")
        )
        raise CheckpointError(
            f"{text} {where}, and HF_HUB_OFFLINE=1 forbids downloading it; "
            f"download it while online (hf download {repo_id}) or pass a checkpoint folder"
        )
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(DOWNLOAD_PATTERNS)))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"{text} is neither a local folder nor a model that could be downloaded from the Hugging Face Hub "
            f"({reason}); check the name, your network and `hf auth login` for gated models"
        ) from None
    lacking = missing_files(_check_inside_cache(text, repo_id, folder))
    if lacking:
        raise CheckpointError(
            f"{text} on the Hugging Face Hub lacks {', '.join(lacking)}; pdmoe reads safetensors weights "
            "only (pickled .bin weights are never downloaded)"
        )
    return folder
