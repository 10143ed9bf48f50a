"""Grouped cross-validation of the lexical topic model's settings (newstagger.lexical).

The training split's validation holds 209 paragraphs of a few reports, too few to choose n-gram
ranges or regularisation on; this scores each setting on every topic-labelled paragraph instead,
out of fold, with folds grouped by report (a report's paragraphs never sit on both sides), at the
0.5 threshold. Prints micro/macro F1 and per-topic F1 per setting.

  python scripts/topic_lexical_cv.py ../shared/data/topics/train.jsonl
"""

from __future__ import annotations

import argparse

import numpy as np
import scipy.sparse as sp
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.model_selection import GroupKFold

from newstagger.lexical import FIT_SETTINGS, NGRAM_RANGE
from training.data import parse_data_spec, read_documents

SHIPPED = {"ngram_range": NGRAM_RANGE, "C": FIT_SETTINGS["C"], "min_df": FIT_SETTINGS["min_df"],
           "max_features": FIT_SETTINGS["max_features"], "jieba_words": False}
VARIANTS = {
    "shipped: char 1-3, C 10": {},
    "C 3": {"C": 3.0},
    "C 30": {"C": 30.0},
    "C 100": {"C": 100.0},
    "char 1-4 (200k features)": {"ngram_range": (1, 4), "max_features": 200_000},
    "char 2-4 (200k features)": {"ngram_range": (2, 4), "max_features": 200_000},
    "min_df 1, no feature cap": {"min_df": 1, "max_features": None},
    "+ jieba words": {"jieba_words": True},
}


def out_of_fold_probs(texts, words, targets, groups, folds, ngram_range, C, min_df, max_features, jieba_words):
    probs = np.zeros(targets.shape)
    for train, test in GroupKFold(folds).split(texts, targets, groups):
        chars = TfidfVectorizer(analyzer="char", ngram_range=ngram_range, sublinear_tf=True,
                                min_df=min_df, max_features=max_features)
        x_train = chars.fit_transform([texts[i] for i in train])
        x_test = chars.transform([texts[i] for i in test])
        if jieba_words:
            vocabulary = TfidfVectorizer(analyzer=str.split, sublinear_tf=True, min_df=2)
            x_train = sp.hstack([x_train, vocabulary.fit_transform([words[i] for i in train])]).tocsr()
            x_test = sp.hstack([x_test, vocabulary.transform([words[i] for i in test])]).tocsr()
        for k in range(targets.shape[1]):
            if targets[train, k].min() == targets[train, k].max():  # one class only: as LexicalTopicModel.fit does
                probs[test, k] = targets[train[0], k]
                continue
            classifier = LogisticRegression(C=C, class_weight=FIT_SETTINGS["class_weight"],
                                            max_iter=FIT_SETTINGS["max_iter"]).fit(x_train, targets[train, k])
            probs[test, k] = classifier.predict_proba(x_test)[:, 1]
    return probs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="topic-labelled documents with a `group`: PATH[:FORMAT], any importer format")
    parser.add_argument("--folds", type=int, default=5, help="grouped folds, at least 2")
    args = parser.parse_args()

    try:
        documents = [doc for doc in read_documents(*parse_data_spec(args.data)) if doc.topics is not None]
    except (OSError, ValueError) as err:  # DataError is a ValueError
        parser.error(str(err))
    if not documents:
        parser.error(f"{args.data} holds no topic-labelled documents")
    texts = [doc.text for doc in documents]
    groups = [doc.group or doc.id for doc in documents]
    if not 2 <= args.folds <= len(set(groups)):
        parser.error(f"--folds must be from 2 to the {len(set(groups))} groups of topic-labelled documents in "
                     f"{args.data}, not {args.folds}")
    topics = sorted({topic for doc in documents for topic in doc.topics})
    targets = np.array([[topic in doc.topics for topic in topics] for doc in documents], dtype=int)
    words = None
    if any(variant.get("jieba_words") for variant in VARIANTS.values()):
        import jieba

        words = [" ".join(jieba.lcut(text)) for text in texts]
    print(f"{len(documents)} paragraphs, {len(set(groups))} groups, {args.folds} grouped folds; F1 at threshold 0.5")
    print(f"{'setting':28s} {'micro':>6s} {'macro':>6s}  " + "  ".join(f"{t:>15s}" for t in topics))
    for name, change in VARIANTS.items():
        predicted = out_of_fold_probs(texts, words, targets, groups, args.folds, **{**SHIPPED, **change}) >= 0.5
        per_topic = f1_score(targets, predicted, average=None)
        print(f"{name:28s} {f1_score(targets, predicted, average='micro'):6.3f} "
              f"{f1_score(targets, predicted, average='macro'):6.3f}  " + "  ".join(f"{f:15.3f}" for f in per_topic),
              flush=True)


if __name__ == "__main__":
    main()
