"""The task: fill the blank of a verse with one of four listed words.

The form of the skill (read the choices, answer with exactly one of them, stop) is the same in both
languages, while choosing the right word needs knowledge of the language: exactly what a
post-training delta learned in English should carry over to Spanish once the model knows Spanish.
Distractors are drawn by corpus frequency (common words, not giveaway rarities) and never occur
in the verse. Every candidate is one token of the tokenizer (after a space), so answering in the
format is copying one listed token: a skill a tiny model can learn in a short SFT. Scored by
exact match of the generated answer and by format adherence (the answer names one of the listed
words and generation stopped after it).

The answer is either the listed word itself or its letter (``AnswerForm``): a letter is the same
symbol in both languages, so the form of the answer owes nothing to the language of the text.
"""

from __future__ import annotations

import enum
import itertools
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

CHOICES = 4
BLANK = "___"
_WORD = re.compile(r"^[a-záéíóúñü]{4,}$")
_TOKEN = re.compile(r"^(\W*)(.*?)(\W*)$")
MIN_WORDS, MAX_WORDS = 6, 24
MIN_COUNT = 3


LETTERS = "ABCD"


class AnswerForm(enum.Enum):
    WORD = "word"  # " light": the listed word
    LETTER = "letter"  # " B": the letter the word is listed under


@dataclass(frozen=True)
class ClozeItem:
    lang: str
    text: str  # the verse with the blank
    choices: tuple[str, ...]
    answer: str

    def prompt(self, form: AnswerForm) -> str:
        if form is AnswerForm.LETTER:
            listed = " | ".join(
                f"{letter}. {word}" for letter, word in zip(LETTERS, self.choices, strict=True)
            )
        else:
            listed = " | ".join(self.choices)
        return f"Text: {self.text}\nChoices: {listed}\nAnswer:"

    def completion(self, form: AnswerForm) -> str:
        if form is AnswerForm.LETTER:
            return f" {LETTERS[self.choices.index(self.answer)]}"
        return f" {self.answer}"

    def chosen(self, form: AnswerForm, answer: str) -> str | None:
        """The listed word that ``answer`` (the generated text, stripped) names; None if none."""
        if form is AnswerForm.LETTER:
            index = LETTERS.find(answer) if len(answer) == 1 else -1
            return self.choices[index] if 0 <= index < len(self.choices) else None
        return answer if answer in self.choices else None


def vocabulary(texts: Iterable[str], eligible: Callable[[str], bool] = lambda word: True) -> Counter:
    """Counts of the lowercase words of at least 4 letters that are ``eligible`` (the candidates for
    blanks and distractors)."""
    counts: Counter = Counter()
    for text in texts:
        for token in text.split():
            core = _TOKEN.match(token).group(2)
            if _WORD.match(core):
                counts[core] += 1
    return Counter({word: n for word, n in counts.items() if eligible(word)})


def make_items(verses: Sequence[str], lang: str, count: int, counts: Counter, seed: int) -> list[ClozeItem]:
    """Up to ``count`` items from distinct ``verses`` (seeded), distractors drawn by ``counts``."""
    rng = random.Random(seed)
    known = sorted(word for word, n in counts.items() if n >= MIN_COUNT)
    order = list(range(len(verses)))
    rng.shuffle(order)
    items = []
    for index in order:
        if len(items) == count:
            break
        tokens = verses[index].split()
        if not MIN_WORDS <= len(tokens) <= MAX_WORDS:
            continue
        parts = [_TOKEN.match(token).groups() for token in tokens]
        present = {core for _, core, _ in parts}
        slots = [i for i, (_, core, _) in enumerate(parts) if core in counts and counts[core] >= MIN_COUNT]
        pool = [word for word in known if word not in present]
        if not slots or len(pool) < CHOICES - 1:
            continue
        slot = rng.choice(slots)
        answer = parts[slot][1]
        cumulative = list(itertools.accumulate(counts[word] for word in pool))
        distractors: list[str] = []
        while len(distractors) < CHOICES - 1:
            word = rng.choices(pool, cum_weights=cumulative)[0]
            if word not in distractors:
                distractors.append(word)
        choices = [answer, *distractors]
        rng.shuffle(choices)
        before, _, after = parts[slot]
        blanked = [*tokens[:slot], f"{before}{BLANK}{after}", *tokens[slot + 1 :]]
        items.append(ClozeItem(lang, " ".join(blanked), tuple(choices), answer))
    return items


@dataclass
class ClozeScore:
    exact: float
    format: float
    count: int


def score(items: Sequence[ClozeItem], generations: Sequence[str | None], form: AnswerForm) -> ClozeScore:
    """``generations[i]`` is the text generated before the stop, None when it never stopped."""
    exact = adherent = 0
    for item, generated in zip(items, generations, strict=True):
        chosen = None if generated is None else item.chosen(form, generated.strip())
        exact += chosen == item.answer
        adherent += chosen is not None
    return ClozeScore(exact / len(items), adherent / len(items), len(items))
