"""Importers from public annotation formats into the internal Document format, plus splits and stats.

Every importer returns `list[Document]` with end-exclusive offsets and runs each document through
`newstagger.documents.validate`, so a bad record fails with a DataError naming the file, the line
(or task) and the problem: nothing is dropped silently.

Formats (names as used by `read_documents` and `PATH:FORMAT` data specs):

- `internal`: the project's JSONL, `{"id", "text", "topics", "entities", "group"}`.
- `cluener`: CLUENER2020 JSON lines, `{"text", "label": {type: {mention: [[start, end_INCLUSIVE]]}}}`.
- `columns`: one character and its tag per line (BIO, BIOES or BMES), blank line between sentences.
- `labelstudio`: a Label Studio JSON export (an array of tasks with `labels` and `choices` results).
- `doccano`: doccano JSONL, spans as `"label": [[start, end, type]]` or `"entities": [...]`,
  categories as `"cats"` or `"label": [str, ...]` (`"labels"` in some doccano versions).
- `hf`: a Hugging Face `datasets` folder (`Dataset.save_to_disk`) or a Parquet file with the internal
  format's columns, read through `datasets` (Arrow: a folder memory-mapped, a file read whole);
  `to_hf_dataset` builds either.

The tagger gives each character one tag, so importers of span formats collapse exact duplicate
spans and drop a span nested inside a longer one (logged); crossing spans, and one stretch of text
given two types, stay errors.
"""

from __future__ import annotations

import difflib
import json
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

from newstagger.checks import is_integer, is_string_list
from newstagger.documents import DataError, Document, Span, json_object, text_field, utf8_only, validate
from newstagger.schema import DEFAULT_COARSE

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

Labels = Iterable[str] | None  # an allowed label set; None allows any
# A record is where it sits in its file and a callable building it; `_load` builds and validates
# the records of every format in one place.
Record = tuple[str, Callable[[], tuple[Document, dict[Span, str] | None]]]

INTERNAL_FIELDS = ("id", "text", "topics", "entities", "group")
INTERNAL_LABEL_FIELDS = {"topics": (str,), "entities": (dict,)}
# doccano's label fields and what their items are: "label" holds spans or categories by file.
DOCCANO_LABEL_FIELDS = {"label": (list, str), "entities": (dict, list), "cats": (str,)}
COLUMN_SUFFIXES = (".bio", ".bioes", ".bmes", ".iob", ".conll", ".txt", ".tsv")
PARQUET_SUFFIX = ".parquet"  # read as the `hf` format
# How many leading records format guessing may read before giving up.
GUESS_LIMIT = 50


def read_internal(path: str | Path, *, topic_labels: Labels = None, entity_types: Labels = None) -> list[Document]:
    """The project's own JSONL (see newstagger.documents)."""
    records = ((where, partial(_internal_document, line, where)) for _, where, line in _json_lines(path))
    return _load(records, topic_labels, entity_types)


def read_cluener(path: str | Path, *, topic_labels: Labels = None, entity_types: Labels = None) -> list[Document]:
    """CLUENER2020 JSON lines; ids are `<file stem>-<line number>`, topics None."""
    stem = Path(path).stem
    records = (
        (where, partial(_cluener_document, line, f"{stem}-{number}", where))
        for number, where, line in _json_lines(path)
    )
    return _load(records, topic_labels, entity_types)


def read_columns(path: str | Path, *, topic_labels: Labels = None, entity_types: Labels = None) -> list[Document]:
    """Character-per-line tag files (MSRA, Resume): `char<TAB or space>tag`, sentences split by a
    blank line. Tags O, B-/I- (BIO) and B-/M-/E-/S- or B-/I-/E-/S- (BMES, BIOES); an I-/M-/E-
    that continues no open span of its type is an error naming its line. Ids are
    `<file stem>-<line number of the sentence's first character>`, topics None."""
    stem = Path(path).stem
    records = (
        (f"{path}:{lines[0][0]}", partial(_columns_document, lines, f"{stem}-{lines[0][0]}", path))
        for lines in _column_sentences(path)
    )
    return _load(records, topic_labels, entity_types)


