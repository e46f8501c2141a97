"""The study's text: Debian's public-domain Bibles, cleaned of OSIS markup, split by book.

English (the original language) is the King James Version and the World English Bible, Spanish
(the new language) the Reina-Valera 1909, read with pysword from the SWORD modules of the Debian
packages ``sword-text-kjv``, ``sword-text-web`` and ``sword-text-sparv``. Held-out books (test and
validation) are excluded from every training set in every language, because the translations are
parallel: a verse seen in one translation would leak into the held-out text of another.
"""

from __future__ import annotations

import functools
import html
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

ORIGINAL, NEW = "en", "es"
MODULES: dict[str, str] = {"engKJV2006eb": ORIGINAL, "engWEB2015eb": ORIGINAL, "spaRV1909eb": NEW}
PACKAGES = ("sword-text-kjv", "sword-text-web", "sword-text-sparv")
SWORD_DIRS = ("/usr/share/sword", "~/.sword")
TEST_BOOKS = ("Ruth", "Eccl", "Lam", "Jonah", "Phil", "Jas", "1Pet")
VALID_BOOKS = ("Esth", "Hab", "Col", "Titus", "2John")
EXCERPT = Path(__file__).with_name("excerpt.jsonl")
# The chapters of the bundled excerpt (every module): training, validation and test books.
EXCERPT_CHAPTERS = (
    *(("Gen", c) for c in range(1, 5)),
    *(("Matt", c) for c in range(5, 8)),
    ("John", 1),
    ("Esth", 1),
    ("Col", 1),
    ("Ruth", 1),
    ("Ruth", 2),
    ("Jas", 1),
)

# Footnotes, headings and speaker labels are not running text; word-level elements are glued to
# their neighbours in the source, every other element separates words.
_DROPPED = re.compile(r"<(note|title|speaker)\b[^>]*?(?<!/)>.*?</\1>", re.S)
_ADJACENT_WORDS = re.compile(r"(</(?:w|transChange)>)(?=<(?:w|transChange)\b)")
_INLINE = re.compile(r"</?(?:w|transChange|divineName|seg|foreign|hi|name|rdg|catchWord)\b[^>]*>")
_TAG = re.compile(r"<[^>]*>")


class DataMissing(RuntimeError):
    """The SWORD modules or pysword are not installed; the message says how to install them."""


@dataclass(frozen=True)
class Verse:
    source: str
    lang: str
    book: str
    chapter: int
    verse: int
    text: str


def clean_osis(osis: str) -> str:
    """Plain text of one verse of OSIS markup.

    pysword's own ``clean=True`` deletes a footnote without a space, gluing the words around it
    ("only born</q><note>...</note><q>Son" -> "only bornSon"); here dropped elements become spaces.
    """
    text = _DROPPED.sub(" ", osis)
    text = _ADJACENT_WORDS.sub(r"\1 ", text)
    text = _INLINE.sub("", text)
    text = _TAG.sub(" ", text)
    text = html.unescape(text).replace("¶", " ")
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r" ([,.;:!?)])", r"\1", text)
    return re.sub(r"([(¿¡]) ", r"\1", text)


def find_sword_dir() -> Path | None:
    """The first SWORD directory holding all three modules ($SWORD_PATH first)."""
    candidates = [os.environ["SWORD_PATH"]] if os.environ.get("SWORD_PATH") else []
    for raw in (*candidates, *SWORD_DIRS):
        path = Path(raw).expanduser()
        if all((path / "mods.d" / f"{name}.conf").is_file() for name in MODULES):
            return path
    return None


def read_sword(sword_dir: Path | None = None) -> list[Verse]:
    """Every verse of the 66 protocanonical books of the three modules, cleaned."""
    try:
        from pysword.modules import SwordModules
    except ImportError:
        raise DataMissing(
            'the full study reads the SWORD modules with pysword: pip install -e ".[study]"'
        ) from None
    sword_dir = sword_dir or find_sword_dir()
    if sword_dir is None:
        raise DataMissing(
            "the SWORD modules engKJV2006eb, engWEB2015eb and spaRV1909eb are not installed; on Debian or "
            f"Ubuntu: sudo apt-get install {' '.join(PACKAGES)} (or set SWORD_PATH to a SWORD directory "
            "holding them); --quick runs on the bundled excerpt instead"
        )
    modules = SwordModules(str(sword_dir))
    modules.parse_modules()
    canon = _protocanon(modules.get_bible_from_module("engKJV2006eb"))
    verses = []
    for source, lang in MODULES.items():
        bible = modules.get_bible_from_module(source)
        # pysword decompresses a whole block (a book or a chapter) again for every verse: memoise it.
        bible._decompressed_text = functools.lru_cache(maxsize=8)(bible._decompressed_text)
        books = {book.osis_name: book for part in bible.get_structure().get_books().values() for book in part}
        for name in canon:
            book = books[name]
            for chapter in range(1, book.num_chapters + 1):
                texts = bible.get_iter(books=[name], chapters=[chapter], clean=False)
                for number, osis in enumerate(texts, 1):
                    text = clean_osis(osis)
                    if text:
                        verses.append(Verse(source, lang, name, chapter, number, text))
    return verses


def _protocanon(kjv) -> list[str]:
    structure = kjv.get_structure().get_books()
    return [book.osis_name for part in ("ot", "nt") for book in structure[part]]


def read_excerpt(path: Path = EXCERPT) -> list[Verse]:
    with path.open(encoding="utf-8") as handle:
        return [Verse(**json.loads(line)) for line in handle if line.strip()]


def write_excerpt(
    verses: Iterable[Verse], chapters: Sequence[tuple[str, int]] = EXCERPT_CHAPTERS, path: Path = EXCERPT
) -> int:
    """Write the verses of ``chapters`` (every module) as the bundled excerpt; returns its size in bytes."""
    wanted = set(chapters)
    with path.open("w", encoding="utf-8") as handle:
        for verse in verses:
            if (verse.book, verse.chapter) in wanted:
                handle.write(json.dumps(asdict(verse), ensure_ascii=False) + "\n")
    return path.stat().st_size


@dataclass(frozen=True)
class Chapter:
    """One document: the verses of a chapter of one translation."""

    source: str
    lang: str
    book: str
    chapter: int
    verses: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(self.verses)

    @property
    def split(self) -> str:
        if self.book in TEST_BOOKS:
            return "test"
        return "valid" if self.book in VALID_BOOKS else "train"


def chapters(verses: Iterable[Verse]) -> list[Chapter]:
    """Verses grouped into chapters, in source then canonical order."""
    grouped: dict[tuple[str, str, int], list[Verse]] = {}
    for verse in verses:
        grouped.setdefault((verse.source, verse.book, verse.chapter), []).append(verse)
    return [
        Chapter(source, group[0].lang, book, chapter, tuple(v.text for v in group))
        for (source, book, chapter), group in grouped.items()
    ]


def write_jsonl(path: Path, records: Iterable[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def documents(items: Iterable[Chapter]) -> Iterator[dict]:
    for chapter in items:
        yield {"text": chapter.text, "lang": chapter.lang}
