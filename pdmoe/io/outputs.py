"""Outputs: one guard, the same for every path a command writes.

Every path a command writes is declared as an ``Output`` (an output folder, or a single file such
as ``eval --json``) and checked by ``check_outputs`` before any work starts, all of a command's
outputs together, against all its inputs. ``claim_output`` then holds a folder for the whole run:

* an output that is, contains, or lies inside an input or another output is refused; paths are
  resolved through symlinks, and an input's links count by their targets (a Hugging Face snapshot
  is links into ``blobs/``);
* an exclusive lock (``OUT/.pdmoe.lock``: an ``flock`` plus the holder's pid, host and command for
  the message) keeps two runs out of one folder; the kernel drops the ``flock`` when a process
  dies, however it dies, so a lock file left by a killed run is stale and is taken over; the lock
  file is opened without following links, and anything but a regular file there is refused;
* a non-empty OUT is touched only when it is pdmoe's own: ``resume`` continues only an output of
  the same command, ``overwrite`` deletes only a folder that holds pdmoe's marker; anything
  else is refused before a single file changes;
* the marker ``OUT/pdmoe-output.json`` records the command, its settings and inputs, pdmoe's
  version and the state: ``writing`` from the claim on, ``complete`` only once the command has
  finished (``OutputFolder.finish``). A killed run leaves ``writing``, and pdmoe refuses to read
  a checkpoint in that state (``refuse_unfinished``), so an interrupted output never passes for a
  finished one.

A single-file output is never inside a model folder or a folder pdmoe wrote, never a link, a
folder or a device, and replaces an existing file only under ``overwrite``.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import shutil
import socket
import stat
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from enum import Enum
from pathlib import Path
from types import TracebackType
from typing import Any

from pdmoe.errors import CheckpointError, Option, Problem, UsageError
from pdmoe.io.atomic import write_text_atomic
from pdmoe.io.strict_json import read_json_object
from pdmoe.version import pdmoe_version

MARKER = "pdmoe-output.json"
LOCK = ".pdmoe.lock"
_FREE_SPACE_MARGIN = 64 * 1024 * 1024


class Command(Enum):
    """The commands that write an output folder."""

    UPCYCLE = "upcycle"
    GRAFT = "graft"
    CPT = "cpt"
    DEMO = "demo"
    EXPORT = "export"
    STUDY = "study"  # bench/study.py: continues its own folder on every run

    @property
    def program(self) -> str:
        """How the user runs it, for messages."""
        return "bench/study.py" if self is Command.STUDY else f"pdmoe {self.value}"


# Commands whose interrupted output is finished by running them again with ``resume``: the value that
# says so (graft's is a switch; cpt's names the checkpoint, the newest being "latest").
RESUME: dict[Command, Option] = {
    Command.GRAFT: Option("resume", True),
    Command.CPT: Option("resume", "latest"),
}
RESUMABLE = tuple(RESUME)
# Outputs a resumed run continues (the study continues its folder on every run); others are written anew.
_CONTINUED = (*RESUMABLE, Command.STUDY)


class OutputState(Enum):
    """Where the run that writes a folder is: still writing (or killed), or done."""

    WRITING = "writing"
    COMPLETE = "complete"


@dataclass(frozen=True)
class OutputRecord:
    """The marker's content: what wrote the folder, with which settings, and whether it finished."""

    command: Command
    state: OutputState
    settings: dict[str, Any]
    inputs: list[str]
    pdmoe_version: str
    started: str
    finished: str | None = None

    def to_json(self) -> str:
        payload = {**asdict(self), "command": self.command.value, "state": self.state.value}
        return json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n"


def read_marker(directory: str | Path) -> OutputRecord | None:
    """The marker of a folder pdmoe wrote, or None when there is none."""
    path = Path(directory) / MARKER
    if not path.is_file():
        return None
    data = read_json_object(path)
    try:
        return OutputRecord(
            command=Command(data["command"]),
            state=OutputState(data["state"]),
            settings=dict(data["settings"]),
            inputs=list(data["inputs"]),
            pdmoe_version=str(data["pdmoe_version"]),
            started=str(data["started"]),
            finished=data.get("finished"),
        )
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path} is not a pdmoe output marker pdmoe can read") from None


OVERWRITE = Option("overwrite", True)


