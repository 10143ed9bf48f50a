"""The joint tagger: one BERT encoder, a multi-label topic head and a BIO token head.

One forward pass serves both tasks. A model folder is self-describing: the Hugging Face
`save_pretrained` layout (config.json, model.safetensors, tokenizer files) plus `newstagger.json`
(label schema, per-topic thresholds, window settings, version, lineage), `metrics.json` and a
model card (README.md). `load_model_folder` needs nothing else.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import CONFIG_NAME, AutoConfig, AutoTokenizer, BertModel, BertPreTrainedModel

from . import lexical
from .checks import check_rules, is_fraction, window_rules
from .crf import BioCrf
from .documents import DataError
from .folders import META_FILE, replace_text
from .lexicon import TokenLexicon
from .schema import LabelSchema

METRICS_FILE = "metrics.json"
CARD_FILE = "README.md"
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")
ONNX_DIR = "onnx"  # written by `newstagger export` (newstagger.export)
EXPORT_RECORD = "export.json"  # in ONNX_DIR: what was exported, from which weights
DEFAULT_TOPIC_THRESHOLD = 0.5  # of a topic no validation tuned


class NewsTaggerModel(BertPreTrainedModel):
    """BERT encoder + topic head over the masked mean of the tokens + per-token BIO head.

    Mean pooling rather than the pooler: the shipped base has no pooler weights, and a mean
    over a window is a steadier summary than one position when long stories are windowed.
    With a lexicon (newstagger.lexicon), its word features enter through a projection added to
    the token embeddings, so the whole encoder can use them. With a CRF (newstagger.crf), the
    decoder adds learned tag transitions to the token head's scores.
    """

    def __init__(self, config):
        super().__init__(config)
        schema = LabelSchema.from_dict(config.newstagger_schema)
        self.bert = BertModel(config, add_pooling_layer=False)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.topic_head = nn.Linear(config.hidden_size, len(schema.topics))
        self.entity_head = nn.Linear(config.hidden_size, len(schema.tags))
        self.lexicon = self.lexicon_projection = None
        if getattr(config, "newstagger_lexicon", None):
            self.lexicon = TokenLexicon(config.newstagger_lexicon)
            self.lexicon_projection = nn.Linear(self.lexicon.num_features, config.hidden_size, bias=False)
        self.crf = BioCrf(len(schema.tags)) if getattr(config, "newstagger_crf", False) else None
        self.post_init()

    @property
    def schema(self) -> LabelSchema:
        return LabelSchema.from_dict(self.config.newstagger_schema)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                lexicon_features: torch.Tensor | None = None):
        """(topic_logits [B, topics], tag_logits [B, L, tags]).

        `lexicon_features` are `self.lexicon(input_ids)`, computed here unless given (the ONNX
        graph takes them as an input: dictionary look-ups have no ONNX operator).
        """
        if self.lexicon is None:
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        else:
            if lexicon_features is None:
                lexicon_features = self.lexicon(input_ids)
            embeddings = self.bert.embeddings.word_embeddings(input_ids)
            embeddings = embeddings + self.lexicon_projection(lexicon_features.to(embeddings.dtype))
            hidden = self.bert(inputs_embeds=embeddings, attention_mask=attention_mask).last_hidden_state
        hidden = self.dropout(hidden)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.topic_head(pooled), self.entity_head(hidden)

    def attach_lexicon(self, lexicon: TokenLexicon) -> None:
        """Give a model (trained or not) dictionary-word features. The projection starts at zero,
        so the model's outputs are unchanged until training teaches it to use them."""
        projection = nn.Linear(lexicon.num_features, self.config.hidden_size, bias=False)
        nn.init.zeros_(projection.weight)
        device = self.bert.embeddings.word_embeddings.weight.device
        self.lexicon, self.lexicon_projection = lexicon.to(device), projection.to(device)
        self.config.newstagger_lexicon = lexicon.config

    def attach_crf(self) -> None:
        """Give a model (trained or not) learned tag transitions. They start at zero, where the CRF
        decodes exactly like the constrained Viterbi, so outputs are unchanged until training."""
        self.crf = BioCrf(len(self.schema.tags)).to(self.entity_head.weight.device)
        self.config.newstagger_crf = True

    def decoding_transitions(self) -> tuple | None:
        """(transitions, start) for decoding.constrained_viterbi, or None for the plain BIO ones."""
        return self.crf.decoding_scores() if self.crf is not None else None

    def grow_labels(self, schema: LabelSchema) -> None:
        """Extend the heads to a schema that appends new labels, keeping the trained rows.

        New rows start from the usual initialisation; existing topics and tags keep their ids
        because `LabelSchema.merged_with` only appends.
        """
        if not schema.extends(self.schema):
            raise ValueError("the new schema must keep the existing labels, in order, and append new ones")
        self.topic_head = _grown(self.topic_head, len(schema.topics), self.config.initializer_range)
        self.entity_head = _grown(self.entity_head, len(schema.tags), self.config.initializer_range)
        if self.crf is not None:
            self.crf = self.crf.grown(len(schema.tags))
        self.config.newstagger_schema = schema.to_dict()
        self.config.id2label = dict(enumerate(schema.tags))
        self.config.label2id = {tag: i for i, tag in enumerate(schema.tags)}


