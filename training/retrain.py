"""`newstagger retrain`: fine-tune the production model on new labelled data, and promote the result
only if it is no worse.

1. Start from the registry's production model (or `--start VERSION`) and its training recipe.
2. Train on the new data mixed with a replay sample of the data the starting model was trained
   on (recorded in the registry, or `--replay`), so old skills are kept. Stories of the gold set
   are left out of both.
3. Score the candidate and the production model on the same fixed gold set, and on the same
   labels: those the production model knows (a new label is scored, but not gated).
4. Promote the candidate only if no gated metric drops by more than its tolerance; otherwise keep
   the production model (the candidate stays in the registry, status `rejected`). With `--anchor
   VERSION` the candidate must also clear the same gate against that version (the first production
   model, say), so that drops each within the tolerance cannot add up over many retrains.

Prints a JSON verdict: both models' gold scores, the deltas, the decision and its reasons. Exit
code 0 when the candidate passed the gate (and was promoted, unless `--no-promote`), 1 when it was
refused, 4 when it passed but another model went into production during the run (it stays a
candidate), 3 when `--server` could not be told. A candidate without a label that the production
model serves is refused: serving it would drop that label. One retrain runs at a time on a registry.

New labels in the new data (an entity type or topic the model does not know) stop the run unless
`--allow-new-labels` is given, since a typo in an annotation tool would otherwise become a label;
with it, the model's heads grow and the new labels are trained.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import re
import shutil
import time
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, fields, replace
from pathlib import Path

from newstagger.backends import resolve_device
from newstagger.checks import MAX_THREADS, check_rules
from newstagger.errors import UsageError
from newstagger.documents import DataError, Document
from newstagger.model import read_meta, read_metrics, write_description
from newstagger.schema import LabelSchema
from newstagger.tagger import Tagger

from .evaluate import coarse_spans, evaluate_tagger
from .registry import (
    DEFAULT_REGISTRY, Entry, ProductionChanged, Registry, RegistryError, add_server_arguments, check_server_arguments,
    check_version, deploy, fingerprint, metric, once_per_path, scores,
)
from .train import (CHECKPOINT, TrainConfig, add_config_arguments, check_field_types, config_from_args, config_option,
                    device_option, device_rule, seed_rule, train)

log = logging.getLogger("newstagger.retrain")

DEFAULT_GATE = ["entities.micro.f1", "topics.micro.f1", "topics.macro.f1"]
NOT_PROMOTED = 4  # exit code: passed the gate, but production changed meanwhile, so not promoted
GATEABLE = re.compile(r"(entities|entities_coarse|topics)\.(micro|macro)\.(precision|recall|f1)")


@dataclass
class RetrainConfig:
    data: list[str] = config_option(list, "new labelled data, PATH[:FORMAT], any format the importers read")
    gold: list[str] = config_option(list, "fixed gold set both models are scored on, PATH[:FORMAT]; never trained on")
    registry: str = config_option(DEFAULT_REGISTRY, "registry folder")
    start: str | None = config_option(None, "registry version to start from (default: the production model)")
    version: str | None = config_option(None, "version of the new model (default: the starting version, patch + 1)")
    replay: list[str] = config_option(list, "earlier data to replay (default: the data the registry records for "
                                            "the starting model)")
    replay_ratio: float = config_option(1.0, "replayed earlier documents per new document")
    gate: list[str] = config_option(list, "gated metric, optionally with its own tolerance "
                                          f"(default: {', '.join(DEFAULT_GATE)})",
                                    metavar="METRIC[=TOLERANCE]")
    tolerance: float = config_option(0.01, "largest drop of a gated metric that still lets the candidate through "
                                           "(negative: demand an improvement)")
    anchor: str | None = config_option(None, "registry version the candidate is also gated against, at the same "
                                             "tolerances (such as the first production model): small drops "
                                             "cannot add up over retrains")
    allow_new_labels: bool = config_option(False, "grow the model for labels the new data adds, instead of stopping")
    promote: bool = config_option(True, "promote a candidate that passes the gate (--no-promote: only register it)")
    epochs: int | None = config_option(None, "passes over the mix (default: as the starting model was trained)")
    max_steps: int | None = config_option(None, "stop after this many optimizer steps (0 = no limit; for smoke tests)")
    learning_rate: float | None = config_option(None, "peak learning rate (default: as the starting model was trained)")
    adversarial_epsilon: float | None = config_option(None, "adversarial training (FGM) distance, 0 = off (default: as "
                                                           "the starting model was trained)")
    keep_start: float | None = config_option(None, "share of the starting model's weights kept in the candidate, 0 = "
                                                   "none (default: as the starting model was trained)")
    threads: int | None = config_option(None, "torch CPU threads (default: as the starting model was trained)")
    seed: int = config_option(13, "seed of the replay sample and of training")
    device: str = device_option()  # this machine's, not the recipe's: a model trained on a GPU retrains anywhere

    def __post_init__(self):
        """Settings that cannot work fail here, before minutes of training."""
        check_field_types(self)
        check_rules(self, (
            ("replay_ratio", self.replay_ratio >= 0, "0 or more"),
            ("epochs", self.epochs is None or self.epochs >= 1, "at least 1"),
            ("max_steps", self.max_steps is None or self.max_steps >= 0, "0 or more"),
            ("learning_rate", self.learning_rate is None or self.learning_rate > 0, "positive"),
            ("adversarial_epsilon", self.adversarial_epsilon is None or self.adversarial_epsilon >= 0, "0 or more"),
            ("keep_start", self.keep_start is None or 0 <= self.keep_start < 1, "from 0 to under 1"),
            ("threads", self.threads is None or 0 <= self.threads <= MAX_THREADS, f"0 to {MAX_THREADS}"),
            device_rule(self.device),
            seed_rule(self.seed),
        ))
        gate_tolerances(self)  # a misspelt --gate too
        if self.anchor is not None:
            check_version(self.anchor)


def gate_tolerances(config: RetrainConfig) -> dict[str, float]:
    """{metric: tolerance} from `--gate METRIC[=TOLERANCE]` flags and the default tolerance."""
    tolerances = {}
    for spec in config.gate or DEFAULT_GATE:
        metric, _, tolerance = spec.partition("=")
        if not GATEABLE.fullmatch(metric):
            raise ValueError(f"--gate: unknown metric {metric!r}; use TASK.AVERAGE.SCORE with TASK one of "
                             "entities, entities_coarse, topics, AVERAGE micro or macro, SCORE precision, recall "
                             "or f1")
        try:
            value = float(tolerance) if tolerance else config.tolerance
        except ValueError:
            value = math.nan
        if not math.isfinite(value):  # a NaN tolerance would pass every candidate
            raise ValueError(f"--gate: tolerance of {metric} must be a finite number, not {tolerance!r}")
        tolerances[metric] = value
    return tolerances


def decide(candidate: dict, current: dict, tolerances: dict[str, float],
           dropped: dict[str, list[str]] | None = None) -> dict:
    """The gate: passed only if no gated metric measured on both drops by more than its tolerance,
    and the candidate keeps every label the current model serves (`dropped`: those it does not)."""
    checks, reasons = {}, []
    if dropped and any(dropped.values()):
        reasons.append(f"the candidate does not know labels the current model serves: {dropped}; start it from "
                       f"the production model")
    for name, tolerance in tolerances.items():
        new, old = metric(candidate, name), metric(current, name)
        if new is None or old is None or not _gold_positives(candidate, name):
            checks[name] = {"skipped": "not measured on the gold set"}
            continue
        delta = round(new - old, 4)
        checks[name] = {"candidate": new, "current": old, "delta": delta, "tolerance": tolerance,
                        "passed": delta >= -tolerance}
        if delta < -tolerance:
            reasons.append(f"{name} changed by {delta:+.4f} ({old:.4f} -> {new:.4f}); the gate allows no less "
                           f"than {-tolerance:+.4f}")
    if all("skipped" in check for check in checks.values()):
        reasons.append("the gold set measures none of the gated metrics; it needs labels for the gated tasks")
    return {"passed": not reasons, "reasons": reasons, "checks": checks}


def _gold_positives(metrics: dict, name: str) -> int:
    """How many gold labels the task of metric `name` (`topics.macro.f1`: topics) had to find. With none,
    every score of it is 0 for any model, so comparing them would pass anything."""
    per_label = metrics.get(name.split(".")[0], {}).get("per_label", {})
    return sum(row.get("support", 0) for row in per_label.values())


def replay_sample(sources: list[list[Document]], size: int, rng: random.Random) -> list[list[Document]]:
    """`size` documents with an equal share from each source, all of a source smaller than its share;
    one list per source, in the sources' order."""
    chosen: list[list[Document]] = [[] for _ in sources]
    remaining = sorted(range(len(sources)), key=lambda k: len(sources[k]))
    taken = 0
    while remaining and taken < size:
        share = (size - taken) // len(remaining) or 1
        k = remaining.pop(0)
        chosen[k] = rng.sample(sources[k], min(share, len(sources[k]), size - taken))
        taken += len(chosen[k])
    return chosen


