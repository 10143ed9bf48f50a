"""Evaluation: seqeval strict IOB2 for entities, scikit-learn P/R/F1 for topics; `newstagger evaluate`.

Entities are scored on characters, not tokens: gold and predicted spans are both turned into
character-level IOB2 sequences, so the score is about the offsets users get, whatever the
tokenizer did. The coarse PER/LOC/ORG view is scored the same way after mapping types.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from seqeval.metrics import classification_report
from seqeval.scheme import IOB2
from sklearn.metrics import precision_recall_fscore_support
from tqdm import tqdm

from newstagger.cli import add_model_argument, check_fraction, check_output_path, refuse_overwriting
from newstagger.decoding import SCORE_DECIMALS, char_spans
from newstagger.documents import DataError, Document
from newstagger.errors import UsageError
from newstagger.schema import LabelSchema
from newstagger.tagger import Tagger

DECODINGS = ("viterbi", "argmax")
BATCH_DOCUMENTS = 256  # per tagger call: bounds the memory of the window batches


def char_iob2(length: int, spans: Sequence[tuple[int, int, str]]) -> list[str]:
    tags = ["O"] * length
    for start, end, entity_type in spans:
        tags[start] = f"B-{entity_type}"
        for i in range(start + 1, end):
            tags[i] = f"I-{entity_type}"
    return tags


def entity_metrics(gold: list[list[tuple[int, int, str]]], predicted: list[list[tuple[int, int, str]]],
                   lengths: list[int]) -> dict:
    """Strict IOB2 span scores per type and micro/macro averages."""
    y_true = [char_iob2(n, spans) for n, spans in zip(lengths, gold)]
    y_pred = [char_iob2(n, spans) for n, spans in zip(lengths, predicted)]
    with warnings.catch_warnings(), np.errstate(invalid="ignore"):  # a macro over no type: NaN, made 0 by _row
        warnings.simplefilter("ignore", RuntimeWarning)
        report = classification_report(y_true, y_pred, mode="strict", scheme=IOB2, output_dict=True, zero_division=0)
    rows = {label: _row(values) for label, values in report.items() if "avg" not in label}
    return {
        "per_label": dict(sorted(rows.items())),
        "micro": _row(report["micro avg"]),
        "macro": _row(report["macro avg"]),
        "documents": len(lengths),
    }


def topic_metrics(gold: np.ndarray, probs: np.ndarray, thresholds: Sequence[float], topics: Sequence[str]) -> dict:
    """Per-topic and micro/macro P/R/F1 of the topics at or over their thresholds (macro over the
    topics that occur in the gold set or the predictions), for gold indicators and probabilities
    [docs, topics]; and `main_topic`: how often a document's highest-scoring topic
    is one of its gold topics (documents with at least one), the headline topic an editor sees first.
    """
    predicted = at_or_over(probs, np.asarray(thresholds)).astype(np.int64)
    # sklearn reads a single column as a binary target, whose label 0 is "no topic": with a column no
    # document has beside it, every label set is read as multi-label, topic k as column k
    gold, predicted = (np.pad(np.asarray(m, dtype=np.int64).reshape(len(m), len(topics)), ((0, 0), (0, 1)))
                       for m in (gold, predicted))
    p, r, f, s = precision_recall_fscore_support(gold, predicted, average=None, zero_division=0,
                                                 labels=list(range(len(topics))))
    per_label = {t: _row({"precision": p[i], "recall": r[i], "f1-score": f[i], "support": s[i]})
                 for i, t in enumerate(topics)}
    out: dict = {"per_label": per_label}
    # As seqeval does for entity types: a topic neither in the gold set nor predicted has no F1 to average.
    occurring = [k for k in range(len(topics)) if gold[:, k].any() or predicted[:, k].any()]
    for average in ("micro", "macro"):
        p, r, f, _ = (precision_recall_fscore_support(gold, predicted, average=average, zero_division=0,
                                                      labels=occurring) if occurring else (0.0, 0.0, 0.0, None))
        out[average] = _row({"precision": p, "recall": r, "f1-score": f})
    with_topic = gold.sum(1) > 0
    # as `tag` reports the scores, so that ties go to the topic its labels list first; a text scored 0
    # for every topic (one without tokens) has no main topic, whichever topic comes first
    scores = np.round(probs[with_topic], SCORE_DECIMALS)
    right = gold[with_topic, scores.argmax(1)].astype(bool) & (scores.max(1) > 0)
    documents, correct = int(with_topic.sum()), int(right.sum())
    out["main_topic"] = {"accuracy": round(correct / documents, 4) if documents else 0.0, "correct": correct,
                         "documents": documents}
    out["documents"] = int(len(gold))
    return out


def _row(values: dict) -> dict:
    # an average over no label at all is NaN, which is not JSON: 0, as zero_division=0 scores the rest
    row = {name: round(float(np.nan_to_num(values[key])), 4)
           for name, key in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score"))}
    if "support" in values:
        row["support"] = int(values["support"])
    return row


def at_or_over(probs: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Which scores carry their label: compared as `tag` reports them, rounded, so that evaluation and
    tuning label exactly what tagging labels."""
    return np.round(probs, SCORE_DECIMALS) >= thresholds


