"""`newstagger train`: fine-tune one BERT on topic and entity data at once, into a model folder.

A short, plain loop (nanoGPT-style) rather than `Trainer`: the joint, partially labelled batches
need their own loss masking, and the loop stays readable. Per epoch: train, evaluate on the
validation split, keep the best state; stop early when the selection score stops improving. At
the end, the lexical topic model (newstagger.lexical) is fitted and blended into the topic head,
per-topic thresholds and the entity score threshold are tuned on validation (where it holds
enough documents of the task; otherwise a continued model keeps its parent's), and the best state
is saved with its metrics and model card.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shutil
import sys
import time
import tomllib
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn
from tqdm import tqdm
from transformers import AutoTokenizer

from newstagger import lexical
from newstagger.backends import DEVICES, cpu_bf16_units, resolve_device
from newstagger.checks import MAX_THREADS, check_rules, is_finite_number, is_integer, is_string_list, window_rules
from newstagger.crf import BioCrf
from newstagger.documents import DataError, Document, Span, utf8_only
from newstagger.errors import UsageError
from newstagger.folders import META_FILE
from newstagger.lexicon import build_lexicon, jieba_words
from newstagger.model import (DEFAULT_TOPIC_THRESHOLD, TOKENIZER_FILES, ModelMeta, NewsTaggerModel, load_model_folder,
                              new_model, read_meta, save_model_folder, windows_past_positions)
from newstagger.schema import LabelSchema
from newstagger.tagger import Tagger
from newstagger.windowing import EncodedText, encode_texts, plan_windows, token_budget_batches

from .data import (corpus_stats, labelled_file, no_topic_documents, not_held_out, parse_data_spec, read_documents,
                   split_validation)
from .evaluate import (Predictions, evaluate_tagger, predict_documents, prediction_metrics, topic_metrics,
                       tune_entity_threshold, tune_thresholds)
from .registry import fingerprint

log = logging.getLogger("newstagger.train")
IGNORE = -100
CHECKPOINT = "checkpoint"  # inside a run's output folder: what --resume continues from


# What a config field's declared type admits; a config file can say anything.
FIELD_TYPES = {
    "int": ("an integer", is_integer),
    "float": ("a finite number", is_finite_number),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str)),
    "list[str]": ("a list of strings", is_string_list),
    "list[float]": ("a list of finite numbers", lambda v: isinstance(v, list) and all(map(is_finite_number, v))),
}


def check_field_types(config) -> None:
    """ValueError naming each field of a config dataclass whose value is not of its declared type."""
    problems = []
    for f in fields(config):
        declared, optional = f.type.removesuffix(" | None"), f.type.endswith(" | None")
        words, admits = FIELD_TYPES[declared]
        value = getattr(config, f.name)
        if not (admits(value) or (optional and value is None)):
            problems.append(f"{f.name} must be {words}{' or unset' if optional else ''}, not {value!r}")
    if problems:
        raise ValueError("; ".join(problems))


def config_from_file(config_class, path: str | Path, **overrides):
    """A config dataclass from the settings of a TOML or JSON file with `overrides` (command-line flags)
    over them, checked once merged: a training file's train_weights may count sources that flags give."""
    path = Path(path)
    kind = path.suffix.lower().lstrip(".")
    if kind not in ("toml", "json"):
        raise ValueError(f"{path}: a config file is .toml or .json")
    with utf8_only(str(path)):
        raw = path.read_text(encoding="utf-8-sig")  # a byte-order mark is fine, as in data files
    try:
        values = tomllib.loads(raw) if kind == "toml" else json.loads(raw)
    except ValueError as err:  # TOMLDecodeError and JSONDecodeError both are
        raise ValueError(f"{path}: not valid {kind.upper()} ({err})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a table of settings, got {type(values).__name__}")
    known = {f.name for f in fields(config_class)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path}: unknown setting(s) {unknown}")
    return config_class(**{**values, **overrides})


def device_option():
    """The `device` field of a training config (train, pretrain, retrain); check it with `device_rule`."""
    return config_option("auto", f"where to train: {', '.join(DEVICES)} (auto: CUDA when present)")


def resume_option():
    """The `resume` field of a training config (train, pretrain)."""
    return config_option(False, "continue from the checkpoint in OUTPUT/checkpoint if there is one")


def attention_dropout_option():
    """The `attention_dropout` field of a training config (train, pretrain, retrain)."""
    return config_option(0.0, "dropout on the encoder's attention probabilities while training, in place of the "
                              "base's own (BERT's: 0.1). Above 0, attention on a CPU leaves its fused kernel: "
                              "the 6-layer base's forward and backward take nearly twice as long (README, Training on "
                              "your own data)")


def attention_dropout_rule(probability: float) -> tuple:
    return "attention_dropout", 0 <= probability < 1, "from 0 to under 1"


def set_attention_dropout(model: nn.Module, probability: float) -> None:
    """Train a BERT with this dropout on its attention probabilities: each attention layer reads its
    dropout's p at call time, and the config records it for the saved model."""
    model.config.attention_probs_dropout_prob = probability
    for name, module in model.named_modules():
        if name.endswith("attention.self"):
            module.dropout.p = probability


def device_rule(device: str) -> tuple:
    return "device", device in DEVICES, f"one of {', '.join(DEVICES)}"


def seed_rule(seed: int, name: str = "seed") -> tuple:
    return name, 0 <= seed < 2**32, "from 0 to 4294967295"  # what numpy's seed takes


def config_option(default, help: str, metavar: str | None = None):
    """A config dataclass field with its help text (shown by --help); `list` as default: an empty list."""
    metadata = {"help": help, "metavar": metavar}
    if default is list:
        return field(default_factory=list, metadata=metadata)
    return field(default=default, metadata=metadata)


