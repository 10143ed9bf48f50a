"""Dictionary-word features: which tokens begin, continue or end a dictionary word, and of what kind.

Entity boundaries are mostly word boundaries, and a small character-level BERT has to guess word
boundaries from context alone. jieba's bundled dictionary (349k words tagged person name, place,
organisation, ...) tells it where words are. The dictionary is matched against each window's
token ids by the model's own module, with tensor ops, so training, `tag`, the server and every
backend see the same features (ONNX graphs take them as an input, computed by this module beside
the graph: dictionary look-ups have no ONNX operator), and the model folder carries its lexicon as
two integer buffers: jieba is needed to build one, never to use one.

A word of n tokens (2 <= n <= max_word_tokens) is stored as one int64 key: its token ids packed
`id_bits` bits apart, plus n above them, so a word never matches a longer run of tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

# jieba part-of-speech tags by the kind of word they mark; anything else is "other".
CATEGORIES = {
    "person": ("nr", "nrt", "nrfg"),
    "place": ("ns",),
    "organization": ("nt",),
    "proper_noun": ("nz",),
    "abbreviation": ("j",),
    "noun": ("n", "ng", "vn"),
    "other": (),
}
ROLES = ("begin", "inside", "end")
KEY_BITS = 63  # int64 keys stay positive


class TokenLexicon(nn.Module):
    """Dictionary words as sorted token-id keys; maps [B, L] token ids to [B, L, roles x categories]."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)
        self.id_bits, self.max_word_tokens = config["id_bits"], config["max_word_tokens"]
        self.num_categories = len(config["categories"])
        self.register_buffer("keys", torch.zeros(config["words"], dtype=torch.long))
        self.register_buffer("categories", torch.zeros(config["words"], dtype=torch.long))

    @property
    def num_features(self) -> int:
        return len(ROLES) * self.num_categories

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        batch, length = input_ids.shape
        features = torch.zeros(batch, length, len(ROLES), self.num_categories, device=input_ids.device)
        if len(self.keys) == 0:
            return features.flatten(2)
        for n in range(2, min(self.max_word_tokens, length) + 1):
            starts = length - n + 1
            query = word_keys(input_ids.unfold(1, n, 1), self.id_bits)  # every run of n tokens
            found = torch.searchsorted(self.keys, query).clamp(max=len(self.keys) - 1)
            hit = self.keys[found] == query
            marks = nn.functional.one_hot(self.categories[found], self.num_categories) * hit.unsqueeze(-1)
            for k in range(n):
                role = 0 if k == 0 else 2 if k == n - 1 else 1
                section = features[:, k : k + starts, role]
                features[:, k : k + starts, role] = torch.maximum(section, marks.to(section.dtype))
        return features.flatten(2)


def word_keys(token_ids: torch.Tensor, id_bits: int) -> torch.Tensor:
    """The int64 key of each word of n token ids, [..., n] -> [...] (see the module's docstring)."""
    n = token_ids.shape[-1]
    shifts = torch.arange(n, device=token_ids.device) * id_bits
    return (token_ids << shifts).sum(-1) | (n << (n * id_bits))


def build_lexicon(words: Iterable[tuple[str, str]], tokenizer, source: str) -> TokenLexicon:
    """A lexicon of (word, category) pairs over this tokenizer's single-character tokens.

    Words with a character the vocabulary lacks as a token of its own, or of a length outside
    2..max_word_tokens, are left out; of repeated words the first category wins.
    """
    vocab = tokenizer.get_vocab()
    id_bits = max(vocab.values()).bit_length()
    max_word_tokens = (KEY_BITS - 3) // id_bits
    category_ids = {name: i for i, name in enumerate(CATEGORIES)}
    by_length: dict[int, tuple[list[list[int]], list[int]]] = {}
    for word, category in words:
        ids = [vocab.get(char) for char in word]
        if 2 <= len(ids) <= max_word_tokens and None not in ids:
            same_length = by_length.setdefault(len(ids), ([], []))
            same_length[0].append(ids)
            same_length[1].append(category_ids[category])
    entries: dict[int, int] = {}
    for ids, categories in by_length.values():
        for key, category in zip(word_keys(torch.tensor(ids), id_bits).tolist(), categories):
            entries.setdefault(key, category)
    config = {"source": source, "words": len(entries), "categories": list(CATEGORIES), "roles": list(ROLES),
              "id_bits": id_bits, "max_word_tokens": max_word_tokens}
    lexicon = TokenLexicon(config)
    keys = sorted(entries)
    lexicon.keys.copy_(torch.tensor(keys, dtype=torch.long))
    lexicon.categories.copy_(torch.tensor([entries[k] for k in keys], dtype=torch.long))
    return lexicon


def jieba_words() -> tuple[list[tuple[str, str]], str]:
    """(word, category) pairs from jieba's bundled dictionary, and a line naming the source."""
    import jieba

    path = Path(jieba.__file__).parent / "dict.txt"
    category_of = {tag: name for name, tags in CATEGORIES.items() for tag in tags}
    words = []
    for line in path.read_text(encoding="utf-8").splitlines():
        fields = line.split()
        if len(fields) >= 3:
            words.append((fields[0], category_of.get(fields[2], "other")))
    return words, f"jieba {jieba.__version__} dict.txt"