def read_label_studio(path: str | Path, *, topic_labels: Labels = None, entity_types: Labels = None) -> list[Document]:
    """A Label Studio JSON export, reading each task's latest annotation that was not cancelled.

    `labels` results become entities, `choices` results topics. Each task is read as labelled for
    a task when any task of its project is (the project labels it): then a task without spans has
    entities [], and one with no choice ticked has topics [] (Label Studio stores no result for an
    empty choice); otherwise None.
    Tasks nobody annotated are skipped with a warning: exports routinely include them.
    """
    with open(path, encoding="utf-8-sig") as handle:
        try:
            tasks = json.load(handle)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
        except (ValueError, RecursionError) as err:  # too deeply nested, or a number too long to read
            raise DataError(f"{path}: not readable JSON ({err})") from None
    if not isinstance(tasks, list):
        raise DataError(f"{path}: a Label Studio export is a JSON array of tasks")
    for index, task in enumerate(tasks):
        if not isinstance(task, dict) or not ("annotations" in task or "completions" in task):
            raise DataError(f"{path}[{index}]: not a Label Studio task with 'annotations'; export as \"JSON\", "
                            f"not \"JSON-MIN\" (which leaves out the annotations). Documents in the internal "
                            f"format go one JSON object per line (JSONL), not in an array")
    annotated = [(index, task, _latest_annotation(task)) for index, task in enumerate(tasks)]
    unannotated = sum(annotation is None for _, _, annotation in annotated)
    if unannotated:
        logger.warning("%s: skipped %d of %d tasks with no annotation that was not cancelled",
                       path, unannotated, len(tasks))
    # What a project labels is decided per project: an export of several (a spans project beside a
    # topics project) would otherwise read the spans project's stories as labelled "no topic".
    controls: dict[str, dict[str, set]] = {}  # project -> kind -> (from_name, to_name) of its results
    for _, task, annotation in annotated:
        if annotation is not None:
            found_in_project = controls.setdefault(_project(task), {"labels": set(), "choices": set()})
            for kind, found in found_in_project.items():
                found |= _result_controls(annotation, kind)
    labelled_for = {project: {kind: bool(found) for kind, found in kinds.items()}
                    for project, kinds in controls.items()}
    for found_in_project in controls.values():
        for kind, found in found_in_project.items():
            # A second Choices control (a quality flag) or a Labels control on another field would
            # otherwise be read as topics or as spans of the text
            if len(found) > 1:
                names = ", ".join(sorted(f"{from_name} on {to_name}" for from_name, to_name in found))
                raise DataError(f"{path}: {kind} results come from {len(found)} controls ({names}); newstagger reads "
                                f"one Labels control for entities and one Choices control for topics, on the "
                                f"text: leave the others out of the export")
    stem = Path(path).stem

    def records() -> Iterator[Record]:
        for index, task, annotation in annotated:
            if annotation is not None:
                where = f"{path}[{index}]"
                build = partial(_label_studio_document, task, annotation, f"{stem}-{index}",
                                labelled_for[_project(task)], where)
                yield where, build

    return _load(records(), topic_labels, entity_types)


def read_doccano(path: str | Path, *, topic_labels: Labels = None, entity_types: Labels = None) -> list[Document]:
    """doccano JSONL. Spans from `"entities": [{"start_offset", "end_offset", "label"}]` or
    `"label": [[start, end, type], ...]`; topics from `"cats"` or `"label": [str, ...]` (`"labels"`,
    as some doccano versions write it, is read as `"label"`). An empty `"label": []` means whatever
    `label` holds elsewhere in the file. Ids from `"id"`, else `<file stem>-<line number>`."""
    stem = Path(path).stem
    file_label_kind = _doccano_file_label_kind(path)
    records = (
        (where, partial(_doccano_document, line, f"{stem}-{number}", file_label_kind, where))
        for number, where, line in _json_lines(path)
    )
    return _load(records, topic_labels, entity_types)


def read_hf(path: str | Path, *, topic_labels: Labels = None, entity_types: Labels = None) -> list[Document]:
    """A `datasets.Dataset` saved to disk, or a Parquet file (as a warehouse exports a table), one row per
    document in the internal format's columns."""
    import datasets  # takes seconds to import; only this format needs it

    if Path(path).is_file():
        dataset = _parquet_dataset(path)
    else:
        try:
            dataset = datasets.load_from_disk(str(path))
        except FileNotFoundError as err:
            raise DataError(f"{path}: not a saved Hugging Face dataset ({err})") from None
    if isinstance(dataset, datasets.DatasetDict):
        raise DataError(f"{path} holds the splits {', '.join(dataset)}; name one, e.g. {Path(path) / next(iter(dataset))}")
    records = ((f"{path}[{i}]", partial(_row_document, row, f"{path}[{i}]")) for i, row in enumerate(dataset))
    return _load(records, topic_labels, entity_types)