DEFAULT_BASE_MODEL = "bert-base-chinese"


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved into the model folder for reproducibility."""

    train: list[str] = config_option(list, "training data, PATH[:FORMAT] (formats: see training.data.FORMATS)")
    train_weights: list[float] = config_option(list, "entity-loss weight of each training source, in the order of "
                                                     "`train` (empty: 1.0 each); below 1 lets a big corpus with other "
                                                     "conventions teach without outvoting the rest", "WEIGHT")
    output: str = config_option("runs/model", "model folder to write")
    base_model: str = config_option(DEFAULT_BASE_MODEL, "Hugging Face BERT checkpoint: hub name or local folder")
    init_model: str | None = config_option(None, "start from this newstagger model folder instead of base_model")
    validation: list[str] = config_option(list, "validation data; empty = hold out validation_fraction of each training set")
    validation_fraction: float = config_option(0.1, "share of each training set held out (grouped by 'group' where given)")
    max_validation_documents: int = config_option(2000, "most documents per validation set, to keep per-epoch evaluation "
                                                        "quick: a training set holds out a smaller share where "
                                                        "validation_fraction would pass it (whole groups, so about this many)")
    max_length: int = config_option(128, "encoder window for training, positions including [CLS]/[SEP]")
    stride: int = config_option(32, "tokens of overlap between windows of a long text")
    inference_max_length: int | None = config_option(None, "window the saved model uses when tagging (default: an "
                                                          "init_model's own, else max_length)")
    inference_stride: int | None = config_option(None, "overlap the saved model uses when tagging (default: an "
                                                      "init_model's own, else stride)")
    epochs: int = config_option(3, "passes over the training data")
    max_steps: int = config_option(0, "stop after this many optimizer steps (0 = no limit; for smoke tests)")
    batch_tokens: int = config_option(4096, "padded tokens per batch (batches are length-bucketed)")
    learning_rate: float = config_option(2e-4, "peak AdamW learning rate")
    head_learning_rate: float = config_option(1e-3, "learning rate of the freshly initialised layers: the two heads, "
                                                     "the lexicon projection and the CRF's transitions")
    weight_decay: float = config_option(0.01, "AdamW weight decay")
    warmup_ratio: float = config_option(0.06, "share of steps spent warming the learning rate up")
    topic_loss_weight: float = config_option(1.0, "weight of the topic loss in the joint loss")
    entity_loss_weight: float = config_option(1.0, "weight of the entity loss in the joint loss")
    topic_oversample: float = config_option(1.0, "repeat topic-labelled windows this many times per epoch, 1 or more "
                                                 "(topic data is small)")
    pack_entity_documents: bool = config_option(True, "join short entity-only documents (e.g. CLUENER sentences) into "
                                                      "training windows of random length up to max_length, so the entity "
                                                      "head learns every position it meets when tagging long stories")
    device: str = device_option()
    attention_dropout: float = attention_dropout_option()
    bf16: bool = config_option(False, "train under bfloat16 autocast (weights stay fp32); 1.4-1.6x faster on "
                                      "CPUs with AMX (Sapphire Rapids and later), and on CUDA GPUs that support it. "
                                      "On a CPU without AMX, training stays fp32 with a warning: bf16 steps are "
                                      "slower there (1.6-1.8x with AVX512-BF16 alone, 11x emulated on AVX2)")
    lexicon: bool = config_option(False, "give the encoder jieba dictionary-word features (newstagger.lexicon); a model "
                                         "that has them keeps them")
    crf: bool = config_option(False, "learn tag transitions with a linear-chain CRF (newstagger.crf) and train the entity "
                                     "head with its sequence likelihood; a model that has one keeps it")
    adversarial_epsilon: float = config_option(0.0, "adversarial training (FGM, Miyato et al., 2017): each step also "
                                                    "learns from the batch with its word embeddings moved this far along "
                                                    "the loss's gradient (0 = off; the default model's third stage "
                                                    "uses 1.0); a step then costs two forward and backward passes")
    keep_start: float = config_option(0.0, "share of the run's starting weights kept in the saved model, each weight "
                                           "keep_start x start + (1 - keep_start) x trained (WiSE-FT, Wortsman et al., "
                                           "2022), before the cuts are tuned: a continued model keeps part of what its "
                                           "init_model knew that the new training wears away (0 = the trained weights)")
    topic_negatives: float = config_option(0.0, "short texts about no topic added to the topic training data, as a "
                                                "share of its documents: bare entity mentions from the entity data, "
                                                "newsroom credits and marks around them, and text without Chinese "
                                                "(training.data.no_topic_documents), so a topic head that only sees "
                                                "paragraphs learns that a name, a byline or an emoji is about nothing "
                                                "(0 = none)")
    patience: int = config_option(2, "epochs without improvement before stopping early")
    topic_lexical: bool = config_option(True, "at the end, fit a char n-gram TF-IDF + logistic regression topic model and "
                                              "blend it into the topic head, with a weight chosen on validation")
    max_topic_blend: float = config_option(0.75, "largest blend weight of the lexical topic model tried on validation "
                                                 "(of 0, 0.25, 0.5, 0.75): validation paragraphs in the style of "
                                                 "the training data can favour it more than other text does")
    # Cuts chosen on a handful of stories are noise: retraining on 29 corrections held 3 out, which set
    # every topic threshold to 0.5 and dropped the lexical topic model, and the gate rejected a better model.
    min_tuning_documents: int = config_option(50, "validation documents a task (entities, topics) needs for its cuts "
                                                  "(entity threshold, topic thresholds and blend) to be chosen on them; "
                                                  "with fewer, an --init-model keeps its own, a new model the defaults")
    seed: int = config_option(13, "random seed")
    validation_seed: int | None = config_option(None, "seed of the validation split and sample (default: seed): "
                                                      "a run continuing a model keeps its split, so the documents "
                                                      "that model trained on stay out of validation, while "
                                                      "`seed` draws another training order")
    threads: int = config_option(0, "torch CPU threads (0 = torch's default)")
    resume: bool = resume_option()
    overwrite_output: bool = config_option(False, "train into an OUTPUT folder that is not empty, replacing the model "
                                                   "there (without it, or --resume, such a folder is refused)")
    version: str | None = config_option(None, "version written into the model folder (default: an init_model's with "
                                              "the patch number raised, else 0.1.0)")
    name: str | None = config_option(None, "model name written into the model folder (default: an init_model's, "
                                           "else newstagger)")

    def __post_init__(self):
        """Settings that cannot work fail here, naming themselves, not minutes into a run."""
        check_field_types(self)
        check_rules(self, (
            ("epochs", self.epochs >= 1, "at least 1"),
            ("max_steps", self.max_steps >= 0, "0 or more"),
            *window_rules("max_length", self.max_length, "stride", self.stride),
            # both or neither given: a lone one is checked with the window it completes (an init_model's)
            *(window_rules("inference_max_length", self.inference_max_length, "inference_stride", self.inference_stride)
              if None not in (self.inference_max_length, self.inference_stride) else ()),
            ("batch_tokens", self.batch_tokens >= self.max_length, "at least max_length"),
            ("learning_rate", self.learning_rate > 0, "positive"),
            ("head_learning_rate", self.head_learning_rate > 0, "positive"),
            ("weight_decay", self.weight_decay >= 0, "0 or more"),
            ("warmup_ratio", 0 <= self.warmup_ratio < 1, "from 0 to under 1"),
            ("validation_fraction", 0 < self.validation_fraction < 1, "between 0 and 1"),
            ("max_validation_documents", self.max_validation_documents >= 1, "at least 1"),
            ("topic_loss_weight", self.topic_loss_weight >= 0, "0 or more"),
            ("entity_loss_weight", self.entity_loss_weight >= 0, "0 or more"),
            ("topic_oversample", self.topic_oversample >= 1, "1 or more"),
            ("train_weights", all(w >= 0 for w in self.train_weights), "0 or more each"),
            ("train_weights", not self.train_weights or len(self.train_weights) == len(self.train),
             f"one weight per train source ({len(self.train)})"),
            ("adversarial_epsilon", self.adversarial_epsilon >= 0, "0 or more"),
            ("keep_start", 0 <= self.keep_start < 1, "from 0 to under 1"),
            ("topic_negatives", self.topic_negatives >= 0, "0 or more"),
            ("patience", self.patience >= 1, "at least 1"),
            ("min_tuning_documents", self.min_tuning_documents >= 1, "at least 1"),
            ("max_topic_blend", 0 <= self.max_topic_blend <= 1, "from 0 to 1"),
            ("threads", 0 <= self.threads <= MAX_THREADS, f"0 to {MAX_THREADS}"),
            device_rule(self.device),
            attention_dropout_rule(self.attention_dropout),
            seed_rule(self.seed),
            *((seed_rule(self.validation_seed, "validation_seed"),) if self.validation_seed is not None else ()),
        ))


# --------------------------------------------------------------------------- data to tensors


@dataclass
class Example:
    """One training window: token ids, tag target ids (TagTargets: a BIO tag, or a set of them for
    coarse labels; IGNORE where unlabelled), topic targets, and the weight of its tokens in the
    entity loss."""

    ids: list[int]
    tags: list[int]
    topics: list[float] | None
    entity_weight: float = 1.0


@dataclass(frozen=True)
class TagTargets:
    """What the token head is trained towards: each BIO tag exactly, plus partial labels.

    Coarse-labelled data (MSRA's PER/LOC/ORG beside CLUENER's ten types) says less than a tag: a
    LOC span's first token is B-address or B-scene, and text outside its spans is O or a type
    the coarse view has no name for (position, book, ...). Each target is a row of allowed tags;
    the loss maximises their total probability, which for an exact tag is plain cross-entropy.
    """

    names: list[str]
    allowed: np.ndarray  # [targets, tags] bool

    @classmethod
    def for_schema(cls, schema: LabelSchema) -> "TagTargets":
        tags = schema.tags
        names, rows = list(tags), [np.eye(len(tags), dtype=bool)]
        for coarse in sorted(schema.coarse_only_types):
            for prefix in ("B", "I"):
                names.append(f"{prefix}-{coarse}")
                rows.append(np.array([[tag.startswith(f"{prefix}-") and schema.coarse.get(tag[2:]) == coarse
                                       for tag in tags]]))
        names.append(COARSE_OUTSIDE)
        rows.append(np.array([[tag == "O" or tag[2:] not in schema.coarse for tag in tags]]))
        return cls(names, np.concatenate(rows))

    def begin(self, entity_type: str) -> int:
        return self.names.index(f"B-{entity_type}")  # its I- target follows it

    def outside(self, coarse: bool) -> int:
        return self.names.index(COARSE_OUTSIDE) if coarse else 0

    def opening(self, target: int) -> int:
        """The target of a window's first token: an I- target there (an entity the window's start
        cuts) becomes its B-, as tagging sees it. Left as I-, the learned transitions would have to
        start on a move the BIO rules forbid, and the CRF loss would carry that penalty."""
        return target - 1 if target >= 0 and self.names[target].startswith("I-") else target


COARSE_OUTSIDE = "O|uncoarse"


def token_tags(doc: Document, encoded: EncodedText, targets: TagTargets, coarse: bool = False) -> np.ndarray:
    """Target id per token (see TagTargets): a token overlapping a span gets B- if it is the
    span's first; `coarse` says the document is labelled in the coarse view only."""
    if doc.entities is None:
        return np.full(len(encoded.ids), IGNORE, dtype=np.int64)
    tags = np.full(len(encoded.ids), targets.outside(coarse), dtype=np.int64)
    starts, ends = encoded.offsets[:, 0], encoded.offsets[:, 1]
    for span in doc.entities:
        inside = np.flatnonzero((starts < span.end) & (ends > span.start))
        if len(inside):
            begin = targets.begin(span.type)
            tags[inside] = begin + 1
            tags[inside[0]] = begin
    return tags