def refuse_unfinished(directory: str | Path) -> None:
    """A CheckpointError when ``directory`` is a pdmoe output whose run has not finished."""
    record = read_marker(directory)
    if record is not None and record.state is not OutputState.COMPLETE:
        rerun = (
            "finish it with the same `{program}` and {resume}"
            if record.command in RESUMABLE
            else "run `{program}` again"
        )
        raise CheckpointError(
            "{directory} is an unfinished `{program}` output (interrupted, or still being written); "
            + rerun
            + ", or use a finished checkpoint",
            directory=directory,
            program=record.command.program,
            resume=RESUME.get(record.command),
        )


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class _Lock:
    """An exclusive ``flock`` on ``directory/LOCK``, its file naming the holder."""

    def __init__(self, directory: Path, command: Command, option: str) -> None:
        self.path = directory / LOCK
        self._fd: int | None = None
        while True:
            fd = self._open(directory, option)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._describe_holder(fd)
                os.close(fd)
                raise CheckpointError(
                    "{directory} is in use by another pdmoe run ({holder}); wait for it to finish, "
                    "or choose another {out}",
                    directory=directory,
                    holder=holder,
                    out=Option(option),
                ) from None
            except OSError as error:
                os.close(fd)
                raise CheckpointError(
                    "cannot lock {path} ({reason}); pdmoe needs a file system with file locks for its "
                    "outputs: choose another {out}",
                    path=self.path,
                    reason=error.strerror,
                    out=Option(option),
                ) from None
            # A run releasing the lock unlinks the file: hold it only if it is still the one in place.
            with contextlib.suppress(FileNotFoundError):
                if os.path.samestat(os.fstat(fd), os.lstat(self.path)):
                    break
            os.close(fd)
        self._fd = fd
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": command.value, "since": _now()}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(holder).encode())

    def _open(self, directory: Path, option: str) -> int:
        """The lock file, never through a link: a planted symlink, folder or device is refused."""
        refusal = CheckpointError(
            "{path} is not a regular file (a link, a folder, ...) and pdmoe did not make it; "
            "remove it, or choose another {out}",
            path=self.path,
            out=Option(option),
        )
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as error:
            if error.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
                raise refusal from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise refusal
        return fd

    @staticmethod
    def _describe_holder(fd: int) -> str:
        try:
            holder = json.loads(os.pread(fd, 4096, 0))
            return (
                f"pdmoe {holder['command']}, pid {holder['pid']} on {holder['host']}, since {holder['since']}"
            )
        except (ValueError, KeyError, TypeError, OSError):
            return "holder unknown"

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def __del__(self) -> None:
        self.release()


@dataclass(frozen=True)
class Output:
    """A path a command writes, named by the option that gives it: a folder claimed for ``command``,
    or a single file when ``command`` is None."""

    path: Path
    option: str = "out"  # the option's field name, as errors name it (``Option``)
    command: Command | None = None


@dataclass(frozen=True)
class _Keep:
    """What an output must keep clear of: an input, or another output (given by ``option``), by its
    resolved path and the resolved targets of the links inside it (a Hugging Face snapshot links into
    ``blobs/``)."""

    shown: Path  # the path as messages name it
    path: Path
    targets: tuple[Path, ...] = ()
    option: str | None = None  # the option that gives another output; None for an input

    def values(self) -> dict[str, object]:
        """The values of the message templates below: ``{kept}``, and ``{kept_option}`` for an output."""
        return (
            {"kept": self.shown}
            if self.option is None
            else {"kept": self.shown, "kept_option": Option(self.option)}
        )

    @property
    def what(self) -> str:
        return "the input {kept}" if self.option is None else "{kept_option} {kept}"

    @property
    def same(self) -> str:
        """How an output at the same path is told."""
        return "is also an input" if self.option is None else "is also " + self.what


def _link_targets(folder: Path) -> tuple[Path, ...]:
    """Where the links below ``folder`` really point (links to folders are not descended into)."""
    if not folder.is_dir():
        return ()
    return tuple(
        (Path(root) / name).resolve()
        for root, folders, files in os.walk(folder)
        for name in (*folders, *files)
        if (Path(root) / name).is_symlink()
    )


def _input(path: str | Path) -> _Keep:
    real = Path(path).resolve()
    return _Keep(real, real, _link_targets(Path(path)))