def _parquet_dataset(path: str | Path) -> "datasets.Dataset":
    """The file's table as a Dataset. Read by pyarrow, not `Dataset.from_parquet`, which takes the name as
    a glob pattern (`week?.parquet` would add other files' rows), refuses a file of no rows, and logs
    and draws progress bars on stderr before its errors."""
    import datasets
    import pyarrow.parquet  # datasets' own dependency

    try:
        return datasets.Dataset(pyarrow.parquet.read_table(str(path)))
    except (OSError, pyarrow.ArrowException) as err:  # pyarrow's ways of saying a footer or a page is damaged
        raise DataError(f"{path}: not a readable Parquet file ({str(err).splitlines()[0]})") from None


_READERS = {
    "internal": read_internal,
    "cluener": read_cluener,
    "columns": read_columns,
    "labelstudio": read_label_studio,
    "doccano": read_doccano,
    "hf": read_hf,
}
FORMATS = tuple(_READERS)


def read_documents(
    path: str | Path,
    format: str | None = None,
    *,
    topic_labels: Labels = None,
    entity_types: Labels = None,
) -> list[Document]:
    """Documents of a file in any of FORMATS (guessed when `format` is None). `topic_labels` and
    `entity_types`, when given, are the allowed label sets; other labels are errors."""
    format = format or guess_format(path)
    if format not in _READERS:
        raise ValueError(f"unknown data format {format!r} (known: {', '.join(FORMATS)})")
    with utf8_only(str(path)):
        return _READERS[format](path, topic_labels=topic_labels, entity_types=entity_types)


def guess_format(path: str | Path) -> str:
    """The format of a data file, from its suffix (column files) or its first records. Records with
    an empty `entities` list and nothing else telling fit both doccano and the internal format: a
    later record decides, and the internal format is the answer when none does."""
    if Path(path).suffix.lower() in COLUMN_SUFFIXES:
        return "columns"
    if Path(path).suffix.lower() == PARQUET_SUFFIX:
        return "hf"
    if Path(path).is_dir():  # what `save_to_disk` writes: a Dataset's state, or a DatasetDict's split list
        if (Path(path) / "state.json").is_file() or (Path(path) / "dataset_dict.json").is_file():
            return "hf"
        raise DataError(f"{path} is a folder, not a data file or a saved Hugging Face dataset")
    undecided, index = None, -1
    for index, (_, _, line) in enumerate(islice(_json_lines(path), GUESS_LIMIT)):
        if index == 0 and line.lstrip().startswith("["):
            return "labelstudio"
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):
            break
        format = _format_of_record(obj)
        if format:
            return format
        if isinstance(obj, dict) and "entities" in obj:
            undecided = "internal"
    if undecided:
        return undecided
    if index < 0:  # e.g. an export of a store with nothing in it
        raise DataError(f"{path}: no documents (the file is empty)")
    raise DataError(
        f"{path}: cannot guess the data format; name it as {path}:FORMAT, FORMAT one of {', '.join(FORMATS)}"
    )


def holds_no_records(path: str | Path) -> bool:
    """A file of blank lines only, such as an export of a store with nothing in it: no format to guess."""
    return (Path(path).is_file() and Path(path).suffix.lower() != PARQUET_SUFFIX
            and next(_json_lines(path), None) is None)


def parse_data_spec(spec: str) -> tuple[Path, str | None]:
    """`path[:format]` from a command-line flag. Only a suffix naming a known format is taken as
    the format, so a path that itself contains ':' still works."""
    path, colon, suffix = spec.rpartition(":")
    if colon and path and suffix in FORMATS:
        return Path(path), suffix
    if colon and path and Path(path).exists() and not Path(spec).exists():  # a misspelt format
        raise DataError(f"{spec}: unknown data format {suffix!r}; FORMAT is one of {', '.join(FORMATS)}")
    return Path(spec), None


def labelled_file(docs: list[Document], where: str) -> list[Document]:
    """The documents of one data file (`where` names it), refused unless at least one is labelled: an
    empty file, or one read in the wrong format or with misnamed fields, would otherwise add nothing
    (or turn validation off, or leave a gate nothing to measure)."""
    if not docs:
        raise DataError(f"{where}: no documents")
    if not any(doc.labelled for doc in docs):
        raise DataError(f"{where}: none of its {len(docs)} documents has topics or entities; is the format right, "
                        "and are the fields named as the format names them?")
    return docs


