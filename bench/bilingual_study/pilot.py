"""The pilot: a design that can test the new-language half of the claim, chosen before any arm runs.

The study can show an instruct model's skill reaching the new language only if that skill exists
and its form is language-neutral. So, on the validation books and looking at B and I alone (no arm
is trained or compared), each candidate below must give an instruct model I that
    (a) has learned the task: exact match >= 60 % in English,
    (b) answers in the right format in Spanish on >= 50 % of the items,
    (c) keeps Spanish perplexity within 10 % of B's (its delta must not itself cost the new language).
The rule and round 1 of the candidates were written down before the pilot first ran, round 2 after
round 1 had run and before round 2 ran (its reasons are with it below). Every candidate is run, and
the design of the full study is the passing candidate with the highest English exact match (ties:
the one listed first). If none passes, the pilot reports what each reached and the full study is
not run on a design that cannot test the claim.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .arms import heldout_of
from .cloze import AnswerForm
from .corpus import NEW, ORIGINAL, Verse
from .evaluate import evaluate, likelihood_choice
from .pipeline import Reuse, _cached, _init_worker, _summary, foundation
from .protocol import Protocol


@dataclass(frozen=True)
class Criteria:
    min_exact_en: float = 0.60
    min_format_es: float = 0.50
    max_ppl_es_ratio: float = 1.10  # I's Spanish perplexity over B's

    def failures(self, base: dict, instruct: dict) -> list[str]:
        """What I misses of the criteria; empty when it passes."""
        missed = []
        if instruct[ORIGINAL]["exact"] < self.min_exact_en:
            missed.append(
                f"exact en {100 * instruct[ORIGINAL]['exact']:.1f} % < {100 * self.min_exact_en:.0f} %"
            )
        if instruct[NEW]["format"] < self.min_format_es:
            missed.append(
                f"format es {100 * instruct[NEW]['format']:.1f} % < {100 * self.min_format_es:.0f} %"
            )
        ratio = instruct[NEW]["ppl"] / base[NEW]["ppl"]
        if ratio > self.max_ppl_es_ratio:
            missed.append(f"ppl es {ratio:.2f} x B's > {self.max_ppl_es_ratio:.2f}")
        return missed


CRITERIA = Criteria()


def _unchanged(start: Protocol) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Candidate:
    name: str
    why: str
    changes: Callable[[Protocol], dict[str, Any]] = _unchanged  # Protocol fields, from the start protocol

    def protocol(self, start: Protocol) -> Protocol:
        return replace(start, **self.changes(start))


LOWER_LR = "a lower SFT learning rate moves B less: less of its Spanish lost, more of its knowledge kept"
LETTER = "the answer is the letter of the listed word, the same symbol in both languages"
LONGER = "twice the steps, half of every batch B's own text (its mixture of both languages)"


def _letter(lr: float, longer: bool = False) -> Callable[[Protocol], dict[str, Any]]:
    def changes(start: Protocol) -> dict[str, Any]:
        longer_sft = {"sft_steps": 2 * start.sft_steps, "sft_text_rows": start.batch // 2} if longer else {}
        return {"answer_form": AnswerForm.LETTER, "sft_lr": lr, **longer_sft}

    return changes


ROUND_1: tuple[Candidate, ...] = (
    Candidate("first edition", "the first edition's I, for reference"),
    Candidate("word, lr 1e-3", LOWER_LR, lambda start: {"sft_lr": 1e-3}),
    Candidate("word, lr 3e-4", LOWER_LR, lambda start: {"sft_lr": 3e-4}),
    Candidate("letter, lr 1e-3", f"{LETTER}; {LOWER_LR}", _letter(1e-3)),
    Candidate("letter, lr 3e-4", f"{LETTER}; {LOWER_LR}", _letter(3e-4)),
    Candidate("letter, lr 1e-3, longer", f"{LETTER}; {LONGER}", _letter(1e-3, longer=True)),
    Candidate("letter, lr 3e-4, longer", f"{LETTER}; {LONGER}", _letter(3e-4, longer=True)),
)


def _deeper(start: Protocol) -> dict[str, Any]:
    return {**_letter(1e-3, longer=True)(start), "model": replace(start.model, layers=start.model.layers + 2)}


def _four_times(start: Protocol) -> dict[str, Any]:
    return {**_letter(1e-3, longer=True)(start), "sft_steps": 4 * start.sft_steps}


# Written after round 1 had run and none of it passed, before round 2 ran: in round 1 the letter form
# met (b) and, with half of every batch replayed text, (c), but no recipe learned the choice itself
# (exact match 21-33 % in English, at chance for the letter form, although B ranks the right word
# first by likelihood on 87 % of the English items). Round 2 keeps that recipe and tests the two
# remaining explanations: too few SFT steps, or too shallow a model (two more layers cost ~1.3x per
# step, which the study's time budget allows; a wider model would not fit it).
ROUND_2: tuple[Candidate, ...] = (
    Candidate("letter, lr 1e-3, 4x steps", "round 2: the round-1 recipe, twice as long again", _four_times),
    Candidate(
        "letter, lr 1e-3, longer, 6 layers",
        "round 2: the round-1 recipe on a deeper B (trained anew)",
        _deeper,
    ),
)
CANDIDATES = ROUND_1 + ROUND_2


def measure(
    candidate: Candidate,
    start: Protocol,
    verses: list[Verse],
    root: Path,
    log: Callable[[str], None],
    seconds: dict[str, float],
    reuse: Reuse,
) -> dict:
    """The candidate's B and I on the validation books, and the criteria I misses."""
    protocol = candidate.protocol(start)
    found = foundation(
        protocol, verses, root, lambda message: log(f"{candidate.name}: {message}"), seconds, reuse
    )
    held = heldout_of(found.data.root, "valid", found.base, protocol.seq_len, root / "token-cache")
    form = protocol.answer_form
    base = _cached(
        found.base.with_suffix(f".valid-{form.value}.json"),
        found.keys.base,
        lambda: evaluate(found.base, held, protocol.eval_sequences, form),
        reuse,
    )
    knows = _cached(
        found.base.with_suffix(".valid-likelihood.json"),
        found.keys.base,
        lambda: {held_out.lang: likelihood_choice(found.base, held_out.items) for held_out in held},
        reuse,
    )
    instruct = _cached(
        found.instruct.with_suffix(".valid.json"),
        found.keys.instruct,
        lambda: evaluate(found.instruct, held, protocol.eval_sequences, form),
        reuse,
    )
    return {
        "name": candidate.name,
        "why": candidate.why,
        "changes": _changed(start, protocol),
        "keys": {"B": found.keys.base, "I": found.keys.instruct},
        "seconds": {"B": found.base_log["seconds"], "I": found.instruct_log["seconds"]},
        "instruct_training": _summary(found.instruct_log),
        "base": base,
        "base_likelihood_choice": knows,
        "instruct": instruct,
        "missed": CRITERIA.failures(base, instruct),
    }