def retrain(config: RetrainConfig) -> dict:
    """Train, score and gate a candidate as configured; returns the verdict (see the module doc)."""
    with Registry(config.registry).retraining():
        return _retrain(config)


def _retrain(config: RetrainConfig) -> dict:
    started = time.time()
    if not config.data:
        raise UsageError("no new data: give --data PATH[:FORMAT]")
    if not config.gold:
        raise UsageError("no gold set: give --gold PATH[:FORMAT]; the gate compares both models on it")
    tolerances = gate_tolerances(config)
    resolve_device(config.device)  # --device cuda without a GPU fails now, not after the preparation
    registry = Registry(config.registry)
    start_entry, production, version = _versions(config, registry)
    start, baseline = start_entry.version, production or start_entry.version

    new_sources = _read_sources(config.data, "--data")
    gold_sources = _read_sources(config.gold, "--gold")
    gold = [doc for _, docs in gold_sources for doc in docs]
    if not any(docs for _, docs in new_sources):
        raise DataError(f"--data: no documents in {', '.join(config.data)}")
    if not gold:
        raise DataError(f"--gold: no documents in {', '.join(config.gold)}")
    if not measurable(tolerances, gold, read_meta(registry.folder(baseline)).schema):
        raise DataError(f"--gold: no gated metric can be measured ({', '.join(tolerances)}): "
                        f"{', '.join(config.gold)} must label the gated tasks, and the production model "
                        f"{baseline} must have them (entities_coarse: a coarse PER/LOC/ORG view)")
    if config.replay_ratio == 0:  # nothing replayed, so nothing read; the earlier data stays on record for later runs
        replay_sources, earlier = [], start_entry.data
    else:
        earlier = []
        replay_sources = _read_sources(config.replay) if config.replay else _recorded_sources(start_entry)
    gold_texts = {story_key(doc.text) for doc in gold}
    new_sets = [_without(gold_texts, docs) for _, docs in new_sources]
    new_docs = [doc for docs in new_sets for doc in docs]
    pool = _latest_labels([_without(gold_texts | {story_key(doc.text) for doc in new_docs}, docs)
                           for _, docs in replay_sources])
    replay_sets = replay_sample(pool, round(config.replay_ratio * len(new_docs)), random.Random(config.seed))
    replayed = [doc for docs in replay_sets for doc in docs]
    if not replay_sources and config.replay_ratio > 0:
        log.warning("no earlier data recorded for %s and none given with --replay: old skills may be lost", start)
    if not new_docs:
        raise DataError("every new document is also in the gold set; nothing is left to train on")
    if not any(doc.labelled for doc in new_docs):
        # the replayed data would train alone, and the gate would promote a copy of the old skills
        raise DataError(f"--data: no labelled documents in {', '.join(config.data)} that are not also in the gold set")

    start_folder = registry.folder(start)
    start_tagger = Tagger.load_exact(start_folder)
    new_labels = start_tagger.schema.new_labels(LabelSchema.from_documents(new_docs + replayed))
    if any(new_labels.values()) and not config.allow_new_labels:
        raise DataError(f"the new data has labels {start} does not know: {new_labels}; check them for typos, "
                        f"then pass --allow-new-labels to grow the model with them")
    _check_gold_labels(gold_sources, start_tagger.schema, new_labels)
    log.info("retraining %s into %s on %d new and %d replayed documents; gold set %d documents",
             start, version, len(new_docs), len(replayed), len(gold))

    with registry.staging() as staged:
        train_config = _training_config(config, start_tagger, start_folder, staged, version)
        # One set per file, as `train` reads files: each is split for validation on its own, and a set
        # labelled only with coarse types (MSRA) trains as partial labels, which it would not be in a pool.
        _, validation = train(train_config, sources=[docs for docs in new_sets + replay_sets if docs])
        shutil.rmtree(staged / CHECKPOINT, ignore_errors=True)  # optimizer state: not part of a model
        baseline_tagger = start_tagger if baseline == start else Tagger.load_exact(registry.folder(baseline))
        candidate, gold_files = Tagger.load_exact(staged), [docs for _, docs in gold_sources]
        candidate_all_labels = evaluate_tagger(candidate, *gold_files)
        candidate_gold, baseline_gold = score_on_gold(candidate, baseline_tagger, gold_files, candidate_all_labels)
        gate = decide(candidate_gold, baseline_gold, tolerances,
                      dropped=read_meta(staged).schema.new_labels(baseline_tagger.schema))
        anchor = None
        if config.anchor is not None:
            anchor_tagger = (baseline_tagger if config.anchor == baseline
                             else Tagger.load_exact(registry.folder(config.anchor)))
            anchor = _anchor_verdict(config.anchor, candidate, anchor_tagger, gold_files, candidate_all_labels,
                                     tolerances)
            gate = {"passed": gate["passed"] and anchor["gate"]["passed"],
                    "reasons": gate["reasons"] + [f"against {config.anchor}: {r}" for r in anchor["gate"]["reasons"]],
                    "checks": gate["checks"]}
        _describe_retraining(staged, registry.root / version, {
            "new": [source for source, _ in new_sources],
            "replayed": [{**source, "documents": len(docs)} for (source, _), docs in zip(replay_sources, replay_sets)],
            "gold": [source for source, _ in gold_sources],
            "gated_against": baseline, "gate": gate,
            **({"anchored_to": config.anchor, "anchor_gate": anchor["gate"]} if anchor else {}),
        }, candidate_all_labels)
        data = once_per_path([*earlier, *(source for source, _ in replay_sources + new_sources)])
        # Registered as the gate decided: a crash before _settle must not leave a promotable candidate
        rejected = {} if gate["passed"] else {"status": "rejected", "rejected_by_gate": True}
        registry.register(staged, Entry(version=version, parent=start, data=data, metrics={
            "gold": scores(candidate_all_labels), "validation": scores(validation)}, **rejected))

    return {
        "decision": _settle(registry, version, production, gate["passed"], config.promote),
        "passed": gate["passed"],
        "reasons": gate["reasons"],
        "candidate": {"version": version, "parent": start, "gold": scores(candidate_gold),
                      "folder": str(registry.folder(version))},
        "current": {"version": baseline, "gold": scores(baseline_gold)},
        "deltas": _deltas(candidate_gold, baseline_gold),
        "gate": gate["checks"],
        **({"anchor": anchor} if anchor else {}),
        "new_labels": {**new_labels, "gold_f1": _label_f1(candidate_all_labels, new_labels)},
        "documents": {"new": len(new_docs), "replayed": len(replayed), "replay_pool": sum(map(len, pool)),
                      "gold": len(gold)},
        "seconds": round(time.time() - started, 1),
    }