def pack_documents(documents: list[Document], max_chars: int, rng: random.Random) -> list[Document]:
    """Join runs of entity-only documents into longer ones of random target length <= max_chars.

    Sentence corpora like CLUENER only ever put entities in the first ~50 positions; stories are
    tagged in full windows. Packing teaches the later positions while the random targets keep
    plenty of short, [CLS]-adjacent examples. Topic-labelled documents stay whole: their labels
    belong to the whole text. Characters bound tokens for Chinese text, so packs fit the window.
    """
    kept, packable = [], []
    for doc in documents:
        (packable if doc.topics is None and doc.entities is not None else kept).append(doc)
    rng.shuffle(packable)
    packed: list[Document] = []
    run: list[Document] = []
    run_chars, target = 0, rng.randint(1, max_chars)
    for doc in [*packable, None]:
        if run and (doc is None or run_chars + len(doc.text) > target):
            packed.append(_join(run))
            run, run_chars, target = [], 0, rng.randint(1, max_chars)
        if doc is not None:
            run.append(doc)
            run_chars += len(doc.text)
    return kept + packed


def _join(documents: list[Document]) -> Document:
    if len(documents) == 1:
        return documents[0]
    spans, offset = [], 0
    for doc in documents:
        spans += [Span(s.start + offset, s.end + offset, s.type) for s in doc.entities]
        offset += len(doc.text)
    return Document(id="+".join(doc.id for doc in documents), text="".join(doc.text for doc in documents),
                    entities=spans)


def build_examples(documents: list[Document], tokenizer, schema: LabelSchema, max_length: int,
                   stride: int, coarse: bool = False, entity_weight: float = 1.0) -> list[Example]:
    encoded = encode_texts(tokenizer, [doc.text for doc in documents])
    targets = TagTargets.for_schema(schema)
    examples = []
    for d, (doc, enc) in enumerate(zip(documents, encoded)):
        if not doc.labelled:  # nothing to learn from; a batch of only these has no loss
            continue
        tags = token_tags(doc, enc, targets, coarse)
        topics = None
        if doc.topics is not None:
            topics = [1.0 if t in doc.topics else 0.0 for t in schema.topics]
        for w in plan_windows(d, len(enc.ids), max_length, stride):
            window_tags = tags[w.start : w.end].tolist()
            if w.start > 0:  # a later window of a long document: its start may cut an entity
                window_tags[0] = targets.opening(window_tags[0])
            examples.append(Example(enc.ids[w.start : w.end], window_tags, topics, entity_weight))
    return examples


def collate(examples: list[Example], tokenizer, num_topics: int) -> dict[str, torch.Tensor]:
    length = max(len(e.ids) for e in examples) + 2
    batch = len(examples)
    input_ids = torch.full((batch, length), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    tags = torch.full((batch, length), IGNORE, dtype=torch.long)
    topics = torch.zeros((batch, num_topics))
    has_topics = torch.zeros(batch, dtype=torch.bool)
    entity_weight = torch.tensor([e.entity_weight for e in examples])
    for row, e in enumerate(examples):
        n = len(e.ids)
        input_ids[row, : n + 2] = torch.tensor([tokenizer.cls_token_id, *e.ids, tokenizer.sep_token_id])
        attention_mask[row, : n + 2] = 1
        tags[row, 1 : n + 1] = torch.tensor(e.tags)
        if e.topics is not None:
            topics[row] = torch.tensor(e.topics)
            has_topics[row] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "tags": tags, "topics": topics,
            "has_topics": has_topics, "entity_weight": entity_weight}


def epoch_batches(examples: list[Example], batch_tokens: int, rng: random.Random) -> list[list[int]]:
    """Length-bucketed batches in random order: shuffle, sort within pools, shuffle batches."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    # Examples sorted by length together: about as many as a batch holds tokens, enough to bucket
    # lengths, few enough that which examples share a batch stays random.
    pool = 64 * max(1, batch_tokens // 64)
    batches: list[list[int]] = []
    for first in range(0, len(order), pool):
        chunk = order[first : first + pool]
        lengths = [len(examples[i].ids) + 2 for i in chunk]  # [CLS] ... [SEP]
        batches += [[chunk[j] for j in b] for b in token_budget_batches(lengths, batch_tokens)]
    rng.shuffle(batches)
    return batches


# --------------------------------------------------------------------------- the loop


class JointLoss(nn.Module):
    """Entity loss over labelled tokens + topic BCE over topic-labelled rows.

    The entity loss is per-token cross-entropy (marginal over the allowed tags for partial labels,
    see TagTargets), or with a CRF the negative log-likelihood of each labelled row's allowed
    paths; either way summed with each row's source weight and divided by the labelled tokens.
    Rows without topic labels and tokens without tags contribute nothing, so a batch mixing
    entity-only and topic-only documents trains each head on what it has. `pos_weight` lifts
    rare topics (city_management is ~4% of the data).
    """

    def __init__(self, pos_weight: torch.Tensor, topic_weight: float, entity_weight: float, targets: TagTargets,
                 crf: BioCrf | None = None):
        super().__init__()
        self.topic_loss = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
        self.register_buffer("allowed", torch.from_numpy(targets.allowed))
        self.topic_weight, self.entity_weight = topic_weight, entity_weight
        self.crf = crf

    def forward(self, topic_logits, tag_logits, batch) -> torch.Tensor:
        loss = tag_logits.new_zeros(())
        labelled = batch["tags"] != IGNORE
        if labelled.any():
            summed = self._crf_loss_sum if self.crf is not None else self._token_loss_sum
            loss = loss + self.entity_weight * summed(tag_logits, batch, labelled) / labelled.sum()
        if batch["has_topics"].any() and topic_logits.shape[-1]:  # no topics, no topic loss (BCE of nothing is NaN)
            rows = batch["has_topics"]
            loss = loss + self.topic_weight * self.topic_loss(topic_logits[rows], batch["topics"][rows])
        return loss

    def _token_loss_sum(self, tag_logits, batch, labelled) -> torch.Tensor:
        logits = tag_logits[labelled]
        allowed_logits = logits.masked_fill(~self.allowed[batch["tags"][labelled]], float("-inf"))
        token_loss = logits.logsumexp(-1) - allowed_logits.logsumexp(-1)
        token_weight = batch["entity_weight"][:, None].expand_as(labelled)[labelled]
        return (token_weight * token_loss).sum()

    def _crf_loss_sum(self, tag_logits, batch, labelled) -> torch.Tensor:
        # A labelled row's tags cover its text, which collate puts right after [CLS].
        rows = labelled.any(1)
        lengths = labelled[rows].sum(1)
        width = int(lengths.max())
        tags = batch["tags"][rows, 1 : 1 + width]
        allowed = self.allowed[tags.clamp(min=0)] | (tags == IGNORE).unsqueeze(-1)
        nll = self.crf.negative_log_likelihood(tag_logits[rows, 1 : 1 + width], allowed, lengths)
        return (batch["entity_weight"][rows] * nll).sum()


def topic_pos_weight(documents: list[Document], topics: list[str]) -> torch.Tensor:
    """sqrt(negatives / positives) per topic: lifts rare topics without swamping precision."""
    labelled = [doc for doc in documents if doc.topics is not None]
    weights = []
    for topic in topics:
        positives = sum(topic in doc.topics for doc in labelled)
        weights.append(math.sqrt((len(labelled) - positives) / positives) if positives else 1.0)
    return torch.tensor(weights)


def selection_score(metrics: dict) -> float | None:
    """Mean of the micro-F1s of the tasks validation covers (entities in the model's own types, or in
    the coarse view where validation has only coarse labels): what 'best epoch' means. None when
    validation measures nothing."""
    entities = "entities" if "entities" in metrics else "entities_coarse"
    scores = [metrics[task]["micro"]["f1"] for task in (entities, "topics") if task in metrics]
    return float(np.mean(scores)) if scores else None


# Blend weights of the lexical topic model tried on validation; 0 keeps the topic head alone.
BLEND_WEIGHTS = (0.0, 0.25, 0.5, 0.75)
MIN_LEXICAL_DOCUMENTS = 2  # the lexical topic model's vocabulary keeps n-grams of 2+ documents


def tuned_topic_metrics(gold: np.ndarray, probs: np.ndarray, topics: list[str],
                        current: dict[str, float] | None = None) -> tuple[dict[str, float], dict]:
    """Per-topic thresholds tuned on these probabilities (`current` kept where they cannot say), and the
    topic metrics under them."""
    thresholds = tune_thresholds(gold, probs, topics, current)
    cuts = [thresholds.get(t, DEFAULT_TOPIC_THRESHOLD) for t in topics]
    return thresholds, topic_metrics(gold, probs, cuts, topics)


def fit_topic_lexical(train_docs: list[Document], topics: list[str]) -> lexical.LexicalTopicModel:
    """The lexical topic model fitted on topic-labelled training documents (blend weight still 0)."""
    return lexical.LexicalTopicModel.fit([doc.text for doc in train_docs], [doc.topics for doc in train_docs], topics)


def fit_topic_blend(train_docs: list[Document], valid_texts: list[str], gold: np.ndarray, bert_probs: np.ndarray,
                    topics: list[str], max_weight: float) -> tuple[lexical.LexicalTopicModel, dict]:
    """The lexical topic model fitted on topic-labelled training documents, with the blend weight (of
    BLEND_WEIGHTS, up to `max_weight`) that scores best on validation, and a report: topic F1s of the
    head alone, the lexical model alone and the blend, each after threshold tuning.

    A weight scores the mean of topic micro and macro F1 (macro so that rare topics count); ties go to
    the lighter weight.
    """
    model = fit_topic_lexical(train_docs, topics)
    lexical_probs = model.predict(valid_texts)

    def f1s(probs: np.ndarray) -> dict:
        result = tuned_topic_metrics(gold, probs, topics)[1]
        micro, macro = result["micro"]["f1"], result["macro"]["f1"]
        return {"micro_f1": micro, "macro_f1": macro, "mean_f1": round((micro + macro) / 2, 4)}

    weights = [w for w in BLEND_WEIGHTS if w <= max_weight]
    by_weight = {w: f1s(lexical.blend(bert_probs, lexical_probs, w)) for w in weights}
    model.weight = max(weights, key=lambda w: by_weight[w]["mean_f1"])
    report = {"weight": model.weight, "bert": f1s(bert_probs), "lexical": f1s(lexical_probs),
              "blend": by_weight[model.weight],
              "mean_f1_by_weight": {str(w): scores["mean_f1"] for w, scores in by_weight.items()}}
    log.info("topic blend on validation: %s", report)
    return model, report


def train(config: TrainConfig, sources: Sequence[list[Document]] = ()) -> tuple[Path, dict]:
    """Run training as configured; returns the model folder and its final validation metrics.

    `sources` are training sets already in memory (retraining mixes new and replayed data), used
    like the files of `config.train`: each one is split for validation on its own.
    """
    started = time.time()
    config = _with_inherited_settings(config)
    output, device, saved = start_run(config, "model")
    run = _prepare_run(config, sources, device)
    state, best_state = _run_epochs(config, run, saved, output / CHECKPOINT)

    _load_weights_to_save(config, run, best_state, state["best_epoch"])
    run.model.eval()
    metrics, topic_lexical, tuning = _tune_on_validation(Tagger(run.model, run.tokenizer, run.meta), run.train_docs,
                                                         run.valid_sources, config, run.parent_meta)
    run.meta.training = _training_record(config, run, state, tuning, started)
    save_model_folder(output, run.model.cpu(), run.tokenizer, run.meta, metrics={"validation": metrics},
                      topic_lexical=topic_lexical)
    log.info("saved %s (best epoch %d): %s", output, state["best_epoch"], _summary(metrics))
    return output, metrics


@dataclass
class _Run:
    """A training run's starting model and data, as `_prepare_run` leaves them for the epochs and the end."""

    model: NewsTaggerModel
    tokenizer: object
    meta: ModelMeta  # of the model to save; its cuts are tuned and its training record written at the end
    parent_meta: ModelMeta | None
    device: torch.device
    bf16: bool
    start_weights: dict[str, torch.Tensor] | None  # kept only where keep_start blends them into the saved weights
    train_docs: list[Document]
    examples: list[Example]
    valid_sources: list[list[Document]]

    @property
    def schema(self) -> LabelSchema:
        return self.meta.schema

    @property
    def valid_docs(self) -> list[Document]:
        return [doc for docs in self.valid_sources for doc in docs]