def _changed(start: Protocol, protocol: Protocol) -> dict[str, Any]:
    """The settings in which ``protocol`` differs from ``start``, nested ones by their dotted names."""
    before, after = start.to_dict(), protocol.to_dict()
    changed = {}
    for name, value in after.items():
        if isinstance(value, dict):
            changed |= {f"{name}.{k}": v for k, v in value.items() if before[name][k] != v}
        elif value != before[name] and name != "name":
            changed[name] = value
    return changed


def run_pilot(
    verses: list[Verse],
    start: Protocol,
    out: Path,
    log: Callable[[str], None],
    candidates: Sequence[Candidate] = CANDIDATES,
) -> dict:
    """Every candidate measured from ``start`` (the first edition, or --quick's toy sizes); returns
    {criteria, candidates, chosen, seconds, reused}."""
    _init_worker(start.foundation_threads)
    seconds: dict[str, float] = {}
    reuse = Reuse()
    rows = []
    for candidate in candidates:
        rows.append(measure(candidate, start, verses, out / "work", log, seconds, reuse))
        missed = rows[-1]["missed"]
        log(f"{candidate.name}: {'passes' if not missed else 'misses ' + '; '.join(missed)}")
    passing = [row for row in rows if not row["missed"]]
    chosen = max(passing, key=lambda row: row["instruct"][ORIGINAL]["exact"], default=None)
    return {
        "criteria": asdict(CRITERIA),
        "candidates": rows,
        "chosen": None if chosen is None else chosen["name"],
        "seconds": seconds,
        "reused": reuse.earlier,
    }


