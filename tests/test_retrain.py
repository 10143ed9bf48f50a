"""Retraining: the promotion gate, replay sampling, new labels, and feedback -> export -> retrain ->
promote -> served -> rollback end to end on the tiny model and a live server."""

from __future__ import annotations

import json
import random
import threading
import time
import unicodedata
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import uvicorn
from conftest import SAMPLE, build_tiny_model_folder

from newstagger.cli import main
from newstagger.documents import DataError, Document, Span, write_jsonl
from newstagger.model import read_meta, read_metrics
from newstagger.model import load_model_folder
from newstagger.schema import LabelSchema
from newstagger.tagger import Tagger
from serving.app import create_app
from serving.settings import ServeSettings
import training.retrain
from training.data import read_documents
from training.evaluate import evaluate_tagger
from training.registry import Entry, Registry, RegistryError, once_per_path
from training.train import _labelled_coarse_only, train
from training.retrain import (RetrainConfig, _latest_labels, _only_labels_of, _training_config, decide,
                              gate_tolerances, replay_sample, retrain, score_on_gold)

WAIT_S = 60  # generous upper bound for a tiny model to load
TINY_TRAINING = ["--max-steps", "2", "--threads", "1"]


def scores(entities: float, topics_micro: float, topics_macro: float) -> dict:
    """evaluate_tagger's shape, with gold labels of both tasks to find."""
    return {"entities": {"micro": {"f1": entities}, "per_label": {"name": {"support": 5}}},
            "topics": {"micro": {"f1": topics_micro}, "macro": {"f1": topics_macro},
                       "per_label": {"economy": {"support": 5}}}}


GATE = gate_tolerances(RetrainConfig())
CURRENT = scores(0.70, 0.80, 0.60)


def test_the_gate_accepts_a_better_candidate():
    verdict = decide(scores(0.72, 0.81, 0.65), CURRENT, GATE)
    assert verdict["passed"] and verdict["reasons"] == []
    assert verdict["checks"]["topics.macro.f1"] == {"candidate": 0.65, "current": 0.60, "delta": 0.05,
                                                    "tolerance": 0.01, "passed": True}


def test_the_gate_accepts_a_drop_within_the_tolerance():
    assert decide(scores(0.695, 0.80, 0.60), CURRENT, GATE)["passed"]


def test_a_drop_of_exactly_the_tolerance_passes_and_its_check_says_so():
    verdict = decide(scores(0.70, 0.80, 0.59), CURRENT, GATE)
    assert verdict["passed"] and verdict["checks"]["topics.macro.f1"] == {
        "candidate": 0.59, "current": 0.60, "delta": -0.01, "tolerance": 0.01, "passed": True}


def test_the_gate_refuses_a_worse_candidate_and_names_each_metric_that_fell():
    # what a candidate trained on shuffled labels looks like: its topics collapse
    verdict = decide(scores(0.71, 0.35, 0.20), CURRENT, GATE)
    assert not verdict["passed"]
    assert [reason.split()[0] for reason in verdict["reasons"]] == ["topics.micro.f1", "topics.macro.f1"]
    assert verdict["reasons"][0] == ("topics.micro.f1 changed by -0.4500 (0.8000 -> 0.3500); "
                                     "the gate allows no less than -0.0100")


def test_per_metric_tolerances_and_custom_gates():
    gate = gate_tolerances(RetrainConfig(gate=["entities.micro.f1=0.05", "topics.micro.f1"], tolerance=0.0))
    assert gate == {"entities.micro.f1": 0.05, "topics.micro.f1": 0.0}
    assert decide(scores(0.66, 0.80, 0.10), CURRENT, gate)["passed"]  # macro is not gated here
    assert not decide(scores(0.70, 0.79, 0.60), CURRENT, gate)["passed"]


@pytest.mark.parametrize("gate", [["entity.micro.f1"], ["topics.micro.f1=lots"], ["topics.micro.f1=nan"]])
def test_a_bad_gate_is_refused_before_anything_runs(gate):
    with pytest.raises(ValueError, match="--gate"):
        RetrainConfig(gate=gate)


@pytest.mark.parametrize(("setting", "message"), [({"tolerance": float("nan")}, "tolerance must be a finite number"),
                                                  ({"replay_ratio": -1.0}, "replay_ratio must be 0 or more"),
                                                  ({"epochs": 0}, "epochs must be at least 1"),
                                                  ({"seed": -1}, "seed must be from 0 to 4294967295")])
def test_retrain_settings_that_cannot_work_are_refused(setting, message):
    with pytest.raises(ValueError, match=message):
        RetrainConfig(**setting)


def test_a_candidate_without_a_label_the_current_model_serves_is_refused():
    verdict = decide(scores(0.72, 0.81, 0.65), CURRENT, GATE, dropped={"topics": ["culture"], "entity_types": []})
    assert not verdict["passed"]
    assert verdict["reasons"][0].startswith("the candidate does not know labels the current model serves")
    assert decide(scores(0.72, 0.81, 0.65), CURRENT, GATE, dropped={"topics": [], "entity_types": []})["passed"]