def _versions(config: RetrainConfig, registry: Registry) -> tuple[Entry, str | None, str]:
    """(the registry entry to start from, the production version or None, the new version); an unknown
    --start or --anchor fails here, not after training."""
    manifest = registry.manifest()
    if config.anchor is not None:
        manifest.entry(config.anchor)
    start = config.start or manifest.current
    if start is None:
        raise RegistryError(f"{config.registry} has no production model; add one with `newstagger models add "
                            f"FOLDER --promote` or name a version with --start")
    start_entry = manifest.entry(start)
    version = check_version(config.version or registry.next_version(start))
    if any(entry.version == version for entry in manifest.models):
        raise RegistryError(f"version {version} is already in the registry; name another with --version")
    return start_entry, manifest.current, version


def _settle(registry: Registry, version: str, production: str | None, passed: bool, promote: bool) -> str:
    """Promote a candidate that passed the gate (unless told not to, or unless production is no longer the
    version it was gated against); the decision. A refused one was registered as rejected."""
    if not passed:  # registered so
        return "rejected"
    if not promote:
        return "passed, not promoted (--no-promote)"
    try:
        registry.promote(version, replacing=production)
    except ProductionChanged as err:
        log.warning("%s; retrain again to gate against the model now in production", err)
        return f"passed, not promoted: {err}"
    return "promoted"