def _prepare_run(config: TrainConfig, sources: Sequence[list[Document]], device: torch.device) -> _Run:
    """The run's data read and checked, its starting model on `device`, and its training examples; DataError
    where the data gives a new model nothing to learn."""
    train_sets, weights, validation_sets = _read_data(config, sources)
    data_schema = LabelSchema.from_documents(doc for docs in train_sets for doc in docs)
    if not (data_schema.topics or data_schema.entity_types or config.init_model):
        raise DataError("the training data names no topic and no entity type (every label is 'none'), so a new "
                        "model would learn nothing")
    model, tokenizer, schema, parent_meta = _starting_model(config, data_schema)
    for spec, docs in validation_sets:
        schema.check_known(docs, f"--validation {spec}")
    validation_files = [docs for _, docs in validation_sets]
    model.to(device)
    start_weights = {k: v.detach().clone() for k, v in model.state_dict().items()} if config.keep_start else None
    bf16 = use_bf16(config.bf16, device)
    train_docs, examples, valid_sources = _training_examples(config, train_sets, weights, validation_files,
                                                             tokenizer, schema)
    meta = ModelMeta(schema=schema, max_length=config.inference_max_length, stride=config.inference_stride,
                     name=config.name, version=config.version,
                     base_model=parent_meta.base_model if parent_meta else config.base_model,
                     parent_version=parent_meta.version if parent_meta else None)
    run = _Run(model, tokenizer, meta, parent_meta, device, bf16, start_weights, train_docs, examples, valid_sources)
    _report_data(config, run)
    return run


def _report_data(config: TrainConfig, run: _Run) -> None:
    """Log what the run trains and validates on, warning of labels nothing teaches and of a run without
    validation; DataError where no labelled training document is left once validation is held out."""
    schema, train_docs, valid_docs = run.schema, run.train_docs, run.valid_docs
    log.info("schema: topics %s; entity types %s", schema.topics, schema.entity_types)
    folded = sorted(schema.coarse_only_types & {span.type for doc in train_docs for span in doc.entities or ()})
    if folded:
        # as MSRA beside CLUENER should; a dataset meaning ORG beside company has to rename one
        log.info("%s spans train as partial labels of the finer types that roll up to them (%s), not as types "
                 "of their own", folded, {t: c for t, c in schema.coarse.items() if c in folded})
    untaught = _untaught_labels(schema, train_docs, run.parent_meta.schema if run.parent_meta else None)
    if untaught:
        log.warning("%s: only the validation share has examples of them, so the model will have them and "
                    "nothing teaches them; add examples, or give --validation", untaught)
    log.info("training: %s", corpus_stats(train_docs))
    log.info("validation: %s", corpus_stats(valid_docs))
    if not run.examples:
        raise DataError("no labelled training documents are left once validation is held out; add data, or "
                        + ("give --validation files that do not hold the training stories" if config.validation
                           else "give --validation"))
    if not valid_docs:
        log.warning("no validation documents (coarse-only or too-small training sets are not split): every "
                    "epoch runs and the last is kept; no cut is tuned")


def _run_epochs(config: TrainConfig, run: _Run, saved: Path | None, checkpoint: Path) -> tuple[dict, dict]:
    """Train epoch after epoch, continuing the `saved` checkpoint where there is one, until `epochs` or `max_steps`
    are done or `patience` epochs in a row gained nothing; each epoch is validated and ends in a checkpoint.
    Returns the trainer state and the best state (the weights of the best epoch)."""
    rng = random.Random(config.seed)
    steps_per_epoch = len(epoch_batches(run.examples, config.batch_tokens, random.Random(0)))
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    optimizer, scheduler = _optimizer_and_schedule(run.model, config, total_steps)
    loss_fn = JointLoss(topic_pos_weight(run.train_docs, run.schema.topics), config.topic_loss_weight,
                        config.entity_loss_weight, TagTargets.for_schema(run.schema), run.model.crf).to(run.device)
    state, best_state = _starting_state(config, saved, run.model, optimizer, scheduler, rng, total_steps)

    stale_epochs = len(state["history"]) - state["best_epoch"] if state["history"] else 0
    while state["epoch"] < config.epochs and state["step"] < total_steps and stale_epochs < config.patience:
        batch_ids = epoch_batches(run.examples, config.batch_tokens, rng)
        batches = (collate([run.examples[i] for i in ids], run.tokenizer, len(run.schema.topics)) for ids in batch_ids)
        bar = tqdm(batches, total=len(batch_ids), desc=f"epoch {state['epoch'] + 1}/{config.epochs}", unit="batch",
                   file=sys.stderr)
        steps_before = state["step"]
        loss = _train_epoch(run.model, bar, loss_fn, optimizer, scheduler, state, total_steps, run.bf16, run.device,
                            config.adversarial_epsilon)
        state["epoch"] += 1
        state["cut_short"] = state["step"] - steps_before < len(batch_ids)  # by max_steps
        best_state = _validate_epoch(run, state, best_state, loss)
        stale_epochs = state["epoch"] - state["best_epoch"]
        state["rng"] = rng_state_to_json(rng.getstate())
        save_checkpoint(checkpoint, run.model, optimizer, scheduler, state, best_state)
    return state, best_state


