"""A lexical topic model blended into the BERT topic head: character n-gram TF-IDF + logistic regression.

On validation report paragraphs, character 1-3-gram TF-IDF with one logistic regression per topic
scores better than the fine-tuned topic head, but news stories are not report paragraphs, and on them
it scores far worse (training/EXPERIMENTS.md). So it is blended in, with a weight chosen on validation
and capped by `max_topic_blend` (0.25 for the default model), for what it adds on paragraphs:

    topic probability = (1 - w) * p_bert + w * p_lexical

Training (training.train) fits it on the topic-labelled training documents, chooses w on validation and
tunes the topic thresholds on the blend; w = 0 means no component. In a model folder it is two files,
no pickle:

- `topic_lexical.safetensors`: `idf` [vocab], `coef` [topics, vocab], `intercept` [topics] (float32);
- `topic_lexical.json`: the vocabulary in column order, the n-gram range and other settings, the topic
  order and the blend weight w.

Fitting lets scikit-learn's TfidfVectorizer choose the vocabulary and idf; features, for fitting and
predicting alike, are computed here with numpy over a whole batch at once: each character n-gram is one
int64 key, looked up in the vocabulary's sorted keys. They equal TfidfVectorizer's (tested), which in
Python loops is several times slower and would cost the tagger a noticeable share of its speed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file
from scipy.special import expit

from .documents import DataError

WEIGHTS_FILE = "topic_lexical.safetensors"
SETTINGS_FILE = "topic_lexical.json"
NGRAM_RANGE = (1, 3)
FIT_SETTINGS = {"min_df": 2, "max_features": 100_000, "C": 10.0, "class_weight": "balanced", "max_iter": 2000}

# Code point + 1 (so no character is 0) fits in 21 bits: an n-gram of up to 3 characters is one int64,
# and n-grams of different lengths never share a key.
_BITS_PER_CHAR = 21
# What scikit-learn's char analyzer does before cutting n-grams (after lowercasing).
_WHITESPACE_RUNS = re.compile(r"\s\s+")
# The logit of a topic all or none of the training documents carry: LogisticRegression needs both classes.
_CONSTANT_LOGIT = 10.0


class LexicalTopicModel:
    """Topic probabilities from character n-grams; `weight` is its share of the blend (w above)."""

    def __init__(self, topics: Sequence[str], vocabulary: Sequence[str], idf, coef, intercept,
                 weight: float = 0.0, ngram_range: Sequence[int] = NGRAM_RANGE):
        self.topics = list(topics)
        self.vocabulary = list(vocabulary)
        self.idf = np.asarray(idf, dtype=np.float32)
        self.coef = np.asarray(coef, dtype=np.float32)
        self.intercept = np.asarray(intercept, dtype=np.float32)
        self.weight = float(weight)
        self.ngram_range = tuple(ngram_range)
        keys = np.array([_key(gram) for gram in self.vocabulary], dtype=np.int64)
        self._column_order = np.argsort(keys)
        self._sorted_keys = keys[self._column_order]

    @classmethod
    def fit(cls, texts: Sequence[str], topic_sets: Sequence[Sequence[str]],
            topics: Sequence[str]) -> "LexicalTopicModel":
        """Fitted on these texts and their topics; `weight` stays 0 until the caller chooses it."""
        from sklearn.feature_extraction.text import TfidfVectorizer  # slow to import; only training needs it
        from sklearn.linear_model import LogisticRegression

        vectorizer = TfidfVectorizer(analyzer="char", ngram_range=NGRAM_RANGE, sublinear_tf=True,
                                     min_df=FIT_SETTINGS["min_df"], max_features=FIT_SETTINGS["max_features"])
        vectorizer.fit(texts)
        vocabulary = sorted(vectorizer.vocabulary_, key=vectorizer.vocabulary_.get)
        no_weights = np.zeros((len(topics), len(vocabulary)))
        model = cls(topics, vocabulary, vectorizer.idf_, no_weights, np.zeros(len(topics)))
        features = model.features(texts)
        for k, topic in enumerate(model.topics):
            target = np.array([topic in topic_set for topic_set in topic_sets])
            if target.all() or not target.any():
                model.intercept[k] = _CONSTANT_LOGIT if target.all() else -_CONSTANT_LOGIT
                continue
            classifier = LogisticRegression(C=FIT_SETTINGS["C"], class_weight=FIT_SETTINGS["class_weight"],
                                            max_iter=FIT_SETTINGS["max_iter"]).fit(features, target)
            model.coef[k], model.intercept[k] = classifier.coef_[0], classifier.intercept_[0]
        return model

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        """Topic probabilities [texts, topics]."""
        return expit(self.features(texts) @ self.coef.T + self.intercept)

    def features(self, texts: Sequence[str]) -> sp.csr_matrix:
        """TF-IDF rows [texts, vocabulary]: (1 + log count) * idf of each n-gram, each row L2-normalised."""
        codes, text_of = _char_codes(texts)
        rows, columns = [], []
        for n in range(self.ngram_range[0], self.ngram_range[1] + 1):
            stop = max(len(codes) - n + 1, 0)
            starts = np.flatnonzero(text_of[:stop] == text_of[n - 1 : n - 1 + stop])  # n-grams within one text
            keys = codes[starts]
            for offset in range(1, n):
                keys = (keys << _BITS_PER_CHAR) | codes[starts + offset]
            position = np.searchsorted(self._sorted_keys, keys).clip(max=len(self._sorted_keys) - 1)
            known = self._sorted_keys[position] == keys
            rows.append(text_of[starts[known]])
            columns.append(self._column_order[position[known]])
        rows, columns = np.concatenate(rows), np.concatenate(columns)
        # csr from (row, column) pairs sums the duplicates: counts
        tfidf = sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, columns)),
                              shape=(len(texts), len(self.vocabulary)))
        tfidf.data = (np.log(tfidf.data) + 1) * self.idf[tfidf.indices]
        row_of_entry = np.repeat(np.arange(len(texts)), np.diff(tfidf.indptr))
        norms = np.sqrt(np.bincount(row_of_entry, weights=tfidf.data**2, minlength=len(texts)))
        tfidf.data /= norms[row_of_entry]
        return tfidf

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        save_file({"idf": self.idf, "coef": self.coef, "intercept": self.intercept}, folder / WEIGHTS_FILE)
        (folder / WEIGHTS_FILE).chmod(0o644)  # safetensors writes 0600 (see model.save_model_folder)
        settings = {
            "topics": self.topics,
            "blend_weight": self.weight,
            "ngram_range": list(self.ngram_range),
            "analyzer": "char, lowercased, whitespace runs as one space (scikit-learn's char analyzer)",
            "tf": "1 + log(count), times idf, rows L2-normalised",
            "fit": FIT_SETTINGS,
            "vocabulary": self.vocabulary,
        }
        (folder / SETTINGS_FILE).write_text(json.dumps(settings, ensure_ascii=False) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, folder: str | Path, topics: Sequence[str]) -> "LexicalTopicModel | None":
        """The folder's component for a model with these topics, None when it has none, or DataError
        naming its files where they do not make one (the tagger would fail or score outside 0 to 1)."""
        folder = Path(folder)
        if not (folder / SETTINGS_FILE).is_file():
            return None
        try:
            settings = json.loads((folder / SETTINGS_FILE).read_text(encoding="utf-8"))
            arrays = load_file(folder / WEIGHTS_FILE)
            model = cls(settings["topics"], settings["vocabulary"], arrays["idf"], arrays["coef"],
                        arrays["intercept"], settings["blend_weight"], settings["ngram_range"])
            problem = model._inconsistency(topics)
        except (OSError, ValueError, KeyError, TypeError, OverflowError, SafetensorError) as err:
            problem = repr(err)
        if problem:
            raise DataError(f"{folder / SETTINGS_FILE} with {WEIGHTS_FILE} is not a usable lexical topic model: "
                            f"{problem}; restore the folder as it was written")
        return model

    def _inconsistency(self, topics: Sequence[str]) -> str:
        """Why these settings and arrays cannot score a model with these topics, or ''."""
        shapes = {"idf": (len(self.vocabulary),), "coef": (len(self.topics), len(self.vocabulary)),
                  "intercept": (len(self.topics),)}
        for name, shape in shapes.items():
            if getattr(self, name).shape != shape:
                return f"{name} has shape {getattr(self, name).shape}, where its settings ask for {shape}"
            if not np.isfinite(getattr(self, name)).all():
                return f"{name} is not all finite"
        if self.topics != list(topics):
            return f"its topics {self.topics} are not the model's {list(topics)}"
        if not 0.0 <= self.weight <= 1.0:  # NaN fails too
            return f"blend_weight must be from 0 to 1, not {self.weight}"
        longest = 63 // _BITS_PER_CHAR  # an n-gram's key is one int64
        if len(self.ngram_range) != 2 or not 1 <= self.ngram_range[0] <= self.ngram_range[1] <= longest:
            return f"ngram_range must be two lengths from 1 to {longest}, not {list(self.ngram_range)}"
        return ""


def blend(bert_probs: np.ndarray, lexical_probs: np.ndarray, weight: float) -> np.ndarray:
    return (1 - weight) * bert_probs + weight * lexical_probs


def remove(folder: str | Path) -> None:
    """Drop a folder's component, so that a model saved over an older one does not inherit it."""
    for name in (WEIGHTS_FILE, SETTINGS_FILE):
        (Path(folder) / name).unlink(missing_ok=True)


def _char_codes(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Code point + 1 of every character of the normalised texts, concatenated, and the text of each."""
    normalised = [_WHITESPACE_RUNS.sub(" ", text.lower()) for text in texts]
    joined = "".join(normalised).encode("utf-32-le", "surrogatepass")
    codes = np.frombuffer(joined, dtype=np.uint32).astype(np.int64) + 1
    text_of = np.repeat(np.arange(len(normalised)), [len(text) for text in normalised])
    return codes, text_of


def _key(gram: str) -> int:
    key = 0
    for char in gram:
        key = (key << _BITS_PER_CHAR) | (ord(char) + 1)
    return key