def _read_sources(specs: list[str], option: str | None = None) -> list[tuple[dict, list[Document]]]:
    """(fingerprint, documents) per data spec; with the `option` that names them, each file with
    documents must hold a labelled one (`labelled_file`). An empty one is let through with a warning:
    a feedback export before any correction, a Label Studio project with nothing annotated yet."""
    from training.data import guess_format, holds_no_records, labelled_file, parse_data_spec, read_documents

    sources = []
    for spec in specs:
        path, format = parse_data_spec(spec)
        if option and not format and holds_no_records(path):  # no format to guess, nothing to record
            log.warning("%s %s holds no documents: it adds nothing", option, spec)
            continue
        format = format or guess_format(path)  # recorded, so a replay reads the file the same way
        docs = read_documents(path, format)
        if option and docs:
            labelled_file(docs, f"{option} {spec}")
        elif option:
            log.warning("%s %s holds no documents (or none annotated yet): it adds nothing", option, spec)
        sources.append((fingerprint(path, format), docs))
    return sources


def _recorded_sources(entry: Entry) -> list[tuple[dict, list[Document]]]:
    """The data the registry says a model was trained on, read again for replay."""
    from training.data import read_documents

    sources = []
    for recorded in entry.data:
        path = Path(recorded["path"])
        if not path.exists():
            raise DataError(f"{path}, which {entry.version} was trained on, is gone; name the earlier data "
                            f"with --replay PATH[:FORMAT]")
        now = fingerprint(path, recorded["format"])
        if now["sha256"] != recorded["sha256"]:
            log.warning("%s changed since %s was trained on it; replaying what it holds now", path, entry.version)
        sources.append((now, read_documents(path, recorded["format"])))
    return sources