def _grown(head: nn.Linear, size: int, std: float) -> nn.Linear:
    grown = nn.Linear(head.in_features, size).to(head.weight.device, head.weight.dtype)
    with torch.no_grad():
        grown.weight.normal_(0.0, std)
        grown.bias.zero_()
        grown.weight[: head.out_features] = head.weight
        grown.bias[: head.out_features] = head.bias
    return grown


@dataclass
class ModelMeta:
    """What a model folder says about itself, beyond the weights (newstagger.json)."""

    schema: LabelSchema
    thresholds: dict[str, float] = field(default_factory=dict)
    # Entities scoring below this are not reported; tuned on validation (0 in folders from before it).
    entity_threshold: float = 0.0
    max_length: int = 256
    stride: int = 64
    name: str = "newstagger"
    version: str = "0.0.0"
    base_model: str = ""
    parent_version: str | None = None
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    training: dict = field(default_factory=dict)

    def __post_init__(self):
        """Settings tagging cannot work with (a hand-edited newstagger.json) fail here, naming themselves."""
        check_rules(self, (
            ("thresholds", isinstance(self.thresholds, dict) and all(map(is_fraction, self.thresholds.values())),
             "an object of numbers from 0 to 1"),
            ("entity_threshold", is_fraction(self.entity_threshold), "a number from 0 to 1"),
            *window_rules("max_length", self.max_length, "stride", self.stride),
        ))

    def threshold(self, topic: str) -> float:
        return self.thresholds.get(topic, DEFAULT_TOPIC_THRESHOLD)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["schema"] = self.schema.to_dict()
        return out

    @classmethod
    def from_dict(cls, obj: dict) -> "ModelMeta":
        obj = dict(obj)
        obj["schema"] = LabelSchema.from_dict(obj["schema"])
        return cls(**obj)


def new_model(base: str, schema: LabelSchema) -> NewsTaggerModel:
    """A tagger on a pretrained BERT (hub name or local folder); the heads start untrained."""
    config = AutoConfig.from_pretrained(base, trust_remote_code=False)
    check_bert_encoder(config)  # before the model is built: another architecture's config breaks BertModel
    _attach_schema(config, schema)
    model, loading = NewsTaggerModel.from_pretrained(base, config=config, dtype=torch.float32, use_safetensors=True,
                                                     output_loading_info=True)
    check_encoder_loaded(model, loading)
    return model


def check_bert_encoder(config) -> None:
    """ValueError where a base checkpoint's config is not a bidirectional BERT encoder as this
    transformers runs it. A decoder's causal mask would let each token see only its left context, and
    relative positions are no longer implemented (absolute ones would run instead): either trains,
    quietly worse."""
    if config.model_type != "bert":
        raise ValueError(f"it is a {config.model_type!r} checkpoint, not BERT")
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise ValueError("it is a BERT decoder (is_decoder or add_cross_attention in its config), which sees only "
                         "the text to the left of each token; a tagger needs the encoder")
    positions = getattr(config, "position_embedding_type", "absolute")
    if positions != "absolute":
        raise ValueError(f"its position_embedding_type is {positions!r}; this transformers runs BERT with absolute "
                         "positions only")


