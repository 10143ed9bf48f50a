"""Texts in, topics and entity spans out: the one tagging path behind the CLI and the server.

Steps: tokenize the whole batch once, cut long texts into windows, run windows of similar length
together under a token budget, stitch each document's token scores back from the windows that own
them, decode spans with the constrained Viterbi, and average topic probabilities over windows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from scipy.special import expit

from .backends import TorchBackend, make_backend
from .decoding import SCORE_DECIMALS, constrained_viterbi, tag_marginals, tags_to_spans
from .documents import unpaired_surrogate
from .folders import default_model_dir
from .lexical import LexicalTopicModel, blend
from .model import ModelMeta, NewsTaggerModel, load_model_folder
from .schema import the_model_knows
from .windowing import (EncodedText, character_parts, encode_texts, pad_batch, plan_windows,
                        token_budget_batches)


# About 0.2 GB of working memory (0.8 KB a character, outside the encoder), and long enough runs of
# stories for the token-budget batches to pair windows of like length.
PART_CHARS = 250_000


class Tagger:
    """A model folder loaded for tagging: `Tagger.load(folder)`, then `tag(texts)`. One tagger may be
    shared by threads; the backend's thread count (`threads`) is torch's, which it sets for the whole
    process and, on the torch backend, again in each thread it tags in."""

    def __init__(self, model: NewsTaggerModel, tokenizer, meta: ModelMeta, backend=None,
                 max_batch_tokens: int | None = None, topic_lexical: LexicalTopicModel | None = None):
        if topic_lexical is not None and topic_lexical.topics != meta.schema.topics:
            raise ValueError(f"the lexical topic model's topics {topic_lexical.topics} are not the model's "
                             f"{meta.schema.topics}")
        self.model = model
        self.tokenizer = tokenizer
        self.meta = meta
        self.schema = meta.schema
        self.backend = backend or TorchBackend(model, device=model.device)
        self.max_batch_tokens = max_batch_tokens or self.backend.batch_tokens
        self.topic_lexical = topic_lexical

    @classmethod
    def load(cls, folder: str | Path | None = None, *, backend: str = "auto", precision: str = "auto",
             device: str = "auto", threads: int | None = None, max_batch_tokens: int | None = None) -> "Tagger":
        """A tagger on the folder's model; `auto` takes the fastest backend that is exact or has
        passed `newstagger check` (see backends.make_backend). `threads` sets torch's thread count,
        process-wide and, on the torch backend, in each thread this tagger tags in (default: the cores this
        process may use)."""
        # resolved once: every file comes from one folder, even while a link to it (registry/current) moves
        folder = Path(folder or default_model_dir()).resolve()
        model, tokenizer, meta = load_model_folder(folder)
        scorer = make_backend(folder, model, backend, precision, device, threads)
        return cls(model, tokenizer, meta, backend=scorer, max_batch_tokens=max_batch_tokens,
                   topic_lexical=LexicalTopicModel.load(folder, meta.schema.topics))

    @classmethod
    def load_exact(cls, folder: str | Path | None = None, *, device: str = "auto") -> "Tagger":
        """A tagger on the model itself, PyTorch fp32, whatever faster approximate backend its folder
        offers: what evaluation, the retraining gate and agreement checks measure."""
        return cls.load(folder, backend="torch", precision="fp32", device=device)

    def tag(self, texts: Iterable[str], *, thresholds: dict[str, float] | None = None,
            entity_types: Iterable[str] | None = None, entity_threshold: float | None = None,
            encoded: list[EncodedText] | None = None) -> list[dict]:
        """One result per text, in order: {"topics": {label: score}, "labels": [...], "entities": [...]}.

        `thresholds` overrides the model's per-topic thresholds; `entity_types` keeps only those
        types (None keeps all); `entity_threshold` overrides the model's minimum entity score;
        `encoded` is `encode(texts)` when the caller made it already. The texts are scored in parts of
        at most `PART_CHARS` characters, so working memory stays bounded however many are given; the
        results themselves are all kept.
        """
        if texts is None or isinstance(texts, (str, bytes, Mapping)):  # iterable, but not of stories
            hint = ": wrap a single text in a list" if isinstance(texts, str) else ""
            raise TypeError(f"texts must be a list of str, not a {type(texts).__name__}{hint}")
        texts = list(texts)  # a generator, a tuple, a numpy array or a pandas column
        if (problem := _untaggable(texts)) is not None:  # before any part is scored (13 ms a million characters)
            raise ValueError(problem)
        if encoded is not None and len(encoded) != len(texts):
            raise ValueError(f"encoded holds {len(encoded)} encodings for {len(texts)} texts")
        if entity_types is not None and not isinstance(entity_types, str):
            entity_types = set(entity_types)  # read once: it may be a one-shot iterator
        self.check_options(thresholds, entity_types, entity_threshold)
        results = []
        for part in character_parts(texts, PART_CHARS):
            part_texts, part_encoded = texts[part], None if encoded is None else encoded[part]
            topic_probs, tag_log_probs, part_encoded = self.score(part_texts, part_encoded)
            paths = self.best_paths(tag_log_probs)
            confidences = self.tag_confidences(tag_log_probs, paths)
            for d, text in enumerate(part_texts):
                entities = tags_to_spans(paths[d], confidences[d], part_encoded[d].offsets, text, self.schema)
                scores = {topic: round(float(p), SCORE_DECIMALS)
                          for topic, p in zip(self.schema.topics, topic_probs[d])}
                results.append(self.with_options({"topics": scores, "entities": entities}, thresholds, entity_types,
                                                 entity_threshold))
        return results

    def check_options(self, thresholds: dict[str, float] | None = None, entity_types: Iterable[str] | None = None,
                      entity_threshold: float | None = None) -> None:
        """ValueError naming each option that names a label this model does not know or a cut outside
        0 to 1: a typo would otherwise change nothing, or silently drop every entity."""
        problems = []
        if isinstance(entity_types, str):
            problems.append(f"entity_types must be a collection of types, not the string {entity_types!r}")
        elif entity_types is not None:
            unknown = sorted(set(entity_types) - set(self.schema.entity_types))
            if unknown:
                problems.append(f"entity_types: unknown {unknown}; "
                                f"{the_model_knows(self.schema.entity_types, 'entity types')}")
        for topic, cut in (thresholds or {}).items():
            if topic not in self.schema.topics:
                problems.append(f"thresholds: unknown topic {topic!r}; {the_model_knows(self.schema.topics, 'topics')}")
            elif not 0.0 <= cut <= 1.0:  # NaN fails too
                problems.append(f"thresholds[{topic!r}] must be between 0 and 1, not {cut}")
        if entity_threshold is not None and not 0.0 <= entity_threshold <= 1.0:
            problems.append(f"entity_threshold must be between 0 and 1, not {entity_threshold}")
        if problems:
            raise ValueError("; ".join(problems))

    def with_options(self, result: dict, thresholds: dict[str, float] | None = None,
                     entity_types: Iterable[str] | None = None, entity_threshold: float | None = None) -> dict:
        """A `tag` result relabelled under these thresholds and cut to these entity types and scores,
        as a new object (the result given stays as it was).

        Lets one forward pass serve callers that asked for different options (the server's
        micro-batcher); applied to an unfiltered result (`entity_threshold=0`) it gives exactly what
        `tag` would have. The options are not checked here: `check_options` them first.
        """
        wanted = set(entity_types) if entity_types is not None else None
        min_score = self.meta.entity_threshold if entity_threshold is None else entity_threshold
        entities = [dict(e) for e in result["entities"]
                    if (wanted is None or e["type"] in wanted) and e["score"] >= min_score]
        # highest score first: an editor reads the strongest topic first (evaluate's main_topic where it passes)
        labels = sorted((t for t, p in result["topics"].items() if p >= self._threshold(t, thresholds)),
                        key=lambda t: -result["topics"][t])
        return {"topics": dict(result["topics"]), "labels": labels, "entities": entities}

    def _threshold(self, topic: str, overrides: dict[str, float] | None) -> float:
        if overrides and topic in overrides:
            return overrides[topic]
        return self.meta.threshold(topic)

    def best_paths(self, log_probs: list[np.ndarray]) -> list[np.ndarray]:
        """The decoder's tag sequence for each document's token log-probabilities."""
        transitions = self._learned_transitions(log_probs)
        if transitions is None:
            return _best_valid_paths(log_probs)
        return _grouped_by_length(range(len(log_probs)), log_probs,
                                  lambda group: constrained_viterbi(group, transitions))

    def tag_confidences(self, log_probs: list[np.ndarray], paths: list[np.ndarray]) -> list[np.ndarray]:
        """The probability of each chosen tag: the token head's, or with a CRF the tag's marginal
        probability given the whole document (the CRF's token scores alone are not calibrated)."""
        transitions = self._learned_transitions(log_probs)
        if transitions is None:
            return [np.exp(lp[np.arange(len(path)), path]) for lp, path in zip(log_probs, paths)]
        marginals = _grouped_by_length(range(len(log_probs)), log_probs,
                                       lambda group: tag_marginals(group, transitions))
        return [m[np.arange(len(path)), path] for m, path in zip(marginals, paths)]

    def _learned_transitions(self, log_probs: list[np.ndarray]) -> tuple | None:
        """The CRF's decoding scores, if the model has one, for these log-probabilities' tags.

        Those may be only the leading tags (an older schema that this model's extends: labels are
        only ever appended); the transitions are cut to match.
        """
        transitions = self.model.decoding_transitions()
        if transitions is None or not log_probs:
            return None
        num_tags = log_probs[0].shape[1]
        return transitions[0][:num_tags, :num_tags], transitions[1][:num_tags]

    def encode(self, texts: Sequence[str]) -> list[EncodedText]:
        """Token ids and offsets of whole texts; separate so a caller can tokenize the next texts
        while the encoder runs on these. ValueError naming the first text the tokenizer cannot take."""
        try:
            return encode_texts(self.tokenizer, list(texts))
        except TypeError:
            if (problem := _untaggable(texts)) is not None:  # looked for only on failure: tag has checked
                raise ValueError(problem) from None
            raise

    def score(self, texts: Sequence[str], encoded: list[EncodedText] | None = None):
        """Per-document topic probabilities [docs, topics], token tag log-probs, and encodings.

        Topic probabilities are the topic head's, blended with the lexical topic model's where the
        model folder has one (see newstagger.lexical); 0 for a text with no tokens.
        """
        encoded = encoded if encoded is not None else self.encode(texts)
        windows = [w for d, enc in enumerate(encoded)
                   for w in plan_windows(d, len(enc.ids), self.meta.max_length, self.meta.stride)]
        # Each window's owned tokens go straight into one array for the whole chunk, so no batch
        # output outlives its batch: keeping slices of them kept every batch's memory (and
        # fragmented the heap: RSS grew by ~5 MB per batch).
        doc_starts = np.cumsum([0] + [len(enc.ids) for enc in encoded])
        token_log_probs = np.empty((doc_starts[-1], len(self.schema.tags)), dtype=np.float32)
        topic_sums = np.zeros((len(texts), len(self.schema.topics)), dtype=np.float64)
        weights = np.zeros(len(texts), dtype=np.float64)
        special = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id, self.tokenizer.pad_token_id
        for batch in token_budget_batches([w.length for w in windows], self.max_batch_tokens):
            batch_windows = [windows[i] for i in batch]
            input_ids, attention_mask = pad_batch(encoded, batch_windows, *special)
            topic_logits, tag_log_probs = self.backend(input_ids, attention_mask)
            topic_probs = expit(topic_logits)
            for row, w in enumerate(batch_windows):
                owned = doc_starts[w.doc] + w.own_start, doc_starts[w.doc] + w.own_end
                # +1: position 0 of every window is [CLS]
                token_log_probs[owned[0] : owned[1]] = tag_log_probs[row, 1 + w.own_start - w.start : 1 + w.own_end - w.start]
                weight = max(w.own_end - w.own_start, 1)
                topic_sums[w.doc] += weight * topic_probs[row]
                weights[w.doc] += weight
        doc_log_probs = [token_log_probs[start:end] for start, end in zip(doc_starts[:-1], doc_starts[1:])]
        doc_topic_probs = topic_sums / weights[:, None]
        if self.topic_lexical is not None:
            doc_topic_probs = blend(doc_topic_probs, self.topic_lexical.predict(texts), self.topic_lexical.weight)
        # A text without tokens (empty, whitespace) is no evidence for any topic; the heads would answer
        # a bare [CLS] [SEP] with their learned priors, labelling an empty story.
        doc_topic_probs[[len(enc.ids) == 0 for enc in encoded]] = 0.0
        return doc_topic_probs, doc_log_probs, encoded


def _untaggable(texts: Sequence[str]) -> str | None:
    """What makes the first text the tokenizer cannot take untaggable, naming it; None if all can be
    tagged (its own TypeError fails the whole batch without saying which)."""
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            return f"texts[{i}] is a {type(text).__name__}, not a str"
        if (at := unpaired_surrogate(text)) is not None:
            return f"texts[{i}] has a lone surrogate at character {at}"
    return None


def _best_valid_paths(log_probs: list[np.ndarray]) -> list[np.ndarray]:
    """constrained_viterbi's answer for each document (plain BIO rules), for less work.

    Where the per-token argmax already is a valid BIO sequence it is the constrained optimum too
    (no path scores more than the sum of per-token maxima), so only the other documents are
    searched. Learned transitions break that shortcut: a CRF's decoder searches every document.
    """
    paths = [lp.argmax(axis=1) for lp in log_probs]
    to_search = [d for d, path in enumerate(paths) if not _is_valid_bio(path)]
    for d, path in zip(to_search, _grouped_by_length(to_search, log_probs, constrained_viterbi)):
        paths[d] = path
    return paths


def _grouped_by_length(documents, log_probs: list[np.ndarray], search, group_size: int = 32) -> list[np.ndarray]:
    """`search` over these documents in groups of similar length, answers in the given order: the
    batched search steps every document through the longest one's length, which over a whole
    mixed chunk cost 3-4x the useful work."""
    documents = list(documents)
    order = sorted(range(len(documents)), key=lambda i: len(log_probs[documents[i]]))
    answers: list = [None] * len(documents)
    for start in range(0, len(order), group_size):
        group = order[start : start + group_size]
        for i, answer in zip(group, search([log_probs[documents[i]] for i in group])):
            answers[i] = answer
    return answers


def _is_valid_bio(tags: np.ndarray) -> bool:
    """Every I-x (tag 2k+2) follows a B-x (2k+1) or an I-x; tag 0 is O."""
    previous = np.concatenate(([0], tags[:-1]))
    inside = (tags > 0) & (tags % 2 == 0)
    return bool(np.all(~inside | (previous == tags - 1) | (previous == tags)))