def _check_gold_labels(gold_sources: list[tuple[dict, list[Document]]], schema: LabelSchema,
                       new_labels: dict[str, list[str]]) -> None:
    """Gold labels must be known to the starting model or the new data (as `newstagger evaluate` refuses
    others): the gate would otherwise compare two models on a label neither learnt."""
    grown = schema.merged_with(LabelSchema(topics=new_labels["topics"], entity_types=new_labels["entity_types"]))
    for source, docs in gold_sources:
        grown.check_known(docs, f"--gold {source['path']}")


def _latest_labels(sets: list[list[Document]]) -> list[list[Document]]:
    """The sets with each story's task labels kept from the last set that labels that task only.

    The registry records files oldest first, so where a story is in several (feedback exported to a
    new file each time, after an editor revised a correction), its latest labels win; a task only an
    earlier file labels (topics in one file, entities in another) is kept from there.
    """
    labelled_later: dict[str, set[str]] = {}
    kept_sets = []
    for docs in reversed(sets):
        kept = []
        for doc in docs:
            later = labelled_later.setdefault(story_key(doc.text), set())
            latest = replace(doc, topics=None if "topics" in later else doc.topics,
                             entities=None if "entities" in later else doc.entities)
            later |= {task for task in ("topics", "entities") if getattr(doc, task) is not None}
            if latest.labelled:
                kept.append(latest)
        kept_sets.insert(0, kept)
    return kept_sets