def not_held_out(docs: list[Document], held_out_texts: set[str], held_out_groups: set[str] = frozenset()
                 ) -> list[Document]:
    """`docs` less those whose text is also held out (the same story in two files, or twice in one),
    or whose group is (a report with paragraphs in two files): trained on, it would leak into what is
    measured on it."""
    unseen = [doc for doc in docs if doc.text not in held_out_texts and doc.group not in held_out_groups]
    if len(unseen) < len(docs):
        logger.warning("left %d training documents out: their text or group is also held out",
                       len(docs) - len(unseen))
    return unseen


def split_validation(
    docs: list[Document], fraction: float = 0.1, seed: int = 13
) -> tuple[list[Document], list[Document]]:
    """(train, validation), deterministic for a seed, each in the input order.

    When any document has a `group`, whole groups go to one side (GroupShuffleSplit, so
    `fraction` is a fraction of groups) and documents without a group form groups of their own.
    Otherwise documents are shuffled and split individually. A set of one document or one group
    cannot be split and is all training (a retrain on a single correction is one).
    """
    from sklearn.model_selection import GroupShuffleSplit, ShuffleSplit  # slow to import; only splits need it

    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be between 0 and 1, got {fraction}")
    if any(doc.group is not None for doc in docs):
        # Prefixes keep a singleton's name from ever equalling a real group's.
        groups = [f"group:{doc.group}" if doc.group is not None else f"doc:{i}" for i, doc in enumerate(docs)]
        if len(set(groups)) < 2:
            return list(docs), []
        splitter = GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
    elif len(docs) < 2:
        return list(docs), []
    else:
        splitter, groups = ShuffleSplit(n_splits=1, test_size=fraction, random_state=seed), None
    try:
        train_index, validation_index = next(splitter.split(docs, groups=groups))
    except ValueError:  # scikit-learn: the share leaves an empty training side
        raise DataError(f"holding out {fraction} of {len(docs)} documents leaves none to train on") from None
    return [docs[i] for i in sorted(train_index)], [docs[i] for i in sorted(validation_index)]


# Pieces of text that carry no topic in any language the model reads: digits (ASCII and
# full-width), emoji and punctuation, beside Latin words (see no_topic_documents).
_DIGITS = "0123456789"
_FULL_WIDTH_DIGITS = "０１２３４５６７８９"
_PUNCTUATION = "。，、！？；：…—“”‘’《》（）()[]#@*&-_/.,!?:%"
_EMOJI = (0x1F300, 0x1F64F)  # symbols, pictographs and emoticons
# What a newsroom wraps around a story: credits (a role and a name) and marks that stand alone.
# Ingest pipelines send them as fields or fragments of their own, and they are about nothing.
_CREDIT_ROLES = ("记者", "本报记者", "通讯员", "实习生", "编辑", "责任编辑", "校对", "审核", "摄影", "摄", "图", "文",
                 "来源", "作者", "主编")
_CREDIT_FORMS = ("{role} {name}", "{role}：{name}", "{role}/{name}", "（{role} {name}）", "{role} {name} {other}",
                 "{name} {role}", "（{name} {role}）", "{role}：{name} {other}")
_STORY_MARKS = ("（完）", "（全文完）", "未完待续", "阅读原文", "点击查看", "展开全文", "返回顶部", "上一篇", "下一篇",
                "分享到", "扫码关注", "更多精彩内容", "编者按", "本报讯", "据新华社电", "本版图片", "第{number}版",
                "图为{name}")


