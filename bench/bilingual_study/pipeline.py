"""The whole study from verses to results: data, B and I, then every unit on a pool of workers.

Each unit runs in a worker process with a fixed number of threads and its own seeds, so its
numbers do not depend on which worker runs it or when: the same command gives the same numbers.
Finished stages are kept under DIR (keyed by the protocol), so an interrupted run continues;
a fresh DIR recomputes everything.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers

from .arms import Arm, Context, Unit, record, run_unit, units
from .corpus import Verse
from .foundation import train_base, train_instruct
from .prepare import Prepared, prepare
from .protocol import BASE_FIELDS, DATA_FIELDS, INSTRUCT_FIELDS, Protocol


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class StageKeys:
    """The cache key of each stage: what the stage's result depends on, so that a change to a later
    stage's settings (the SFT recipe, the CPT grid) reuses the data and B already computed."""

    data: str
    base: str
    instruct: str
    everything: str


def stage_keys(protocol: Protocol, verses: list[Verse]) -> StageKeys:
    settings = protocol.to_dict()
    sample = [asdict(v) for v in verses[:: max(1, len(verses) // 1000)]]
    data = _key({name: settings[name] for name in DATA_FIELDS}, protocol.model.vocab, sample, len(verses))
    base = _key(data, {name: settings[name] for name in BASE_FIELDS})
    instruct = _key(base, {name: settings[name] for name in INSTRUCT_FIELDS})
    return StageKeys(data, base, instruct, _key(settings, sample, len(verses)))


@dataclass
class Reuse:
    """The stages that an earlier run into the same folder had computed (``earlier``, reported),
    told apart from those this run computed and then read again (``computed``)."""

    earlier: list[str] = field(default_factory=list)
    computed: set[str] = field(default_factory=set)

    def found(self, name: str) -> None:
        if name not in self.computed and name not in self.earlier:
            self.earlier.append(name)


def _cached(path: Path, key: str, compute: Callable[[], Any], reuse: Reuse) -> Any:
    """``compute()``'s JSON result, stored at ``path`` with ``key``; reused while the key matches."""
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            reuse.found(path.stem)
            return stored["value"]
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "value": value}, indent=1) + "\n")
    reuse.computed.add(path.stem)
    return value


@dataclass(frozen=True)
class Foundation:
    """The prepared data and the two models every arm starts from, with their training logs."""

    keys: StageKeys
    data: Prepared
    base: Path
    base_log: dict
    instruct: Path
    instruct_log: dict


def foundation(
    protocol: Protocol,
    verses: list[Verse],
    root: Path,
    log: Callable[[str], None],
    seconds: dict[str, float],
    reuse: Reuse,
) -> Foundation:
    """Data, B and I under ``root``, each reused while its stage key matches; B and I sit in folders
    named by their keys, so the candidates of the pilot share one B and keep one I each."""
    keys = stage_keys(protocol, verses)
    data_dir, models, cache = root / "data", root / "models", root / "token-cache"
    base_dir, instruct_dir = models / f"B-{keys.base}", models / f"I-{keys.instruct}"

    def prepared() -> dict:
        shutil.rmtree(data_dir, ignore_errors=True)
        return prepare(verses, protocol, data_dir).stats

    def base() -> dict:
        shutil.rmtree(base_dir, ignore_errors=True)
        train_base(protocol, data, base_dir, cache, log)
        return json.loads((base_dir / "training.json").read_text())

    def instruct() -> dict:
        shutil.rmtree(instruct_dir, ignore_errors=True)
        train_instruct(protocol, data, base_dir, instruct_dir, cache, log)
        return json.loads((instruct_dir / "training.json").read_text())

    clock = time.perf_counter()
    data = Prepared(data_dir, _cached(root / "data.json", keys.data, prepared, reuse))
    seconds["data"] = seconds.get("data", 0.0) + time.perf_counter() - clock
    log(f"data: {data.stats['tokens']}")
    clock = time.perf_counter()
    base_log = _cached(base_dir.with_suffix(".json"), keys.base, base, reuse)
    seconds["base"] = seconds.get("base", 0.0) + time.perf_counter() - clock
    log(f"B: loss {base_log['losses'][0]:.3f} -> {base_log['losses'][-1]:.3f} in {base_log['seconds']:.0f} s")
    clock = time.perf_counter()
    instruct_log = _cached(instruct_dir.with_suffix(".json"), keys.instruct, instruct, reuse)
    seconds["instruct"] = seconds.get("instruct", 0.0) + time.perf_counter() - clock
    first, last = instruct_log["losses"][0], instruct_log["losses"][-1]
    log(f"I: loss {first:.3f} -> {last:.3f} in {instruct_log['seconds']:.0f} s")
    return Foundation(keys, data, base_dir, base_log, instruct_dir, instruct_log)


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    transformers.utils.logging.disable_progress_bar()


