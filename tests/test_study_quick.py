"""The study (bench/study.py): its text cleaning, its task, and the whole pipeline on the excerpt."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from bilingual_study.cloze import BLANK, AnswerForm, make_items, score, vocabulary
from bilingual_study.corpus import TEST_BOOKS, VALID_BOOKS, chapters, clean_osis, read_excerpt

ROOT = Path(__file__).resolve().parents[1]


def test_footnotes_and_markup_leave_words_apart():
    osis = (
        '<w lemma="strong:G3439">only</w> born</q><note placement="foot"><reference>3:16 </reference>'
        'The phrase "only born"</note><q marker=""><w lemma="x">Son</w>, that'
    )
    assert clean_osis(osis) == "only born Son, that"
    # adjacent word elements in the source (RV 1909) are separate words; inline ones are not split
    assert clean_osis('<w>HABIENDO entrado</w><transChange type="added">Jesús</transChange>,') == (
        "HABIENDO entrado Jesús,"
    )
    assert clean_osis("<w>the <divineName>Lord</divineName>’s</w> house") == "the Lord’s house"
    assert clean_osis('¶ <title type="psalm">A Psalm</title>Blessed &amp; <l level="1"/>holy .') == (
        "Blessed & holy."
    )


def test_cloze_items_have_one_blank_and_fair_choices():
    verses = [
        "And God said, Let there be light: and there was light.",
        "In the beginning God created the heaven and the earth above all things.",
        "And the evening and the morning were the first day of creation.",
    ] * 4
    counts = vocabulary(verses * 3)
    items = make_items(verses, "en", 5, counts, seed=1)
    assert items == make_items(verses, "en", 5, counts, seed=1)
    for item in items:
        assert item.text.count(BLANK) == 1
        assert item.answer in item.choices and len(set(item.choices)) == 4
        words = set(item.text.replace(",", " ").replace(".", " ").split())
        assert not words & (set(item.choices) - {item.answer})
        assert item.prompt(AnswerForm.WORD).endswith("\nAnswer:")
        assert item.completion(AnswerForm.WORD) == f" {item.answer}"
    first = items[0]
    result = score(items[:3], [f" {first.answer}", "nothing listed", None], AnswerForm.WORD)
    assert result.exact == pytest.approx((items[1].answer == "nothing listed") / 3 + 1 / 3)
    assert result.format == pytest.approx(1 / 3)


def test_letter_answers_name_the_listed_word():
    verses = [
        "And God said, Let there be light: and there was light.",
        "In the beginning God created the heaven and the earth above all things.",
        "And the evening and the morning were the first day of creation.",
    ] * 4
    item = make_items(verses, "en", 1, vocabulary(verses * 3), seed=2)[0]
    right = "ABCD"[item.choices.index(item.answer)]
    wrong = next(letter for letter in "ABCD" if letter != right)
    prompt = item.prompt(AnswerForm.LETTER)
    assert prompt.splitlines()[1] == "Choices: " + " | ".join(
        f"{letter}. {word}" for letter, word in zip("ABCD", item.choices, strict=True)
    )
    assert item.completion(AnswerForm.LETTER) == f" {right}"
    result = score([item] * 4, [f" {right}", f" {wrong}", " E", None], AnswerForm.LETTER)
    assert (result.exact, result.format) == (0.25, 0.5)


def test_excerpt_covers_every_split_and_language():
    found = Counter((c.lang, c.split) for c in chapters(read_excerpt()))
    assert {key for key, n in found.items() if n} == {
        (lang, split) for lang in ("en", "es") for split in ("train", "valid", "test")
    }
    assert (ROOT / "bench" / "bilingual_study" / "excerpt.jsonl").stat().st_size < 1_000_000
    assert set(TEST_BOOKS).isdisjoint(VALID_BOOKS)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("study") / "quick"
    subprocess.run([sys.executable, "bench/study.py", "--out", str(out), "--quick"], cwd=ROOT, check=True)
    return out


def test_quick_study_writes_every_arm(quick_run: Path):
    result = json.loads((quick_run / "study.json").read_text())
    protocol = result["protocol"]
    seeds = len(protocol["seeds"])
    arms = Counter(record["arm"] for record in result["records"])
    for arm in ("dense CPT", "dense CPT + ParamΔ", "dense TIES", "dense DARE"):
        assert arms[arm] == seeds * len(protocol["dense_lrs"]), arm
    for arm in ("MoE CPT", "DeltaMoE", "MoE CPT + review", "DeltaMoE + review"):
        assert arms[arm] == seeds * len(protocol["moe_lrs"]), arm
    assert arms["B"] == arms["I"] == 1
    assert arms["dense CPT + ParamΔ, matched FLOPs"] == seeds
    for record in result["records"]:
        for lang in ("en", "es"):
            values = record["eval"][lang]
            assert math.isfinite(values["ppl"]) and 0 <= values["exact"] <= values["format"] <= 1
            assert (values["expert0"] is None) == ("MoE" not in record["arm"])
    table = (quick_run / "study.md").read_text()
    assert "| DeltaMoE + review |" in table and (quick_run / "study.png").stat().st_size > 0


def test_quick_study_held_out_text_is_not_trained_on(quick_run: Path):
    data = quick_run / "work" / "data"
    trained = "".join((data / name).read_text() for name in ("base.jsonl", "cpt.jsonl", "review.jsonl"))
    for lang in ("en", "es"):
        for line in (data / f"heldout-test-{lang}.jsonl").read_text().splitlines():
            assert json.loads(line)["text"][:200] not in trained


def test_quick_study_unit_reruns_give_the_same_numbers(quick_run: Path):
    """A unit computed again in a fresh process reproduces its numbers exactly."""
    runs = sorted((quick_run / "work" / "runs").glob("test-moe-*.json"))
    before = json.loads(runs[0].read_text())["value"]
    runs[0].unlink()
    subprocess.run(
        [sys.executable, "bench/study.py", "--out", str(quick_run), "--quick"], cwd=ROOT, check=True
    )
    after = json.loads(runs[0].read_text())["value"]
    assert [r["eval"] for r in after] == [r["eval"] for r in before]
    reused = json.loads((quick_run / "study.json").read_text())["reused"]
    assert runs[0].stem not in reused and {"data", "foundation-test"} <= set(reused)
    assert {name.split("-")[0] for name in reused} >= {"B", "I"}
    assert "reused" in (quick_run / "study.md").read_text()


def test_quick_pilot_measures_every_candidate_against_the_criteria(tmp_path: Path):
    from bilingual_study.pilot import CANDIDATES, CRITERIA

    out = tmp_path / "pilot"
    subprocess.run(
        [sys.executable, "bench/study.py", "--out", str(out), "--pilot", "--quick"], cwd=ROOT, check=True
    )
    result = json.loads((out / "pilot.json").read_text())
    assert [row["name"] for row in result["candidates"]] == [c.name for c in CANDIDATES]
    for row in result["candidates"]:
        assert row["missed"] == CRITERIA.failures(row["base"], row["instruct"])
        assert all(
            math.isfinite(row[model][lang]["ppl"]) for model in ("base", "instruct") for lang in ("en", "es")
        )
    passing = [row["name"] for row in result["candidates"] if not row["missed"]]
    assert (result["chosen"] is None) == (not passing)
    assert "| letter, lr 3e-4 |" in (out / "pilot.md").read_text()


def test_pilot_criteria_name_what_instruct_misses():
    from bilingual_study.pilot import Criteria

    base = {"en": {"ppl": 50.0}, "es": {"ppl": 100.0}}
    good = {"en": {"exact": 0.6, "ppl": 60.0}, "es": {"format": 0.5, "ppl": 110.0}}
    assert Criteria().failures(base, good) == []
    bad = {"en": {"exact": 0.3, "ppl": 60.0}, "es": {"format": 0.0, "ppl": 161.0}}
    assert Criteria().failures(base, bad) == [
        "exact en 30.0 % < 60 %",
        "format es 0.0 % < 50 %",
        "ppl es 1.61 x B's > 1.10",
    ]