def test_metrics_the_gold_set_cannot_measure_are_skipped_but_one_must_be_measured():
    entities_only = {"entities": {"micro": {"f1": 0.7}, "per_label": {"name": {"f1": 0.7, "support": 3}}}}
    verdict = decide(entities_only, entities_only, GATE)
    assert verdict["passed"] and verdict["checks"]["topics.micro.f1"] == {"skipped": "not measured on the gold set"}
    assert not decide({}, {}, GATE)["passed"]
    # stories labelled with no topic at all: every model scores 0, which measures nothing
    no_topics = {"topics": {"micro": {"f1": 0.0}, "macro": {"f1": 0.0}, "per_label": {"economy": {"support": 0}}}}
    verdict = decide(no_topics, no_topics, GATE)
    assert not verdict["passed"] and verdict["checks"]["topics.micro.f1"] == {"skipped": "not measured on the gold set"}


def test_a_grown_model_is_compared_on_the_labels_the_older_one_knows(tiny_model_dir, sample):
    """Growing the heads keeps the trained rows, so before any training the grown model, seen
    through the old schema, scores exactly as the old one: a new label does not move the gate."""
    old = Tagger.load(tiny_model_dir, backend="torch", precision="fp32")
    model, tokenizer, meta = load_model_folder(tiny_model_dir)
    schema = old.schema.merged_with(LabelSchema(topics=["culture"], entity_types=["event"]))
    model.grow_labels(schema)
    grown = Tagger(model, tokenizer, replace(meta, schema=schema))
    gold = [replace(doc, topics=[*doc.topics, "culture"], entities=[*doc.entities, Span(0, 1, "event")])
            for doc in sample[:10]]

    candidate_all_labels = evaluate_tagger(grown, gold)
    candidate, baseline = score_on_gold(grown, old, [gold], candidate_all_labels)
    assert candidate == baseline
    assert "culture" in candidate_all_labels["topics"]["per_label"]
    assert "culture" not in candidate["topics"]["per_label"] and "event" not in candidate["entities"]["per_label"]


def test_coarse_people_places_organisations_are_not_new_labels_for_a_fine_model(tiny_model_dir):
    known = Tagger.load(tiny_model_dir, backend="torch", precision="fp32").schema
    coarse = LabelSchema.from_documents([Document("m", "李四在上海", entities=[Span(0, 2, "PER"), Span(3, 5, "LOC")])])
    assert known.new_labels(coarse) == {"topics": [], "entity_types": []}
    assert known.new_labels(LabelSchema(topics=["culture"], entity_types=["event"])) == {
        "topics": ["culture"], "entity_types": ["event"]}


def test_the_gate_keeps_coarse_gold_entities_when_the_candidate_grew_labels(tiny_model_dir):
    old = Tagger.load(tiny_model_dir, backend="torch", precision="fp32")
    gold = [Document("m", "李四在上海", entities=[Span(0, 2, "PER"), Span(3, 5, "event")])]
    assert _only_labels_of(old.schema, gold)[0].entities == [Span(0, 2, "PER")]


def test_a_recipe_with_per_file_weights_can_be_retrained(tiny_model_dir, tmp_path):
    """Retraining pools new and replayed documents into two sets, so the recipe's weights per file
    are dropped rather than left to mismatch."""
    tagger = Tagger.load(tiny_model_dir, backend="torch", precision="fp32")
    recipe = {"train": ["a.json:cluener", "b.bio:columns"], "train_weights": [1.0, 0.4]}
    tagger.meta = replace(tagger.meta, training={"config": recipe})
    config = _training_config(RetrainConfig(), tagger, tiny_model_dir, tmp_path / "out", "0.0.2")
    assert config.train == [] and config.train_weights == []


def test_a_model_trained_on_a_gpu_retrains_on_the_device_retrain_is_given(tiny_model_dir, tmp_path):
    tagger = Tagger.load(tiny_model_dir, backend="torch", precision="fp32")
    tagger.meta = replace(tagger.meta, training={"config": {"device": "cuda", "bf16": True}})
    config = _training_config(RetrainConfig(device="cpu"), tagger, tiny_model_dir, tmp_path / "out", "0.0.2")
    assert config.device == "cpu" and config.bf16
    assert _training_config(RetrainConfig(), tagger, tiny_model_dir, tmp_path / "out", "0.0.2").device == "auto"


def test_a_recipe_from_before_attention_dropout_replays_the_dropout_it_was_trained_at(tiny_model_dir, tmp_path):
    tagger = Tagger.load(tiny_model_dir, backend="torch", precision="fp32")
    tagger.model.config.attention_probs_dropout_prob = 0.1
    tagger.meta = replace(tagger.meta, training={"config": {"epochs": 1}})
    assert _training_config(RetrainConfig(), tagger, tiny_model_dir, tmp_path / "out", "0.0.2").attention_dropout == 0.1
    tagger.meta = replace(tagger.meta, training={"config": {"epochs": 1, "attention_dropout": 0.0}})
    assert _training_config(RetrainConfig(), tagger, tiny_model_dir, tmp_path / "out", "0.0.2").attention_dropout == 0.0