def check_encoder_loaded(model: nn.Module, loading: dict) -> None:
    """ValueError where a base checkpoint left BERT encoder weights at their random start (another
    architecture, or BERT saved under other names) or holds encoder tensors BERT does not use (another
    variant's): transformers only logs that, and the run would train without a word."""
    check_bert_encoder(model.config)
    unset = [key for key in loading["missing_keys"] if key.startswith("bert.")]
    if unset:
        raise ValueError(f"its weights leave {len(unset)} of the BERT encoder's tensors unset ({unset[0]}, ...): "
                         "BERT saved under other names?")
    buffers = {name.removeprefix("bert.") for name, _ in model.named_buffers()}  # saved by older versions
    unused = sorted(key for key in loading["unexpected_keys"]
                    if key.removeprefix("bert.").startswith(("embeddings.", "encoder."))
                    and key.removeprefix("bert.") not in buffers)
    if unused:
        raise ValueError(f"it holds {len(unused)} encoder tensors BERT does not use ({unused[0]}, ...): "
                         "a variant of BERT this transformers does not run")


def model_from_config(config, schema: LabelSchema) -> NewsTaggerModel:
    """A randomly initialised tagger from a BertConfig (tests and tiny experiments)."""
    _attach_schema(config, schema)
    return NewsTaggerModel(config)


def _attach_schema(config, schema: LabelSchema) -> None:
    config.newstagger_schema = schema.to_dict()
    config.id2label = dict(enumerate(schema.tags))
    config.label2id = {tag: i for i, tag in enumerate(schema.tags)}
    config.architectures = [NewsTaggerModel.__name__]


def save_model_folder(
    folder: str | Path,
    model: NewsTaggerModel,
    tokenizer,
    meta: ModelMeta,
    metrics: dict | None = None,
    weights_dtype: torch.dtype = torch.float16,
    topic_lexical: lexical.LexicalTopicModel | None = None,
) -> Path:
    """Write a complete, self-describing model folder, with the lexical topic model where it blends in.

    Weights are stored in fp16 by default, which halves the folder (the shipped model must stay
    small) and changes predictions far less than the bf16 or int8 fast paths do; they are loaded
    back as fp32. Saving over a folder drops what belonged to the old weights: its ONNX export and
    its lexical topic model.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(folder / ONNX_DIR, ignore_errors=True)
    if topic_lexical is not None and topic_lexical.weight > 0:
        topic_lexical.save(folder)
    else:
        lexical.remove(folder)
    state = {k: v.detach().to(weights_dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    model.save_pretrained(folder, state_dict=state)
    # safetensors writes 0600, which would hide the weights from a server run as another user
    (folder / "model.safetensors").chmod(0o644)
    tokenizer.save_pretrained(folder)
    write_description(folder, meta, metrics or {})
    return folder


def write_description(folder: Path, meta: ModelMeta, metrics: dict) -> None:
    """A model folder's description: newstagger.json, metrics.json and the card rendered from both
    (also rewritten alone, when what is known about unchanged weights grows, maybe while a server
    loads the folder: hence whole-file replacements)."""
    replace_text(folder / META_FILE, json.dumps(meta.to_dict(), ensure_ascii=False, indent=2) + "\n")
    replace_text(folder / METRICS_FILE, json.dumps(metrics, ensure_ascii=False, indent=2) + "\n")
    replace_text(folder / CARD_FILE, render_model_card(meta, metrics))


def weights_sha256(folder: Path) -> str:
    with open(folder / "model.safetensors", "rb") as weights:
        return hashlib.file_digest(weights, "sha256").hexdigest()


def read_meta(folder: str | Path) -> ModelMeta:
    """A model folder's description, or an error (FileNotFoundError, DataError) saying why there is none."""
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a newstagger model folder (no {META_FILE})")
    try:
        return ModelMeta.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError, AttributeError) as err:  # not JSON, or not the fields of a ModelMeta
        raise DataError(f"{path} cannot be read as a model description: {err!r}") from None


