"""Texts in, topics and entity spans out: the one tagging path behind the CLI and the server.

Steps: tokenize the whole batch once, cut long texts into windows, run windows of similar length
together under a token budget, stitch each document's token scores back from the windows that own
them, decode spans with the constrained Viterbi, and average topic probabilities over windows.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from .decoding import constrained_viterbi, tags_to_spans
from .model import ModelMeta, NewsTaggerModel, load_model_folder
from .windowing import encode_texts, pad_batch, plan_windows, token_budget_batches

DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "default"


def default_model_dir() -> Path:
    """The shipped model, or the folder NEWSTAGGER_MODEL names."""
    return Path(os.environ.get("NEWSTAGGER_MODEL") or DEFAULT_MODEL_DIR)


class TorchBackend:
    """Runs the encoder and both heads in PyTorch; returns topic logits and tag log-probs."""

    name = "torch"

    def __init__(self, model: NewsTaggerModel, precision: str = "fp32", device: str | torch.device = "cpu"):
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, not {precision!r}")
        self.precision = precision
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        if precision == "bf16":
            self.model = self.model.to(torch.bfloat16)

    @torch.inference_mode()
    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = torch.from_numpy(input_ids).to(self.device)
        mask = torch.from_numpy(attention_mask).to(self.device)
        topic_logits, tag_logits = self.model(ids, mask)
        tag_log_probs = torch.log_softmax(tag_logits.float(), dim=-1)
        return topic_logits.float().cpu().numpy(), tag_log_probs.cpu().numpy()


class Tagger:
    def __init__(self, model: NewsTaggerModel, tokenizer, meta: ModelMeta, metrics: dict | None = None,
                 backend=None, max_batch_tokens: int = 8192):
        self.model = model
        self.tokenizer = tokenizer
        self.meta = meta
        self.metrics = metrics or {}
        self.schema = meta.schema
        self.backend = backend or TorchBackend(model)
        self.max_batch_tokens = max_batch_tokens

    @classmethod
    def load(cls, folder: str | Path | None = None, *, precision: str = "fp32", device: str = "cpu",
             max_batch_tokens: int = 8192) -> "Tagger":
        model, tokenizer, meta, metrics = load_model_folder(folder or default_model_dir())
        backend = TorchBackend(model, precision=precision, device=device)
        return cls(model, tokenizer, meta, metrics, backend=backend, max_batch_tokens=max_batch_tokens)

    def tag(self, texts: Sequence[str], *, thresholds: dict[str, float] | None = None,
            entity_types: Iterable[str] | None = None) -> list[dict]:
        """One result per text, in order: {"topics": {label: score}, "labels": [...], "entities": [...]}.

        `thresholds` overrides the model's per-topic thresholds; `entity_types` keeps only those
        types (None keeps all).
        """
        if not texts:
            return []
        topic_probs, tag_log_probs, encoded = self.score(texts)
        paths = constrained_viterbi(tag_log_probs)
        if entity_types is not None:
            entity_types = set(entity_types)  # read once: it may be a one-shot iterator
        results = []
        for d, text in enumerate(texts):
            tag_probs = np.exp(tag_log_probs[d][np.arange(len(paths[d])), paths[d]])
            entities = tags_to_spans(paths[d], tag_probs, encoded[d].offsets, text, self.schema)
            scores = {topic: round(float(p), 4) for topic, p in zip(self.schema.topics, topic_probs[d])}
            results.append(self.with_options({"topics": scores, "entities": entities}, thresholds, entity_types))
        return results

    def with_options(self, result: dict, thresholds: dict[str, float] | None = None,
                     entity_types: Iterable[str] | None = None) -> dict:
        """A `tag` result relabelled under these thresholds and cut to these entity types.

        Lets one forward pass serve callers that asked for different options (the server's
        micro-batcher); applied to an unfiltered result it gives exactly what `tag` would have.
        """
        wanted = set(entity_types) if entity_types is not None else None
        entities = [e for e in result["entities"] if wanted is None or e["type"] in wanted]
        labels = [t for t, p in result["topics"].items() if p >= self._threshold(t, thresholds)]
        return {"topics": result["topics"], "labels": labels, "entities": entities}

    def _threshold(self, topic: str, overrides: dict[str, float] | None) -> float:
        if overrides and topic in overrides:
            return overrides[topic]
        return self.meta.threshold(topic)

    def score(self, texts: Sequence[str]):
        """Per-document topic probabilities [docs, topics], token tag log-probs, and encodings."""
        encoded = encode_texts(self.tokenizer, list(texts))
        windows = [w for d, enc in enumerate(encoded)
                   for w in plan_windows(d, len(enc.ids), self.meta.max_length, self.meta.stride)]
        window_topic_probs = np.zeros((len(windows), len(self.schema.topics)), dtype=np.float32)
        window_tag_log_probs: list[np.ndarray] = [None] * len(windows)  # type: ignore[list-item]
        special = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id, self.tokenizer.pad_token_id
        for batch in token_budget_batches(windows, self.max_batch_tokens):
            batch_windows = [windows[i] for i in batch]
            input_ids, attention_mask = pad_batch(encoded, batch_windows, *special)
            topic_logits, tag_log_probs = self.backend(input_ids, attention_mask)
            window_topic_probs[batch] = 1.0 / (1.0 + np.exp(-topic_logits))
            for row, (i, w) in enumerate(zip(batch, batch_windows)):
                # +1: position 0 of every window is [CLS]
                window_tag_log_probs[i] = tag_log_probs[row, 1 + w.own_start - w.start : 1 + w.own_end - w.start]

        topic_sums = np.zeros((len(texts), len(self.schema.topics)), dtype=np.float64)
        weights = np.zeros(len(texts), dtype=np.float64)
        pieces: list[list[np.ndarray]] = [[] for _ in texts]
        for i, w in enumerate(windows):
            weight = max(w.own_end - w.own_start, 1)
            topic_sums[w.doc] += weight * window_topic_probs[i]
            weights[w.doc] += weight
            pieces[w.doc].append(window_tag_log_probs[i])
        num_tags = len(self.schema.tags)
        doc_log_probs = [np.concatenate(p) if p else np.zeros((0, num_tags), np.float32) for p in pieces]
        return topic_sums / weights[:, None], doc_log_probs, encoded