def test_a_recipes_adversarial_training_and_kept_start_are_replayed_unless_overridden(tiny_model_dir, tmp_path):
    tagger = Tagger.load(tiny_model_dir, backend="torch", precision="fp32")
    tagger.meta = replace(tagger.meta, training={"config": {"adversarial_epsilon": 1.0, "keep_start": 0.5}})
    replayed = _training_config(RetrainConfig(), tagger, tiny_model_dir, tmp_path / "out", "0.0.2")
    assert (replayed.adversarial_epsilon, replayed.keep_start) == (1.0, 0.5)
    plain = _training_config(RetrainConfig(adversarial_epsilon=0, keep_start=0), tagger, tiny_model_dir,
                             tmp_path / "out", "0.0.2")
    assert (plain.adversarial_epsilon, plain.keep_start) == (0, 0)


def test_the_replay_sample_takes_an_equal_share_of_each_source():
    sources = [[Document(f"{name}{i}", "x") for i in range(size)] for name, size in (("a", 100), ("b", 3), ("c", 50))]
    sample = replay_sample(sources, 30, random.Random(0))
    assert [len(docs) for docs in sample] == [14, 3, 13]  # one list per source, in order
    assert all(doc.id[0] == name for docs, name in zip(sample, "abc") for doc in docs)
    assert len({doc.id for docs in sample for doc in docs}) == 30
    assert [len(docs) for docs in replay_sample(sources, 1000, random.Random(0))] == [100, 3, 50]


# --- real runs on the tiny model ---------------------------------------------------------------------


@pytest.fixture
def registry(tmp_path) -> Registry:
    registry = Registry(tmp_path / "registry")
    with registry.staging() as staged:
        build_tiny_model_folder(staged, version="1.0.0")
        registry.register(staged, Entry(version="1.0.0"))
    registry.promote("1.0.0")
    return registry


@pytest.fixture(scope="module")
def sample() -> list[Document]:
    return read_documents(SAMPLE)


@pytest.fixture
def gold(sample, tmp_path) -> Path:
    write_jsonl(sample[-12:], tmp_path / "gold.jsonl")
    return tmp_path / "gold.jsonl"


def tiny_config(registry: Registry, data: Path, gold: Path, **changes) -> RetrainConfig:
    return RetrainConfig(data=[str(data)], gold=[str(gold)], registry=str(registry.root), max_steps=2, threads=1,
                         **changes)


def test_a_refused_candidate_stays_in_the_registry_as_rejected(registry, sample, gold, tmp_path):
    write_jsonl(sample[:20], tmp_path / "new.jsonl")
    # a negative tolerance demands an improvement of 1.0: no candidate can pass
    verdict = retrain(tiny_config(registry, tmp_path / "new.jsonl", gold, gate=["topics.micro.f1=-1"]))
    assert verdict["decision"] == "rejected" and not verdict["passed"]
    assert verdict["reasons"][0].endswith("the gate allows no less than +1.0000")
    manifest = registry.manifest()
    assert manifest.current == "1.0.0"
    assert manifest.entry("1.0.1").status == "rejected" and manifest.entry("1.0.1").rejected_by_gate
    assert not (registry.root / "1.0.1" / "checkpoint").exists()
    # the folder describes itself: where it lives, what it was made from, the gate's verdict, its gold scores
    training = read_meta(registry.root / "1.0.1").training
    assert training["config"]["output"] == str((registry.root / "1.0.1").absolute())
    retraining = training["retraining"]
    assert [Path(s["path"]).name for s in retraining["new"]] == ["new.jsonl"]
    assert [Path(s["path"]).name for s in retraining["gold"]] == ["gold.jsonl"]
    assert retraining["gated_against"] == "1.0.0" and retraining["gate"]["passed"] is False
    assert read_metrics(registry.root / "1.0.1")["gold"]["topics"]["micro"]["f1"] == verdict["candidate"]["gold"][
        "topics.micro.f1"]
    assert "### gold: topics" in (registry.root / "1.0.1" / "README.md").read_text(encoding="utf-8")
    other = Registry(tmp_path / "other")  # so that another registry knows what to replay for it
    assert main(["models", "add", str(registry.root / "1.0.1"), "--registry", str(other.root)]) == 0
    assert [Path(d["path"]).name for d in other.manifest().entry("1.0.1").data] == ["new.jsonl"]


def test_an_anchor_gates_the_candidate_against_an_earlier_version_too(registry, sample, gold, tmp_path):
    """Drops each within the tolerance of the model they replace would otherwise add up over retrains."""
    write_jsonl(sample[:20], tmp_path / "new.jsonl")
    assert retrain(tiny_config(registry, tmp_path / "new.jsonl", gold, tolerance=1.0))["decision"] == "promoted"
    verdict = retrain(tiny_config(registry, tmp_path / "new.jsonl", gold, anchor="1.0.0", gate=["topics.micro.f1=-1"]))
    assert verdict["current"]["version"] == "1.0.1" and verdict["anchor"]["version"] == "1.0.0"
    assert verdict["decision"] == "rejected" and len(verdict["reasons"]) == 2
    assert verdict["reasons"][1].startswith("against 1.0.0: topics.micro.f1 changed by")
    assert set(verdict["anchor"]["deltas"]) == set(verdict["deltas"])
    retraining = read_meta(registry.root / "1.0.2").training["retraining"]
    assert retraining["anchored_to"] == "1.0.0" and retraining["anchor_gate"] == verdict["anchor"]["gate"]