def load_model_folder(folder: str | Path):
    """(model in eval mode on the CPU, tokenizer, meta) from a folder written by save_model_folder."""
    folder = Path(folder)
    meta = read_meta(folder)
    read_metrics(folder)  # a damaged metrics.json fails here on every machine, not only where a backend choice reads it
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        # transformers would quietly make a tokenizer that knows five tokens
        raise DataError(f"{folder} is not a complete model folder: no tokenizer ({' or '.join(TOKENIZER_FILES)})")
    if not (folder / CONFIG_NAME).is_file():  # transformers would quietly take BERT-base's defaults
        raise DataError(f"{folder} is not a complete model folder: no {CONFIG_NAME}")
    try:
        # trust_remote_code=False: a folder naming code of its own (auto_map) is refused, never asked
        # about on stdin, which `tag` reads stories from
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        if not hasattr(config, "newstagger_schema"):
            raise ValueError(f"its {CONFIG_NAME} has no newstagger_schema: not a newstagger model's")
        # Mismatched shapes are reported below with the other misfits rather than raised on their own
        model, loading = NewsTaggerModel.from_pretrained(folder, config=config, dtype=torch.float32,
                                                         use_safetensors=True, ignore_mismatched_sizes=True,
                                                         output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, SafetensorError) as err:  # transformers' ways of saying a file is missing or broken
        raise DataError(f"{folder} is not a complete model folder: {err}") from None
    if misfits := _weights_misfits(loading):  # transformers only logs them, and leaves those tensors random
        raise DataError(f"{folder / 'model.safetensors'} does not fit its {CONFIG_NAME} ({misfits}); "
                        "restore the folder as it was written")
    model.eval()
    if model.schema != meta.schema:  # it would load, then fail (or mislabel) on every text
        raise DataError(f"{folder / META_FILE}: its labels do not match the ones the weights were saved with "
                        f"(config.json); restore the folder as it was written")
    if too_long := windows_past_positions(model.config, max_length=meta.max_length):
        raise DataError(f"{folder / META_FILE}: {too_long[0]} is more than the encoder's "
                        f"{model.config.max_position_embeddings} positions")
    return model, tokenizer, meta


def _weights_misfits(loading: dict) -> str:
    """What a weights file lacks, has over, or has in another shape than its config asks, or ''."""
    misfits = {"missing": sorted(loading["missing_keys"]), "not in the model": sorted(loading["unexpected_keys"]),
               "of another shape": sorted(key for key, *_ in loading["mismatched_keys"])}
    return "; ".join(f"{how}: {', '.join(keys)}" for how, keys in misfits.items() if keys)


def windows_past_positions(encoder_config, **windows: int) -> list[str]:
    """'NAME VALUE' for each window setting longer than the encoder's position embeddings."""
    return [f"{name} {value}" for name, value in windows.items() if value > encoder_config.max_position_embeddings]


def read_metrics(folder: str | Path) -> dict:
    """A model folder's recorded metrics ({} where it has none), or DataError when they cannot be read."""
    path = Path(folder) / METRICS_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except ValueError as err:
        raise DataError(f"{path} is not valid JSON: {err}") from None