def _run(args: tuple[Unit, Context]) -> list[dict]:
    return run_unit(*args)


def run_study(
    verses: list[Verse],
    protocol: Protocol,
    out: Path,
    *,
    keep_models: bool,
    log: Callable[[str], None],
) -> dict:
    """Run every stage; returns {protocol, data, records, seconds, reused}: ``seconds`` are this
    call's, and ``reused`` names what an earlier call into ``out`` had computed already."""
    _init_worker(protocol.foundation_threads)
    seconds: dict[str, float] = {}
    reuse = Reuse()
    root = out / "work"
    found = foundation(protocol, verses, root, log, seconds, reuse)
    key = found.keys.everything
    cache = root / "token-cache"
    ctx = Context(
        protocol,
        found.data.root,
        found.base,
        found.instruct,
        root / "units",
        cache,
        keep_models,
    )
    clock = time.perf_counter()
    foundation_records = _cached(
        root / "foundation-test.json",
        key,
        lambda: [
            record(ctx, Arm.BASE, ctx.base, None, _summary(found.base_log)),
            record(ctx, Arm.INSTRUCT, ctx.instruct, None, _summary(found.instruct_log)),
        ],
        reuse,
    )
    seconds["eval_foundation"] = time.perf_counter() - clock

    clock = time.perf_counter()
    todo = units(protocol)
    results: dict[str, list[dict]] = {}
    pending = []
    for unit in todo:
        path = root / "runs" / f"test-{unit.name}.json"
        unit_key = _key(key, unit)
        if path.is_file() and json.loads(path.read_text()).get("key") == unit_key:
            results[unit.name] = json.loads(path.read_text())["value"]
            reuse.found(path.stem)
        else:
            pending.append((unit, path, unit_key))
    if pending:
        context = multiprocessing.get_context("spawn")
        pool = context.Pool(protocol.workers, _init_worker, (protocol.threads,))
        try:
            jobs = pool.imap(_run, [(unit, ctx) for unit, _, _ in pending])
            for (unit, path, unit_key), value in zip(pending, jobs, strict=True):
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps({"key": unit_key, "value": value}, indent=1) + "\n")
                results[unit.name] = value
                log(f"{unit.name}: " + "; ".join(_short(r) for r in value))
            pool.close()
        except BaseException:
            pool.terminate()
            raise
        finally:
            pool.join()
    seconds["units"] = time.perf_counter() - clock
    records = [*foundation_records, *(r for unit in todo for r in results[unit.name])]
    return {
        "protocol": protocol.to_dict(),
        "data": found.data.stats,
        "records": records,
        "seconds": seconds,
        "reused": reuse.earlier,
    }


def _short(record: dict) -> str:
    ev = record["eval"]
    return (
        f"{record['arm']} ppl {ev['en']['ppl']:.1f}/{ev['es']['ppl']:.1f}, "
        f"task {100 * ev['en']['exact']:.0f}/{100 * ev['es']['exact']:.0f} %"
    )


def _summary(log: dict) -> dict:
    losses = log["losses"]
    tenth = max(1, len(losses) // 10)
    return {
        "loss_first": sum(losses[:tenth]) / tenth,
        "loss_last": sum(losses[-tenth:]) / tenth,
        "seconds": log["seconds"],
    }