def test_a_candidate_the_anchor_refuses_is_rejected_though_production_passes_it(registry, sample, gold, tmp_path,
                                                                              monkeypatch):
    real_anchor_verdict = training.retrain._anchor_verdict

    def anchor_verdict(*args):  # against the anchor, an improvement of 1.0 demanded: no candidate has it
        return real_anchor_verdict(*args[:-1], {"topics.micro.f1": -1.0})

    monkeypatch.setattr(training.retrain, "_anchor_verdict", anchor_verdict)
    write_jsonl(sample[:20], tmp_path / "new.jsonl")
    verdict = retrain(tiny_config(registry, tmp_path / "new.jsonl", gold, anchor="1.0.0", tolerance=1.0))
    assert verdict["gate"]["topics.micro.f1"]["passed"] and not verdict["anchor"]["gate"]["passed"]
    assert verdict["decision"] == "rejected" and not verdict["passed"]
    assert [reason.split(":")[0] for reason in verdict["reasons"]] == ["against 1.0.0"]
    assert registry.manifest().current == "1.0.0" and registry.manifest().entry("1.0.1").status == "rejected"


def test_an_unknown_anchor_is_refused_before_training(registry, sample, gold, tmp_path):
    write_jsonl(sample[:20], tmp_path / "new.jsonl")
    with pytest.raises(RegistryError, match="no model '0.9.0' in the registry"):
        retrain(tiny_config(registry, tmp_path / "new.jsonl", gold, anchor="0.9.0"))
    assert [entry.version for entry in registry.manifest().models] == ["1.0.0"]


@pytest.mark.parametrize("empty, option", [("data", "--data"), ("gold", "--gold")])
def test_empty_new_data_or_gold_set_is_refused_naming_it(registry, gold, tmp_path, empty, option):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "new.jsonl").write_text('{"id": "n1", "text": "滨江市", "topics": ["economy"]}\n', encoding="utf-8")
    data, gold = (tmp_path / "empty.jsonl", gold) if empty == "data" else (tmp_path / "new.jsonl", tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match=f"{option}: no documents in .*empty.jsonl:internal"):
        retrain(tiny_config(registry, f"{data}:internal", f"{gold}:internal"))
    assert registry.manifest().current == "1.0.0" and len(registry.manifest().models) == 1


@pytest.mark.parametrize("unlabelled, message", [
    ("data", "--data .*bare.jsonl:internal: none of its 20 documents has topics or entities"),
    ("gold", "--gold .*bare.jsonl:internal: none of its 20 documents has topics or entities")])
def test_unlabelled_new_data_or_gold_set_is_refused_before_training(registry, sample, gold, tmp_path, unlabelled,
                                                                      message):
    write_jsonl([Document(doc.id, doc.text) for doc in sample[:20]], tmp_path / "bare.jsonl")
    write_jsonl(sample[:20], tmp_path / "new.jsonl")
    data, gold = ((tmp_path / "bare.jsonl", gold) if unlabelled == "data"
                  else (tmp_path / "new.jsonl", tmp_path / "bare.jsonl"))
    with pytest.raises(DataError, match=message):  # even with earlier data to replay, which would train alone
        retrain(tiny_config(registry, f"{data}:internal", f"{gold}:internal", replay=[f"{SAMPLE}:internal"]))
    assert [entry.version for entry in registry.manifest().models] == ["1.0.0"]  # no version used up


def test_an_unlabelled_file_beside_labelled_new_data_is_refused_naming_it(registry, sample, gold, tmp_path):
    """A second file read in the wrong format would otherwise add nothing, and the run would not say so."""
    write_jsonl(sample[:20], tmp_path / "new.jsonl")
    write_jsonl([Document(doc.id, doc.text) for doc in sample[20:25]], tmp_path / "bare.jsonl")
    config = tiny_config(registry, tmp_path / "new.jsonl", gold)
    config.data.append(f"{tmp_path / 'bare.jsonl'}:internal")
    with pytest.raises(DataError, match="--data .*bare.jsonl:internal: none of its 5 documents has topics"):
        retrain(config)
    assert [entry.version for entry in registry.manifest().models] == ["1.0.0"]


def test_an_empty_file_beside_labelled_new_data_is_let_through_with_a_warning(registry, sample, gold, tmp_path,
                                                                             caplog):
    """A feedback export before any correction, beside a labelled export, as the README's workflow has it."""
    write_jsonl(sample[:20], tmp_path / "new.jsonl")
    (tmp_path / "feedback.jsonl").write_text("")
    config = tiny_config(registry, tmp_path / "new.jsonl", gold)
    config.data.append(f"{tmp_path / 'feedback.jsonl'}:internal")
    config.data.append(str(tmp_path / "feedback.jsonl"))  # no format to guess from an empty file: none needed
    assert retrain(config)["candidate"]["version"] == "1.0.1"
    assert "feedback.jsonl:internal holds no documents (or none annotated yet): it adds nothing" in caplog.text
    assert "feedback.jsonl holds no documents: it adds nothing" in caplog.text