def render_model_card(meta: ModelMeta, metrics: dict) -> str:
    schema = meta.schema
    tasks = " and ".join(task for task, labels in (("multi-label topics", schema.topics),
                                                   ("named-entity spans", schema.entity_types)) if labels)
    lines = [
        f"# {meta.name} {meta.version}",
        "",
        f"A newstagger model for Chinese text: {tasks},",
        "from one fine-tuned BERT encoder. Load it with `newstagger tag --model <this folder>` or",
        "`newstagger.Tagger.load(<this folder>)`.",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{meta.base_model}` |",
        f"| created | {meta.created} |",
        f"| parent version | {meta.parent_version or '-'} |",
        f"| window | {meta.max_length} positions, {meta.stride} tokens overlap |",
        f"| topics | {_cell(', '.join(schema.topics)) or '-'} |",
        f"| entity types | {_cell(', '.join(schema.entity_types)) or '-'} |",
        f"| word features | {_lexicon_summary(meta.training.get('lexicon'))} |",  # encoder input: both tasks
    ]
    if schema.entity_types:
        lines += [
            f"| coarse view | {_cell(', '.join(f'{k}->{v}' for k, v in schema.coarse.items())) or '-'} |",
            f"| span decoding | Viterbi over valid BIO sequences"
            f"{', with learned tag transitions (CRF)' if meta.training.get('crf') else ''} |",
            f"| entity threshold | {meta.entity_threshold:.2f} (entities whose score, the mean probability of their "
            "tags (marginal, with a CRF), is lower are dropped) |",
        ]
    if schema.topics:
        lines += [
            "",
            "## Topics and thresholds",
            "",
            "| topic | threshold |",
            "|---|---|",
            *[f"| {_cell(t)} | {meta.threshold(t):.3f}{'' if t in meta.thresholds else ' (default: not tuned)'} |"
              for t in schema.topics],
        ]
    blend = meta.training.get("topic_blend")
    if blend and blend.get("weight"):
        lines += ["", f"Topic scores are (1 - w) x the topic head's + w x a character n-gram TF-IDF logistic "
                  f"regression's (`topic_lexical.*`), w = {blend['weight']} "
                  + (f"kept from {blend['kept_from']}." if "kept_from" in blend else "chosen on validation.")]
    if metrics:
        lines += ["", "## Metrics", ""]
        tuned = meta.training.get("tuned_on_validation")
        if tuned:
            lines += [f"The {', '.join(tuned)} were chosen on this validation set, so its figures are optimistic.", ""]
        lines += _metrics_tables(metrics)
    if meta.training:
        lines += ["", "## Training", "", "```json", json.dumps(meta.training, ensure_ascii=False, indent=2), "```"]
    lines += [
        "",
        "## Limits",
        "",
        "- Trained on the data listed under Training: text unlike it (for a news model: social",
        "  media, classical Chinese) is out of its domain.",
        ("- Entity offsets are Python `str` indices, end exclusive; text longer than the window is"
         if schema.entity_types else "- Text longer than the window is"),
        "  windowed and merged, so length is not limited.",
        "",
    ]
    return "\n".join(lines)


def _cell(text: str) -> str:
    """Text for a markdown table cell: labels come from the data, and a `|` would split the cell."""
    return text.replace("|", "\\|")


def _lexicon_summary(lexicon: dict | None) -> str:
    if not lexicon:
        return "-"
    return f"{lexicon['source']}: {lexicon['words']:,} words of 2-{lexicon['max_word_tokens']} tokens ({', '.join(lexicon['categories'])})"


TASK_TABLES = ("entities", "entities_coarse", "topics")


def _metrics_tables(metrics: dict) -> list[str]:
    """Per-label tables for each evaluation (e.g. `validation`), a table for the backend check."""
    lines: list[str] = []
    for section, result in metrics.items():
        if isinstance(result, dict) and any(task in result for task in TASK_TABLES):
            for task in TASK_TABLES:
                if task in result:
                    lines += [f"### {section}: {task}", ""] + _task_table(result[task])
        elif not result:
            lines += [f"- {section}: not measured (nothing to score it on)", ""]
        elif section == "agreement":
            lines += ["### agreement with PyTorch fp32 (`newstagger check`)", "",
                      "| backend | device | identical entities | max topic difference | passed |",
                      "|---|---|---|---|---|"]
            for backend, row in result.items():
                if "span_agreement" in row:
                    lines.append(f"| {backend} | {row.get('device', 'cpu')} | {row['span_agreement']:.2%} "
                                 f"| {row['max_topic_difference']:.4f} | {'yes' if row['passed'] else 'no'} |")
            lines.append("")
        else:
            lines += [f"- {section}: `{json.dumps(result, ensure_ascii=False)}`", ""]
    return lines


def _task_table(result: dict) -> list[str]:
    lines = ["| label | precision | recall | f1 | support |", "|---|---|---|---|---|"]
    for label, row in result.get("per_label", {}).items():
        lines.append(f"| {_cell(label)} | {row['precision']:.3f} | {row['recall']:.3f} | {row['f1']:.3f} | {row['support']} |")
    for average in ("micro", "macro"):
        if average in result:
            row = result[average]
            lines.append(f"| **{average}** | {row['precision']:.3f} | {row['recall']:.3f} | {row['f1']:.3f} | |")
    if "main_topic" in result:
        main = result["main_topic"]
        lines += ["", f"Highest-scoring topic is a gold topic: {main['correct']} of {main['documents']} "
                      f"({main['accuracy']:.3f})."]
    return lines + [""]