def _resolved(output: Output) -> Path:
    """Where ``output`` really is: a folder through every link (pdmoe writes into what a link names),
    a file through the links of its folder only (pdmoe never writes through a link)."""
    path = output.path
    if output.command is not None or not path.name:
        return path.resolve()
    return path.parent.resolve() / path.name


def _overlap(out: Path, keep: _Keep) -> tuple[str, dict[str, object]] | None:
    """How the resolved output path ``out`` collides with ``keep`` (a message template and its
    values), or None."""
    values = keep.values()
    if out == keep.path:
        return keep.same, values
    if out in keep.path.parents:
        return "contains " + keep.what, values
    if keep.path in out.parents:
        return "lies inside " + keep.what, values
    for target in keep.targets:
        if out == target or out in target.parents or target in out.parents:
            relation = "lies inside" if target in out.parents else "contains"
            return f"{relation} {{target}}, a file that {keep.what} links to", {**values, "target": target}
    return None


def _entries(directory: Path) -> list[Path]:
    return sorted(path for path in directory.iterdir() if path.name != LOCK)


def _file_states(directory: Path) -> dict[str, tuple[int, int]]:
    """Size and modification time of every file below ``directory`` but the marker and the lock."""
    states = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = Path(root) / name
            if path.parent == directory and name in (MARKER, LOCK):
                continue
            with contextlib.suppress(FileNotFoundError):
                stat = path.lstat()
                states[str(path.relative_to(directory))] = (stat.st_size, stat.st_mtime_ns)
    return states


def _remove_entries(directory: Path) -> None:
    """Delete everything in ``directory`` but the lock; symlinks are removed, never followed."""
    for path in _entries(directory):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


class OutputFolder:
    """An output folder claimed for one run: locked, marked ``writing`` until ``finish()``.

    As a context manager it releases the lock on every exit; when the body fails and
    ``keep_partial`` is false, it first removes what this run wrote (``discard``).
    """

    def __init__(
        self,
        path: Path,
        record: OutputRecord,
        lock: _Lock,
        *,
        created: list[Path],
        previous: OutputRecord | None,
        keep_partial: bool,
    ) -> None:
        self.path = path
        self.record = record
        self.keep_partial = keep_partial
        self._lock: _Lock | None = lock
        self._created = created  # folders this run created, outermost first
        self._previous = previous  # the marker of the output this run resumes
        self._previous_files = _file_states(path) if previous is not None else None

    def _write_marker(self) -> None:
        write_text_atomic(self.path / MARKER, self.record.to_json())

    def finish(self) -> None:
        """Mark the output complete (the last write of a run) and release the lock."""
        self.record = replace(self.record, state=OutputState.COMPLETE, finished=_now())
        self._write_marker()
        self.release()

    def discard(self) -> None:
        """Remove what this run wrote: the folder's contents when they are all this run's, and the
        folders it created. An earlier run's output (``resume``) is left as it is."""
        if self._previous is None:
            _remove_entries(self.path)
        self.release()
        for folder in reversed(self._created):
            with contextlib.suppress(OSError):  # not empty: something else appeared there meanwhile
                folder.rmdir()

    def release(self) -> None:
        """Unlock. A resumed output that this run left unfinished but unchanged (it failed before
        writing) gets its earlier marker back: a refused ``--resume`` does not unfinish a finished output."""
        if self._lock is None:
            return
        if (
            self.record.state is OutputState.WRITING
            and self._previous is not None
            and _file_states(self.path) == self._previous_files
        ):
            self.record = self._previous
            self._write_marker()
        self._lock.release()
        self._lock = None

    def __del__(self) -> None:
        self.release()

    def __enter__(self) -> OutputFolder:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None and not self.keep_partial:
            self.discard()
        self.release()