def tune_thresholds(gold: np.ndarray, probs: np.ndarray, topics: Sequence[str],
                    current: dict[str, float] | None = None) -> dict[str, float]:
    """Per-topic threshold maximising that topic's F1 on the given (validation) documents.

    A topic without a positive there keeps its `current` threshold (a continued model's, tuned on
    data that had some), else has none (the model's default applies, and its card says it was not
    tuned); ties go to the threshold nearest 0.5.
    """
    grid = np.round(np.arange(0.05, 0.96, 0.01), 2)
    thresholds = {}
    for k, topic in enumerate(topics):
        if gold[:, k].sum() == 0:
            if current and topic in current:
                thresholds[topic] = current[topic]
            continue
        predicted = at_or_over(probs[:, k][None, :], grid[:, None])
        tp = (predicted & (gold[:, k] == 1)).sum(1)
        f1 = 2 * tp / (predicted.sum(1) + gold[:, k].sum())
        best = np.flatnonzero(f1 == f1.max())
        thresholds[topic] = float(grid[best[np.argmin(np.abs(grid[best] - 0.5))]])
    return thresholds


def coarse_spans(spans: list[tuple[int, int, str]], schema: LabelSchema) -> list[tuple[int, int, str]]:
    """The spans in the coarse view: fine types rolled up, coarse ones (MSRA's PER) as they are."""
    return [(s, e, schema.coarse.get(t, t)) for s, e, t in spans
            if t in schema.coarse or t in schema.coarse_only_types]


@dataclass
class Predictions:
    """A tagger's uncut predictions on labelled documents, what their metrics and the tuning of
    cuts are computed from: for the documents labelled for entities, gold spans, predicted spans
    with their scores and text lengths; for those labelled for topics, gold rows and probabilities."""

    gold_spans: list[list[tuple[int, int, str]]] = field(default_factory=list)
    predicted_spans: list[list[tuple[int, int, str, float]]] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    coarse_only: list[bool] = field(default_factory=list)  # see coarse_view_alone
    topic_gold: np.ndarray | None = None
    topic_probs: np.ndarray | None = None

    @classmethod
    def joined(cls, parts: Sequence["Predictions"]) -> "Predictions":
        """One set of predictions of several sources, each keeping its own coarse_only."""
        topics = [part for part in parts if part.topic_gold is not None]
        return cls([spans for part in parts for spans in part.gold_spans],
                   [spans for part in parts for spans in part.predicted_spans],
                   [length for part in parts for length in part.lengths],
                   [coarse for part in parts for coarse in part.coarse_only],
                   np.concatenate([part.topic_gold for part in topics]) if topics else None,
                   np.concatenate([part.topic_probs for part in topics]) if topics else None)


def predict_documents(tagger: Tagger, documents: Sequence[Document], decoding: str = "viterbi",
                      show_progress: bool = True) -> Predictions:
    """Run the tagger over labelled documents of one source (a file: see `coarse_view_alone`); one
    labelled for one task only counts for that task only."""
    schema = tagger.schema
    topic_index = {t: k for k, t in enumerate(schema.topics)}
    predictions, topic_gold, topic_probs = Predictions(), [], []
    progress = tqdm(total=len(documents), desc=f"evaluating ({decoding})", unit="doc",
                    disable=not show_progress, file=sys.stderr)
    for first in range(0, len(documents), BATCH_DOCUMENTS):
        batch = documents[first : first + BATCH_DOCUMENTS]
        probs, log_probs, encoded = tagger.score([doc.text for doc in batch])
        # Only documents labelled for entities are decoded: topic-only ones are long report paragraphs.
        labelled = [i for i, doc in enumerate(batch) if doc.entities is not None]
        entity_log_probs = [log_probs[i] for i in labelled]
        paths = (tagger.best_paths(entity_log_probs) if decoding == "viterbi"
                 else [lp.argmax(1) for lp in entity_log_probs])
        for i, path, confidence in zip(labelled, paths, tagger.tag_confidences(entity_log_probs, paths)):
            doc = batch[i]
            predictions.predicted_spans.append([(s, e, schema.entity_types[k], score)
                                                for s, e, k, score in char_spans(path, confidence, encoded[i].offsets)])
            predictions.gold_spans.append([(s.start, s.end, s.type) for s in doc.entities])
            predictions.lengths.append(len(doc.text))
        for doc, doc_probs in zip(batch, probs):
            if doc.topics is not None and schema.topics:  # a model without topics has none to score
                row = np.zeros(len(schema.topics), dtype=np.int64)
                row[[topic_index[t] for t in doc.topics if t in topic_index]] = 1
                topic_gold.append(row)
                topic_probs.append(doc_probs)
        progress.update(len(batch))
    progress.close()
    predictions.coarse_only = coarse_view_alone(predictions.gold_spans, schema)
    if topic_gold:
        predictions.topic_gold, predictions.topic_probs = np.stack(topic_gold), np.stack(topic_probs)
    return predictions