def write_pilot(result: dict, path: Path) -> None:
    """pilot.md (the rule, every candidate's numbers, the choice) and pilot.json beside it."""
    path.with_suffix(".json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    criteria = Criteria(**result["criteria"])
    lines = [
        "# pdmoe study: the pilot",
        "",
        "Command: `python bench/study.py --pilot --out DIR`. Validation books; B and I only, no arm.",
        "",
        __doc__.split("\n\n", 1)[1].strip(),
        "",
        f"Criteria: exact match en >= {100 * criteria.min_exact_en:.0f} %, format es >= "
        f"{100 * criteria.min_format_es:.0f} %, ppl es of I <= {criteria.max_ppl_es_ratio:.2f} x B's.",
        "",
        "| candidate | changes | ppl en I / B | ppl es I / B | exact en % | format en % | exact es % "
        "| format es % | B's likelihood choice en / es % | SFT min | result |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    rows = result["candidates"]
    for row in rows:
        base, instruct = row["base"], row["instruct"]
        changes = ", ".join(f"{name} = {value}" for name, value in row["changes"].items()) or "none"
        cells = [
            row["name"],
            changes,
            f"{instruct[ORIGINAL]['ppl']:.1f} / {base[ORIGINAL]['ppl']:.1f}",
            f"{instruct[NEW]['ppl']:.1f} / {base[NEW]['ppl']:.1f}",
            *(
                f"{100 * instruct[lang][metric]:.1f}"
                for lang in (ORIGINAL, NEW)
                for metric in ("exact", "format")
            ),
            " / ".join(f"{100 * row['base_likelihood_choice'][lang]:.1f}" for lang in (ORIGINAL, NEW)),
            f"{row['seconds']['I'] / 60:.1f}",
            "passes" if not row["missed"] else "misses " + "; ".join(row["missed"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "B's likelihood choice: the share of items on which B, scoring the verse with each listed word in"
        " the blank, gives the answer the highest likelihood; what B knows of the task, whatever I learns"
        " to answer (chance: 25 %).",
        "",
        "Why each candidate:",
        "",
    ]
    lines += [f"- **{row['name']}**: {row['why']}" for row in result["candidates"]]
    chosen = result["chosen"]
    lines += [
        "",
        f"**Chosen: {chosen}.**"
        if chosen
        else "**No candidate passes: the full study is not run on this design.**",
        "",
        f"Training time (from the models' logs): B {_minutes(rows, 'B')}, I {_minutes(rows, 'I')}; "
        f"this invocation {result['seconds'].get('total', 0) / 60:.1f} min wall"
        + (f", reusing {len(result['reused'])} stages of an earlier one." if result["reused"] else "."),
        "",
    ]
    path.write_text("\n".join(lines))


def _minutes(rows: Sequence[dict], model: str) -> str:
    """Total training minutes of the distinct ``model``s (candidates share a B where they can)."""
    seconds = {row["keys"][model]: row["seconds"][model] for row in rows}
    return f"{sum(seconds.values()) / 60:.1f} min ({len(seconds)} trained)"