def test_new_data_labelled_only_where_it_is_also_gold_is_refused(registry, sample, gold, tmp_path):
    write_jsonl([*sample[-12:], *(Document(doc.id, doc.text) for doc in sample[:5])], tmp_path / "new.jsonl")
    with pytest.raises(DataError, match="no labelled documents in .*new.jsonl that are not also in the gold set"):
        retrain(tiny_config(registry, tmp_path / "new.jsonl", gold))


def test_a_gold_set_without_labels_for_the_gated_metrics_is_refused(registry, sample, tmp_path):
    write_jsonl(sample[:20], tmp_path / "new.jsonl")
    write_jsonl([Document(doc.id, doc.text, entities=doc.entities) for doc in sample[-12:]], tmp_path / "gold.jsonl")
    with pytest.raises(DataError, match="--gold: no gated metric can be measured \\(topics.micro.f1\\)"):
        retrain(tiny_config(registry, tmp_path / "new.jsonl", tmp_path / "gold.jsonl", gate=["topics.micro.f1"]))
    # labelled, but with nothing to find: "no topic" and "no entity" everywhere
    write_jsonl([Document(doc.id, doc.text, topics=[], entities=[]) for doc in sample[-12:]], tmp_path / "gold.jsonl")
    with pytest.raises(DataError, match="--gold: no gated metric can be measured"):
        retrain(tiny_config(registry, tmp_path / "new.jsonl", tmp_path / "gold.jsonl"))


def test_a_gate_on_a_view_the_production_model_has_not_is_refused_before_training(sample, tmp_path):
    registry = Registry(tmp_path / "registry")
    with registry.staging() as staged:  # its own entity types, without a coarse PER/LOC/ORG view
        build_tiny_model_folder(staged, version="1.0.0", schema=LabelSchema(topics=[], entity_types=["team"]))
        registry.register(staged, Entry(version="1.0.0"))
    registry.promote("1.0.0")
    write_jsonl([Document(f"d{i}", "红星队赢了。", entities=[Span(0, 3, "team")]) for i in range(4)],
                tmp_path / "new.jsonl")
    for gate in ("entities_coarse.micro.f1", "topics.micro.f1"):
        with pytest.raises(DataError, match=f"no gated metric can be measured \\({gate}\\).* the production model "
                                            "1.0.0 must have them"):
            retrain(tiny_config(registry, tmp_path / "new.jsonl", tmp_path / "new.jsonl", gate=[gate]))


def test_a_coarse_gate_on_gold_spans_without_a_coarse_view_is_refused_before_training(registry, sample, tmp_path):
    write_jsonl(sample[:20], tmp_path / "new.jsonl")
    write_jsonl([Document(f"g{i}", "《三体》很好看。", entities=[Span(0, 4, "book")]) for i in range(3)],
                tmp_path / "gold.jsonl")  # book has no coarse view
    with pytest.raises(DataError, match="no gated metric can be measured \\(entities_coarse.micro.f1\\)"):
        retrain(tiny_config(registry, tmp_path / "new.jsonl", tmp_path / "gold.jsonl",
                            gate=["entities_coarse.micro.f1"]))


def test_a_candidate_is_not_promoted_over_a_model_that_went_into_production_during_its_run(
        registry, sample, gold, tmp_path, monkeypatch, capsys):
    write_jsonl(sample[:20], tmp_path / "new.jsonl")
    real_train = train

    def train_while_an_operator_promotes(config, sources):
        with registry.staging() as staged:
            build_tiny_model_folder(staged, version="2.0.0")
            registry.register(staged, Entry(version="2.0.0"))
        registry.promote("2.0.0")
        return real_train(config, sources)

    monkeypatch.setattr("training.retrain.train", train_while_an_operator_promotes)
    capsys.readouterr()
    code = main(["retrain", "--registry", str(registry.root), "--data", str(tmp_path / "new.jsonl"), "--gold", str(gold),
                 "--tolerance", "1", *TINY_TRAINING])
    verdict = json.loads(capsys.readouterr().out)
    assert code == 4  # passed, yet not live: a script checking the exit code must not think it is
    assert verdict["passed"] and verdict["decision"].startswith("passed, not promoted: production changed from 1.0.0")
    assert registry.manifest().current == "2.0.0" and registry.manifest().entry("1.0.1").status == "candidate"