def prediction_metrics(predictions: Predictions, tagger: Tagger, decoding: str = "viterbi",
                       entity_threshold: float | None = None) -> dict:
    """The metrics JSON of the tagger's predictions, in its labels: entities cut at `entity_threshold`
    (default: the model's, as `tag` cuts them), topics at the model's thresholds."""
    schema, meta = tagger.schema, tagger.meta
    metrics: dict = {"decoding": decoding}
    if predictions.gold_spans:
        cut = meta.entity_threshold if entity_threshold is None else entity_threshold
        metrics.update(scored_entity_metrics(predictions.gold_spans, predictions.predicted_spans,
                                             predictions.lengths, schema, cut, predictions.coarse_only))
    if predictions.topic_gold is not None:
        cuts = [meta.threshold(t) for t in schema.topics]
        metrics["topics"] = topic_metrics(predictions.topic_gold, predictions.topic_probs, cuts, schema.topics)
    return metrics


def evaluate_tagger(tagger: Tagger, *sources: Sequence[Document], decoding: str = "viterbi",
                    entity_threshold: float | None = None, show_progress: bool = True) -> dict:
    """Metrics of a tagger on one or more sources (files) of labelled documents (see
    `predict_documents` and `prediction_metrics`)."""
    predictions = Predictions.joined([predict_documents(tagger, docs, decoding, show_progress) for docs in sources])
    return prediction_metrics(predictions, tagger, decoding, entity_threshold)


def coarse_view_alone(gold: Sequence[list[tuple[int, int, str]]], schema: LabelSchema) -> list[bool]:
    """Which documents of one source, given by their gold spans, are scored in the coarse view alone:
    those labelled with a coarse type (MSRA-style PER/LOC/ORG), and those without entities in a
    source whose other documents are all so labelled (MSRA's sentences without a name are still
    MSRA's, whatever other files are scored beside them)."""
    coarse_labelled = [any(t in schema.coarse_only_types for _, _, t in spans) for spans in gold]
    all_coarse = any(coarse_labelled) and not any(spans and not coarse for spans, coarse in zip(gold, coarse_labelled))
    return [coarse or (all_coarse and not spans) for spans, coarse in zip(gold, coarse_labelled)]


def scored_entity_metrics(gold: list[list[tuple[int, int, str]]], predicted: list[list[tuple[int, int, str, float]]],
                          lengths: list[int], schema: LabelSchema, entity_threshold: float,
                          coarse_only: Sequence[bool] | None = None) -> dict:
    """`entities` (the model's types) and `entities_coarse` metrics of the predicted spans scoring
    at least `entity_threshold`; documents marked `coarse_only` (default: `coarse_view_alone` of the
    documents as one source) count in the coarse view alone."""
    kept = [[(s, e, t) for s, e, t, score in spans if score >= entity_threshold] for spans in predicted]
    coarse_only = coarse_view_alone(gold, schema) if coarse_only is None else coarse_only
    fine = [i for i, coarse in enumerate(coarse_only) if not coarse]
    metrics = {}
    if fine:
        metrics["entities"] = entity_metrics([gold[i] for i in fine], [kept[i] for i in fine],
                                             [lengths[i] for i in fine])
    # only where the gold has a span of the coarse view: over position, book and game alone it would read
    # 0, as if every person, place and organisation were missed
    coarse_gold = [coarse_spans(s, schema) for s in gold] if schema.coarse else []
    if any(coarse_gold):
        metrics["entities_coarse"] = entity_metrics(coarse_gold, [coarse_spans(s, schema) for s in kept], lengths)
    return metrics