def _starting_state(config: TrainConfig, saved: Path | None, model: NewsTaggerModel, optimizer, scheduler,
                    rng: random.Random, total_steps: int) -> tuple[dict, dict | None]:
    """The trainer state and best state the epochs start from: a new run's, or those of the `saved` checkpoint,
    restored with the model, optimizer, scheduler and rng."""
    state = {"epoch": 0, "step": 0, "best_score": -1.0, "best_epoch": 0, "history": []}
    best_state = None
    identity = run_identity(config, RUN_SETTINGS, [*config.train, *config.validation])
    if saved:
        state, best_state = resume_checkpoint(saved, identity, model, optimizer, scheduler, rng)
        if state.get("cut_short") and state["step"] < total_steps:
            # Only epoch ends are checkpointed: the rest of that epoch's batches cannot be drawn again
            log.warning("epoch %d stopped at max_steps %d before its end and counts as done: training goes on "
                        "with epoch %d, if --epochs allows it", state["epoch"], state["step"], state["epoch"] + 1)
    state["run"] = identity
    return state, best_state


def _validate_epoch(run: _Run, state: dict, best_state: dict | None, loss: float) -> dict:
    """Score the epoch just trained on validation, add it to `state["history"]`, and return the best state:
    this epoch's weights where they score above the best so far (or validation measures nothing)."""
    metrics = _validate(run.model, run.tokenizer, run.meta, run.valid_sources)
    score = selection_score(metrics)
    state["history"].append({"epoch": state["epoch"], "step": state["step"],
                             "score": None if score is None else round(score, 4),
                             "loss": round(loss, 4), **_summary(metrics)})
    log.info("epoch %d: %s", state["epoch"], state["history"][-1])
    if score is None or best_state is None or score > state["best_score"]:  # unmeasured: keep the latest
        state["best_score"], state["best_epoch"] = -1.0 if score is None else score, state["epoch"]
        best_state = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    return best_state


def _load_weights_to_save(config: TrainConfig, run: _Run, best_state: dict, best_epoch: int) -> None:
    """The best epoch's weights into the model, or with `keep_start`, their blend with the starting weights."""
    if run.start_weights is None:
        run.model.load_state_dict(best_state)
    else:  # the epochs' validation scores in the history are those of the trained weights, not these
        log.info("saving %.2f x the starting weights + %.2f x epoch %d's (keep_start)", config.keep_start,
                 1 - config.keep_start, best_epoch)
        run.model.load_state_dict(interpolated(run.start_weights, best_state, config.keep_start))


def _training_record(config: TrainConfig, run: _Run, state: dict, tuning: dict, started: float) -> dict:
    """How the model was trained, for its newstagger.json: settings, data, epochs, time and what was tuned."""
    return {
        # continued models: their base, not a default
        "config": asdict(replace(config, base_model=run.meta.base_model)),
        "data": {"train": corpus_stats(run.train_docs), "validation": corpus_stats(run.valid_docs)},
        "history": state["history"],
        "best_epoch": state["best_epoch"],
        "seconds": round(time.time() - started, 1),
        "torch": torch.__version__,
        "device": run.device.type,
        "precision": "bf16 autocast" if run.bf16 else "fp32",
        **({"lexicon": run.model.lexicon.config} if run.model.lexicon is not None else {}),
        "crf": run.model.crf is not None,
        **tuning,
    }


# What decides a run's data, split, examples and optimizer: resuming under other values would continue
# weights on another split or another optimization. epochs, patience, max_steps and threads may change
# (more steps stretch the learning-rate decay from where it stands).
RUN_SETTINGS = ("train", "train_weights", "validation", "validation_fraction", "max_validation_documents",
                "max_length", "stride", "batch_tokens", "learning_rate", "head_learning_rate", "weight_decay",
                "warmup_ratio", "topic_loss_weight", "entity_loss_weight", "topic_oversample", "topic_negatives",
                "pack_entity_documents", "base_model", "init_model", "lexicon", "crf", "attention_dropout",
                "adversarial_epsilon", "seed", "validation_seed")


def run_identity(config, settings: Sequence[str], data_specs: Sequence[str]) -> dict:
    """What a checkpoint must have been made with to be resumed (train, pretrain): the `settings`
    named, and the contents of the data files, which edited between a crash and a resume would move
    the split and the batches under the weights."""
    return {**{name: getattr(config, name) for name in settings},
            "data_sha256": [fingerprint(path)["sha256"] for path, _ in map(parse_data_spec, data_specs)]}


def _with_inherited_settings(config: TrainConfig) -> TrainConfig:
    """The unset tagging window, name and version: an init_model's own (its version with the patch
    number raised), else the defaults."""
    parent = read_meta(config.init_model) if config.init_model else None
    if parent is None:
        # tag as trained: windows longer than those trained on cost long stories dearly (README)
        inherited = {"inference_max_length": config.max_length, "inference_stride": config.stride,
                     "name": "newstagger", "version": "0.1.0"}
    else:
        major, _, patch = parent.version.rpartition(".")
        inherited = {"inference_max_length": parent.max_length, "inference_stride": parent.stride, "name": parent.name,
                     "version": f"{major}.{int(patch) + 1}" if major and patch.isdigit() else parent.version}
    try:
        return replace(config, **{name: value for name, value in inherited.items() if getattr(config, name) is None})
    except ValueError as err:  # one window setting given, which does not fit the other's inherited value
        raise UsageError(f"{err} (with {config.init_model or 'the default'}'s "
                         f"{'stride' if config.inference_stride is None else 'window'})") from None


def start_run(config, output_kind: str) -> tuple[Path, torch.device, Path | None]:
    """(output folder, device, the checkpoint --resume continues from or None) of a training run
    (train or pretrain), after seeding every random generator it draws from and setting its torch CPU
    threads; UsageError where the output is a file, cannot be written, or holds files while the run
    neither resumes a checkpoint there nor has `overwrite_output` (a model trained earlier, or the
    very init_model the run starts from, would be replaced without a word; one whose checkpoint was
    deleted once it was final stays refused under --resume). A run that replaces one deletes its
    checkpoint first: until the new run's first checkpoint, a --resume after a crash would continue
    the replaced run."""
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    output = Path(config.output)
    if output.exists() and not output.is_dir():
        raise UsageError(f"output {output} is a file; name a folder for the {output_kind}")
    checkpoint = output / CHECKPOINT
    found = saved_checkpoint(checkpoint)
    saved = found if config.resume else None
    # A first checkpoint half written when the run was killed is the run's own, not a folder's contents
    held = [path for path in output.iterdir() if not (config.resume and path == _staging(checkpoint))] \
        if output.is_dir() else []
    if not (saved or config.overwrite_output) and held:
        raise UsageError(f"output {output} is not empty; " + ("--resume continues the run there, " if found else
                         f"name a new folder for the {output_kind}, ") + "or --overwrite-output replaces what is there")
    # checked now, not when the first checkpoint or the result is written, hours in
    nearest = next(folder for folder in (output.absolute(), *output.absolute().parents) if folder.exists())
    if not (nearest.is_dir() and os.access(nearest, os.W_OK | os.X_OK)):
        raise UsageError(f"output {output}: cannot create or write in {nearest}")
    if config.resume and not saved:  # killed before its first checkpoint: said, since the run starts over
        log.warning("--resume: no checkpoint in %s to continue; training from the start", output)
    if not saved:
        for folder in (checkpoint, _previous(checkpoint), _staging(checkpoint)):
            shutil.rmtree(folder, ignore_errors=True)
    return output, resolve_device(config.device), saved


def use_bf16(asked: bool, device: torch.device) -> bool:
    """Whether to train under bf16 autocast: where asked for and the device has bf16 matrix units (a CUDA
    GPU that supports bf16, or a CPU with AMX)."""
    on_gpu = device.type == "cuda"
    bf16 = asked and (torch.cuda.is_bf16_supported() if on_gpu else cpu_bf16_units() == "amx")
    if asked and not bf16 and on_gpu:
        log.warning("bf16 asked for, but this GPU does not support it; training in fp32")
    elif asked and not bf16:
        log.warning("bf16 asked for, but this CPU has no bf16 matrix units (AMX), where bf16 autocast steps ran "
                    "slower than fp32 (AMD EPYC, AVX2: 11x; a Xeon with AVX512-BF16 alone: 1.6-1.8x); training in fp32")
    return bf16


def _train_epoch(model: NewsTaggerModel, bar: tqdm, loss_fn: JointLoss, optimizer, scheduler, state: dict,
                 total_steps: int, bf16: bool, device: torch.device, adversarial_epsilon: float = 0.0) -> float:
    """One pass over the collated batches of a progress bar (stopping at `total_steps`), counting steps
    in `state`, with adversarial steps where `adversarial_epsilon` is above 0; returns the smoothed loss."""
    model.train()
    running = None
    for batch in bar:
        batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}

        def batch_loss() -> torch.Tensor:
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
                topic_logits, tag_logits = model(batch["input_ids"], batch["attention_mask"])
            return loss_fn(topic_logits.float(), tag_logits.float(), batch)

        adversarial = (partial(add_adversarial_gradients, model, batch_loss, adversarial_epsilon)
                       if adversarial_epsilon else None)
        running = optimizer_step(model, batch_loss(), optimizer, scheduler, bar, running, adversarial)
        state["step"] += 1
        if state["step"] >= total_steps:
            break
    bar.close()
    return running or 0.0


