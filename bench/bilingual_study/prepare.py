"""From verses to the study's files: tokenizer, corpora per stage, held-out text and task items.

Layout under ``DIR/data``:
    tokenizer/                 byte-level BPE of both languages (training books only)
    base.jsonl                 pre-training of B: English + the share of Spanish chapters
    cpt.jsonl                  continued pre-training: the other Spanish chapters
    review.jsonl               review stage: English and Spanish chapters, half and half
    heldout-{test,valid}-{en,es}.jsonl    held-out books, by language
    cloze-{sft,test,valid}-*.jsonl        task items
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from .cloze import ClozeItem, make_items, vocabulary
from .corpus import NEW, ORIGINAL, Chapter, Verse, chapters, documents, write_jsonl
from .protocol import Protocol
from .tokenizer import train_tokenizer

SPLIT_SEED = 1234


@dataclass
class Prepared:
    """Paths of the prepared files and the facts about them that the report quotes."""

    root: Path
    stats: dict

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    def path(self, name: str) -> Path:
        return self.root / name

    def cloze(self, name: str) -> list[ClozeItem]:
        with self.path(f"cloze-{name}.jsonl").open(encoding="utf-8") as handle:
            return [
                ClozeItem(**{**json.loads(line), "choices": tuple(json.loads(line)["choices"])})
                for line in handle
            ]


def _token_counts(tokenizer, items: list[Chapter]) -> dict[Chapter, int]:
    ids = tokenizer([c.text for c in items], add_special_tokens=False)["input_ids"]
    return {chapter: len(x) + 1 for chapter, x in zip(items, ids, strict=True)}  # + the EOS after each


def prepare(verses: list[Verse], protocol: Protocol, root: Path) -> Prepared:
    all_chapters = chapters(verses)
    train = [c for c in all_chapters if c.split == "train"]
    english = [c for c in train if c.lang == ORIGINAL]
    spanish = [c for c in train if c.lang == NEW]
    tokenizer = train_tokenizer((c.text for c in train), protocol.model.vocab, root / "tokenizer")
    tokens = _token_counts(tokenizer, all_chapters)

    # Spanish chapters go to the base corpus, in a seeded order, until they reach their share of
    # its tokens; the rest is the CPT corpus (no chapter in both).
    english_tokens = sum(tokens[c] for c in english)
    rng = random.Random(SPLIT_SEED)
    order = list(range(len(spanish)))
    rng.shuffle(order)
    base_spanish, cpt_spanish, spanish_tokens = [], [], 0
    for index in order:
        if spanish_tokens < protocol.spanish_share / (1 - protocol.spanish_share) * english_tokens:
            base_spanish.append(spanish[index])
            spanish_tokens += tokens[spanish[index]]
        else:
            cpt_spanish.append(spanish[index])
    base_spanish.sort(key=spanish.index)
    cpt_spanish.sort(key=spanish.index)
    write_jsonl(root / "base.jsonl", documents([*english, *base_spanish]))
    write_jsonl(root / "cpt.jsonl", documents(cpt_spanish))
    cpt_tokens = sum(tokens[c] for c in cpt_spanish)

    # Review data: about review_tokens_share of the CPT tokens, half English, half Spanish.
    review_budget = protocol.review_steps * protocol.batch * protocol.seq_len
    review = []
    for pool in (english, cpt_spanish):
        picked = list(pool)
        rng.shuffle(picked)
        taken = 0
        for chapter in picked:
            if taken >= review_budget / 2:
                break
            review.append(chapter)
            taken += tokens[chapter]
    write_jsonl(root / "review.jsonl", documents(review))

    heldout_tokens = {}
    for split in ("test", "valid"):
        for lang in (ORIGINAL, NEW):
            held = [c for c in all_chapters if c.split == split and c.lang == lang]
            write_jsonl(root / f"heldout-{split}-{lang}.jsonl", documents(held))
            heldout_tokens[f"{split}-{lang}"] = sum(tokens[c] for c in held)

    def one_token(word: str) -> bool:
        return len(tokenizer(f" {word}", add_special_tokens=False)["input_ids"]) == 1

    counts_by_lang = {
        lang: vocabulary((c.text for c in train if c.lang == lang), one_token) for lang in (ORIGINAL, NEW)
    }
    cloze_sets = {
        "sft-en": make_items(
            [v for c in english for v in c.verses], ORIGINAL, protocol.sft_items, counts_by_lang[ORIGINAL], 1
        )
    }
    for split, seed in (("test", 2), ("valid", 3)):
        for lang in (ORIGINAL, NEW):
            verses_of = [v for c in all_chapters if c.split == split and c.lang == lang for v in c.verses]
            cloze_sets[f"{split}-{lang}"] = make_items(
                verses_of, lang, protocol.cloze_items, counts_by_lang[lang], seed
            )
    for name, items in cloze_sets.items():
        write_jsonl(root / f"cloze-{name}.jsonl", (asdict(item) for item in items))

    stats = {
        "chapters": {"en_train": len(english), "es_base": len(base_spanish), "es_cpt": len(cpt_spanish)},
        "tokens": {
            "base_en": english_tokens,
            "base_es": spanish_tokens,
            "base_es_share": spanish_tokens / (english_tokens + spanish_tokens),
            "cpt_es": cpt_tokens,
            "review": sum(tokens[c] for c in review),
            "heldout": heldout_tokens,
        },
        "cloze_items": {name: len(items) for name, items in cloze_sets.items()},
    }
    (root / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return Prepared(root, stats)
