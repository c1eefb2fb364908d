"""Word <-> id mapping. Tokenisation needs no downloaded NLTK data, so it works offline."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

from nltk.tokenize import RegexpTokenizer

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIAL_TOKENS = (PAD, START, END, UNK)

# Words (with inner apostrophes/hyphens kept) and numbers; punctuation is dropped, as in the
# usual captioning pre-processing.
_TOKENIZER = RegexpTokenizer(r"[a-z0-9]+(?:['\-][a-z0-9]+)*")


def tokenize(text: str) -> list[str]:
    """Lowercase and split a caption into words."""
    return _TOKENIZER.tokenize(text.lower())


class Vocabulary:
    """Maps words to ids. Ids 0..3 are always `<pad> <start> <end> <unk>`."""

    def __init__(self, words: Sequence[str]):
        if tuple(words[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"vocabulary must start with {SPECIAL_TOKENS}, got {list(words[:4])}")
        if len(set(words)) != len(words):
            raise ValueError("vocabulary contains duplicate words")
        self.words: list[str] = list(words)
        self.index: dict[str, int] = {w: i for i, w in enumerate(self.words)}

    pad_id, start_id, end_id, unk_id = 0, 1, 2, 3

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 5) -> Vocabulary:
        """Keep words seen at least `min_count` times, most frequent first (ties alphabetical)."""
        counts = Counter(word for caption in captions for word in tokenize(caption))
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