def story_key(text: str) -> str:
    """A story's text as matched across files: NFC, whitespace runs as one space, no edges. A gold
    story sent back with a newline added, or in another Unicode form, is still the gold story."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def measurable(metrics: Iterable[str], gold: list[Document], schema: LabelSchema) -> list[str]:
    """The metrics both the gold set and a model of this schema can measure: the gold set labels the
    task, and not all empty (stories without topics give every model the same 0), and the model has it."""
    tasks = {"topics": bool(schema.topics) and any(doc.topics for doc in gold),
             "entities": bool(schema.entity_types) and any(doc.entities for doc in gold)}
    # as evaluate scores the coarse view: where the gold has a span of it
    tasks["entities_coarse"] = tasks["entities"] and any(
        coarse_spans([(span.start, span.end, span.type) for span in doc.entities or ()], schema) for doc in gold)
    return [name for name in metrics if tasks[name.split(".")[0]]]


def _without(keys: set[str], docs: list[Document]) -> list[Document]:
    return [doc for doc in docs if story_key(doc.text) not in keys]


def score_on_gold(candidate: Tagger, baseline: Tagger, gold: list[list[Document]],
                  candidate_all_labels: dict) -> tuple[dict, dict]:
    """Gold metrics, on the gold files, of the candidate and the baseline on the labels the baseline
    knows; `candidate_all_labels` are the candidate's on all its own labels.

    A candidate that grew new labels is seen through the baseline's schema, so that a new label,
    hard to learn from a few examples, neither sinks the comparison nor lifts it.
    """
    if candidate.schema == baseline.schema or not candidate.schema.extends(baseline.schema):
        return candidate_all_labels, evaluate_tagger(baseline, *gold)
    shared = [_only_labels_of(baseline.schema, docs) for docs in gold]
    return evaluate_tagger(KnownLabelsView(candidate, baseline.schema), *shared), evaluate_tagger(baseline, *shared)


class KnownLabelsView:
    """A tagger seen as if it knew only the labels of an older schema that its own extends.

    Labels are only ever appended, so the older labels are the leading topic and tag columns:
    dropping the rest before decoding scores the tagger on exactly the older model's labels.
    """

    def __init__(self, tagger: Tagger, schema: LabelSchema):
        self.tagger, self.schema, self.meta = tagger, schema, tagger.meta

    def score(self, texts):
        probs, log_probs, encoded = self.tagger.score(texts)
        return probs[:, : len(self.schema.topics)], [lp[:, : len(self.schema.tags)] for lp in log_probs], encoded

    def best_paths(self, log_probs):
        return self.tagger.best_paths(log_probs)

    def tag_confidences(self, log_probs, paths):
        return self.tagger.tag_confidences(log_probs, paths)


def _only_labels_of(schema: LabelSchema, docs: list[Document]) -> list[Document]:
    """The documents with only the labels `schema` can be scored on (coarse PER/LOC/ORG spans included)."""
    types = schema.scorable_entity_types
    return [replace(doc, topics=None if doc.topics is None else [t for t in doc.topics if t in schema.topics],
                    entities=None if doc.entities is None else [s for s in doc.entities if s.type in types])
            for doc in docs]


def _label_f1(metrics: dict, labels: dict[str, list[str]]) -> dict[str, float]:
    """Gold F1 of each of these labels that the gold set has."""
    per_label = {**metrics.get("entities", {}).get("per_label", {}), **metrics.get("topics", {}).get("per_label", {})}
    return {label: per_label[label]["f1"] for kind in ("topics", "entity_types") for label in labels[kind]
            if per_label.get(label, {}).get("support")}


def _training_config(config: RetrainConfig, start: Tagger, start_folder: Path, output: Path,
                     version: str) -> TrainConfig:
    """The starting model's own recipe, continued from its weights into `output`.

    A model that records no recipe gets the defaults, at the window it serves with. A recipe from
    before `attention_dropout` was a setting trained at the encoder's own, which its config records.
    """
    meta = start.meta
    known = {f.name for f in fields(TrainConfig)}
    recorded = {k: v for k, v in meta.training.get("config", {}).items() if k in known}
    if recorded:
        recorded.setdefault("attention_dropout", start.model.config.attention_probs_dropout_prob)
    try:
        recipe = TrainConfig(**recorded) if recorded else TrainConfig(max_length=meta.max_length, stride=meta.stride)
    except ValueError as err:  # a hand-edited newstagger.json
        raise DataError(f"{start_folder}: its recorded training settings cannot be used: {err}") from None
    overrides = {name: getattr(config, name) for name in ("epochs", "max_steps", "learning_rate", "adversarial_epsilon",
                                                          "keep_start", "threads")
                 if getattr(config, name) is not None}
    # The new and replayed documents come as in-memory sets, trained at weight 1: per-file weights do not apply.
    return replace(recipe, **overrides, train=[], train_weights=[], validation=[], output=str(output),
                   init_model=str(start_folder),
                   version=version, name=meta.name, seed=config.seed, device=config.device, resume=False,
                   inference_max_length=meta.max_length, inference_stride=meta.stride)


def _describe_retraining(staged: Path, final: Path, retraining: dict, gold_metrics: dict) -> None:
    """The candidate's folder says how it was made: its data files, the gate's verdict and its gold
    scores, and the registry folder it is written for, not the staging folder it was trained in."""
    meta, metrics = read_meta(staged), read_metrics(staged)
    meta.training["config"]["output"] = str(final.absolute())
    meta.training["retraining"] = retraining
    write_description(staged, meta, {**metrics, "gold": gold_metrics})


def _anchor_verdict(version: str, candidate: Tagger, anchor: Tagger, gold: list[list[Document]],
                    candidate_all_labels: dict, tolerances: dict[str, float]) -> dict:
    """The anchor's gold scores, the candidate's deltas from them, and the gate against it."""
    candidate_gold, anchor_gold = score_on_gold(candidate, anchor, gold, candidate_all_labels)
    return {"version": version, "gold": scores(anchor_gold), "deltas": _deltas(candidate_gold, anchor_gold),
            "gate": decide(candidate_gold, anchor_gold, tolerances)}


def _deltas(candidate: dict, current: dict) -> dict[str, float]:
    new, old = scores(candidate), scores(current)
    return {name: round(new[name] - old[name], 4) for name in new if name in old}


# --------------------------------------------------------------------------- command line


def register(subparsers) -> None:
    parser = subparsers.add_parser("retrain", help="train on new data, promote only if no worse on a gold set",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, RetrainConfig)
    add_server_arguments(parser)
    parser.set_defaults(handler=run)


def run(args) -> int:
    check_server_arguments(args)
    config = config_from_args(args, RetrainConfig)
    verdict = retrain(config)
    print(json.dumps(verdict, ensure_ascii=False, indent=2))
    if not verdict["passed"]:
        return 1
    if verdict["decision"] == "promoted":
        return deploy(args, Registry(config.registry))
    return NOT_PROMOTED if config.promote else 0
