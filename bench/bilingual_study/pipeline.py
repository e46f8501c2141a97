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
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import transformers

from .arms import Arm, Context, Unit, record, run_unit, units
from .corpus import Verse
from .foundation import train_base, train_instruct
from .prepare import Prepared, prepare
from .protocol import Protocol


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cached(path: Path, key: str, compute: Callable[[], Any], reused: list[str]) -> Any:
    """``compute()``'s JSON result, stored at ``path`` with ``key``; reused while the key matches
    (then ``path``'s stem is appended to ``reused``)."""
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            reused.append(path.stem)
            return stored["value"]
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "value": value}, indent=1) + "\n")
    return value


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
    split: str,
    grafts: bool,
    matched_lr: float | None,
    keep_models: bool,
    log: Callable[[str], None],
) -> dict:
    """Run every stage; returns {protocol, data, records, seconds, reused}: ``seconds`` are this
    call's, and ``reused`` names what an earlier call into ``out`` had computed already."""
    _init_worker(protocol.foundation_threads)
    seconds: dict[str, float] = {}
    reused: list[str] = []
    clock = time.perf_counter()
    key = _key(protocol.to_dict(), [asdict(v) for v in verses[:: max(1, len(verses) // 1000)]], len(verses))
    root = out / "work"
    data_dir, models, cache = root / "data", root / "models", root / "token-cache"

    def prepared() -> dict:
        shutil.rmtree(data_dir, ignore_errors=True)
        return prepare(verses, protocol, data_dir).stats

    stats = _cached(root / "data.json", key, prepared, reused)
    data = Prepared(data_dir, stats)
    seconds["data"] = time.perf_counter() - clock
    log(f"data: {stats['tokens']}")

    def base() -> dict:
        shutil.rmtree(models / "B", ignore_errors=True)
        train_base(protocol, data, models / "B", cache, log)
        return json.loads((models / "B" / "training.json").read_text())

    def instruct() -> dict:
        shutil.rmtree(models / "I", ignore_errors=True)
        train_instruct(protocol, data, models / "B", models / "I", cache, log)
        return json.loads((models / "I" / "training.json").read_text())

    clock = time.perf_counter()
    base_log = _cached(models / "B.json", key, base, reused)
    seconds["base"] = time.perf_counter() - clock
    log(f"B: loss {base_log['losses'][0]:.3f} -> {base_log['losses'][-1]:.3f} in {base_log['seconds']:.0f} s")
    clock = time.perf_counter()
    instruct_log = _cached(models / "I.json", key, instruct, reused)
    seconds["instruct"] = time.perf_counter() - clock
    log(
        f"I: loss {instruct_log['losses'][0]:.3f} -> {instruct_log['losses'][-1]:.3f} in {instruct_log['seconds']:.0f} s"
    )

    ctx = Context(
        protocol, data_dir, models / "B", models / "I", root / "units", cache, split, grafts, keep_models
    )
    clock = time.perf_counter()
    foundation = _cached(
        root / f"foundation-{split}.json",
        key,
        lambda: [
            record(ctx, Arm.BASE, ctx.base, None, _summary(base_log)),
            record(ctx, Arm.INSTRUCT, ctx.instruct, None, _summary(instruct_log)),
        ],
        reused,
    )
    seconds["eval_foundation"] = time.perf_counter() - clock

    clock = time.perf_counter()
    todo = units(protocol, matched_lr)
    results: dict[str, list[dict]] = {}
    pending = []
    for unit in todo:
        path = root / "runs" / f"{split}-{unit.name}.json"
        unit_key = _key(key, unit, split, grafts)
        if path.is_file() and json.loads(path.read_text()).get("key") == unit_key:
            results[unit.name] = json.loads(path.read_text())["value"]
            reused.append(path.stem)
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
    records = [*foundation, *(r for unit in todo for r in results[unit.name])]
    return {
        "protocol": protocol.to_dict(),
        "data": stats,
        "records": records,
        "seconds": seconds,
        "reused": reused,
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