def optimizer_step(model: nn.Module, loss: torch.Tensor, optimizer, scheduler, bar: tqdm,
                   running: float | None, after_backward: Callable[[], None] | None = None) -> float:
    """Backpropagate `loss` (then run `after_backward`, which may add gradients) with gradients clipped
    to norm 1, step the optimizer and the schedule; the smoothed loss after it (`running` before), shown
    on the progress bar with the learning rate."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if after_backward is not None:
        after_backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
    bar.set_postfix(loss=f"{running:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
    return running


def add_adversarial_gradients(model: NewsTaggerModel, batch_loss: Callable[[], torch.Tensor], epsilon: float) -> None:
    """FGM: add the gradients of the loss at the word embeddings moved by `epsilon` along their
    gradient, normalised over the whole embedding matrix, to those already there; the embeddings are
    moved back before the optimizer steps."""
    embeddings = model.bert.embeddings.word_embeddings.weight
    norm = embeddings.grad.norm()
    if not (norm > 0 and torch.isfinite(norm)):
        return
    delta = epsilon * embeddings.grad / norm
    with torch.no_grad():
        embeddings.add_(delta)
    batch_loss().backward()
    with torch.no_grad():
        embeddings.sub_(delta)


def interpolated(start: dict[str, torch.Tensor], trained: dict[str, torch.Tensor], keep_start: float) -> dict:
    """The state dict keep_start x start + (1 - keep_start) x trained; tensors that are not floating
    point (buffers of ids) are the trained ones."""
    return {name: keep_start * start[name] + (1 - keep_start) * value if value.is_floating_point() else value
            for name, value in trained.items()}


def _read_data(config: TrainConfig, sources: Sequence[list[Document]]):
    """(training sets: the files, then `sources`; each set's entity-loss weight; validation sets read
    from files, as (spec, documents))."""
    train_sets = [*(_labelled_file(spec, "--train") for spec in config.train), *sources]
    validation_sets = []
    for spec in config.validation:
        docs = _labelled_file(spec, "--validation")
        if len(docs) > config.max_validation_documents:  # a sample, not the head of a file sorted by date or desk
            log.warning("--validation %s: scoring a random %d of its %d documents (max_validation_documents)",
                        spec, config.max_validation_documents, len(docs))
            kept = sorted(random.Random(_validation_seed(config)).sample(range(len(docs)),
                                                                         config.max_validation_documents))
            docs = [docs[i] for i in kept]
        validation_sets.append((spec, docs))
    if not any(train_sets):
        raise DataError("no training documents: give at least one --train PATH[:FORMAT] with documents in it")
    if not any(doc.labelled for docs in train_sets for doc in docs):
        raise DataError("no labelled training documents: none has topics or entities")
    weights = [*(config.train_weights or [1.0] * len(config.train)), *[1.0] * len(sources)]
    return train_sets, weights, validation_sets


def _validation_seed(config: TrainConfig) -> int:
    return config.seed if config.validation_seed is None else config.validation_seed


def _labelled_file(spec: str, option: str) -> list[Document]:
    return labelled_file(read_documents(*parse_data_spec(spec)), f"{option} {spec}")


def _starting_model(config: TrainConfig, data_schema: LabelSchema):
    """(model, tokenizer, label schema, the parent model's meta or None): the `init_model` folder with
    its heads grown to the data's new labels, or a fresh model on `base_model`; then the lexicon and
    the CRF attached where asked for and not there yet."""
    parent_meta = None
    if config.init_model:
        model, tokenizer, parent_meta = load_model_folder(config.init_model)
        lexical.LexicalTopicModel.load(config.init_model, parent_meta.schema.topics)  # damaged: said now, not after
        if config.base_model not in (DEFAULT_BASE_MODEL, parent_meta.base_model):
            log.warning("base_model %s is not used: init_model %s continues its own encoder (from %s)",
                        config.base_model, config.init_model, parent_meta.base_model)
        schema = parent_meta.schema.merged_with(data_schema)
        if schema != parent_meta.schema:
            log.warning("new labels in the data: topics %s, entity types %s; growing the heads",
                        sorted(set(schema.topics) - set(parent_meta.schema.topics)),
                        sorted(set(schema.entity_types) - set(parent_meta.schema.entity_types)))
            model.grow_labels(schema)
    else:
        schema = data_schema
        with loading_base(config.base_model):
            model = new_model(config.base_model, schema)
            tokenizer = AutoTokenizer.from_pretrained(config.base_model, trust_remote_code=False)
        check_tokenizer_fits(config.base_model, tokenizer, model.config)
    if config.lexicon and model.lexicon is None:
        words, source = jieba_words()
        model.attach_lexicon(build_lexicon(words, tokenizer, source))
        log.info("lexicon: %s", model.lexicon.config)
    if config.crf and model.crf is None:
        model.attach_crf()
    set_attention_dropout(model, config.attention_dropout)
    check_windows_fit(model.config, max_length=config.max_length, inference_max_length=config.inference_max_length)
    return model, tokenizer, schema, parent_meta


@contextmanager
def loading_base(name_or_path: str):
    """Around loading a base checkpoint (train, pretrain): what cannot be a base, or cannot be loaded,
    is a UsageError naming it."""
    folder = Path(name_or_path)
    if not folder.exists() and name_or_path.startswith("~"):
        raise UsageError(f"base_model {name_or_path!r}: no such folder ('~' is not expanded: write the whole path)")
    if not folder.exists() and (folder.is_absolute() or name_or_path.startswith(".")):  # not a hub name
        raise UsageError(f"base_model {name_or_path!r}: no such folder")
    if folder.is_file():  # transformers would read it as a config, then unpickle it as weights
        raise UsageError(f"base_model {name_or_path!r} is a file; give the checkpoint's folder or a hub name")
    if (folder / META_FILE).is_file():
        raise UsageError(f"base_model {name_or_path!r} is not a plain BERT checkpoint (a newstagger model folder: "
                         "continue it with train --init-model)")
    if (folder / "config.json").is_file() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        # transformers would quietly make a tokenizer that knows five tokens
        raise UsageError(f"base_model {name_or_path!r} has no tokenizer ({' or '.join(TOKENIZER_FILES)})")
    if any(folder.glob("*.bin")) and not any(folder.glob("*.safetensors")):
        raise UsageError(f"base_model {name_or_path!r} has no safetensors weights, and newstagger does not "
                         "unpickle a pytorch_model.bin: convert it once where you trust it (README: Base model)")
    try:
        yield
    # transformers' ways of saying "no such folder or hub model", "not a model folder", "damaged weights"
    except (OSError, ValueError, SafetensorError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if not folder.exists():  # a hub name, or a relative folder written like one ("runs/zh-news-base")
            raise UsageError(f"base_model {name_or_path!r}: no such folder here, and as a hub model: "
                             f"{reason}") from None
        raise UsageError(f"base_model {name_or_path!r} cannot be loaded: {reason}") from None
    except RuntimeError:
        raise UsageError(f"base_model {name_or_path!r} is not a plain BERT checkpoint: its weights do not fit "
                         "its config") from None


BERT_SPECIALS = ("cls", "sep", "pad", "unk")  # what tagging and training feed the encoder; pretraining adds "mask"


def check_tokenizer_fits(name_or_path: str, tokenizer, encoder_config,
                         special: tuple[str, ...] = BERT_SPECIALS) -> None:
    """UsageError where the tokenizer lacks a special token BERT needs in its own vocabulary (transformers
    adds a missing one as a new, untrained token: a crash at the first batch, or tokens the encoder never
    saw) or has ids past the encoder's embeddings (an IndexError hours into a run otherwise, when such a
    token first turns up, or masked-LM training draws it as a random token)."""
    for role in special:
        token, token_id = getattr(tokenizer, f"{role}_token"), getattr(tokenizer, f"{role}_token_id")
        if token is None or token_id is None or token_id >= tokenizer.vocab_size:
            raise UsageError(f"base_model {name_or_path!r}: its tokenizer has no {role} token in its vocabulary "
                             f"({token or 'none set'}): give the vocabulary's own as {role}_token in its "
                             "tokenizer_config.json")
    if len(tokenizer) > encoder_config.vocab_size:
        raise UsageError(f"base_model {name_or_path!r}: its tokenizer has {len(tokenizer)} tokens, more than the "
                         f"encoder's {encoder_config.vocab_size} embeddings")


def check_windows_fit(encoder_config, **windows: int) -> None:
    """UsageError naming each window setting longer than the encoder's position embeddings."""
    too_long = windows_past_positions(encoder_config, **windows)
    if too_long:
        raise UsageError(f"{' and '.join(too_long)}: more than the encoder's "
                         f"{encoder_config.max_position_embeddings} positions")