def no_topic_documents(documents: Sequence[Document], count: int, latin_words: Sequence[str],
                       rng: random.Random) -> list[Document]:
    """`count` short texts about no topic, labelled for topics only (`topics == []`): a third bare entity
    mentions from `documents` (a name alone is no topic: a passing word is not enough, by the topic
    guidelines), a third newsroom credits and marks ("记者 <name>", "（完）"; the names are people's
    where the data has any), and the rest text without Chinese (`latin_words`, numbers, emoji,
    punctuation).

    Topic data is paragraphs; a topic head that never saw anything shorter answered "hello world"
    and a lone emoji with topics over their thresholds.
    """
    spans = [(doc.text[span.start : span.end], span.type) for doc in documents for span in doc.entities or ()]
    mentions = [mention for mention, _ in spans]
    people = [mention for mention, type_ in spans if DEFAULT_COARSE.get(type_) == "PER"] or mentions
    texts = []
    if mentions:
        texts += [rng.choice(mentions) for _ in range(count // 3)]
        texts += [_newsroom_text(people, rng) for _ in range(count // 3)]
    while len(texts) < count:
        texts.append(_contentless_text(latin_words, rng))
    return [Document(id=f"no-topic-{i}", text=text, topics=[]) for i, text in enumerate(texts)]


def _newsroom_text(people: Sequence[str], rng: random.Random) -> str:
    template = rng.choice(_CREDIT_FORMS) if rng.random() < 0.6 else rng.choice(_STORY_MARKS)
    return template.format(role=rng.choice(_CREDIT_ROLES), name=rng.choice(people), other=rng.choice(people),
                           number=rng.randint(1, 24))


def _contentless_text(latin_words: Sequence[str], rng: random.Random) -> str:
    def piece() -> str:
        kind = rng.randrange(4) if latin_words else rng.randrange(1, 4)
        if kind == 0:
            return rng.choice(latin_words)
        if kind == 1:
            return "".join(rng.choice(rng.choice((_DIGITS, _FULL_WIDTH_DIGITS))) for _ in range(rng.randint(1, 8)))
        if kind == 2:
            return "".join(chr(rng.randint(*_EMOJI)) for _ in range(rng.randint(1, 3)))
        return "".join(rng.choice(_PUNCTUATION) for _ in range(rng.randint(1, 4)))

    return rng.choice(("", " ")).join(piece() for _ in range(rng.randint(1, 6)))


def corpus_stats(docs: Iterable[Document]) -> dict:
    """Counts for logs and model cards; label counts are most frequent first."""
    topics: Counter[str] = Counter()
    entity_types: Counter[str] = Counter()
    documents = characters = for_topics = for_entities = without_topic = 0
    for doc in docs:
        documents += 1
        characters += len(doc.text)
        if doc.topics is not None:
            for_topics += 1
            without_topic += not doc.topics
            topics.update(doc.topics)
        if doc.entities is not None:
            for_entities += 1
            entity_types.update(span.type for span in doc.entities)
    return {
        "documents": documents,
        "characters": characters,
        "labelled_for_topics": for_topics,
        "labelled_for_entities": for_entities,
        "topics": dict(topics.most_common()),
        "without_topic": without_topic,
        "entity_types": dict(entity_types.most_common()),
        "entities": sum(entity_types.values()),
    }


def to_hf_dataset(docs: Iterable[Document]) -> "datasets.Dataset":
    """A `datasets.Dataset` with columns id, text, topics, entities, group (`save_to_disk` it for the
    `hf` format). A task the document is not labelled for stays None (Arrow lists are nullable),
    distinct from [] = labelled, none."""
    import datasets  # takes seconds to import

    features = datasets.Features({
        "id": datasets.Value("string"),
        "text": datasets.Value("string"),
        # Plain-list notation means "list of" in every datasets version the project admits.
        "topics": [datasets.Value("string")],
        "entities": [{
            "start": datasets.Value("int64"),
            "end": datasets.Value("int64"),
            "type": datasets.Value("string"),
        }],
        "group": datasets.Value("string"),
    })
    rows = [doc.to_dict() for doc in docs]
    return datasets.Dataset.from_dict({name: [row.get(name) for row in rows] for name in features}, features=features)


def _load(records: Iterable[Record], topic_labels: Labels, entity_types: Labels) -> list[Document]:
    """Build and validate each record; the first bad one raises its DataError."""
    # Materialised once: every record is checked against them, and a generator would run dry.
    topic_labels = frozenset(topic_labels) if topic_labels is not None else None
    entity_types = frozenset(entity_types) if entity_types is not None else None
    docs: list[Document] = []
    seen_ids: set[str] = set()
    for where, build in records:
        doc, mentions = build()
        validate(doc, topic_labels=topic_labels, entity_types=entity_types, mentions=mentions, where=where)
        if doc.id in seen_ids:
            raise DataError(f"{where}: duplicate id {doc.id!r}")
        seen_ids.add(doc.id)
        docs.append(doc)
    return docs


def _lines(path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 file, split at "\n" only (a stray "\r" inside a JSON line is
    whitespace, not a break), so that bytes that are not UTF-8 are an error naming their line."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            with utf8_only(f"{path}:{number}"):
                yield number, raw.decode("utf-8-sig" if number == 1 else "utf-8")


def _json_lines(path) -> Iterator[tuple[int, str, str]]:
    """(line number, "path:number", line) for each non-blank line."""
    for number, line in _lines(path):
        if line.strip():
            yield number, f"{path}:{number}", line


def _internal_document(line: str, where: str):
    return _row_document(json_object(line, where), where)


def _row_document(row: dict, where: str):
    """A document in the internal format's fields, with the mention an entity carries as `text` (as
    `tag` output does) checked against its offsets. A misspelt label field is an error: its labels
    would otherwise go unread, and a gold set or corrections would lose a task without a word."""
    for name in row:
        meant = _misspelt_label_field(name, row, INTERNAL_LABEL_FIELDS) if name not in INTERNAL_FIELDS else None
        if meant:
            raise DataError(f"{where}: field {name!r} is not read; did you mean {meant!r}?")
    doc = Document.from_dict(row, where)
    entities = row.get("entities") or ()
    # None as well as absent: a table's column of mentions has a null where an entity has none
    mentions = {span: entity["text"] for span, entity in zip(doc.entities or (), entities)
                if entity.get("text") is not None}
    return doc, mentions


def _misspelt_label_field(name: str, row: dict, label_fields: dict[str, tuple[type, ...]]) -> str | None:
    """The label field that `name` misspells ("topic", "entites"): close to it, holding what it would
    (a list of `label_fields[field]` items), and in a row without it. Names built on it
    ("pred_topics") and values of other shapes (a CMS's "topic": "体育", "entity_ids": [3]) are
    metadata, ignored."""
    if name in label_fields:
        return None
    meant = difflib.get_close_matches(name, label_fields, n=1, cutoff=0.7)
    if not meant or meant[0] in row or meant[0] in name or not isinstance(row[name], list):
        return None
    return meant[0] if all(isinstance(item, label_fields[meant[0]]) for item in row[name]) else None


def _string_list(value, field: str, where: str) -> list[str]:
    if not is_string_list(value):
        raise DataError(f"{where}: {field} must be a list of strings, got {value!r}")
    return list(value)


def _span(start, end, entity_type, where: str) -> Span:
    if not (is_integer(start) and is_integer(end) and isinstance(entity_type, str)):
        raise DataError(f"{where}: a span needs integer offsets and a string type, got {[start, end, entity_type]!r}")
    return Span(start, end, entity_type)


def _flat_spans(spans: Iterable[Span], text: str, mentions: dict[Span, str] | None, where: str) -> list[Span]:
    """Spans with exact duplicates collapsed and spans nested inside a longer one dropped (logged).
    Crossing spans and same-offset spans of two types are kept for validate() to reject; a span that
    is wrong on its own (outside the text, empty, not its mention) is an error even where it is nested:
    validate() sees only the kept ones, so a span is checked here before it is dropped."""
    kept: list[Span] = []
    for span in sorted(set(spans), key=lambda s: (s.start, -s.end, s.type)):
        length = span.end - span.start
        outer = next((k for k in kept if k.start <= span.start and span.end <= k.end and k.end - k.start > length), None)
        if outer is None:
            kept.append(span)
        else:
            validate(Document("", text, entities=[span]), mentions=mentions, where=where)
            logger.warning(
                "%s: dropped %s span [%d, %d) nested inside %s span [%d, %d); each character gets one tag",
                where, span.type, span.start, span.end, outer.type, outer.start, outer.end,
            )
    return kept


def _cluener_document(line: str, doc_id: str, where: str):
    obj = json_object(line, where)
    text = text_field(obj, where)
    label = obj.get("label")
    if not isinstance(label, dict):
        raise DataError(f"{where}: field 'label' must be an object {{type: {{mention: [[start, end]]}}}}")
    mentions: dict[Span, str] = {}
    for entity_type, by_mention in label.items():
        if not isinstance(by_mention, dict):
            raise DataError(f"{where}: label[{entity_type!r}] must be an object {{mention: [[start, end]]}}")
        for mention, offsets in by_mention.items():
            if not isinstance(offsets, list) or not all(isinstance(pair, list) and len(pair) == 2 for pair in offsets):
                raise DataError(f"{where}: offsets of {mention!r} must be a list of [start, end] pairs")
            for start, inclusive_end in offsets:
                span = _span(start, inclusive_end, entity_type, where)
                span = Span(span.start, span.end + 1, span.type)
                if mentions.get(span, mention) != mention:  # one of the two is not what the text says there
                    raise DataError(f"{where}: {entity_type} span [{span.start}, {inclusive_end}] is given as both "
                                    f"{mentions[span]!r} and {mention!r}")
                mentions[span] = mention
    return Document(doc_id, text, entities=_flat_spans(mentions, text, mentions, where)), mentions


def _column_sentences(path) -> Iterator[list[tuple[int, str]]]:
    """Each sentence's (line number, line) pairs."""
    sentence: list[tuple[int, str]] = []
    for number, line in _lines(path):
        line = line.rstrip("\r\n")
        if line.strip() and not line.startswith("-DOCSTART-"):  # CoNLL's document marker: a break, no text
            sentence.append((number, line))
        elif sentence:
            yield sentence
            sentence = []
    if sentence:
        yield sentence


def _columns_document(lines: list[tuple[int, str]], doc_id: str, path):
    tokens: list[str] = []
    spans: list[Span] = []
    offset = 0
    open_type: str | None = None
    open_start = 0
    for number, line in lines:
        where = f"{path}:{number}"
        if "\t" in line:  # a tab separates exactly, so the character itself may be a space
            token, tag = line.rsplit("\t", 1)
            tag = tag.strip()
        else:  # ASCII spaces only: the character may be a full-width or no-break space
            fields = [field for field in line.split(" ") if field]
            token, tag = fields if len(fields) == 2 else ("", "")
        if not token or not tag or "\t" in token:  # a third column (CoNLL's part of speech) would join the text
            raise DataError(f"{where}: expected a character and a tag, got {line!r}")
        prefix, _, entity_type = tag.partition("-")
        if tag != "O" and (prefix not in ("B", "I", "M", "E", "S") or not entity_type):
            raise DataError(f"{where}: unknown tag {tag!r} (expected O, or B-/I-/M-/E-/S- and a type)")
        if prefix in ("I", "M", "E"):
            if open_type != entity_type:
                raise DataError(f"{where}: tag {tag!r} continues no open {entity_type} span")
        else:
            if open_type is not None:
                spans.append(Span(open_start, offset, open_type))
            open_type = entity_type if prefix in ("B", "S") else None
            open_start = offset
        offset += len(token)
        tokens.append(token)
        if prefix in ("E", "S"):
            spans.append(Span(open_start, offset, entity_type))
            open_type = None
    if open_type is not None:
        spans.append(Span(open_start, offset, open_type))
    return Document(doc_id, "".join(tokens), entities=spans), None


def _latest_annotation(task) -> dict | None:
    annotations = task.get("annotations", task.get("completions"))  # completions: before Label Studio 1.0
    usable = [a for a in annotations or () if isinstance(a, dict) and not a.get("was_cancelled")]
    if not usable:
        return None
    # ISO timestamps compare correctly as strings; the id (an integer in Label Studio) breaks ties.
    return max(usable, key=lambda a: (str(a.get("updated_at") or a.get("created_at") or ""),
                                      a["id"] if isinstance(a.get("id"), int) else -1))


def _project(task: dict) -> str:
    """The Label Studio project a task comes from (exports write its id in each task); tasks
    without one are taken as one project."""
    return json.dumps(task.get("project"), sort_keys=True)


def _result_controls(annotation: dict, kind: str) -> set[tuple]:
    """(from_name, to_name) of each of the annotation's results of this kind."""
    result = annotation.get("result")
    if not isinstance(result, list):
        return set()
    return {(str(item.get("from_name")), str(item.get("to_name"))) for item in result  # str: a list is no key
            if isinstance(item, dict) and item.get("type") == kind}


def _label_studio_document(task, annotation: dict, fallback_id: str, labelled_for: dict[str, bool], where: str):
    data = task.get("data")
    if not isinstance(data, dict):
        raise DataError(f"{where}: task has no 'data' object")
    text = text_field(data, where)
    result = annotation.get("result")
    if not isinstance(result, list):
        raise DataError(f"{where}: annotation 'result' must be a list")
    topics: list[str] | None = [] if labelled_for["choices"] else None
    mentions: dict[Span, str] = {}
    spans: list[Span] = []
    for item in result:
        value = item.get("value") if isinstance(item, dict) else None
        kind = item.get("type") if isinstance(item, dict) else None
        if kind in ("labels", "choices") and not isinstance(value, dict):
            raise DataError(f"{where}: a {kind} result has no 'value' object")
        if kind == "choices":
            if "start" in value:
                raise DataError(f"{where}: a choices result with a span (from_name {item.get('from_name')!r}) is a "
                                "per-region choice, not a topic of the story")
            topics = (topics or []) + _string_list(value.get("choices"), "'choices'", where)
        elif kind == "labels":
            labels = value.get("labels")
            if not isinstance(labels, list) or len(labels) != 1:
                raise DataError(f"{where}: a labels result needs exactly one label, got {labels!r}")
            span = _span(value.get("start"), value.get("end"), labels[0], where)
            spans.append(span)
            if "text" in value:
                mentions[span] = value["text"]
    task_id = task.get("id")
    return Document(
        id=str(task_id) if task_id is not None else fallback_id,
        text=text,
        topics=topics,
        entities=_flat_spans(spans, text, mentions, where) if labelled_for["labels"] else None,
        group=str(data["group"]) if data.get("group") is not None else None,
    ), mentions


def _doccano_label_kind(label, where: str) -> str | None:
    """'spans' or 'categories' for a non-empty doccano `label` list, None for an empty one."""
    if not isinstance(label, list):
        raise DataError(f"{where}: field 'label' must be a list")
    if not label:
        return None
    if all(isinstance(item, str) for item in label):
        return "categories"
    if all(isinstance(item, list) and len(item) == 3 for item in label):
        return "spans"
    raise DataError(f"{where}: 'label' must hold either [start, end, type] spans or category strings")


def _doccano_file_label_kind(path) -> str | None:
    """What `label` holds in this file, from the first record that tells; None if none does."""
    for _, where, line in _json_lines(path):
        try:
            obj = _doccano_fields(json_object(line, where), where)
            if "entities" in obj:
                return "categories"  # spans live in 'entities', so 'label' can only be categories
            if "label" in obj:
                kind = _doccano_label_kind(obj["label"], where)
                if kind:
                    return kind
        except DataError:
            continue  # the bad record fails on its own when it is read
    return None


def _doccano_fields(obj: dict, where: str) -> dict:
    """The record with `labels` read as `label`; a misspelt label field is an error, as in the
    internal format, since its labels would otherwise go unread."""
    if "labels" in obj:
        if "label" in obj:
            raise DataError(f"{where}: both 'label' and 'labels' given; doccano writes one of them")
        obj = {("label" if name == "labels" else name): value for name, value in obj.items()}
    for name in obj:
        meant = _misspelt_label_field(name, obj, DOCCANO_LABEL_FIELDS)
        if meant:
            raise DataError(f"{where}: field {name!r} is not read; did you mean {meant!r}?")
    return obj


def _doccano_document(line: str, fallback_id: str, file_label_kind: str | None, where: str):
    obj = _doccano_fields(json_object(line, where), where)
    text = text_field(obj, where)
    spans: list[Span] | None = None
    topics: list[str] | None = None
    if "entities" in obj:
        entities = obj["entities"]
        # objects from sequence labelling, [start, end, label] lists from "intent detection and slot filling"
        if not isinstance(entities, list) or not all(
                isinstance(e, dict) or (isinstance(e, list) and len(e) == 3) for e in entities):
            raise DataError(f"{where}: 'entities' must be a list of {{start_offset, end_offset, label}} objects "
                            f"or of [start, end, label] lists")
        spans = [_span(*e, where) if isinstance(e, list) else
                 _span(e.get("start_offset"), e.get("end_offset"), e.get("label"), where) for e in entities]
    if "cats" in obj:
        topics = _string_list(obj["cats"], "'cats'", where)
    if "label" in obj:
        kind = _doccano_label_kind(obj["label"], where) or file_label_kind
        if kind is None:
            raise DataError(
                f"{where}: every 'label' in the file is empty, so it is unclear whether it means spans or categories"
            )
        if kind == "spans":
            if spans is not None:
                raise DataError(f"{where}: spans given both in 'label' and in 'entities'")
            spans = [_span(*item, where) for item in obj["label"]]
        else:
            if topics is not None:
                raise DataError(f"{where}: categories given both in 'label' and in 'cats'")
            topics = list(obj["label"])
    doc_id = obj.get("id")
    return Document(
        id=str(doc_id) if doc_id is not None else fallback_id,
        text=text,
        topics=topics,
        entities=_flat_spans(spans, text, None, where) if spans is not None else None,
        group=str(obj["group"]) if obj.get("group") is not None else None,
    ), None


def _format_of_record(obj) -> str | None:
    """The JSON-lines format one record belongs to, or None if it does not tell."""
    if not isinstance(obj, dict):
        return None
    if "topics" in obj:  # only the internal format has it; a 'label' beside it is the source's metadata
        return "internal"
    label = obj.get("label")
    if isinstance(label, dict):
        return "cluener"
    if isinstance(label, list) or isinstance(obj.get("labels"), list) or "cats" in obj:
        return "doccano"
    if "relations" in obj:  # doccano's export of spans with relations
        return "doccano"
    entities = obj.get("entities")
    if isinstance(entities, list) and entities and isinstance(entities[0], dict):
        return "doccano" if "start_offset" in entities[0] else "internal"
    if isinstance(entities, list) and entities and isinstance(entities[0], list):  # [start, end, label]
        return "doccano"
    return None