def test_the_gold_set_is_never_trained_on_and_earlier_data_is_replayed(registry, sample, gold, tmp_path):
    write_jsonl(sample[:29], tmp_path / "first.jsonl")  # includes no gold story ...
    write_jsonl(sample[20:], tmp_path / "second.jsonl")  # ... this one is mostly gold
    first = retrain(tiny_config(registry, tmp_path / "first.jsonl", gold, tolerance=1.0))
    assert first["documents"] == {"new": 29, "replayed": 0, "replay_pool": 0, "gold": 12}
    second = retrain(tiny_config(registry, tmp_path / "second.jsonl", gold, tolerance=1.0, replay_ratio=2.0))
    # 21 new stories less the 12 gold ones; replay from first.jsonl less what is new again
    assert second["documents"] == {"new": 9, "replayed": 18, "replay_pool": 20, "gold": 12}
    recorded = {Path(d["path"]).name for d in registry.manifest().entry("1.0.2").data}
    assert recorded == {"first.jsonl", "second.jsonl"}


def test_a_gold_story_sent_back_with_other_whitespace_or_unicode_form_is_still_not_trained_on(
        registry, sample, gold, tmp_path):
    altered = [replace(doc, text=doc.text + "\n", entities=None) for doc in sample[-12:-6]]
    altered += [replace(doc, text=unicodedata.normalize("NFD", "  " + doc.text), entities=None) for doc in sample[-6:]]
    write_jsonl(sample[:5] + altered, tmp_path / "new.jsonl")
    verdict = retrain(tiny_config(registry, tmp_path / "new.jsonl", gold, tolerance=1.0))
    assert verdict["documents"]["new"] == 5


def test_a_story_in_several_replayed_files_is_replayed_from_the_last_one_only(registry, sample, gold, tmp_path):
    """Feedback exported to a new file each time: a story corrected again must not train on its old labels."""
    write_jsonl(sample[:10], tmp_path / "export-1.jsonl")
    write_jsonl([replace(doc, topics=["ecology"]) for doc in sample[:5]], tmp_path / "export-2.jsonl")
    write_jsonl(sample[10:20], tmp_path / "new.jsonl")
    verdict = retrain(tiny_config(registry, tmp_path / "new.jsonl", gold, tolerance=1.0, replay_ratio=3.0,
                                  replay=[str(tmp_path / "export-1.jsonl"), str(tmp_path / "export-2.jsonl")]))
    assert verdict["documents"]["replay_pool"] == 10  # five from export-2, the other five from export-1
    replayed = {Path(d["path"]).name: d["documents"]
                for d in read_meta(registry.root / "1.0.1").training["retraining"]["replayed"]}
    assert replayed == {"export-1.jsonl": 5, "export-2.jsonl": 5}


def test_a_task_only_an_earlier_replayed_file_labels_is_still_replayed():
    first = [Document("a", "滨江市招商。", topics=["economy"], entities=[]), Document("b", "青澜港复工。", topics=[])]
    later = [Document("a", "滨江市招商。 ", topics=["ecology"])]  # the same story, topics revised
    earlier, latest = _latest_labels([first, later])
    assert latest == later
    assert earlier == [Document("a", "滨江市招商。", entities=[]), Document("b", "青澜港复工。", topics=[])]


def test_a_file_recorded_twice_keeps_its_last_place():
    assert [s["path"] for s in once_per_path([{"path": "a"}, {"path": "b"}, {"path": "a"}])] == ["b", "a"]


def test_each_file_trains_as_its_own_set_so_coarse_only_replay_stays_partially_labelled(
        registry, sample, gold, tmp_path, monkeypatch):
    write_jsonl(sample[:10], tmp_path / "new.jsonl")
    (tmp_path / "msra.bio").write_text("\n\n".join(f"张\tB-PER\n{i}\tO\n北\tB-LOC\n京\tI-LOC" for i in range(10)),
                                       encoding="utf-8")
    trained_on = []

    def capture(config, sources):
        trained_on.extend(sources)
        raise KeyboardInterrupt  # enough: what train was given

    monkeypatch.setattr("training.retrain.train", capture)
    with pytest.raises(KeyboardInterrupt):
        retrain(tiny_config(registry, tmp_path / "new.jsonl", gold, replay=[f"{tmp_path / 'msra.bio'}:columns"]))
    new, replayed = trained_on
    assert [doc.id for doc in new] == [doc.id for doc in sample[:10]]
    assert {span.type for doc in replayed for span in doc.entities} == {"PER", "LOC"}
    assert _labelled_coarse_only(replayed, Tagger.load(registry.folder("1.0.0")).schema)


def test_new_labels_stop_the_run_unless_allowed_and_then_grow_the_heads(registry, sample, gold, tmp_path):
    relabelled = [replace(doc, topics=[*doc.topics, "culture"],
                          entities=[*doc.entities[:1], *(replace(s, type="event") for s in doc.entities[1:2])])
                  for doc in sample[:20]]
    write_jsonl(relabelled, tmp_path / "new.jsonl")
    with pytest.raises(DataError, match=r"'topics': \['culture'\], 'entity_types': \['event'\]"):
        retrain(tiny_config(registry, tmp_path / "new.jsonl", gold))
    verdict = retrain(tiny_config(registry, tmp_path / "new.jsonl", gold, allow_new_labels=True, tolerance=1.0))
    assert verdict["new_labels"] == {"topics": ["culture"], "entity_types": ["event"], "gold_f1": {}}  # none in gold
    schema = Tagger.load(verdict["candidate"]["folder"]).schema
    assert schema.topics[-1] == "culture" and schema.entity_types[-1] == "event"
    assert Tagger.load(verdict["candidate"]["folder"]).tag([sample[0].text])[0]["topics"].keys() >= {"culture"}