def _make_folders(out: Path, option: str) -> list[Path]:
    """Create ``out`` and its missing parents; returns those created, outermost first."""
    missing = [path for path in (out, *out.parents) if not path.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise CheckpointError(
            "cannot create {path}: a part of that path is a file or a broken link; choose another {out}",
            path=out,
            out=Option(option),
        ) from None
    except OSError as error:
        raise CheckpointError(
            "cannot create {path} ({reason}); choose another {out}",
            path=out,
            reason=error.strerror,
            out=Option(option),
        ) from None
    return list(reversed(missing))


def check_outputs(
    outputs: Iterable[Output],
    *,
    inputs: Iterable[str | Path] = (),
    overwrite: bool = False,
    resume: bool = False,
) -> None:
    """Refuse now, changing nothing, what writing any of ``outputs`` would break: called before any
    work, with every output a command will write and all its inputs. Each output is checked against
    every input (and the real files its links point to) and against the other outputs; a folder by
    the rules of ``claim_output``, a single file by those of ``_check_file``."""
    if resume and overwrite:
        raise UsageError(
            "{resume} continues what is in OUT and {overwrite} deletes it; pass only one",
            problem=Problem.CONFLICT,
            resume=Option("resume"),
            overwrite=Option("overwrite"),
        )
    outputs, kept_inputs = list(outputs), [_input(path) for path in inputs]
    for output in outputs:
        if output.command is None:
            _check_file_path(output)
        others = [
            _Keep(other.path, _resolved(other), option=other.option)
            for other in outputs
            if other is not output
        ]
        for kept in (*kept_inputs, *others):
            if overlap := _overlap(_resolved(output), kept):
                relation, values = overlap
                named = "output directory {path}" if output.command else "{out} {path}"
                raise CheckpointError(
                    f"{named} {relation}; choose another {{out}}",
                    problem=Problem.CONFLICT,
                    path=output.path,
                    out=Option(output.option),
                    **values,
                )
        if output.command is None:
            _check_file(output, overwrite=overwrite)
        else:  # resume continues the resumable outputs; the others are written anew
            _check_folder(output, overwrite=overwrite, resume=resume and output.command in _CONTINUED)


def check_output(
    out: str | Path,
    command: Command,
    *,
    inputs: Iterable[str | Path] = (),
    overwrite: bool = False,
    resume: bool = False,
    option: str = "out",
) -> None:
    """``check_outputs`` of one output folder: for a command that prepares for long (tokenising,
    loading) before it claims its output."""
    check_outputs([Output(Path(out), option, command)], inputs=inputs, overwrite=overwrite, resume=resume)


def _check_folder(output: Output, *, overwrite: bool, resume: bool) -> None:
    out, option = output.path, Option(output.option)
    if out.is_symlink() and not out.is_dir():
        raise CheckpointError(
            "{out} {path} is a broken link; choose another {out}",
            problem=Problem.INVALID,
            out=option,
            path=out,
        )
    if out.exists() and not out.is_dir():
        raise CheckpointError(
            "{path} exists and is not a directory; choose another {out}",
            problem=Problem.INVALID,
            out=option,
            path=out,
        )
    if out.is_dir():
        assert output.command is not None
        _check_contents(
            out, output.command, overwrite=overwrite, resume=resume, empty=False, option=output.option
        )


def _check_file_path(output: Output) -> None:
    """A single-file output (``eval --json``) names a file in an existing folder: not a link, a
    folder or a device."""
    path, folder = output.path, output.path.parent
    if not folder.is_dir():
        refusal = "{out} {path}: the folder {folder} does not exist; create it or choose another path"
    elif path.is_symlink():
        refusal = "{out} {path} is a link; pdmoe never writes through links: give a plain file path"
    elif path.is_dir():
        refusal = "{out} {path} is a directory; give a file path"
    elif path.exists() and not path.is_file():
        refusal = "{out} {path} is not a regular file; give a file path"
    else:
        return
    raise UsageError(refusal, problem=Problem.INVALID, out=Option(output.option), path=path, folder=folder)


def _check_file(output: Output, *, overwrite: bool) -> None:
    """A single-file output is not inside a folder pdmoe wrote or a model folder; an existing file is
    replaced only under ``overwrite`` and only when it is writable; its folder is writable."""
    path, folder, option = output.path, output.path.parent, Option(output.option)
    real = _resolved(output)
    for parent in real.parents:
        if (parent / MARKER).is_file() or (parent == real.parent and (parent / "config.json").is_file()):
            raise UsageError(
                "{out} {path} lies inside the model or pdmoe output folder {parent}; write it outside that folder",
                problem=Problem.CONFLICT,
                out=option,
                path=path,
                parent=parent,
            )
    if path.exists():
        if not overwrite:
            raise UsageError(
                "{out} {path} exists; pass {overwrite} to replace it, or choose another path",
                problem=Problem.REFUSED,
                out=option,
                path=path,
                overwrite=OVERWRITE,
            )
        if not os.access(path, os.W_OK):
            raise UsageError(
                "{out} {path} is read-only; make it writable or choose another path",
                problem=Problem.INVALID,
                out=option,
                path=path,
            )
    probe = folder / f".{path.name}.pdmoe-probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        probe.unlink()
    except FileExistsError:
        pass  # a probe of a concurrent run: the folder is writable
    except OSError as error:
        raise UsageError(
            "{out} {path}: cannot write in {folder} ({reason}); choose another path",
            problem=Problem.INVALID,
            out=option,
            path=path,
            folder=folder,
            reason=error.strerror,
        ) from None


def claim_output(
    out: str | Path,
    command: Command,
    *,
    inputs: Iterable[str | Path] = (),
    overwrite: bool = False,
    resume: bool = False,
    settings: Mapping[str, Any] | None = None,
    keep_partial: bool = False,
    option: str = "out",
) -> OutputFolder:
    """Claim ``out`` for a run of ``command`` (see the module docstring); refuses before changing anything.

    ``keep_partial`` keeps what a failed run wrote (for ``--resume``) instead of removing it.
    """
    out = Path(out)
    sources = [Path(source) for source in inputs]
    check_output(out, command, inputs=sources, overwrite=overwrite, resume=resume, option=option)
    created = _make_folders(out, option)
    lock = _Lock(out, command, option)
    try:
        previous = _check_contents(
            out, command, overwrite=overwrite, resume=resume, empty=True, option=option
        )
        record = OutputRecord(
            command=command,
            state=OutputState.WRITING,
            settings=dict(settings or {}),
            inputs=[str(source.resolve()) for source in sources],
            pdmoe_version=pdmoe_version(),
            started=_now(),
        )
        folder = OutputFolder(
            out, record, lock, created=created, previous=previous, keep_partial=keep_partial
        )
        folder._write_marker()
    except BaseException:
        lock.release()
        for path in reversed(created):
            with contextlib.suppress(OSError):
                path.rmdir()
        raise
    return folder


def _check_contents(
    out: Path, command: Command, *, overwrite: bool, resume: bool, empty: bool, option: str
) -> OutputRecord | None:
    """Refuse a non-empty folder pdmoe may not touch; under ``overwrite``, ``empty`` it. Returns the
    marker of the earlier run when this one resumes it, None when the folder is (to be) empty."""
    if not _entries(out):
        return None
    record = read_marker(out)
    values = {
        "path": out,
        "out": Option(option),
        "marker": MARKER,
        "program": command.program,
        "resume": Option("resume"),
        "resume_it": RESUME.get(command),
        "overwrite": OVERWRITE,
    }
    if resume:
        named = "{resume}: " if command in RESUMABLE else ""
        if record is None:
            raise CheckpointError(
                named + "{path} was not written by pdmoe (it has no {marker}); pdmoe continues only its own "
                "`{program}` output: choose another {out}",
                problem=Problem.REFUSED,
                **values,
            )
        if record.command is not command:
            raise CheckpointError(
                named + "{path} is a `{found}` output, not a `{program}` one; choose another {out}",
                problem=Problem.REFUSED,
                found=record.command.program,
                **values,
            )
        return record
    if overwrite:
        if record is None:
            raise CheckpointError(
                "{overwrite}: {path} holds files pdmoe did not write (it has no {marker}); pdmoe deletes "
                "only its own outputs: remove them yourself or choose another {out}",
                problem=Problem.REFUSED,
                **values,
            )
        if empty:
            _remove_entries(out)
        return None
    if record is None:
        hint = "choose another {out} (pdmoe replaces only folders it wrote)"
    elif record.command is command and record.state is OutputState.WRITING and command in RESUMABLE:
        hint = "pass {resume_it} to finish the interrupted run, or {overwrite} to replace it"
    else:
        hint = "pass {overwrite} to replace it"
    raise CheckpointError("output directory {path} is not empty; " + hint, problem=Problem.REFUSED, **values)


def ensure_free_space(out_dir: Path, needed_bytes: int, option: str = "out") -> None:
    free = shutil.disk_usage(out_dir).free
    if free < needed_bytes + _FREE_SPACE_MARGIN:
        raise CheckpointError(
            "{path} has {free:.2f} GiB free but the output needs {needed:.2f} GiB; free some space or "
            "choose another {out}",
            path=out_dir,
            free=free / 2**30,
            needed=needed_bytes / 2**30,
            out=Option(option),
        )
