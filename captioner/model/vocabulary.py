"""Word <-> id mapping, and the tokeniser that splits captions into words (no downloaded data,
so it works offline)."""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence

import regex

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIAL_TOKENS = (PAD, START, END, UNK)

# Words: runs of letters and digits of any script (with their combining marks), inner
# apostrophes and hyphens kept; punctuation is dropped, as in the usual captioning
# pre-processing. Chinese and Japanese, written without spaces, give one token per character.
# On ASCII text it is the same as _ASCII_WORD, the tokeniser of earlier versions, which ASCII
# captions still go through (3x faster), so earlier vocabularies (the shipped model's) encode
# them as they did.
_CJK = r"[\p{Han}\p{Hiragana}\p{Katakana}]"
_PART = rf"(?:(?!{_CJK})[\p{{L}}\p{{N}}]\p{{M}}*)+"
_WORD = regex.compile(rf"{_CJK}|{_PART}(?:['\-]{_PART})*")
_ASCII_WORD = re.compile(r"[a-z0-9]+(?:['\-][a-z0-9]+)*")


def tokenize(text: str) -> list[str]:
    """Split a caption into words: Unicode-normalised (NFKC: "ﬁ" is "fi", full-width letters are
    letters), case-folded ("Straße" is "strasse"), punctuation dropped."""
    return _ASCII_WORD.findall(text.lower()) if text.isascii() else _unicode_words(text)


def _unicode_words(text: str) -> list[str]:
    text = unicodedata.normalize("NFKC", text).casefold().replace("\u2019", "'")  # dog’s: dog's
    return _WORD.findall(text)


class Vocabulary:
    """Maps words to ids. Ids 0..3 are always `<pad> <start> <end> <unk>`."""

    def __init__(self, words: Sequence[str]):
        if not isinstance(words, (list, tuple)):
            raise TypeError(f"vocabulary must be a list of words, got {type(words).__name__}")
        for i, word in enumerate(words):
            if not isinstance(word, str) or not word:
                raise ValueError(
                    f"vocabulary entry {i} is {word!r}: every entry must be a word (a non-empty string)"
                )
        if tuple(words[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"vocabulary must start with {SPECIAL_TOKENS}, got {list(words[:4])}")
        if len(set(words)) != len(words):
            raise ValueError("vocabulary contains duplicate words")
        self.words: list[str] = list(words)
        self.index: dict[str, int] = {w: i for i, w in enumerate(self.words)}

    pad_id, start_id, end_id, unk_id = 0, 1, 2, 3

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 5, max_words: int | None = None) -> Vocabulary:
        """Keep words seen at least `min_count` times, most frequent first (ties alphabetical).
        With `max_words`, only each caption's first max_words words count: those training sees
        (a 10,000-word caption must not fill the vocabulary with words never trained on)."""
        counts = Counter(word for caption in captions for word in tokenize(caption)[:max_words])
        kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls([*SPECIAL_TOKENS, *(w for w in kept if w not in SPECIAL_TOKENS)])

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, caption: str) -> list[int]:
        """Caption -> `<start> w1 .. wn <end>` ids, unknown words as `<unk>`."""
        ids = [self.index.get(w, self.unk_id) for w in tokenize(caption)]
        return [self.start_id, *ids, self.end_id]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Ids -> words, stopping at `<end>` and dropping `<start>`/`<pad>`."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.end_id:
                break
            if i not in (self.start_id, self.pad_id):
                words.append(self.words[i])
        return words

    def to_json(self) -> list[str]:
        """The words in id order, as a model folder's config.json and a run state hold them;
        `Vocabulary(words)` reads them back."""
        return list(self.words)