def tune_entity_threshold(gold: list[list[tuple[int, int, str]]], predicted: list[list[tuple[int, int, str, float]]],
                          lengths: list[int], schema: LabelSchema,
                          coarse_only: Sequence[bool] | None = None) -> tuple[float, dict]:
    """The entity score cut (0 to 0.8 by 0.1) with the best mean of the fine and coarse micro-F1 on
    the given (validation) documents, and scored_entity_metrics at it; ties go to the lower cut,
    which drops less.

    Scores are the mean tag probability of a span (marginal, with a CRF), so a cut drops the spans the model is least
    sure of: it pays where those are more often wrong than right. One cut serves both views, so
    it is chosen by the mean micro-F1 of the model's types and of the coarse view. Finer steps
    would fit noise: on 1,075 validation sentences F1 moves by ~0.002 between neighbouring cuts.
    """
    best_f1, best = -1.0, (0.0, {})
    for cut in np.round(np.arange(0.0, 0.81, 0.1), 1).tolist():
        metrics = scored_entity_metrics(gold, predicted, lengths, schema, cut, coarse_only)
        f1 = float(np.mean([metrics[view]["micro"]["f1"] for view in ("entities", "entities_coarse") if view in metrics]))
        if f1 > best_f1:
            best_f1, best = f1, (cut, metrics)
    return best


def register(subparsers) -> None:
    parser = subparsers.add_parser("evaluate", help="score a model on labelled data (JSON out)")
    add_model_argument(parser)
    parser.add_argument("--data", action="append", required=True, metavar="PATH[:FORMAT]",
                        help="labelled data, any importer format; repeatable")
    parser.add_argument("--decoding", choices=DECODINGS, default="viterbi",
                        help="span decoding: constrained Viterbi (what tag and serve use) or naive argmax")
    parser.add_argument("--topic-blend", type=float, metavar="W",
                        help="score topics with the lexical topic model at this blend weight instead of the "
                             "folder's (0: the topic head alone); the folder's thresholds stay")
    parser.add_argument("--entity-threshold", type=float, metavar="SCORE",
                        help="score entities cut at this score instead of the folder's (0: every entity found)")
    parser.add_argument("--output", "-o", help="write the metrics JSON to this file as well as to stdout")
    parser.set_defaults(handler=run, log_level=logging.WARNING)  # as `tag`: stderr for what went wrong


def run(args) -> int:
    from training.data import labelled_file, parse_data_spec, read_documents

    sources = [parse_data_spec(spec) for spec in args.data]
    refuse_overwriting(args.output, [path for path, _ in sources])
    if args.output:
        check_output_path("--output", args.output)
    tagger = Tagger.load_exact(args.model)
    # A gold label the model does not know is more often a typo than a test of what it cannot find:
    # a topic would silently count as no topic, an entity type as misses that drag the averages.
    schema = tagger.schema
    # A task the model does not have is left out of the scores, not refused label by label as unknown.
    lacking = [task for task, labels in (("topics", schema.topics), ("entities", schema.entity_types)) if not labels]
    for task in lacking:
        print(f"newstagger evaluate: this model has no {task}; the data's {task} are not scored", file=sys.stderr)
    files = []
    for spec, source in zip(args.data, sources):
        docs = read_documents(*source, topic_labels=schema.topics or None,
                              entity_types=schema.scorable_entity_types or None)
        scored = [replace(doc, **{task: None for task in lacking}) for doc in docs]
        if any(doc.labelled for doc in docs) and not any(doc.labelled for doc in scored):
            raise DataError(f"--data {spec}: it labels only {' and '.join(lacking)}, which this model has not")
        files.append(labelled_file(scored, f"--data {spec}"))
    entity_threshold = check_fraction("--entity-threshold", args.entity_threshold)
    if check_fraction("--topic-blend", args.topic_blend) is not None:
        if tagger.topic_lexical is None:
            raise UsageError("--topic-blend: this model folder has no lexical topic model")
        tagger.topic_lexical.weight = args.topic_blend
    result = json.dumps(evaluate_tagger(tagger, *files, decoding=args.decoding, entity_threshold=entity_threshold),
                        ensure_ascii=False, indent=2)
    print(result)
    if args.output and args.output != "-":  # `-`: stdout, which has it already
        with open(args.output, "w", encoding="utf-8") as handle:
            handle.write(result + "\n")
    return 0