@contextmanager
def live_server(settings: ServeSettings):
    """The app under a real uvicorn on a free port, so the CLI reaches it over HTTP."""
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=0, log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT_S
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    url = "http://127.0.0.1:%d" % server.servers[0].sockets[0].getsockname()[1]
    while httpx.get(f"{url}/readyz").status_code != 200:
        assert time.monotonic() < deadline, "the model did not load"
        time.sleep(0.01)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(WAIT_S)


def test_feedback_export_retrain_promote_serve_and_roll_back(registry, sample, gold, tmp_path, capsys):
    feedback_url = f"sqlite:///{tmp_path / 'feedback.db'}"
    settings = ServeSettings(model=registry.root / "current", feedback_url=feedback_url, admin_token="secret")
    with live_server(settings) as url:
        version = lambda: httpx.get(f"{url}/v1/info").json()["model"]["version"]  # noqa: E731
        assert version() == "1.0.0"
        for doc in sample[:20]:
            response = httpx.post(f"{url}/v1/feedback", json={**doc.to_dict(), "sender": "editor"})
            assert response.status_code == 201, response.text

        exported = tmp_path / "corrections.jsonl"
        assert main(["feedback", "export", "--store", feedback_url, "-o", str(exported)]) == 0
        server_flags = ["--server", url, "--token", "secret"]
        capsys.readouterr()
        code = main(["retrain", "--registry", str(registry.root), "--data", str(exported), "--gold", str(gold),
                     "--tolerance", "1", *TINY_TRAINING, *server_flags])
        printed = capsys.readouterr()
        verdict = json.loads(printed.out)  # stdout is the verdict alone
        assert code == 0 and verdict["decision"] == "promoted"
        assert set(verdict["deltas"]) >= {"entities.micro.f1", "topics.micro.f1", "topics.macro.f1"}
        assert f"{url} now serves tiny 1.0.1 (was 1.0.0)" in printed.err
        assert version() == "1.0.1"

        assert main(["models", "rollback", "--registry", str(registry.root), *server_flags]) == 0
        assert version() == "1.0.0"
        assert main(["models", "deploy", "--registry", str(registry.root), *server_flags]) == 0
        assert version() == "1.0.0"
        assert Tagger.load(registry.root / "current").meta.version == "1.0.0"


def test_a_server_of_several_workers_is_said_to_need_a_restart(registry, tmp_path, capsys):
    with registry.staging() as staged:
        build_tiny_model_folder(staged, version="1.0.1")
        registry.register(staged, Entry(version="1.0.1"))
    settings = ServeSettings(model=registry.root / "current", workers=2, admin_token="secret",
                             feedback_url=f"sqlite:///{tmp_path / 'feedback.db'}")
    with live_server(settings) as url:
        code = main(["models", "promote", "1.0.1", "--registry", str(registry.root), "--server", url,
                     "--token", "secret"])
    assert code == 3 and registry.manifest().current == "1.0.1"
    assert "restart it to serve production (it runs several workers" in capsys.readouterr().err


def test_a_server_that_cannot_be_reached_leaves_the_registry_promoted_and_exits_3(registry, tmp_path, capsys):
    with registry.staging() as staged:
        build_tiny_model_folder(staged, version="1.0.1")
        registry.register(staged, Entry(version="1.0.1"))
    server = ["--server", "http://127.0.0.1:9", "--token", "secret"]
    code = main(["models", "promote", "1.0.1", "--registry", str(registry.root), *server])
    assert code == 3  # not 1, which retrain gives a refused candidate
    assert "the registry is updated but the server is not" in capsys.readouterr().err
    assert registry.manifest().current == "1.0.1"
    # running promote again would say "already in production": deploy tells the server what is
    assert main(["models", "deploy", "--registry", str(registry.root), *server]) == 3
    assert registry.manifest().current == "1.0.1"


@pytest.mark.parametrize("server, message", [(["--server", "http://127.0.0.1:9"], "needs the server's admin token"),
                                             (["--server", "localhost:8000", "--token", "t"], "give the server's URL")])
@pytest.mark.parametrize("command", [["models", "promote", "1.0.1"], ["models", "rollback"], ["models", "deploy"],
                                     ["retrain", "--data", "new.jsonl", "--gold", "gold.jsonl"]])
def test_a_server_that_could_never_be_told_is_refused_before_the_registry_changes(
        registry, server, message, command, capsys, monkeypatch):
    monkeypatch.delenv("NEWSTAGGER_ADMIN_TOKEN", raising=False)
    with registry.staging() as staged:
        build_tiny_model_folder(staged, version="1.0.1")
        registry.register(staged, Entry(version="1.0.1"))
    manifest = (registry.root / "manifest.json").read_bytes()
    assert main([*command, "--registry", str(registry.root), *server]) == 2
    assert message in capsys.readouterr().err
    assert (registry.root / "manifest.json").read_bytes() == manifest