def _untaught_labels(schema: LabelSchema, train_docs: list[Document], parent: LabelSchema | None) -> list[str]:
    """The schema's labels that no training document has (a coarse span teaching its finer types)
    and the parent model did not know: a rare label the validation split took every example of."""
    topics = {topic for doc in train_docs for topic in doc.topics or ()}
    types = {span.type for doc in train_docs for span in doc.entities or ()}
    types |= {t for t, c in schema.coarse.items() if c in types}
    known = (set(parent.topics) | set(parent.entity_types)) if parent else set()
    return [f"topic {t!r}" for t in schema.topics if t not in topics | known] + \
        [f"entity type {t!r}" for t in schema.entity_types if t not in types | known]


def _training_examples(config: TrainConfig, train_sets: list[list[Document]], weights: list[float],
                       validation_files: list[list[Document]], tokenizer, schema: LabelSchema):
    """(training documents with the no-topic ones `topic_negatives` asks for, their windows as examples
    with topic rows oversampled, validation sources: each validation file's documents and each set's
    held-out share, kept apart because each source is scored in its own entity view)."""
    valid_sources = list(validation_files)
    kept_sets = []
    for docs in train_sets:
        coarse = _labelled_coarse_only(docs, schema)
        if docs and not (config.validation or coarse):  # coarse-only sets are not split: selection scores fine types
            docs, held = split_validation(docs, held_out_share(config, len(docs)), seed=_validation_seed(config))
            valid_sources.append(held)
        kept_sets.append((docs, coarse))
    # A story in two sets (topics in one file, entities in another), or in --validation too, is
    # validated on, so it is trained on in neither: its text would leak into the scores and the cuts.
    # So is the rest of a group held out from another set.
    validated = {doc.text for docs in valid_sources for doc in docs}
    validated_groups = {doc.group for docs in valid_sources for doc in docs if doc.group is not None}
    train_docs: list[Document] = []
    examples: list[Example] = []
    for (docs, coarse), weight in zip(kept_sets, weights):
        docs = not_held_out(docs, validated, validated_groups)
        train_docs += docs
        if config.pack_entity_documents:
            docs = pack_documents(docs, config.max_length - 2, random.Random(config.seed))
        examples += build_examples(docs, tokenizer, schema, config.max_length, config.stride, coarse, weight)
    if config.topic_negatives:
        topic_documents = sum(doc.topics is not None for doc in train_docs)
        # sorted: get_vocab's order changes from one load to the next, and the draw must not
        latin_words = sorted(token for token in tokenizer.get_vocab() if token.isascii() and token.isalpha()
                             and len(token) > 1)
        negatives = no_topic_documents(train_docs, round(config.topic_negatives * topic_documents), latin_words,
                                       random.Random(config.seed))
        train_docs += negatives
        examples += build_examples(negatives, tokenizer, schema, config.max_length, config.stride)
    topic_examples = [e for e in examples if e.topics is not None]
    extra = int(round((config.topic_oversample - 1.0) * len(topic_examples)))
    examples += [topic_examples[i % len(topic_examples)] for i in range(extra)] if topic_examples else []
    return train_docs, examples, valid_sources


def held_out_share(config: TrainConfig, documents: int) -> float:
    """The validation share of a training set of this many documents: a smaller one where the usual
    share would pass the cap, so nothing held out goes unused."""
    # scikit-learn rounds the count up, and cap / n * n can come out a hair over the cap
    return min(config.validation_fraction, config.max_validation_documents / documents * (1 - 1e-9))


def _optimizer_and_schedule(model: NewsTaggerModel, config: TrainConfig, total_steps: int):
    """AdamW, the freshly started layers at the head learning rate; linear warm-up, then linear decay."""
    fresh_layers = [model.topic_head, model.entity_head, model.lexicon_projection, model.crf]
    head_params = [p for layer in fresh_layers if layer is not None for p in layer.parameters()]
    head_ids = {id(p) for p in head_params}
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in model.parameters() if id(p) not in head_ids], "lr": config.learning_rate},
         {"params": head_params, "lr": config.head_learning_rate}],
        weight_decay=config.weight_decay)
    return optimizer, warmup_then_decay(optimizer, config.warmup_ratio, total_steps)


