"""The lexical topic model: its features, its folder files (no pickle), blending in the tagger, and
fitting, weighting and saving it at the end of training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer

import training.train
from newstagger import Tagger
from newstagger.cli import main
from newstagger.documents import DataError
from newstagger.lexical import SETTINGS_FILE, WEIGHTS_FILE, LexicalTopicModel
from newstagger.model import load_model_folder
from training.data import read_documents
from training.train import train

from conftest import SAMPLE, TOPICS
from test_training import tiny_base, tiny_train_config  # noqa: F401  (tiny_base is a fixture)

ODD_TEXTS = ["", "市", "Ａ股  大涨\n\n\t两成", "青澜市 APP 上线🚇，  地铁 5 号线"]


@pytest.fixture(scope="module")
def sample():
    return read_documents(SAMPLE)


@pytest.fixture(scope="module")
def fitted(sample) -> LexicalTopicModel:
    model = LexicalTopicModel.fit([doc.text for doc in sample], [doc.topics for doc in sample], TOPICS)
    model.weight = 0.5
    return model


def test_features_are_scikit_learns_char_tfidf(fitted, sample):
    reference = TfidfVectorizer(analyzer="char", ngram_range=(1, 3), sublinear_tf=True,
                                vocabulary={gram: i for i, gram in enumerate(fitted.vocabulary)})
    reference.idf_ = fitted.idf.astype(np.float64)
    texts = [doc.text for doc in sample] + ODD_TEXTS
    np.testing.assert_allclose(fitted.features(texts).toarray(), reference.transform(texts).toarray(), atol=1e-6)


def test_save_load_round_trip_without_pickle_gives_identical_probabilities(fitted, sample, tmp_path):
    fitted.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {WEIGHTS_FILE, SETTINGS_FILE}
    settings = json.loads((tmp_path / SETTINGS_FILE).read_text(encoding="utf-8"))
    assert settings["topics"] == TOPICS and settings["blend_weight"] == 0.5 and settings["ngram_range"] == [1, 3]

    loaded = LexicalTopicModel.load(tmp_path, TOPICS)
    assert loaded.vocabulary == fitted.vocabulary and loaded.weight == 0.5
    texts = [doc.text for doc in sample] + ODD_TEXTS
    assert np.array_equal(loaded.predict(texts), fitted.predict(texts))
    assert LexicalTopicModel.load(tmp_path / "elsewhere", TOPICS) is None


def test_it_learns_the_sample_topics(fitted, sample):
    gold = np.array([[topic in doc.topics for topic in TOPICS] for doc in sample])
    assert ((fitted.predict([doc.text for doc in sample]) >= 0.5) == gold).mean() > 0.9


def test_blending_changes_only_topic_scores(tiny_model_dir, fitted, sample, tmp_path):
    blended_dir = Path(shutil.copytree(tiny_model_dir, tmp_path / "blended"))
    fitted.save(blended_dir)
    plain, blended = Tagger.load(tiny_model_dir), Tagger.load(blended_dir)
    assert plain.topic_lexical is None and blended.topic_lexical.weight == 0.5

    texts = [doc.text for doc in sample[:8]] + ["滨江市人民政府今天宣布，地铁5号线将于年底开通。" * 10]
    plain_probs, plain_log_probs, _ = plain.score(texts)
    blended_probs, blended_log_probs, _ = blended.score(texts)
    np.testing.assert_allclose(blended_probs, 0.5 * plain_probs + 0.5 * fitted.predict(texts), rtol=1e-6)
    assert not np.allclose(blended_probs, plain_probs)
    assert all(np.array_equal(a, b) for a, b in zip(plain_log_probs, blended_log_probs))
    assert [r["entities"] for r in plain.tag(texts)] == [r["entities"] for r in blended.tag(texts)]


def test_evaluate_scores_topics_at_another_blend_weight(tiny_model_dir, fitted, tmp_path, capsys):
    blended_dir = Path(shutil.copytree(tiny_model_dir, tmp_path / "blended"))
    fitted.save(blended_dir)

    def topic_f1(*flags: str) -> float:
        assert main(["evaluate", "--model", str(blended_dir), "--data", str(SAMPLE), *flags]) == 0
        return json.loads(capsys.readouterr().out)["topics"]["micro"]["f1"]

    lexical_alone, head_alone = topic_f1("--topic-blend", "1"), topic_f1("--topic-blend", "0")
    assert lexical_alone > 0.9 > head_alone  # fitted on these very stories; the tiny head is random
    assert topic_f1() > head_alone  # the folder's own weight, 0.5

    assert main(["evaluate", "--model", str(blended_dir), "--data", str(SAMPLE), "--topic-blend", "2"]) == 2
    assert main(["evaluate", "--model", str(tiny_model_dir), "--data", str(SAMPLE), "--topic-blend", "0"]) == 2
    assert "no lexical topic model" in capsys.readouterr().err


def edit_settings(**changes):
    def damage(folder):
        settings = json.loads((folder / SETTINGS_FILE).read_text(encoding="utf-8"))
        (folder / SETTINGS_FILE).write_text(json.dumps({**settings, **changes}), encoding="utf-8")
    return damage


@pytest.mark.parametrize(("damage", "reason"), [
    (lambda folder: (folder / SETTINGS_FILE).write_text("{"), "JSONDecodeError"),
    (lambda folder: (folder / WEIGHTS_FILE).unlink(), "FileNotFoundError"),
    (lambda folder: (folder / WEIGHTS_FILE).write_bytes(b"\xff" * 64), "SafetensorError"),
    (edit_settings(vocabulary=None), "TypeError"),
    (lambda folder: edit_settings(vocabulary=json.loads((folder / SETTINGS_FILE).read_text())["vocabulary"][:-5])(folder),
     "idf has shape"),
    (edit_settings(topics=TOPICS[::-1]), "are not the model's"),
    (edit_settings(blend_weight=5.0), "blend_weight must be from 0 to 1, not 5.0"),
    (edit_settings(blend_weight=float("nan")), "blend_weight must be from 0 to 1, not nan"),
    (edit_settings(ngram_range=[1, 4]), "ngram_range must be two lengths from 1 to 3"),
])
def test_a_damaged_component_is_refused_naming_its_files(fitted, tmp_path, damage, reason):
    fitted.save(tmp_path)
    damage(tmp_path)
    with pytest.raises(DataError, match=f"{SETTINGS_FILE} with {WEIGHTS_FILE} is not a usable") as refused:
        LexicalTopicModel.load(tmp_path, TOPICS)
    assert reason in str(refused.value)


def test_a_folder_without_the_component_tags_as_before(tiny_model_dir, sample):
    model, tokenizer, meta = load_model_folder(tiny_model_dir)
    texts = [doc.text for doc in sample[:8]]
    assert Tagger.load(tiny_model_dir, backend="torch", precision="fp32").tag(texts) == \
        Tagger(model, tokenizer, meta).tag(texts)


def test_a_component_for_other_topics_is_refused(tiny_model_dir, fitted):
    model, tokenizer, meta = load_model_folder(tiny_model_dir)
    other = LexicalTopicModel(TOPICS[::-1], fitted.vocabulary, fitted.idf, fitted.coef, fitted.intercept, 0.5)
    with pytest.raises(ValueError, match="topics"):
        Tagger(model, tokenizer, meta, topic_lexical=other)


def test_training_fits_weights_and_saves_the_component_and_a_zero_weight_removes_it(tiny_base, tmp_path,
                                                                                    monkeypatch):
    output = tmp_path / "model"
    monkeypatch.setattr(training.train, "BLEND_WEIGHTS", (0.5,))
    _, metrics = train(tiny_train_config(tiny_base, output))
    assert (output / WEIGHTS_FILE).is_file() and (output / SETTINGS_FILE).is_file()
    report = json.loads((output / "newstagger.json").read_text())["training"]["topic_blend"]
    assert report["weight"] == 0.5 and set(report) >= {"bert", "lexical", "blend"}
    assert report["blend"]["micro_f1"] == metrics["topics"]["micro"]["f1"]
    assert report["blend"]["macro_f1"] == metrics["topics"]["macro"]["f1"]
    assert '"topic_blend"' in (output / "README.md").read_text()
    assert Tagger.load(output).topic_lexical.weight == 0.5

    # resuming the finished run redoes the final part: the topic head alone wins, so no component
    monkeypatch.setattr(training.train, "BLEND_WEIGHTS", (0.0,))
    train(tiny_train_config(tiny_base, output, resume=True))
    assert not (output / WEIGHTS_FILE).exists() and not (output / SETTINGS_FILE).exists()
    assert json.loads((output / "newstagger.json").read_text())["training"]["topic_blend"]["weight"] == 0.0
    assert Tagger.load(output).topic_lexical is None

    train(tiny_train_config(tiny_base, output, resume=True, topic_lexical=False))
    assert "topic_blend" not in json.loads((output / "newstagger.json").read_text())["training"]


def test_the_blend_weight_is_chosen_up_to_max_topic_blend(tiny_base, tmp_path):
    train(tiny_train_config(tiny_base, tmp_path / "model", max_topic_blend=0.25))
    report = json.loads((tmp_path / "model" / "newstagger.json").read_text())["training"]["topic_blend"]
    assert set(report["mean_f1_by_weight"]) == {"0.0", "0.25"} and report["weight"] <= 0.25


def test_a_continued_model_keeps_its_parents_cuts_where_validation_is_too_small(tiny_base, tmp_path, monkeypatch):
    """Retraining on a few corrections holds out a few stories: no cut is chosen on those."""
    parent = tmp_path / "parent"
    monkeypatch.setattr(training.train, "BLEND_WEIGHTS", (0.5,))
    train(tiny_train_config(tiny_base, parent))
    parent_meta = json.loads((parent / "newstagger.json").read_text())
    parent_meta.update(thresholds={"economy": 0.27, "ecology": 0.35, "city_management": 0.62}, entity_threshold=0.4)
    (parent / "newstagger.json").write_text(json.dumps(parent_meta))

    child = tmp_path / "child"
    train(tiny_train_config(tiny_base, child, init_model=str(parent), min_tuning_documents=50, max_steps=1))
    meta = json.loads((child / "newstagger.json").read_text())
    # livelihood was never tuned: it stays at the default, and the child does not record 0.5 as if it had been
    assert meta["thresholds"] == {"economy": 0.27, "ecology": 0.35, "city_management": 0.62}
    assert meta["entity_threshold"] == 0.4
    assert meta["training"]["topic_blend"] == {"weight": 0.5, "kept_from": parent_meta["version"]}
    assert Tagger.load(child).topic_lexical.weight == 0.5
    assert "w = 0.5 kept from 9.9.9" in (child / "README.md").read_text()

    # A new topic: the parent's lexical model cannot score it, so one is fitted with the parent's weight.
    stories = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()]
    stories[0]["topics"] = ["culture"]
    grown_data = tmp_path / "grown.jsonl"
    grown_data.write_text("".join(json.dumps(story, ensure_ascii=False) + "\n" for story in stories), encoding="utf-8")
    grown = tmp_path / "grown"
    train(tiny_train_config(tiny_base, grown, init_model=str(parent), train=[f"{grown_data}:internal"],
                            min_tuning_documents=50, max_steps=1))
    lexical_model = Tagger.load(grown).topic_lexical
    assert lexical_model.weight == 0.5 and "culture" in lexical_model.topics

    # Told to have no lexical model, a continued model keeps none.
    plain = tmp_path / "plain"
    train(tiny_train_config(tiny_base, plain, init_model=str(parent), min_tuning_documents=50, max_steps=1,
                            topic_lexical=False))
    assert Tagger.load(plain).topic_lexical is None

