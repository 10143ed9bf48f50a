"""Train -> save -> load -> tag on a tiny model, resume, and the metrics on hand-checked examples."""

from __future__ import annotations

import json
import math
import logging
import re
import shutil
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertModel

from newstagger import Document, Span, Tagger
from newstagger.crf import BioCrf
from newstagger.model import ModelMeta, load_model_folder, new_model, render_model_card
from newstagger.documents import DataError
from newstagger.errors import UsageError
from newstagger.schema import LabelSchema
from newstagger.windowing import encode_texts
from newstagger.cli import main
import training.train
from training.data import read_documents, split_validation
from training.evaluate import (at_or_over, entity_metrics, evaluate_tagger, scored_entity_metrics, topic_metrics,
                                tune_entity_threshold, tune_thresholds)
from training.train import (JointLoss, TagTargets, TrainConfig, _training_examples, _untaught_labels,
                            add_adversarial_gradients, build_examples, collate, config_from_file, pack_documents,
                            set_attention_dropout, token_tags, topic_pos_weight, train)

from conftest import SAMPLE, damaged_copy, tiny_config, tiny_schema, tiny_tokenizer


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny pretrained-style BERT folder, standing in for bert-base-chinese."""
    folder = tmp_path_factory.mktemp("tiny-base")
    tokenizer = tiny_tokenizer()
    BertModel(tiny_config(len(tokenizer)), add_pooling_layer=False).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_train_config(tiny_base: Path, output: Path, **overrides) -> TrainConfig:
    settings = dict(train=[f"{SAMPLE}:internal"], base_model=str(tiny_base), output=str(output), max_length=32,
                    stride=8, inference_max_length=32, inference_stride=8, epochs=1, batch_tokens=512,
                    validation_fraction=0.25, version="9.9.9", min_tuning_documents=1)
    return TrainConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def trained(tiny_base, tmp_path_factory) -> tuple[Path, dict]:
    return train(tiny_train_config(tiny_base, tmp_path_factory.mktemp("run") / "model"))


def test_round_trip_train_save_load_tag(trained):
    folder, metrics = trained
    assert {"config.json", "model.safetensors", "tokenizer.json", "newstagger.json", "metrics.json",
            "README.md"} <= {p.name for p in folder.iterdir()}
    assert not list(folder.glob("*.bin")), "weights must be safetensors only"
    # readable by a server run as another user (safetensors itself writes 0600)
    assert all(path.stat().st_mode & 0o044 == 0o044 for path in folder.glob("*.safetensors"))
    assert "entities" in metrics and "topics" in metrics
    saved = json.loads((folder / "metrics.json").read_text())
    assert saved["validation"]["topics"]["micro"] == metrics["topics"]["micro"]
    # trained at the training default, not at the base's 0.1
    assert json.loads((folder / "config.json").read_text())["attention_probs_dropout_prob"] == 0.0

    tagger = Tagger.load(folder)
    assert tagger.meta.version == "9.9.9"
    assert sorted(tagger.schema.topics) == sorted(tiny_schema().topics)
    assert set(tagger.meta.thresholds) == set(tagger.schema.topics)
    assert 0.0 <= tagger.meta.entity_threshold <= 0.8
    text = "滨江市人民政府今天宣布，地铁5号线将于年底开通。" * 10
    (result,) = tagger.tag([text])
    assert set(result) == {"topics", "labels", "entities"}
    assert all(text[e["start"] : e["end"]] == e["text"] for e in result["entities"])
    card = (folder / "README.md").read_text()
    assert "Metrics" in card and "9.9.9" in card and "Highest-scoring topic is a gold topic" in card
    assert "| entity threshold |" in card
    tuned = tagger.meta.training["tuned_on_validation"]
    assert "topic thresholds" in tuned and f"The {', '.join(tuned)} were chosen on this validation set" in card


def test_a_card_escapes_labels_for_its_tables_and_says_what_was_not_measured():
    schema = LabelSchema(topics=["a|b"], entity_types=["x|y"])
    card = render_model_card(ModelMeta(schema=schema, max_length=32, stride=8), {"validation": {}})
    assert "| a\\|b | 0.500 (default: not tuned) |" in card and "| entity types | x\\|y |" in card
    assert "- validation: not measured" in card


def test_a_card_describes_only_the_task_its_model_has():
    topics_only = render_model_card(ModelMeta(schema=LabelSchema(topics=["sports"]), max_length=32, stride=8), {})
    assert "model for Chinese text: multi-label topics," in topics_only and "## Topics and thresholds" in topics_only
    assert "entity threshold" not in topics_only and "span decoding" not in topics_only
    assert "| word features |" in topics_only and "Entity offsets" not in topics_only
    entities_only = render_model_card(ModelMeta(schema=LabelSchema(entity_types=["team"]), max_length=32, stride=8), {})
    assert "model for Chinese text: named-entity spans," in entities_only and "| entity threshold |" in entities_only
    assert "## Topics and thresholds" not in entities_only


def test_the_best_epoch_is_kept_and_training_stops_after_patience_epochs_without_gain(tiny_base, tmp_path,
                                                                                      monkeypatch):
    scores, snapshots = iter([0.50, 0.52, 0.49, 0.9, 0.9]), []
    real_validate = training.train._validate

    def validate(model, *args):
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return real_validate(model, *args)

    monkeypatch.setattr(training.train, "_validate", validate)
    monkeypatch.setattr(training.train, "selection_score", lambda metrics: next(scores))
    output, _ = train(tiny_train_config(tiny_base, tmp_path / "model", epochs=5, patience=1, learning_rate=5e-3))

    record = load_model_folder(output)[2].training
    assert [h["epoch"] for h in record["history"]] == [1, 2, 3]  # epoch 3 gained nothing: patience 1 stops there
    assert record["best_epoch"] == 2
    saved = load_model_folder(output)[0].state_dict()
    name = "bert.encoder.layer.0.attention.self.query.weight"
    assert torch.equal(saved[name], snapshots[1][name].half().float())  # stored in fp16
    assert not torch.equal(saved[name], snapshots[2][name].half().float())


def test_an_epoch_that_only_ties_the_best_score_does_not_replace_it(tiny_base, tmp_path, monkeypatch):
    scores = iter([0.5, 0.5])
    monkeypatch.setattr(training.train, "selection_score", lambda metrics: next(scores))
    output, _ = train(tiny_train_config(tiny_base, tmp_path / "model", epochs=2, patience=5))
    assert load_model_folder(output)[2].training["best_epoch"] == 1


def test_a_resumed_run_counts_the_epochs_without_gain_it_had_before(tiny_base, tmp_path, monkeypatch):
    scores = iter([0.6, 0.5, 0.4])
    monkeypatch.setattr(training.train, "selection_score", lambda metrics: next(scores))
    output = tmp_path / "model"
    train(tiny_train_config(tiny_base, output, epochs=2, patience=5))
    # epoch 2 gained nothing on epoch 1: with patience 1 the resumed run has no epoch left to run
    train(tiny_train_config(tiny_base, output, epochs=5, patience=1, resume=True))
    record = load_model_folder(output)[2].training
    assert [h["epoch"] for h in record["history"]] == [1, 2] and record["best_epoch"] == 1


def test_a_new_model_tags_in_the_windows_it_was_trained_in(tiny_base, tmp_path):
    output, _ = train(tiny_train_config(tiny_base, tmp_path / "model", inference_max_length=None,
                                        inference_stride=None, max_steps=1))
    meta = load_model_folder(output)[2]
    assert (meta.max_length, meta.stride) == (32, 8)


def test_resume_continues_from_the_last_epoch(tiny_base, tmp_path, caplog):
    output = tmp_path / "model"
    train(tiny_train_config(tiny_base, output, epochs=1, resume=True))  # killed before any checkpoint: starts over
    assert f"--resume: no checkpoint in {output} to continue; training from the start" in caplog.text
    train(tiny_train_config(tiny_base, output, epochs=2, resume=True))
    history = json.loads((output / "newstagger.json").read_text())["training"]["history"]
    assert [h["epoch"] for h in history] == [1, 2]


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tiny_base, tmp_path, monkeypatch):
    straight, _ = train(tiny_train_config(tiny_base, tmp_path / "straight", epochs=2, patience=5))
    save = training.train.save_checkpoint

    def save_then_crash(*args):
        save(*args)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(training.train, "save_checkpoint", save_then_crash)
        with pytest.raises(KeyboardInterrupt):
            train(tiny_train_config(tiny_base, tmp_path / "resumed", epochs=2, patience=5))
    resumed, _ = train(tiny_train_config(tiny_base, tmp_path / "resumed", epochs=2, patience=5, resume=True))
    # epoch 2's losses and final weights (the checkpoint's, whichever epoch was best): dropout continued too
    history = [json.loads((folder / "newstagger.json").read_text())["training"]["history"] for folder in (straight,
                                                                                                         resumed)]
    assert [row["loss"] for row in history[0]] == [row["loss"] for row in history[1]]
    expected = load_file(straight / "checkpoint" / "model.safetensors")
    got = load_file(resumed / "checkpoint" / "model.safetensors")
    assert all(torch.equal(expected[name], got[name]) for name in expected)


def test_resuming_under_settings_that_change_the_split_or_schedule_is_refused(tiny_base, tmp_path):
    output = tmp_path / "model"
    train(tiny_train_config(tiny_base, output, epochs=1))
    with pytest.raises(DataError, match="from a run with other learning_rate, seed; resume with the same settings"):
        train(tiny_train_config(tiny_base, output, epochs=2, resume=True, seed=99, learning_rate=1e-3))
    # named before the weights load, which would fail on the CRF's missing transitions without saying why
    with pytest.raises(DataError, match="from a run with other crf; resume with the same settings"):
        train(tiny_train_config(tiny_base, output, epochs=2, resume=True, crf=True))
    with pytest.raises(DataError, match="from a run with other adversarial_epsilon; resume with the same settings"):
        train(tiny_train_config(tiny_base, output, epochs=2, resume=True, adversarial_epsilon=1.0))


def test_a_larger_max_steps_on_resume_says_the_cut_epoch_counts_as_done(tiny_base, tmp_path, caplog):
    output = tmp_path / "model"
    train(tiny_train_config(tiny_base, output, epochs=2, max_steps=1))
    with caplog.at_level(logging.WARNING):
        train(tiny_train_config(tiny_base, output, epochs=2, resume=True))
    assert "epoch 1 stopped at max_steps 1 before its end and counts as done: training goes on with epoch 2" in caplog.text
    history = json.loads((output / "newstagger.json").read_text())["training"]["history"]
    assert [entry["epoch"] for entry in history] == [1, 2] and history[0]["step"] == 1


def test_resuming_over_an_edited_data_file_is_refused(tiny_base, tmp_path):
    """The same path with other stories in it would move the split and the batches under the weights."""
    data = tmp_path / "news.jsonl"
    shutil.copy(SAMPLE, data)
    output = tmp_path / "model"
    train(tiny_train_config(tiny_base, output, train=[f"{data}:internal"]))
    data.write_text("\n".join(data.read_text(encoding="utf-8").splitlines()[:-1]) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="from a run with other data_sha256; resume with the same settings"):
        train(tiny_train_config(tiny_base, output, train=[f"{data}:internal"], epochs=2, resume=True))


def test_training_into_a_folder_that_is_not_empty_needs_overwrite_output(tiny_base, tmp_path, capsys):
    output = tmp_path / "model"
    train(tiny_train_config(tiny_base, output, max_steps=1))
    before = (output / "model.safetensors").read_bytes()
    capsys.readouterr()
    argv = ["train", "--train", f"{SAMPLE}:internal", "--init-model", str(output), "--output", str(output)]
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"output {output} is not empty; --resume continues the run there, or --overwrite-output" in line
    shutil.rmtree(output / "checkpoint")  # the model is final: --resume has nothing to continue either
    assert main([*argv, "--resume"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"output {output} is not empty; name a new folder for the model, or --overwrite-output" in line
    assert (output / "model.safetensors").read_bytes() == before
    train(tiny_train_config(tiny_base, output, max_steps=1, seed=14, overwrite_output=True))
    assert (output / "model.safetensors").read_bytes() != before


def test_a_story_validated_on_in_one_set_is_trained_on_in_no_other():
    texts = [f"滨江市第{i}号新闻稿。" for i in range(40)]
    by_topics = [Document(f"t{i}", text, topics=["economy"]) for i, text in enumerate(texts)]
    by_entities = [Document(f"e{i}", text, entities=[Span(0, 3, "address")]) for i, text in enumerate(texts)]
    config = TrainConfig(train=["a", "b"], validation_fraction=0.25, max_length=32, stride=8)
    train_docs, _, valid_sources = _training_examples(config, [by_topics, by_entities], [1.0, 1.0], [],
                                                      tiny_tokenizer(), tiny_schema())
    valid_docs = [doc for docs in valid_sources for doc in docs]
    assert valid_docs and not {doc.text for doc in train_docs} & {doc.text for doc in valid_docs}


def test_nothing_left_to_train_on_after_the_validation_split_is_a_data_error(tiny_base, tmp_path):
    data = tmp_path / "two.jsonl"
    data.write_text('{"id": "b", "text": "今天天气很好"}\n'
                    '{"id": "a", "text": "王五住在北京", "entities": [{"start": 0, "end": 2, "type": "name"}]}\n',
                    encoding="utf-8")
    with pytest.raises(DataError, match="no labelled training documents are left once validation is held out"):
        train(tiny_train_config(tiny_base, tmp_path / "model", train=[f"{data}:internal"], validation_fraction=0.5))


def test_a_continued_model_keeps_its_parents_window_and_name_and_raises_its_version(tiny_base, tmp_path):
    untuned = {"min_tuning_documents": 10_000}
    parent, _ = train(tiny_train_config(tiny_base, tmp_path / "parent", max_steps=1, inference_max_length=48,
                                        inference_stride=12, name="desk-model", version="2.3.4", **untuned))
    child, _ = train(tiny_train_config(tiny_base, tmp_path / "child", init_model=str(parent), max_steps=1,
                                       inference_max_length=None, inference_stride=None, version=None, **untuned))
    meta = Tagger.load(child).meta
    assert (meta.max_length, meta.stride, meta.name, meta.version, meta.parent_version) == (
        48, 12, "desk-model", "2.3.5", "2.3.4")
    # Neither tuned its topic thresholds: the child's card says so, as its parent's does.
    assert meta.thresholds == {} and "0.500 (default: not tuned)" in (child / "README.md").read_text()


def test_a_continued_model_keeps_its_parents_cuts_where_validation_is_too_small_to_tune_them(trained, tiny_base,
                                                                                              tmp_path):
    parent = tmp_path / "parent"
    shutil.copytree(trained[0], parent, ignore=shutil.ignore_patterns("checkpoint"))
    described = json.loads((parent / "newstagger.json").read_text())
    cuts = {"entity_threshold": 0.37, "thresholds": {"economy": 0.41, "ecology": 0.62}}
    (parent / "newstagger.json").write_text(json.dumps({**described, **cuts}))
    child, _ = train(tiny_train_config(tiny_base, tmp_path / "child", init_model=str(parent), max_steps=1,
                                       min_tuning_documents=10_000))
    meta = Tagger.load(child).meta
    assert (meta.entity_threshold, meta.thresholds) == (0.37, {"economy": 0.41, "ecology": 0.62})
    assert meta.training["tuned_on_validation"] == []


def test_exactly_min_tuning_documents_of_validation_is_enough_to_tune_the_cuts(tiny_base, tmp_path):
    folder, _ = train(tiny_train_config(tiny_base, tmp_path / "model", max_validation_documents=4,
                                        min_tuning_documents=4, max_steps=1))
    training = json.loads((folder / "newstagger.json").read_text())["training"]
    assert training["data"]["validation"]["documents"] == 4  # each labelled with topics and entities
    assert {"entity threshold", "topic thresholds"} <= set(training["tuned_on_validation"])


def test_a_damaged_checkpoint_is_named_rather_than_a_traceback(tiny_base, tmp_path):
    output = tmp_path / "model"
    train(tiny_train_config(tiny_base, output, epochs=1))
    (output / "checkpoint" / "trainer_state.json").write_text("{")
    with pytest.raises(DataError, match="cannot be resumed from .*delete it to train afresh"):
        train(tiny_train_config(tiny_base, output, epochs=2, resume=True))


def test_a_checkpoint_holds_no_pickle_and_one_without_its_optimizer_is_refused(tiny_base, tmp_path):
    output = tmp_path / "model"
    train(tiny_train_config(tiny_base, output, epochs=1))
    checkpoint = output / "checkpoint"
    assert {path.suffix for path in checkpoint.iterdir()} == {".safetensors", ".json"}
    (checkpoint / "optimizer.safetensors").unlink()
    with pytest.raises(DataError, match=r"is not a whole checkpoint \(no optimizer.safetensors\); delete it"):
        train(tiny_train_config(tiny_base, output, epochs=2, resume=True))


@pytest.mark.parametrize("damage, named", [("pickled weights", "has no safetensors weights, and newstagger does not "
                                                               "unpickle a pytorch_model.bin: convert it once"),
                                           ("weights under other names", "of the BERT encoder's tensors unset"),
                                           ("another architecture", "it is a 'roberta' checkpoint, not BERT"),
                                           ("an ALBERT", "it is a 'albert' checkpoint, not BERT"),
                                           ("a decoder", "it is a BERT decoder"),
                                           ("relative positions", "position_embedding_type is 'relative_key_query'"),
                                           ("encoder tensors BERT does not use", "it holds 1 encoder tensors BERT "
                                                                                "does not use"),
                                           ("tokenizer past the embeddings", "more than the encoder's"),
                                           ("no pad token", "its tokenizer has no pad token in its vocabulary"),
                                           ("unknown token not in the vocabulary",
                                            "its tokenizer has no unk token in its vocabulary ([UNK])")])
def test_a_base_model_that_would_train_badly_exits_2_before_training(tiny_base, tmp_path, capsys, damage, named):
    base = damaged_copy(tiny_base, tmp_path / "base", damage)
    capsys.readouterr()  # transformers' own progress bars while the copy was saved
    argv = ["train", "--train", f"{SAMPLE}:internal", "--base-model", str(base), "--output", str(tmp_path / "m")]
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"base_model '{base}'" in line and named in line
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("command", ["train", "pretrain"])
def test_an_output_that_cannot_be_written_exits_2_before_training(tiny_base, tmp_path, capsys, command):
    (tmp_path / "a-file").write_text("")
    argv = [command, f"--{'train' if command == 'train' else 'text'}", f"{SAMPLE}:internal", "--base-model",
            str(tiny_base), "--output", str(tmp_path / "a-file" / "model")]
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"output {tmp_path / 'a-file' / 'model'}: cannot create or write in {tmp_path / 'a-file'}" in line


def test_resume_after_a_kill_while_the_first_checkpoint_was_written_starts_over(tiny_base, tmp_path, caplog):
    output = tmp_path / "model"
    (output / "checkpoint.tmp").mkdir(parents=True)
    (output / "checkpoint.tmp" / "model.safetensors").write_bytes(b"half")
    with pytest.raises(UsageError, match="is not empty"):  # without --resume: what the folder holds, as ever
        train(tiny_train_config(tiny_base, output, epochs=1))
    with caplog.at_level(logging.WARNING):
        train(tiny_train_config(tiny_base, output, epochs=1, resume=True))
    assert "no checkpoint in" in caplog.text and (output / "model.safetensors").is_file()


def test_resume_after_a_crash_between_the_checkpoint_renames(tiny_base, tmp_path):
    """Only `checkpoint.old` is left: resume from it, and the next save is not blocked by it."""
    output = tmp_path / "model"
    train(tiny_train_config(tiny_base, output, epochs=1))
    (output / "checkpoint").rename(output / "checkpoint.old")
    train(tiny_train_config(tiny_base, output, epochs=2, resume=True))
    history = json.loads((output / "newstagger.json").read_text())["training"]["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert not (output / "checkpoint.old").exists()


def test_bf16_autocast_training_saves_a_working_model(tiny_base, tmp_path, monkeypatch):
    monkeypatch.setattr("training.train.cpu_bf16_units", lambda: "amx")  # slow where it has none, not wrong
    folder, _ = train(tiny_train_config(tiny_base, tmp_path / "model", bf16=True, max_steps=3))
    assert json.loads((folder / "newstagger.json").read_text())["training"]["precision"] == "bf16 autocast"
    (result,) = Tagger.load(folder).tag(["王五住在北京"])
    assert set(result["topics"]) == set(tiny_schema().topics)


def test_bf16_without_amx_trains_in_fp32_and_says_so(tiny_base, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr("training.train.cpu_bf16_units", lambda: "avx512_bf16")
    folder, _ = train(tiny_train_config(tiny_base, tmp_path / "model", bf16=True, max_steps=1))
    assert json.loads((folder / "newstagger.json").read_text())["training"]["precision"] == "fp32"
    assert any("no bf16 matrix units" in record.message for record in caplog.records)


def test_lexicon_training_builds_jiebas_dictionary_into_the_model_folder(tiny_base, tmp_path):
    folder, _ = train(tiny_train_config(tiny_base, tmp_path / "model", lexicon=True, max_steps=3))
    saved = json.loads((folder / "newstagger.json").read_text())["training"]["lexicon"]
    assert saved["source"].startswith("jieba") and saved["words"] > 300_000
    assert "jieba" in (folder / "README.md").read_text()
    tagger = Tagger.load(folder)
    assert tagger.model.lexicon is not None and tagger.model.lexicon_projection.weight.abs().sum() > 0
    text = "滨江市人民政府今天宣布，地铁5号线将于年底开通。"
    (result,) = tagger.tag([text])
    assert all(text[e["start"] : e["end"]] == e["text"] for e in result["entities"])

    retrained, _ = train(tiny_train_config(tiny_base, tmp_path / "retrained", init_model=str(folder), max_steps=2))
    assert Tagger.load(retrained).model.lexicon is not None  # kept without asking again


def test_packing_joins_entity_only_documents_and_keeps_every_span():
    sentences = [Document(f"s{i}", "王五住在北京。", entities=[Span(0, 2, "name"), Span(4, 6, "address")])
                 for i in range(40)]
    story = Document("t", "北京的新闻", topics=["economy"], entities=[Span(0, 2, "address")])
    unlabelled_entities = Document("u", "只有主题", topics=["ecology"])
    packed = pack_documents([story, *sentences, unlabelled_entities], max_chars=30, rng=random.Random(0))

    assert story in packed and unlabelled_entities in packed  # topic labels belong to the whole text
    joined = [doc for doc in packed if doc.topics is None]
    assert len(joined) < len(sentences) and any(len(doc.text) > 7 for doc in joined)
    assert all(len(doc.text) <= 30 for doc in joined)
    assert sum(len(doc.entities) for doc in joined) == 80
    for doc in joined:
        assert [doc.text[s.start:s.end] for s in doc.entities] == ["王五", "北京"] * (len(doc.text) // 7)


def test_train_command_rejects_a_config_with_unknown_settings(tmp_path, capsys):
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"train": ["x.jsonl"], "learning_rat": 0.1}))
    assert main(["train", "--config", str(config)]) == 2
    assert "learning_rat" in capsys.readouterr().err


def test_attention_dropout_reaches_every_attention_layer():
    model = BertModel(tiny_config(50), add_pooling_layer=False)
    set_attention_dropout(model, 0.25)
    attention = [m.dropout.p for n, m in model.named_modules() if n.endswith("attention.self")]
    assert attention == [0.25] * model.config.num_hidden_layers
    assert model.config.attention_probs_dropout_prob == 0.25
    assert model.config.hidden_dropout_prob == 0.1  # the other dropouts are left as they are


@pytest.mark.parametrize("flags, named", [(["--epochs", "0"], "epochs must be at least 1"),
                                          (["--max-length", "64", "--stride", "64"], "stride must be"),
                                          (["--inference-stride", "300"], "inference_stride must be"),
                                          (["--learning-rate=-1e-4"], "learning_rate must be positive"),
                                          (["--device", "tpu"], "device must be one of auto, cpu, cuda"),
                                          (["--seed=-1"], "seed must be from 0 to 4294967295"),
                                          (["--attention-dropout", "1"], "attention_dropout must be from 0 to under"),
                                          (["--keep-start", "1"], "keep_start must be from 0 to under 1"),
                                          (["--adversarial-epsilon=-1"], "adversarial_epsilon must be 0 or more"),
                                          (["--topic-negatives=-0.5"], "topic_negatives must be 0 or more"),
                                          (["--validation-seed=-1"], "validation_seed must be from 0 to"),
                                          (["--threads", "100000"], "threads must be 0 to 1024")])
def test_train_command_rejects_settings_that_cannot_work(flags, named, capsys):
    assert main(["train", "--train", "x.jsonl", *flags]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert named in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", ["train", "pretrain"])
def test_training_on_cuda_without_a_gpu_exits_2_saying_so(command, tmp_path, capsys):
    data_flag = "--train" if command == "train" else "--text"
    assert main([command, data_flag, f"{SAMPLE}:internal", "--device", "cuda", "--output", str(tmp_path / "m")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "no CUDA device" in line and not (tmp_path / "m").exists()


def test_a_window_too_short_is_the_only_complaint_about_it():
    with pytest.raises(ValueError) as error:
        TrainConfig(train=["x.jsonl"], max_length=4, stride=0)
    assert str(error.value) == "max_length must be an integer of at least 8, not 4"


def test_windows_longer_than_the_encoder_exit_2_before_training(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "news.jsonl"
    data.write_text('{"id": "a", "text": "滨江市", "topics": ["economy"]}\n', encoding="utf-8")
    argv = ["train", "--train", f"{data}:internal", "--init-model", str(tiny_model_dir), "--max-length", "64",
            "--inference-max-length", "256", "--output", str(tmp_path / "m")]
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "inference_max_length 256: more than the encoder's 128 positions" in line
    assert not (tmp_path / "m").exists()


def test_a_base_saved_with_the_buffers_of_older_transformers_loads(tiny_base, tmp_path):
    """Position and token type ids were once saved beside the weights: buffers, not encoder tensors
    of another BERT variant."""
    base = shutil.copytree(tiny_base, tmp_path / "base")
    tensors = load_file(base / "model.safetensors")
    length = tensors["embeddings.position_embeddings.weight"].shape[0]
    tensors |= {"embeddings.position_ids": torch.arange(length)[None],
                "embeddings.token_type_ids": torch.zeros(1, length, dtype=torch.long)}
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    assert new_model(str(base), tiny_schema()).bert is not None


@pytest.mark.parametrize("base, named", [("{tmp}/missing", "base_model '{tmp}/missing': no such folder"),
                                         ("./missing", "base_model './missing': no such folder"),
                                         ("~/missing", "no such folder ('~' is not expanded: write the whole path)"),
                                         ("{tmp}", "base_model '{tmp}' cannot be loaded")])
def test_a_base_model_that_cannot_be_loaded_exits_2_naming_it(tmp_path, capsys, base, named):
    data = tmp_path / "news.jsonl"
    data.write_text('{"id": "a", "text": "滨江市", "topics": ["economy"]}\n', encoding="utf-8")
    argv = ["train", "--train", f"{data}:internal", "--base-model", base.format(tmp=tmp_path), "--output", str(tmp_path / "m")]
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert named.format(tmp=tmp_path) in line


@pytest.mark.parametrize("content, message", [
    ("", "no documents"),
    # doccano's layout read as the internal format: nothing labelled, where it would have added nothing
    ('{"id": "a", "text": "滨江市", "label": [[0, 3, "address"]]}\n', "none of its 1 documents has topics or entities"),
    ('{"id": "a", "text": "滨江市", "entites": []}\n', "field 'entites' is not read; did you mean 'entities'?"),
])
@pytest.mark.parametrize("option", ["--train", "--validation"])
def test_a_data_file_that_adds_no_labels_exits_2_naming_it(tmp_path, capsys, content, message, option):
    """Beside other files too: an empty or misread --validation file would turn validation off."""
    labelled, bad = tmp_path / "labelled.jsonl", tmp_path / "bad.jsonl"
    labelled.write_text('{"id": "b", "text": "滨江市", "topics": ["economy"]}\n', encoding="utf-8")
    bad.write_text(content, encoding="utf-8")
    argv = ["train", "--train", str(labelled), option, f"{bad}:internal", "--output", str(tmp_path / "m")]
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert str(bad) in line and message in line


def test_a_long_validation_file_is_sampled_not_cut_to_its_head(tiny_base, tmp_path, caplog):
    """A gold file sorted by date or desk would otherwise be scored on its first stories only."""
    validation = tmp_path / "validation.jsonl"
    validation.write_text("".join(json.dumps({"id": str(i), "text": f"滨江市第{i}号。", "topics": []}) + "\n"
                                  for i in range(50)), encoding="utf-8")
    config = tiny_train_config(tiny_base, tmp_path / "m", validation=[str(validation)], max_validation_documents=10)
    with caplog.at_level(logging.WARNING):
        _, _, [(_, docs)] = training.train._read_data(config, [])
    ids = [int(doc.id) for doc in docs]
    assert len(ids) == 10 and ids == sorted(ids) and ids != list(range(10))
    assert "scoring a random 10 of its 50 documents" in caplog.text


def test_each_validation_file_is_scored_as_its_own_source_as_evaluate_scores_it(tiny_base, tmp_path, monkeypatch):
    """MSRA's sentences without a name are scored in the coarse view alone only where MSRA is its own
    source: mixed with fine files, any fine entity found in them would count as wrong."""
    fine, coarse = tmp_path / "fine.jsonl", tmp_path / "coarse.bio"
    fine.write_text('{"id": "f", "text": "刘洋在滨江市。", "entities": [{"start": 0, "end": 2, "type": "name"}]}\n',
                    encoding="utf-8")
    coarse.write_text("刘\tB-PER\n洋\tI-PER\n\n好\tO\n的\tO\n\n", encoding="utf-8")
    scored = []
    real_predict = training.train.predict_documents
    monkeypatch.setattr(training.train, "predict_documents",
                        lambda tagger, docs, *args: scored.append([doc.id for doc in docs]) or real_predict(tagger, docs))
    train(tiny_train_config(tiny_base, tmp_path / "m", validation=[f"{fine}:internal", f"{coarse}:columns"]))
    assert scored == [["f"], ["coarse-1", "coarse-4"]]


@pytest.mark.parametrize(("documents", "cap"), [(100, 7), (20_012, 2_000)])
def test_the_held_out_share_never_passes_the_cap(tiny_base, tmp_path, documents, cap):
    config = tiny_train_config(tiny_base, tmp_path / "m", max_validation_documents=cap)
    docs = [Document(str(i), "滨江市") for i in range(documents)]
    assert len(split_validation(docs, training.train.held_out_share(config, documents))[1]) == cap


def test_a_label_only_the_validation_data_has_exits_2(tiny_base, tmp_path, capsys):
    """It would become a class no example taught, with an untuned threshold in the card."""
    train, validation = tmp_path / "train.jsonl", tmp_path / "validation.jsonl"
    train.write_text('{"id": "a", "text": "滨江市招商。", "topics": ["economy"]}\n', encoding="utf-8")
    validation.write_text('{"id": "b", "text": "滨江市比赛。", "topics": ["sports"]}\n', encoding="utf-8")
    argv = ["train", "--train", str(train), "--validation", str(validation), "--output", str(tmp_path / "m"),
            "--base-model", str(tiny_base)]
    assert main(argv) == 2
    assert "--validation" in (err := capsys.readouterr().err) and "unknown topic 'sports'" in err


def test_token_tags_label_first_token_begin_rest_inside():
    tokenizer = tiny_tokenizer()
    schema = tiny_schema()
    doc = Document("d", "王五住在北京", entities=[Span(0, 2, "name"), Span(4, 6, "address")])
    from newstagger.windowing import encode_texts

    (encoded,) = encode_texts(tokenizer, [doc.text])
    targets = TagTargets.for_schema(schema)
    tags = token_tags(doc, encoded, targets)
    names = [schema.tags[t] for t in tags]
    assert names == ["B-name", "I-name", "O", "O", "B-address", "I-address"]
    assert (token_tags(Document("d", "王五", entities=None), encode_texts(tokenizer, ["王五"])[0], targets) == -100).all()


@pytest.mark.parametrize(("entity_type", "coarse"), [("address", False), ("LOC", True)])
def test_a_window_starting_inside_an_entity_opens_it_with_b(entity_type, coarse):
    schema = tiny_schema()
    targets = TagTargets.for_schema(schema)
    text = "我" * 4 + "青澜市江北区" + "我" * 12  # 22 tokens; windows of 16 tokens from 0 and from 6
    doc = Document("d", text, entities=[Span(4, 10, entity_type)])
    examples = build_examples([doc], tiny_tokenizer(), schema, max_length=18, stride=10, coarse=coarse)
    assert len(examples) == 2
    first, second = ([targets.names[t] for t in e.tags] for e in examples)
    assert first[4:11] == [f"B-{entity_type}"] + [f"I-{entity_type}"] * 5 + [first[0]]
    assert second[:5] == [f"B-{entity_type}"] + [f"I-{entity_type}"] * 3 + [first[0]]  # 市江北区 opens anew

    crf = BioCrf(len(schema.tags))
    loss_fn = JointLoss(torch.ones(len(schema.topics)), 1.0, 1.0, targets, crf)
    batch = collate(examples[1:], tiny_tokenizer(), len(schema.topics))
    loss = loss_fn(None, torch.zeros(1, batch["tags"].shape[1], len(schema.tags)), batch)
    assert loss < 5  # no forbidden move on the gold path (it would add 1e4 / 16 tokens)


def test_coarse_spans_are_partial_labels_over_the_fine_types_they_roll_up():
    schema = tiny_schema()
    targets = TagTargets.for_schema(schema)
    allowed = {name: {tag for tag, ok in zip(schema.tags, row) if ok} for name, row in zip(targets.names, targets.allowed)}
    assert allowed["B-LOC"] == {"B-address", "B-scene"}
    assert allowed["I-ORG"] == {"I-organization", "I-government", "I-company"}
    assert allowed["B-PER"] == {"B-name"}
    assert allowed["B-name"] == {"B-name"}
    assert "O" in allowed["O|uncoarse"] and "B-position" in allowed["O|uncoarse"]
    assert "B-name" not in allowed["O|uncoarse"]

    (encoded,) = encode_texts(tiny_tokenizer(), ["王五住在北京"])
    doc = Document("m", "王五住在北京", entities=[Span(0, 2, "PER"), Span(4, 6, "LOC")])
    assert [targets.names[t] for t in token_tags(doc, encoded, targets, coarse=True)] == [
        "B-PER", "I-PER", "O|uncoarse", "O|uncoarse", "B-LOC", "I-LOC"]


def test_joint_loss_is_cross_entropy_for_exact_tags_and_a_marginal_for_partial_ones():
    schema = tiny_schema()
    targets = TagTargets.for_schema(schema)
    loss_fn = JointLoss(torch.ones(len(schema.topics)), 1.0, 1.0, targets)
    tag_logits = torch.randn(1, 3, len(schema.tags))
    batch = {"tags": torch.tensor([[-100, schema.tags.index("B-name"), targets.begin("LOC")]]),
             "has_topics": torch.tensor([False]), "topics": torch.zeros(1, len(schema.topics)),
             "entity_weight": torch.tensor([1.0])}
    log_probs = tag_logits[0].log_softmax(-1)
    loc = [schema.tags.index("B-address"), schema.tags.index("B-scene")]
    expected = -(log_probs[1, schema.tags.index("B-name")] + log_probs[2, loc].logsumexp(0)) / 2
    assert torch.allclose(loss_fn(None, tag_logits, batch), expected)

    # A second row from a source weighted 0.25: its token counts a quarter in the mean.
    tag_logits = torch.cat([tag_logits, torch.randn(1, 3, len(schema.tags))])
    batch = {**batch, "tags": torch.cat([batch["tags"], torch.tensor([[0, -100, -100]])]),
             "has_topics": torch.tensor([False, False]), "entity_weight": torch.tensor([1.0, 0.25])}
    weighted = (2 * expected - 0.25 * tag_logits[1, 0].log_softmax(-1)[0]) / 3
    assert torch.allclose(loss_fn(None, tag_logits, batch), weighted)


def test_the_topic_loss_counts_only_documents_labelled_with_topics():
    schema = tiny_schema()
    loss_fn = JointLoss(torch.ones(len(schema.topics)), 1.0, 1.0, TagTargets.for_schema(schema))
    topic_logits = torch.randn(2, len(schema.topics))
    batch = {"tags": torch.full((2, 3), -100), "has_topics": torch.tensor([True, False]),
             "topics": torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]), "entity_weight": torch.ones(2)}
    # the entity-only second row must not teach "no topic"
    expected = torch.nn.functional.binary_cross_entropy_with_logits(topic_logits[:1], batch["topics"][:1])
    assert torch.allclose(loss_fn(topic_logits, torch.randn(2, 3, len(schema.tags)), batch), expected)


def test_topic_pos_weight_is_the_root_of_negatives_over_positives_among_topic_labelled_documents():
    docs = [Document("a", "一", topics=["economy"]), *(Document(c, c, topics=[]) for c in "二三四五"),
            Document("f", "六", entities=[])]  # no topic labels: neither a positive nor a negative
    assert topic_pos_weight(docs, ["economy", "ecology"]).tolist() == [2.0, 1.0]  # no positive: unweighted


def test_data_whose_every_topic_label_is_none_trains_and_scores_an_entity_model(tiny_base, tmp_path, capsys):
    """Labelled for topics, none of which apply: no topic to learn, and a BCE over no topics is NaN."""
    stories = [{**doc.to_dict(), "topics": []} for doc in read_documents(SAMPLE, "internal")]
    data = tmp_path / "no-topics.jsonl"
    data.write_text("".join(json.dumps(story, ensure_ascii=False) + "\n" for story in stories), encoding="utf-8")
    folder, metrics = train(tiny_train_config(tiny_base, tmp_path / "m", train=[f"{data}:internal"]))
    state = json.loads((folder / "checkpoint" / "trainer_state.json").read_text())
    assert math.isfinite(state["history"][0]["loss"]) and "topics" not in metrics
    assert Tagger.load(folder).schema.topics == []
    assert main(["evaluate", "--model", str(folder), "--data", f"{data}:internal"]) == 0
    assert "topics" not in json.loads(capsys.readouterr().out)
    nothing = tmp_path / "nothing.jsonl"
    nothing.write_text("".join(json.dumps({**story, "entities": []}, ensure_ascii=False) + "\n" for story in stories),
                       encoding="utf-8")
    with pytest.raises(DataError, match="names no topic and no entity type"):
        train(tiny_train_config(tiny_base, tmp_path / "m2", train=[f"{nothing}:internal"]))


def test_crf_joint_loss_is_the_weighted_sequence_likelihood_per_labelled_token():
    schema = tiny_schema()
    targets = TagTargets.for_schema(schema)
    crf = BioCrf(len(schema.tags))
    with torch.no_grad():
        crf.transitions.normal_()
    loss_fn = JointLoss(torch.ones(len(schema.topics)), 1.0, 1.0, targets, crf)
    name, loc = schema.tags.index("B-name"), targets.begin("LOC")
    # [CLS], then each row's tagged text: "B-name I-name" (2 tokens) and "O B-LOC I-LOC" (3 tokens)
    tags = torch.tensor([[-100, name, name + 1, -100, -100], [-100, 0, loc, loc + 1, -100]])
    tag_logits = torch.randn(2, 5, len(schema.tags))
    batch = {"tags": tags, "has_topics": torch.tensor([False, False]), "topics": torch.zeros(2, len(schema.topics)),
             "entity_weight": torch.tensor([1.0, 0.25])}

    allowed = torch.zeros(2, 3, len(schema.tags), dtype=torch.bool)
    allowed[0, 2] = True  # past the first row's length: any tag
    for row, position, target in [(0, 0, name), (0, 1, name + 1), (1, 0, 0), (1, 1, loc), (1, 2, loc + 1)]:
        allowed[row, position] = torch.from_numpy(targets.allowed[target])
    nll = crf.negative_log_likelihood(tag_logits[:, 1:4], allowed, torch.tensor([2, 3]))
    assert torch.allclose(loss_fn(None, tag_logits, batch), (nll[0] + 0.25 * nll[1]) / 5)


def test_crf_training_round_trip_and_a_retrained_model_keeps_its_crf(tiny_base, tmp_path):
    folder, _ = train(tiny_train_config(tiny_base, tmp_path / "model", crf=True, max_steps=3))
    assert json.loads((folder / "newstagger.json").read_text())["training"]["crf"] is True
    tagger = Tagger.load(folder)
    assert tagger.model.crf.transitions.abs().sum() > 0  # trained away from the zero start
    text = "滨江市人民政府今天宣布，地铁5号线将于年底开通。" * 6
    (result,) = tagger.tag([text])
    assert all(text[e["start"] : e["end"]] == e["text"] for e in result["entities"])

    retrained, _ = train(tiny_train_config(tiny_base, tmp_path / "retrained", init_model=str(folder), max_steps=2,
                                           base_model="bert-base-chinese"))  # unused beside init_model ...
    assert Tagger.load(retrained).model.crf is not None
    recorded = json.loads((retrained / "newstagger.json").read_text())
    assert recorded["training"]["config"]["base_model"] == recorded["base_model"] == str(tiny_base)  # ... not recorded


def test_keep_start_saves_the_weights_between_the_start_and_the_trained_ones(trained, tiny_base, tmp_path):
    start, _ = trained
    runs = {keep: train(tiny_train_config(tiny_base, tmp_path / str(keep), init_model=str(start), keep_start=keep,
                                          max_steps=2))[0] for keep in (0.0, 0.75)}
    before = load_file(start / "model.safetensors")
    after = load_file(runs[0.0] / "checkpoint" / "best.safetensors")  # the trained weights in fp32, before saving
    kept = load_file(runs[0.75] / "model.safetensors")
    moved = [name for name in after if after[name].is_floating_point() and not torch.equal(after[name],
                                                                                             before[name].float())]
    assert moved
    for name in moved:
        expected = (0.75 * before[name].float() + 0.25 * after[name]).half()
        torch.testing.assert_close(kept[name], expected, atol=1e-3, rtol=1e-3)


def test_an_adversarial_step_adds_the_gradients_at_the_moved_embeddings_and_moves_them_back(tiny_model_dir):
    model, _, _ = load_model_folder(tiny_model_dir)
    model.eval()  # no dropout: the same batch gives the same loss
    input_ids = torch.randint(5, model.config.vocab_size, (2, 12))

    def batch_loss():
        topic_logits, tag_logits = model(input_ids, torch.ones_like(input_ids))
        return topic_logits.sum() + tag_logits.pow(2).mean()

    embeddings = model.bert.embeddings.word_embeddings.weight
    batch_loss().backward()
    clean, before = embeddings.grad.clone(), embeddings.detach().clone()
    add_adversarial_gradients(model, batch_loss, 0.5)
    torch.testing.assert_close(embeddings, before)  # moved back, to the last bit or so
    both = embeddings.grad.clone()

    model.zero_grad()
    with torch.no_grad():
        embeddings.add_(0.5 * clean / clean.norm())
    batch_loss().backward()
    assert not torch.equal(embeddings.grad, clean)  # the moved embeddings give other gradients
    torch.testing.assert_close(both, clean + embeddings.grad)


@pytest.mark.parametrize(("setting", "message"), [
    ({"epochs": "3"}, "epochs must be an integer, not '3'"),
    ({"learning_rate": float("inf")}, "learning_rate must be a finite number, not inf"),
    ({"crf": "no"}, "crf must be true or false, not 'no'"),
    ({"train": "a.jsonl"}, "train must be a list of strings, not 'a.jsonl'"),
])
def test_settings_of_the_wrong_type_are_named(setting, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TrainConfig(**setting)


def test_a_config_file_that_does_not_parse_is_named(tmp_path):
    (tmp_path / "bad.toml").write_text("train = [")
    with pytest.raises(ValueError, match=r"bad.toml: not valid TOML"):
        config_from_file(TrainConfig, tmp_path / "bad.toml")
    (tmp_path / "list.json").write_text('["a.jsonl"]')
    with pytest.raises(ValueError, match=r"list.json: expected a table of settings, got list"):
        config_from_file(TrainConfig, tmp_path / "list.json")


def test_config_files_are_read_as_windows_tools_write_them_and_other_kinds_are_named(tmp_path):
    (tmp_path / "BOM.TOML").write_bytes("\ufeffepochs = 2\n".encode("utf-8"))
    assert config_from_file(TrainConfig, tmp_path / "BOM.TOML", train=["a.jsonl"]).epochs == 2
    (tmp_path / "run.yaml").write_text("epochs: 2\n")
    with pytest.raises(ValueError, match=r"run.yaml: a config file is .toml or .json"):
        config_from_file(TrainConfig, tmp_path / "run.yaml")
    (tmp_path / "gbk.toml").write_bytes('name = "新闻"\n'.encode("gbk"))
    with pytest.raises(ValueError, match=r"gbk.toml: not UTF-8"):
        config_from_file(TrainConfig, tmp_path / "gbk.toml")


def test_a_config_files_train_weights_may_count_the_sources_flags_give(tmp_path):
    (tmp_path / "weights.toml").write_text("train_weights = [1.0, 0.5]\n")
    config = config_from_file(TrainConfig, tmp_path / "weights.toml", train=["a.jsonl", "b.bio"])
    assert config.train_weights == [1.0, 0.5]


def test_train_weights_must_match_the_train_sources(tiny_base, tmp_path):
    with pytest.raises(ValueError, match=r"train_weights must be one weight per train source \(1\)"):
        tiny_train_config(tiny_base, tmp_path / "model", train_weights=[1.0, 0.5])


def test_schema_keeps_coarse_types_out_of_the_head_when_fine_types_are_there():
    fine = Document("c", "王五住在北京", entities=[Span(0, 2, "name"), Span(4, 6, "address")])
    coarse = Document("m", "李四在上海", entities=[Span(0, 2, "PER"), Span(3, 5, "LOC")])
    schema = LabelSchema.from_documents([fine, coarse])
    assert schema.entity_types == ["address", "name"] and schema.coarse_only_types == {"PER", "LOC"}
    # without a finer type to roll up to, a coarse type is a type of its own
    assert LabelSchema.from_documents([fine, *[Document("o", "国务院", entities=[Span(0, 3, "ORG")])]]).entity_types == [
        "ORG", "address", "name"]
    assert LabelSchema.from_documents([coarse]).entity_types == ["LOC", "PER"]
    assert tiny_schema().merged_with(LabelSchema.from_documents([coarse])) == tiny_schema()


def test_training_mixes_fine_data_with_coarse_only_data(tiny_base, tmp_path):
    coarse = [Document(f"m{i}", "李四在上海工作。", entities=[Span(0, 2, "PER"), Span(3, 5, "LOC")]) for i in range(8)]
    folder, metrics = train(tiny_train_config(tiny_base, tmp_path / "model", max_steps=3), sources=[coarse])
    saved = json.loads((folder / "newstagger.json").read_text())
    assert "PER" not in saved["schema"]["entity_types"] and "name" in saved["schema"]["entity_types"]
    sample_fit, sample_held = split_validation(read_documents(SAMPLE), 0.25, seed=13)
    data = saved["training"]["data"]
    assert data["validation"]["documents"] == len(sample_held)  # the coarse-only set is not split
    assert data["train"]["documents"] == len(sample_fit) + len(coarse)


def test_without_validation_every_epoch_runs_and_the_last_is_kept(trained, tiny_base, tmp_path):
    """Coarse-only data for a model with fine types is not split, so validation measures nothing:
    a tie at no score must not stop training after one epoch and keep that one."""
    coarse = [Document(f"m{i}", "李四在上海工作。", entities=[Span(0, 2, "PER"), Span(3, 5, "LOC")]) for i in range(8)]
    config = tiny_train_config(tiny_base, tmp_path / "model", train=[], init_model=str(trained[0]), epochs=3,
                               patience=1)
    folder, _ = train(config, sources=[coarse])
    training = json.loads((folder / "newstagger.json").read_text())["training"]
    assert [epoch["score"] for epoch in training["history"]] == [None, None, None]
    assert training["best_epoch"] == 3


def test_a_validation_cap_holds_out_a_smaller_share_and_nothing_is_lost(tiny_base, tmp_path):
    folder, _ = train(tiny_train_config(tiny_base, tmp_path / "model", max_validation_documents=4, max_steps=1))
    data = json.loads((folder / "newstagger.json").read_text())["training"]["data"]
    assert data["validation"]["documents"] == 4  # not the 11 a 0.25 share would hold out
    assert data["train"]["documents"] + data["validation"]["documents"] == len(read_documents(SAMPLE))


def test_entity_metrics_on_a_hand_checked_example():
    gold = [[(0, 2, "name"), (3, 5, "address")], [(1, 4, "company")]]
    predicted = [[(0, 2, "name"), (3, 4, "address")], [(1, 4, "company"), (5, 6, "name")]]
    metrics = entity_metrics(gold, predicted, lengths=[6, 7])
    # 2 of 4 predictions right (name, company); 2 of 3 gold found; the address is off by one: strict
    assert metrics["micro"] == {"precision": 0.5, "recall": 0.6667, "f1": 0.5714, "support": 3}
    assert metrics["per_label"]["company"]["f1"] == 1.0
    assert metrics["per_label"]["address"]["f1"] == 0.0
    assert metrics["per_label"]["name"] == {"precision": 0.5, "recall": 1.0, "f1": 0.6667, "support": 1}
    assert metrics["macro"]["f1"] == pytest.approx((1.0 + 0.0 + 0.6667) / 3, abs=1e-4)


def test_entity_metrics_over_no_entity_at_all_are_zero_not_nan():
    metrics = entity_metrics([[]], [[]], lengths=[4])
    assert json.loads(json.dumps(metrics), parse_constant=lambda name: pytest.fail(f"{name} in the metrics"))
    assert metrics["macro"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


def test_topic_metrics_and_threshold_tuning_on_a_hand_checked_example():
    gold = np.array([[1, 0], [1, 1], [0, 1], [0, 0]])
    probs = np.array([[0.9, 0.1], [0.35, 0.8], [0.2, 0.7], [0.6, 0.2]])  # predicts [1,0] [0,1] [0,1] [1,0]
    metrics = topic_metrics(gold, probs, [0.5, 0.5], ["economy", "ecology"])
    assert metrics["per_label"]["economy"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert metrics["per_label"]["ecology"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2}
    assert metrics["micro"]["f1"] == 0.75
    assert metrics["macro"]["f1"] == 0.75
    # the top topic of the three documents with a gold topic: economy, ecology, ecology -- all gold
    assert metrics["main_topic"] == {"accuracy": 1.0, "correct": 3, "documents": 3}
    assert topic_metrics(gold, probs[:, ::-1], [0.5, 0.5], ["economy", "ecology"])["main_topic"]["correct"] == 1
    no_topics = topic_metrics(gold[3:], probs[3:], [0.5, 0.5], ["economy", "ecology"])["main_topic"]
    assert no_topics == {"accuracy": 0.0, "correct": 0, "documents": 0}
    # an empty text scores 0 for every topic: it has no main topic, not the first topic's
    empty = topic_metrics(np.array([[1, 0]]), np.zeros((1, 2)), [0.5, 0.5], ["economy", "ecology"])["main_topic"]
    assert empty == {"accuracy": 0.0, "correct": 0, "documents": 1}
    # scores equal as `tag` reports them (4 decimals) tie, and go to the topic its labels list first
    tied = topic_metrics(np.array([[1, 0]]), np.array([[0.70001, 0.70004]]), [0.5, 0.5], ["economy", "ecology"])
    assert tied["main_topic"]["correct"] == 1

    probs = np.array([[0.9, 0.1], [0.35, 0.8], [0.2, 0.7], [0.3, 0.2]])
    thresholds = tune_thresholds(gold, probs, ["economy", "ecology"])
    assert 0.3 < thresholds["economy"] <= 0.35
    assert 0.2 < thresholds["ecology"] <= 0.7


def test_a_label_only_validation_holds_is_named_unless_a_coarse_span_or_the_parent_teaches_it():
    schema = LabelSchema(topics=["economy", "finance"], entity_types=["address", "coach", "name"],
                         coarse={"address": "LOC", "name": "PER"})
    train_docs = [Document("a", "青澜市", topics=["economy"], entities=[Span(0, 3, "LOC")]),
                  Document("b", "李明", entities=[Span(0, 2, "name")])]
    assert _untaught_labels(schema, train_docs, None) == ["topic 'finance'", "entity type 'coach'"]
    assert _untaught_labels(schema, train_docs, LabelSchema(topics=["finance"], entity_types=["coach"])) == []


def test_a_model_of_one_topic_is_scored_on_that_topic_not_on_having_none():
    metrics = topic_metrics(np.array([[1], [1], [0]]), np.array([[0.9], [0.9], [0.9]]), [0.5], ["sports"])
    assert metrics["per_label"]["sports"] == {"precision": 0.6667, "recall": 1.0, "f1": 0.8, "support": 2}
    assert metrics["micro"]["f1"] == metrics["macro"]["f1"] == 0.8


def test_threshold_tuning_ties_stay_near_one_half_and_a_topic_without_positives_keeps_it():
    assert tune_thresholds(np.array([[1], [0]]), np.array([[0.8], [0.2]]), ["t"]) == {"t": 0.5}
    assert tune_thresholds(np.array([[0], [0]]), np.array([[0.8], [0.2]]), ["t"]) == {}  # untuned: the default
    # a continued model keeps the cut its parent tuned where this validation has no positive to tune on
    assert tune_thresholds(np.array([[0], [0]]), np.array([[0.8], [0.2]]), ["t"], {"t": 0.34}) == {"t": 0.34}


def test_a_score_counts_as_tag_shows_it_rounded():
    assert at_or_over(np.array([0.49996]), np.array([0.5])).tolist() == [True]


def test_topic_averages_leave_out_topics_neither_in_the_gold_set_nor_predicted():
    gold = np.array([[1, 0], [0, 0]])
    metrics = topic_metrics(gold, gold.astype(float), [0.5, 0.5], ["economy", "city_management"])
    assert metrics["macro"]["f1"] == metrics["micro"]["f1"] == 1.0
    assert metrics["per_label"]["city_management"]["support"] == 0


def test_a_topic_predicted_but_never_gold_counts_in_the_averages():
    gold = np.array([[1, 0], [1, 0]])
    metrics = topic_metrics(gold, np.array([[0.9, 0.9], [0.9, 0.1]]), [0.5, 0.5], ["economy", "ecology"])
    # economy: 2 right; ecology: 1 wrong, nothing to find (F1 0)
    assert metrics["micro"] == {"precision": 0.6667, "recall": 1.0, "f1": 0.8}
    assert metrics["macro"]["f1"] == 0.5


def test_mixed_fine_and_coarse_gold_is_scored_per_document():
    """CLUENER-style and MSRA-style documents in one set (a validation or gold file of each): each
    counts in the views its labels can be scored in."""
    schema = LabelSchema(entity_types=["address", "name"], coarse={"address": "LOC", "name": "PER"})
    gold = [[(0, 2, "name")], [(0, 2, "PER")], []]
    predicted = [[(0, 2, "name", 0.9)], [(0, 2, "name", 0.9)], []]
    metrics = scored_entity_metrics(gold, predicted, [5, 5, 5], schema, 0.0)
    assert metrics["entities"]["micro"]["f1"] == 1.0 and metrics["entities"]["documents"] == 2
    assert set(metrics["entities"]["per_label"]) == {"name"}
    assert metrics["entities_coarse"]["micro"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2}


def test_the_coarse_view_is_scored_only_where_the_gold_has_a_span_of_it(recwarn):
    """Over positions alone, a coarse view would read 0 as if every person, place and organisation
    were missed; its averages over no type must not print numpy's warnings either."""
    schema = LabelSchema(entity_types=["name", "position"], coarse={"name": "PER"})
    metrics = scored_entity_metrics([[(0, 2, "position")]], [[(0, 2, "position", 0.9)]], [5], schema, 0.0)
    assert metrics["entities"]["micro"]["f1"] == 1.0 and "entities_coarse" not in metrics
    missed = scored_entity_metrics([[(0, 2, "name")]], [[]], [5], schema, 0.0)
    assert missed["entities_coarse"]["micro"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_entity_threshold_tuning_on_a_hand_checked_example():
    schema = LabelSchema(entity_types=["address", "name"], coarse={"address": "LOC", "name": "PER"})
    gold = [[(0, 2, "name"), (3, 5, "address")], [(0, 3, "address")]]
    predicted = [[(0, 2, "name", 0.9), (3, 5, "address", 0.6), (6, 8, "name", 0.3)],
                 [(0, 3, "address", 0.3)]]
    # cut 0: 3 of 4 right, all 3 found (F1 0.857); over 0.3 the two 0.3s go: 2 of 2 right, 2 of 3
    # found (F1 0.8); so a cut pays only for dropping more wrong spans than right ones
    cut, metrics = tune_entity_threshold(gold, predicted, [10, 5], schema)
    assert cut == 0.0 and metrics["entities"]["micro"]["f1"] == 0.8571

    predicted[1] = []
    cut, metrics = tune_entity_threshold(gold, predicted, [10, 5], schema)
    assert cut == 0.4  # the lowest cut on the grid that drops the wrong 0.3 span; higher ties keep it
    assert metrics["entities"]["micro"] == {"precision": 1.0, "recall": 0.6667, "f1": 0.8, "support": 3}
    assert metrics["entities_coarse"]["micro"]["f1"] == 0.8


def test_evaluate_counts_each_task_only_on_documents_labelled_for_it(tiny_model_dir):
    tagger = Tagger.load(tiny_model_dir)
    docs = [Document("a", "王五住在北京", entities=[Span(0, 2, "name")]),
            Document("b", "城市管理条例", topics=["city_management"])]
    metrics = evaluate_tagger(tagger, docs, show_progress=False)
    assert metrics["entities"]["documents"] == 1
    assert metrics["topics"]["documents"] == 1


def test_a_coarse_files_sentences_without_entities_stay_out_of_the_fine_view_beside_a_fine_file(tiny_model_dir):
    tagger = Tagger.load(tiny_model_dir)
    fine = [Document("c", "王五住在北京", entities=[Span(0, 2, "name")], topics=["livelihood"])]
    coarse = [Document("m1", "王五住在北京", entities=[Span(0, 2, "PER")]), Document("m2", "今天下雨", entities=[])]
    metrics = evaluate_tagger(tagger, fine, coarse, show_progress=False)
    assert metrics["entities"]["documents"] == 1 and metrics["entities_coarse"]["documents"] == 3
    assert metrics["topics"]["documents"] == 1
    # pooled into one source, nothing tells whose the sentence without entities is: the fine view takes it
    assert evaluate_tagger(tagger, fine + coarse, show_progress=False)["entities"]["documents"] == 2


def test_coarse_labelled_data_is_scored_in_the_coarse_view(tiny_model_dir):
    tagger = Tagger.load(tiny_model_dir)
    docs = [Document("m", "王五住在北京", entities=[Span(0, 2, "PER"), Span(4, 6, "LOC")])]
    metrics = evaluate_tagger(tagger, docs, show_progress=False)
    assert "entities" not in metrics
    assert set(metrics["entities_coarse"]["per_label"]) <= {"PER", "LOC", "ORG"}
    assert metrics["entities_coarse"]["micro"]["support"] == 2


def test_topic_negatives_add_no_topic_documents_to_the_topic_training_data():
    texts = [f"滨江市第{i}号新闻稿。" for i in range(40)]
    by_topics = [Document(f"t{i}", text, topics=["economy"]) for i, text in enumerate(texts)]
    by_entities = [Document(f"e{i}", text, entities=[Span(0, 3, "address")]) for i, text in enumerate(texts)]

    def examples_with(share: float):
        config = TrainConfig(train=["a", "b"], max_length=32, stride=8, topic_negatives=share)
        return _training_examples(config, [by_topics, by_entities], [1.0, 1.0], [], tiny_tokenizer(), tiny_schema())

    (plain_docs, plain_examples, _), (train_docs, examples, valid_sources) = examples_with(0.0), examples_with(0.5)
    valid_docs = [doc for docs in valid_sources for doc in docs]
    topic_documents = sum(doc.topics is not None for doc in plain_docs)
    added = train_docs[len(plain_docs):]
    assert len(added) == round(0.5 * topic_documents) and train_docs[: len(plain_docs)] == plain_docs
    assert all(doc.topics == [] and doc.entities is None for doc in added)
    no_topic_rows = [e for e in examples if e.topics is not None and not any(e.topics)]
    assert len(examples) - len(plain_examples) == len(no_topic_rows) >= len(added)
    assert not {doc.text for doc in valid_docs} & {doc.text for doc in added}
    # the same texts from another load of the tokenizer, whose vocabulary comes in another order
    assert [doc.text for doc in examples_with(0.5)[0]] == [doc.text for doc in train_docs]


def test_no_group_is_on_both_sides_of_the_split_across_sets_or_with_a_validation_file():
    """Each set is split on its own groups; a group held out from one must not train in another."""
    topic_docs = [Document(f"t{i}", f"滨江市第{i}号报告。", topics=["economy"], group=f"r{i // 2}") for i in range(40)]
    entity_docs = [Document(f"e{i}", f"滨江市第{i}号新闻。", entities=[Span(0, 3, "address")], group=f"r{10 + i // 2}")
                   for i in range(40)]
    validation_file = [Document("v", "滨江市另一号报告。", topics=["economy"], group="r0")]
    config = TrainConfig(train=["a", "b"], max_length=32, stride=8, validation_fraction=0.25)
    train_docs, _, valid_sources = _training_examples(config, [topic_docs, entity_docs], [1.0, 1.0], [validation_file],
                                                      tiny_tokenizer(), tiny_schema())
    valid_docs = [doc for docs in valid_sources for doc in docs]
    assert not {doc.group for doc in train_docs} & {doc.group for doc in valid_docs}
    assert "r0" not in {doc.group for doc in train_docs}


def test_validation_seed_keeps_the_split_while_seed_changes_the_training_order():
    docs = [Document(f"t{i}", f"滨江市第{i}号新闻稿。", topics=["economy"]) for i in range(40)]

    def split(**seeds):
        config = TrainConfig(train=["a"], max_length=32, stride=8, **seeds)
        train_docs, _, (valid_docs,) = _training_examples(config, [docs], [1.0], [], tiny_tokenizer(), tiny_schema())
        return {doc.id for doc in train_docs}, {doc.id for doc in valid_docs}

    assert split(seed=14, validation_seed=13) == split(seed=13) != split(seed=14)