def test_registry_commands_on_a_mistyped_registry_leave_nothing_behind(tmp_path, capsys):
    for argv in (["promote", "1.0.0"], ["list"]):
        assert main(["models", *argv, "--registry", str(tmp_path / "nope")]) == 2
        assert "no registry here" in capsys.readouterr().err and not (tmp_path / "nope").exists()


def test_one_retrain_at_a_time_on_a_registry(registry, sample, gold, tmp_path):
    write_jsonl(sample[:20], tmp_path / "new.jsonl")
    with registry.retraining():  # another run in progress
        with pytest.raises(RegistryError, match="another retrain is running"):
            retrain(tiny_config(registry, tmp_path / "new.jsonl", gold))
    assert len(registry.manifest().models) == 1


def test_a_gold_label_neither_model_nor_new_data_knows_is_refused_naming_it(registry, sample, gold, tmp_path):
    write_jsonl(sample[:20], tmp_path / "new.jsonl")
    typo = replace(sample[-1], topics=["ecolgy"])
    write_jsonl([*sample[-12:-1], typo], tmp_path / "typo.jsonl")
    with pytest.raises(DataError, match=f"--gold .*typo.jsonl: document '{typo.id}': unknown topic 'ecolgy'"):
        retrain(tiny_config(registry, tmp_path / "new.jsonl", tmp_path / "typo.jsonl"))
    assert len(registry.manifest().models) == 1


def test_no_replay_needs_no_recorded_data(tmp_path, sample, gold):
    registry = Registry(tmp_path / "registry")
    with registry.staging() as staged:
        build_tiny_model_folder(staged, version="1.0.0")
        gone = {"path": str(tmp_path / "moved-away.jsonl"), "format": "internal", "sha256": "0" * 64}
        registry.register(staged, Entry(version="1.0.0", data=[gone]))
    registry.promote("1.0.0")
    write_jsonl(sample[:20], tmp_path / "new.jsonl")
    with pytest.raises(DataError, match="moved-away.jsonl, which 1.0.0 was trained on, is gone"):
        retrain(tiny_config(registry, tmp_path / "new.jsonl", gold, tolerance=1.0))
    verdict = retrain(tiny_config(registry, tmp_path / "new.jsonl", gold, tolerance=1.0, replay_ratio=0.0))
    assert verdict["documents"]["replayed"] == 0 and verdict["decision"] == "promoted"
    # still on record, for a later run that replays
    assert [Path(d["path"]).name for d in registry.manifest().entry("1.0.1").data] == ["moved-away.jsonl", "new.jsonl"]


def shuffled_labels(documents: list[Document], seed: int) -> list[Document]:
    """The same stories with labels that mean nothing: topic sets dealt to other stories, and every
    entity span given another type."""
    rng = random.Random(seed)
    topic_sets = [doc.topics for doc in documents]
    rng.shuffle(topic_sets)
    types = sorted({span.type for doc in documents for span in doc.entities})
    other = dict(zip(types, types[1:] + types[:1]))
    return [replace(doc, topics=topics, entities=[Span(s.start, s.end, other[s.type]) for s in doc.entities])
            for doc, topics in zip(documents, topic_sets)]


def test_a_candidate_trained_on_shuffled_labels_is_refused(tmp_path, sample):
    """The current model has learned the sample; a candidate retrained on half of it with shuffled
    labels unlearns the other half, the gold set, and the gate keeps the current model."""
    from training.train import TrainConfig, train

    registry = Registry(tmp_path / "registry")
    build_tiny_model_folder(tmp_path / "init", max_length=64, stride=16)
    # validated on the sample's stories with a closing mark added: other texts, so every story is trained on
    write_jsonl([replace(doc, text=doc.text + "（完）") for doc in sample], tmp_path / "valid.jsonl")
    with registry.staging() as staged:
        train(TrainConfig(output=str(staged), init_model=str(tmp_path / "init"),
                          validation=[str(tmp_path / "valid.jsonl")],
                          epochs=100, max_steps=150, learning_rate=5e-3, head_learning_rate=1.5e-2, batch_tokens=512,
                          max_length=64, stride=16, inference_max_length=64, inference_stride=16, patience=100,
                          threads=1, version="1.0.0"), sources=[sample])
        registry.register(staged, Entry(version="1.0.0"))
    registry.promote("1.0.0")
    write_jsonl(shuffled_labels(sample[20:], seed=1), tmp_path / "shuffled.jsonl")
    write_jsonl(sample[:20], tmp_path / "gold.jsonl")

    verdict = retrain(RetrainConfig(data=[str(tmp_path / "shuffled.jsonl")], gold=[str(tmp_path / "gold.jsonl")],
                                    registry=str(registry.root), max_steps=50, threads=1))
    assert verdict["decision"] == "rejected", verdict
    assert verdict["deltas"]["topics.micro.f1"] < -0.2
    assert registry.manifest().current == "1.0.0"
