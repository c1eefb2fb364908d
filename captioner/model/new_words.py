"""Words the vocabulary lacks, added by direct transfer (issue #37 (d); Hendricks et al. 2016,
"Deep Compositional Captioning", section 3.3).

A new word starts as an exact copy of a known word of the same kind: its embedding row and its
output-layer row (weights and bias) are the source word's. The decoder then treats "zebra" as it
treats "horse", so evidence, a constraint or language training (captioner.training.language)
can select or refine it; the old words' weights are untouched, so their logits do not change.
The shipped table (new_words.json) was checked by hand: WordNet distance picked poor sources for
artefacts in the prototype (remote and keyboard from "toy").
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from captioner.model.caption_model import CaptionModel
from captioner.model.decoder import AttentionDecoder
from captioner.model.vocabulary import SPECIAL_TOKENS, Vocabulary, tokenize

NEW_WORDS_FILE = Path(__file__).with_name("new_words.json")


def load_new_words(path: str | Path = NEW_WORDS_FILE) -> dict[str, str]:
    """{new word: source word} from a JSON file ({"sources": {...}}, or the mapping itself)."""
    table = json.loads(Path(path).read_text(encoding="utf-8"))
    sources = table.get("sources", table) if isinstance(table, dict) else table
    if not isinstance(sources, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in sources.items()
    ):
        raise ValueError(f"{path}: expected {{new word: source word}} strings, got {type(sources).__name__}")
    return dict(sources)


def check_new_words(vocab: Vocabulary, sources: Mapping[str, str]) -> dict[str, str]:
    """The entries of `sources` to add: each new word must be one token, each source a known
    word (ValueError naming the entry otherwise); words the vocabulary already has are left out."""
    wanted = {}
    for new, source in sources.items():
        if tokenize(new) != [new]:
            raise ValueError(
                f"new word {new!r} is not a single lower-case word (tokenize gives {tokenize(new)})"
            )
        if source not in vocab.index or source in SPECIAL_TOKENS:
            raise ValueError(f"source word {source!r} of {new!r} is not a word of the vocabulary")
        if new not in vocab.index:
            wanted[new] = source
    return wanted


def extend_decoder(
    decoder: AttentionDecoder, vocab: Vocabulary, sources: Mapping[str, str], bias_offset: float = 0.0
) -> tuple[AttentionDecoder, Vocabulary]:
    """A copy of `decoder` and `vocab` with the new words of `sources` appended (ids len(vocab)..),
    each new embedding row and output row (weights and bias) a copy of its source word's.

    bias_offset is added to the new words' output bias: 0 is DCC's exact copy (the new word is
    as likely as its source); a negative offset keeps it below its source until evidence, a
    constraint or language training lifts it."""
    if not isinstance(decoder, AttentionDecoder):
        raise ValueError(f"can only extend one AttentionDecoder, got {type(decoder).__name__} (an ensemble?)")
    if not math.isfinite(bias_offset):
        raise ValueError(f"bias_offset must be a finite number, got {bias_offset!r}")
    wanted = check_new_words(vocab, sources)
    extended = copy.deepcopy(decoder)
    source_ids = torch.tensor([vocab.index[s] for s in wanted.values()], dtype=torch.long)
    with torch.no_grad():
        old_embedding = decoder.embedding.weight  # (V, E)
        extended.embedding = nn.Embedding.from_pretrained(
            torch.cat([old_embedding, old_embedding[source_ids]]), freeze=False
        )
        old = decoder.classifier
        classifier = nn.Linear(old.in_features, old.out_features + len(wanted)).to(old.weight.dtype)
        classifier.weight.copy_(torch.cat([old.weight, old.weight[source_ids]]))  # (V + k, E)
        classifier.bias.copy_(torch.cat([old.bias, old.bias[source_ids] + bias_offset]))
        extended.classifier = classifier
    extended.vocab_size = len(vocab) + len(wanted)
    extended._tables = None  # the word tables are rebuilt for the new embedding
    return extended, Vocabulary([*vocab.words, *wanted])


def extend_model(
    model: CaptionModel, vocab: Vocabulary, sources: Mapping[str, str], bias_offset: float = 0.0
) -> Vocabulary:
    """Extend the model's decoder in place (see extend_decoder); returns the extended vocabulary."""
    decoder, extended_vocab = extend_decoder(model.decoder, vocab, sources, bias_offset)  # type: ignore[arg-type]
    model.decoder = decoder
    return extended_vocab