def warmup_then_decay(optimizer, warmup_ratio: float, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Learning rate schedule: linear warm-up over `warmup_ratio` of the steps, then linear decay to 0.
    transformers' get_linear_schedule_with_warmup, but its first step is not at learning rate 0
    (a step that changes nothing, a loss on short test runs of a few steps)."""
    warmup = max(1, int(warmup_ratio * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (total_steps - step) / max(1, total_steps - warmup))))


def resume_checkpoint(checkpoint: Path, run: dict, model, optimizer, scheduler,
                      rng: random.Random) -> tuple[dict, dict | None]:
    """Restore a `save_checkpoint` folder of the run `run` (the settings it must have been made with)
    into the model, optimizer, scheduler and rng (train, pretrain); returns the trainer state and the
    best state so far (None where the run keeps none). DataError where it is another run's or damaged."""
    try:
        return _restore(checkpoint, run, model, optimizer, scheduler, rng)
    except DataError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as err:  # damaged, another run's
        raise DataError(f"{checkpoint} cannot be resumed from ({err!r}); delete it to train afresh") from None


def _restore(checkpoint: Path, run: dict, model, optimizer, scheduler, rng: random.Random) -> tuple[dict, dict | None]:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    # A new split or schedule under weights trained on the old one would tune on trained-on text; checked
    # before the weights load, whose errors (another head, no CRF) would not say which setting changed.
    changed = [name for name, value in state.get("run", run).items() if run.get(name) != value]
    if changed:
        raise DataError(f"{checkpoint} is from a run with other {', '.join(changed)}; resume with the same settings, "
                        f"or delete it to train afresh")
    load_model(model, checkpoint / "model.safetensors")
    _load_optimizer(checkpoint, optimizer, scheduler)
    best_state = load_file(checkpoint / "best.safetensors") if (checkpoint / "best.safetensors").is_file() else None
    rng.setstate(_rng_state_from_json(state["rng"]))
    if (checkpoint / "torch_rng.safetensors").is_file():
        rng_states = load_file(checkpoint / "torch_rng.safetensors")
        torch.set_rng_state(rng_states.pop("cpu"))
        if rng_states and torch.cuda.is_available():  # written on a GPU, resumed on one
            devices = min(len(rng_states), torch.cuda.device_count())
            torch.cuda.set_rng_state_all([rng_states[f"cuda:{i}"] for i in range(devices)])
    log.info("resumed from %s at epoch %d, step %d", checkpoint, state["epoch"], state["step"])
    return state, best_state


def _tune_on_validation(tagger: Tagger, train_docs: list[Document], valid_sources: list[list[Document]],
                        config: TrainConfig, parent_meta: ModelMeta | None) -> tuple[dict, lexical.LexicalTopicModel | None, dict]:
    """The trained model's final validation metrics, with its cuts (entity threshold, topic blend, topic
    thresholds) chosen on them and set in `tagger.meta`; where validation has fewer than
    `min_tuning_documents` of a task, the parent model's cuts are kept (the defaults without one).
    Returns (metrics, lexical topic model or None, what was tuned and the blend report, for the
    training record)."""
    meta, schema = tagger.meta, tagger.schema
    keeping = f"keeping {parent_meta.name} {parent_meta.version}'s" if parent_meta else "keeping the default"
    if parent_meta is not None:
        meta.entity_threshold = parent_meta.entity_threshold
        meta.thresholds = {t: parent_meta.thresholds[t] for t in schema.topics if t in parent_meta.thresholds}
    predictions = Predictions.joined([predict_documents(tagger, docs) for docs in valid_sources])
    metrics = prediction_metrics(predictions, tagger) if any(valid_sources) else {}
    tuned = []
    if len(predictions.gold_spans) >= config.min_tuning_documents:
        tuned.append("entity threshold")
        meta.entity_threshold, entity_metrics = tune_entity_threshold(
            predictions.gold_spans, predictions.predicted_spans, predictions.lengths, schema, predictions.coarse_only)
        metrics.update(entity_metrics)
    else:
        log.info("%d entity-labelled validation documents, under min_tuning_documents: %s entity threshold (%.2f)",
                 len(predictions.gold_spans), keeping, meta.entity_threshold)

    topic_lexical, topic_blend = None, {}
    topic_train_docs = [doc for doc in train_docs if doc.topics is not None]
    can_fit_lexical = config.topic_lexical and len(topic_train_docs) >= MIN_LEXICAL_DOCUMENTS
    gold, topic_probs = predictions.topic_gold, predictions.topic_probs
    # topic_gold's rows; none where predict_documents scored no topics (a model without any)
    valid_texts = ([doc.text for docs in valid_sources for doc in docs if doc.topics is not None]
                   if gold is not None else [])
    tune_topics = len(valid_texts) >= config.min_tuning_documents
    if tune_topics and can_fit_lexical:
        tuned.append("topic blend")
        topic_lexical, topic_blend = fit_topic_blend(topic_train_docs, valid_texts, gold, topic_probs, schema.topics,
                                                     config.max_topic_blend)
    elif not tune_topics:
        log.info("%d topic-labelled validation documents, under min_tuning_documents: %s topic thresholds and "
                 "blend", len(valid_texts), keeping)
        if parent_meta is not None and config.topic_lexical:
            topic_lexical = _kept_topic_lexical(config.init_model, parent_meta, schema, topic_train_docs)
        if topic_lexical is not None:
            topic_blend = {"weight": topic_lexical.weight, "kept_from": parent_meta.version}
    if gold is not None:
        if topic_lexical is not None:
            topic_probs = lexical.blend(topic_probs, topic_lexical.predict(valid_texts), topic_lexical.weight)
        if tune_topics:
            tuned.append("topic thresholds")
            meta.thresholds, metrics["topics"] = tuned_topic_metrics(gold, topic_probs, schema.topics, meta.thresholds)
        else:
            metrics["topics"] = topic_metrics(gold, topic_probs, [meta.threshold(t) for t in schema.topics],
                                              schema.topics)
    tuning = {"tuned_on_validation": tuned, **({"topic_blend": topic_blend} if topic_blend else {})}
    return metrics, topic_lexical, tuning


def _kept_topic_lexical(parent_folder: str, parent_meta: ModelMeta, schema: LabelSchema,
                        topic_train_docs: list[Document]) -> lexical.LexicalTopicModel | None:
    """The parent's lexical topic model; where the data adds topics, which it cannot score, one fitted
    on the training documents at its weight. None where the parent has none (or nothing to fit on)."""
    parent_lexical = lexical.LexicalTopicModel.load(parent_folder, parent_meta.schema.topics)
    if parent_lexical is None or parent_meta.schema.topics == schema.topics:
        return parent_lexical
    if len(topic_train_docs) < MIN_LEXICAL_DOCUMENTS:
        return None
    refitted = fit_topic_lexical(topic_train_docs, schema.topics)
    refitted.weight = parent_lexical.weight
    return refitted


def _labelled_coarse_only(documents: list[Document], schema: LabelSchema) -> bool:
    types = {span.type for doc in documents for span in doc.entities or ()}
    return bool(types) and types <= schema.coarse_only_types


def _validate(model: NewsTaggerModel, tokenizer, meta: ModelMeta, sources: list[list[Document]]) -> dict:
    if not any(sources):
        return {}
    model.eval()
    return evaluate_tagger(Tagger(model, tokenizer, meta), *sources)


def _summary(metrics: dict) -> dict:
    return {f"{task}_{avg}_f1": metrics[task][avg]["f1"]
            for task in ("entities", "topics") if task in metrics for avg in ("micro", "macro")}


def save_checkpoint(folder: Path, model, optimizer, scheduler, state: dict, best_state: dict | None = None) -> None:
    """Everything `--resume` needs (train, pretrain); written to a temporary name first so a crash
    leaves the last one."""
    staging = _staging(folder)
    staging.mkdir(parents=True, exist_ok=True)
    # save_model, unlike save_file, takes weights tied to others (pretrain's masked-LM head)
    save_model(model, staging / "model.safetensors", force_contiguous=True)
    if best_state is not None:
        save_file({k: v.cpu().contiguous() for k, v in best_state.items()}, staging / "best.safetensors")
    _save_optimizer(staging, optimizer, scheduler)
    rng_states = {"cpu": torch.get_rng_state()}  # so that dropout continues its sequence
    if torch.cuda.is_initialized():
        rng_states |= {f"cuda:{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())}
    save_file(rng_states, staging / "torch_rng.safetensors")
    (staging / "trainer_state.json").write_text(json.dumps(state, indent=1))
    previous = _previous(folder)
    if folder.exists():  # else `previous` may be the one checkpoint there is (resumed after a crash): kept till now
        shutil.rmtree(previous, ignore_errors=True)
        folder.rename(previous)
    staging.rename(folder)
    shutil.rmtree(previous, ignore_errors=True)


def _save_optimizer(folder: Path, optimizer, scheduler) -> None:
    """The optimizer's moments as safetensors and its settings and schedule as JSON: a checkpoint
    holds no pickle, so resuming one from elsewhere runs no code."""
    optimizer_state = optimizer.state_dict()
    save_file({f"{param}.{slot}": value.cpu().contiguous()
               for param, slots in optimizer_state["state"].items() for slot, value in slots.items()},
              folder / "optimizer.safetensors")
    settings = {"param_groups": optimizer_state["param_groups"], "scheduler": scheduler.state_dict()}
    (folder / "optimizer.json").write_text(json.dumps(settings, indent=1))


def _load_optimizer(folder: Path, optimizer, scheduler) -> None:
    missing = [name for name in ("optimizer.json", "optimizer.safetensors") if not (folder / name).is_file()]
    if missing:
        raise DataError(f"{folder} is not a whole checkpoint (no {' or '.join(missing)}); delete it to train afresh")
    settings = json.loads((folder / "optimizer.json").read_text())
    moments: dict[int, dict] = {}
    # on the CPU: a checkpoint written on a GPU resumes on a CPU (the optimizer moves state to its parameters)
    for key, value in load_file(folder / "optimizer.safetensors").items():
        param, slot = key.split(".")
        moments.setdefault(int(param), {})[slot] = value
    groups = [group | {"betas": tuple(group["betas"])} for group in settings["param_groups"]]  # JSON has no tuples
    optimizer.load_state_dict({"state": moments, "param_groups": groups})
    scheduler.load_state_dict(settings["scheduler"])
    # The saved learning rates are the old schedule's: with more epochs or steps than before, the one
    # saved at the old end is 0, and the next step would train nothing. This schedule's, at this step:
    for group, base_lr, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * factor(scheduler.last_epoch)


def _staging(folder: Path) -> Path:
    """Where a checkpoint is written before it is renamed into place."""
    return folder.with_name(folder.name + ".tmp")


def _previous(folder: Path) -> Path:
    """Where the last checkpoint waits while its successor is renamed into place."""
    return folder.with_name(folder.name + ".old")


def saved_checkpoint(folder: Path) -> Path | None:
    """The checkpoint to resume from: `folder`, or the previous one where a crash between
    `save_checkpoint`'s two renames left only that."""
    for candidate in (folder, _previous(folder)):
        if (candidate / "trainer_state.json").is_file():
            return candidate
    return None


def rng_state_to_json(rng_state) -> list:
    version, internal, gauss = rng_state
    return [version, list(internal), gauss]


def _rng_state_from_json(data) -> tuple:
    version, internal, gauss = data
    return version, tuple(internal), gauss


# --------------------------------------------------------------------------- command line


def add_config_arguments(parser: argparse.ArgumentParser, config_class=TrainConfig) -> None:
    """One flag per field of a config dataclass, help text from the field, default None = 'not given'
    (the field's own default is applied later, under a config file's values, and shown in the help)."""
    for f in fields(config_class):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"]
        if f.default not in (MISSING, None) and "(default" not in help_text:
            shown = ("on" if f.default else "off") if isinstance(f.default, bool) else f.default
            help_text += f" (default: {shown})"
        kind = f.type.removesuffix(" | None")
        if kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif kind.startswith("list"):
            parser.add_argument(flag, action="append", default=None, metavar=f.metadata["metavar"] or "PATH[:FORMAT]",
                                type=float if kind == "list[float]" else str, help=help_text + " (repeatable)")
        else:
            parser.add_argument(flag, type={"int": int, "float": float}.get(kind, str), default=None,
                                metavar=f.metadata["metavar"], help=help_text)


def config_from_args(args: argparse.Namespace, config_class=TrainConfig):
    """A command's config from its flags, over its --config file where it has one; UsageError naming
    each setting that cannot work."""
    overrides = {f.name: getattr(args, f.name) for f in fields(config_class) if getattr(args, f.name) is not None}
    config_file = getattr(args, "config", None)
    try:
        return config_from_file(config_class, config_file, **overrides) if config_file else config_class(**overrides)
    except (ValueError, TypeError) as err:
        raise UsageError(str(err)) from None


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="fine-tune a tagger into a model folder",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="JSON or TOML file of settings; flags override it")
    add_config_arguments(parser)
    parser.set_defaults(handler=run)


def run(args) -> int:
    config = config_from_args(args)
    if not config.train:
        raise UsageError("no training data: give --train PATH[:FORMAT] or 'train' in --config")
    folder, metrics = train(config)
    print(json.dumps({"model": str(folder), "validation": metrics}, ensure_ascii=False, indent=2))
    return 0
