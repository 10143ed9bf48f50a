"""BIO tag scores in, entity spans with exact character offsets out.

Decoding is a Viterbi search constrained to valid BIO sequences (an I- tag only after a B- or I-
of the same type), so the output never holds the fragments argmax decoding produces: orphan I-
tags, half names, a type switching in the middle of a mention. It runs over a batch of documents
at once, vectorised over documents and tags.
"""

from __future__ import annotations

import numpy as np

from .schema import LabelSchema


def bio_transitions(num_types: int) -> tuple[np.ndarray, np.ndarray]:
    """Additive scores (0 allowed, -inf forbidden) for tag -> tag moves and for the first tag."""
    num_tags = 1 + 2 * num_types
    inside = np.arange(2, num_tags, 2)
    transitions = np.zeros((num_tags, num_tags), dtype=np.float32)
    transitions[:, inside] = -np.inf
    for i in inside:
        transitions[i - 1, i] = 0.0  # B-x -> I-x
        transitions[i, i] = 0.0  # I-x -> I-x
    start = np.zeros(num_tags, dtype=np.float32)
    start[inside] = -np.inf
    return transitions, start


def constrained_viterbi(log_probs: list[np.ndarray],
                        transitions: tuple[np.ndarray, np.ndarray] | None = None) -> list[np.ndarray]:
    """Best valid BIO tag sequence for each [n_i, num_tags] array of log-probabilities.

    `transitions` are (tag -> tag, first tag) scores to add, forbidden moves at -inf: a CRF's
    learned ones (newstagger.crf); by default the plain BIO rules.
    """
    if not log_probs:
        return []
    num_tags = log_probs[0].shape[1]
    transitions, start = transitions if transitions is not None else bio_transitions((num_tags - 1) // 2)
    lengths = np.array([len(lp) for lp in log_probs])
    batch, longest = len(log_probs), max(int(lengths.max()), 1)
    emissions = np.zeros((batch, longest, num_tags), dtype=np.float32)
    for b, lp in enumerate(log_probs):
        emissions[b, : len(lp)] = lp

    score = emissions[:, 0] + start
    backpointers = np.zeros((batch, longest, num_tags), dtype=np.int16)
    for t in range(1, longest):
        candidates = score[:, :, None] + transitions[None]
        backpointers[:, t] = candidates.argmax(axis=1)
        active = (t < lengths)[:, None]
        score = np.where(active, candidates.max(axis=1) + emissions[:, t], score)

    paths = np.zeros((batch, longest), dtype=np.int64)
    rows = np.arange(batch)
    last = np.maximum(lengths - 1, 0)
    paths[rows, last] = score.argmax(axis=1)
    for t in range(longest - 1, 0, -1):
        inside = t <= last
        previous = backpointers[rows, t, paths[rows, t]]
        paths[:, t - 1] = np.where(inside, previous, paths[:, t - 1])
    return [paths[b, :n] for b, n in enumerate(lengths)]


def tag_marginals(log_probs: list[np.ndarray], transitions: tuple[np.ndarray, np.ndarray]) -> list[np.ndarray]:
    """P(token t has tag y | the whole sequence) under a CRF's scores, [n_i, num_tags] per document.

    With a CRF these are the calibrated per-token probabilities (the token head's own softmax is
    not one: the transitions carry part of the evidence). Forward-backward over a batch of
    documents in probability space, each step renormalised: a marginal is alpha x beta normalised
    over the tags, so the per-step scales cancel, and a step is one small matrix product.
    """
    if not log_probs:
        return []
    transition, start = (np.exp(x.astype(np.float64)) for x in transitions)  # forbidden moves: 0
    lengths = np.array([len(lp) for lp in log_probs])
    batch, longest, num_tags = len(log_probs), max(int(lengths.max()), 1), log_probs[0].shape[1]
    likelihoods = np.ones((batch, longest, num_tags))  # 1 past a row's end keeps its steps finite
    for b, lp in enumerate(log_probs):
        likelihoods[b, : len(lp)] = np.exp(lp)

    alpha = np.empty_like(likelihoods)
    alpha[:, 0] = likelihoods[:, 0] * start
    alpha[:, 0] /= alpha[:, 0].sum(axis=1, keepdims=True)
    for t in range(1, longest):
        step = (alpha[:, t - 1] @ transition) * likelihoods[:, t]
        alpha[:, t] = step / step.sum(axis=1, keepdims=True)
    beta = np.ones_like(likelihoods)  # at each row's last token and past it
    for t in range(longest - 2, -1, -1):
        step = (likelihoods[:, t + 1] * beta[:, t + 1]) @ transition.T
        beta[:, t] = np.where((t < lengths - 1)[:, None], step / step.sum(axis=1, keepdims=True), 1.0)
    marginals = alpha * beta
    marginals /= marginals.sum(axis=2, keepdims=True)
    return [marginals[b, :n] for b, n in enumerate(lengths)]


def tags_to_spans(
    tags: np.ndarray,
    tag_probs: np.ndarray,
    offsets: np.ndarray,
    text: str,
    schema: LabelSchema,
) -> list[dict]:
    """Entity dicts {start, end, type, text, score} from a BIO sequence over tokens.

    `tag_probs` is the probability of each chosen tag (see `Tagger.tag_confidences`); a span's
    score is their mean (`span_score`).
    """
    return [{"start": start, "end": end, "type": schema.entity_types[kind], "text": text[start:end], "score": score}
            for start, end, kind, score in char_spans(tags, tag_probs, offsets)]


def char_spans(tags: np.ndarray, tag_probs: np.ndarray, offsets: np.ndarray) -> list[tuple[int, int, int, float]]:
    """(start, end, type index, score) in characters of each span of a BIO sequence over tokens
    (`lenient_spans`); `offsets` are the tokens' character offsets.

    Tokens can share a character (the tokenizer spells a Hangul syllable as two or three letters),
    so a span may begin inside the character where the one before it ends: it begins after that
    character instead, and is dropped if nothing is left, so that spans never overlap.
    """
    spans: list[tuple[int, int, int, float]] = []
    for b, e, kind in lenient_spans(tags):
        start, end = int(offsets[b, 0]), int(offsets[e - 1, 1])
        if spans:
            start = max(start, spans[-1][1])
        if start < end:
            spans.append((start, end, kind, span_score(tag_probs, b, e)))
    return spans


SCORE_DECIMALS = 4  # scores are reported, cut by thresholds and evaluated at this precision alike


def span_score(tag_probs: np.ndarray, begin: int, end: int) -> float:
    """An entity's confidence: the mean probability of its tokens' tags, as reported and as cut by
    the model's entity threshold."""
    return round(float(np.mean(tag_probs[begin:end], dtype=np.float64)), SCORE_DECIMALS)


def lenient_spans(tags: np.ndarray) -> list[tuple[int, int, int]]:
    """(begin, end, type index) token spans of a BIO sequence, valid or not.

    A valid path (the Viterbi decoders' output) is read exactly; on an invalid one (naive argmax
    decoding, which evaluation compares against) an I- tag that does not continue a span of its
    type opens a new span, as naive decoders do.
    """
    spans: list[tuple[int, int, int]] = []
    for t, tag in enumerate(tags.tolist()):
        if tag == 0:
            continue
        kind, is_inside = (tag - 1) // 2, tag % 2 == 0
        if is_inside and spans and spans[-1][1] == t and spans[-1][2] == kind:
            spans[-1] = (spans[-1][0], t + 1, kind)
        else:
            spans.append((t, t + 1, kind))
    return spans
