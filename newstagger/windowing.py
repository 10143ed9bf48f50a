"""Long text in, encoder-sized windows out, and every token traceable to exact string offsets.

Texts are tokenized once, whole, by the fast tokenizer (its `offset_mapping` gives Python `str`
indices into the text as sent, whatever the normalizer did to full-width characters, accents or
emoji). The token sequence is then cut into overlapping windows. Each token is *owned* by exactly
one window, the one in which it sits furthest from an edge, so per-token scores can be stitched
back into one sequence per document with no duplicates and the best context for every token.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Window:
    doc: int  # index of the document in the batch
    start: int  # first content token of the window (document token index)
    end: int  # one past the last content token
    own_start: int  # tokens [own_start, own_end) of the document take their scores from here
    own_end: int

    @property
    def length(self) -> int:
        """Encoder positions used, [CLS] and [SEP] included."""
        return self.end - self.start + 2


@dataclass
class EncodedText:
    ids: list[int]
    offsets: np.ndarray  # [n_tokens, 2] start/end character offsets, end exclusive


def encode_texts(tokenizer, texts: list[str]) -> list[EncodedText]:
    """Tokenize whole texts in one batched call, without special tokens or truncation. "[SEP]" or
    "[PAD]" written in a story is text: read as the control token, it would cut or blank its window."""
    if not texts:
        return []
    batch = tokenizer(
        texts,
        add_special_tokens=False,
        return_offsets_mapping=True,
        return_attention_mask=False,
        return_token_type_ids=False,
        truncation=False,
        split_special_tokens=True,
        verbose=False,
    )
    return [
        EncodedText(ids=ids, offsets=_clusters_joined(text, np.asarray(offsets, dtype=np.int64).reshape(-1, 2)))
        for text, ids, offsets in zip(texts, batch["input_ids"], batch["offset_mapping"])
    ]


ZERO_WIDTH_JOINER = "\u200d"


def _continues_previous(char: str) -> bool:
    """A character that is part of the one before it: a mark (an accent, a variation selector, a
    keycap), an emoji skin tone or tag character (a subdivision flag's), a zero-width (non-)joiner, a
    half-width kana sound mark, or a Hangul vowel or final consonant written as a letter of its own
    (decomposed Korean, whose syllables the tokenizer would otherwise split between entities)."""
    return (unicodedata.category(char)[0] == "M" or char in "\u200c\u200d\uff9e\uff9f"
            or "\U0001f3fb" <= char <= "\U0001f3ff" or "\U000e0020" <= char <= "\U000e007f"
            or "\u1160" <= char <= "\u11ff" or "\ud7b0" <= char <= "\ud7ff")


# Looked up for every token, so the Basic Multilingual Plane is tabled once (20 ms)
_CONTINUES_IN_BMP = np.fromiter((_continues_previous(chr(code)) for code in range(0x10000)), dtype=bool,
                                count=0x10000)


def _clusters_joined(text: str, offsets: np.ndarray) -> np.ndarray:
    """`offsets` moved so that no token boundary falls inside a character as a reader sees it, and no
    character the tokenizer dropped is lost at an entity's edge.

    - The normalizer drops nonspacing marks and joiners, so a decomposed "é" (e + U+0301) ending a
      name would leave its accent out: a token's end moves past those that follow it. Marks are told
      by category, not combining class: Thai vowels and variation selectors have class 0.
    - It drops private-use characters too, which Chinese text uses for rare characters of names: the
      token before one, else the token after it, takes it in.
    - A token that continues the character before it (a keycap, a skin tone, what follows a
      zero-width joiner, a decomposed Hangul syllable's vowel) shares that character's offsets with
      the tokens before it, as a precomposed Hangul syllable's letters share theirs, so that spans
      begin and end on whole characters.
    """
    if not len(offsets):
        return offsets
    next_starts = np.append(offsets[1:, 0], len(text))
    for k in np.nonzero(next_starts > offsets[:, 1])[0]:  # only where a gap follows: spaces, marks, controls
        end = offsets[k, 1]
        while end < next_starts[k] and (_continues_previous(text[end]) or _private_use(text[end])):
            end += 1
        offsets[k, 1] = end
    previous_ends = np.insert(offsets[:-1, 1], 0, 0)
    for k in np.nonzero(offsets[:, 0] > previous_ends)[0]:
        start = offsets[k, 0]
        while start > previous_ends[k] and _private_use(text[start - 1]):
            start -= 1
        offsets[k, 0] = start
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    starts = offsets[1:, 0]
    first_codes = codes[starts]
    continues = _CONTINUES_IN_BMP[np.minimum(first_codes, 0xFFFF)] & (first_codes <= 0xFFFF)
    for i in np.flatnonzero(first_codes > 0xFFFF):  # emoji and rare characters: few
        continues[i] = _continues_previous(chr(first_codes[i]))
    after_joiner = (starts > 0) & (codes[np.maximum(starts - 1, 0)] == ord(ZERO_WIDTH_JOINER))
    continuing = (np.flatnonzero(continues | after_joiner) + 1).tolist()
    for k in continuing:  # in order: a run's first start reaches its last token
        offsets[k, 0] = offsets[k - 1, 0]
    # Tokens of one character (a run just joined, a Hangul syllable's letters) end where its last one
    # does: a mark after the syllable was taken in by that last token alone.
    firsts = np.flatnonzero(np.diff(offsets[:, 0], prepend=-1))
    offsets[:, 1] = np.repeat(np.maximum.reduceat(offsets[:, 1], firsts), np.diff(np.append(firsts, len(offsets))))
    return offsets


def _private_use(char: str) -> bool:
    return unicodedata.category(char) == "Co"


def plan_windows(doc: int, n_tokens: int, max_length: int, stride: int) -> list[Window]:
    """Windows of at most `max_length` positions overlapping by `stride` tokens.

    The last window is aligned to the end of the text rather than left short, so no window
    holds only a few tokens of context. A text with no tokens still gets one (empty) window,
    so its topics are scored like any other text's.
    """
    span = max_length - 2
    if span <= stride:
        raise ValueError(f"max_length {max_length} leaves no room beyond the stride {stride}")
    if n_tokens <= span:
        return [Window(doc, 0, n_tokens, 0, n_tokens)]
    step = span - stride
    starts = list(range(0, n_tokens - span, step)) + [n_tokens - span]
    windows = []
    for k, start in enumerate(starts):
        end = start + span
        own_start = 0 if k == 0 else (start + starts[k - 1] + span) // 2
        own_end = n_tokens if k == len(starts) - 1 else (starts[k + 1] + end) // 2
        windows.append(Window(doc, start, end, own_start, own_end))
    return windows


def character_parts(texts: list[str], max_chars: int) -> list[slice]:
    """Consecutive runs of texts holding at most `max_chars` characters between them (a longer text
    alone). The tagger's working memory grows with the text it scores at once (about 0.8 KB a
    character, outside the encoder), so a large input runs in parts rather than all together."""
    parts: list[slice] = []
    start, chars = 0, 0
    for i, text in enumerate(texts):
        if i > start and chars + len(text) > max_chars:
            parts.append(slice(start, i))
            start, chars = i, 0
        chars += len(text)
    if start < len(texts):
        parts.append(slice(start, len(texts)))
    return parts


def token_budget_batches(lengths: list[int], max_tokens: int, max_rows: int = 256) -> list[list[int]]:
    """Group row indices into batches of similar length (positions, specials included) whose rows
    times the longest length fit the budget (padding to a multiple of 8 may add a few percent).

    Sorting by length keeps padding (which costs more than its share on CPU) to a minimum.
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[i]  # sorted ascending: the newest row is the longest
        if current and (longest * (len(current) + 1) > max_tokens or len(current) >= max_rows):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def pad_batch(
    encoded: list[EncodedText],
    windows: list[Window],
    cls_id: int,
    sep_id: int,
    pad_id: int,
    pad_to_multiple_of: int = 8,
) -> tuple[np.ndarray, np.ndarray]:
    """input_ids and attention_mask ([B, L], int64) for a batch of windows."""
    length = max(w.length for w in windows)
    length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = np.full((len(windows), length), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(windows), length), dtype=np.int64)
    for row, window in enumerate(windows):
        ids = encoded[window.doc].ids[window.start : window.end]
        input_ids[row, 0] = cls_id
        input_ids[row, 1 : 1 + len(ids)] = ids
        input_ids[row, 1 + len(ids)] = sep_id
        attention_mask[row, : window.length] = 1
    return input_ids, attention_mask
