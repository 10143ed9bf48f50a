"""Windowing, span decoding and offsets: what every caller of the tagger relies on."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from scipy.special import expit
from transformers import AutoTokenizer

from newstagger import Tagger
from newstagger.decoding import (bio_transitions, char_spans, constrained_viterbi, lenient_spans, span_score,
                                 tags_to_spans)
from newstagger.schema import LabelSchema
from newstagger.windowing import (Window, character_parts, encode_texts, pad_batch, plan_windows,
                                  token_budget_batches)

from conftest import REPO, TOPICS, tiny_tokenizer

MIXED_TEXTS = [
    "",
    "   \n\t ",
    "😀🎉🚇",
    "\x00\x07控制字符\x1b[0m",
    "北京市海淀区人民政府今天发布通知。",
    "全角ＡＢＣ１２３，半角abc123；　空格\u3000和换行\n第二行🙂结束",
    "[UNK] [CLS] 字面上的特殊记号 [SEP]",
    ("滨江市地铁5号线今日开通🚇，市长王建国出席仪式。\n" * 40) + "全文完。",
]


@pytest.fixture(scope="module")
def tagger(tiny_model_dir) -> Tagger:
    return Tagger.load(tiny_model_dir)


def test_windows_cover_every_token_once_with_overlap():
    windows = plan_windows(0, n_tokens=100, max_length=32, stride=8)
    owned = np.concatenate([np.arange(w.own_start, w.own_end) for w in windows])
    assert owned.tolist() == list(range(100))
    assert all(w.length <= 32 for w in windows)
    assert all(w.start <= w.own_start and w.own_end <= w.end for w in windows)
    assert windows[-1].end == 100
    for left, right in zip(windows, windows[1:]):
        assert left.end - right.start >= 8  # consecutive windows overlap by at least the stride


def test_each_token_is_owned_by_the_window_where_it_is_most_central():
    # overlaps are split at their middle, so every token keeps context on both sides
    windows = plan_windows(0, n_tokens=100, max_length=32, stride=8)
    assert [(w.own_start, w.own_end) for w in windows] == [(0, 26), (26, 48), (48, 70), (70, 83), (83, 100)]


def test_the_encoder_sees_cls_the_window_and_sep_as_training_feeds_it():
    encoded = encode_texts(tiny_tokenizer(), ["北京市海淀区", "王五"])
    windows = [Window(0, 1, 4, 1, 4), Window(1, 0, 2, 0, 2)]
    input_ids, attention_mask = pad_batch(encoded, windows, cls_id=101, sep_id=102, pad_id=0)
    assert input_ids[0, :5].tolist() == [101, *encoded[0].ids[1:4], 102]
    assert input_ids[1, :4].tolist() == [101, *encoded[1].ids[:2], 102]
    assert attention_mask.sum(1).tolist() == [w.length for w in windows] == [5, 4]
    assert input_ids.shape[1] % 8 == 0 and not input_ids[1, 4:].any()


def test_short_and_empty_texts_get_one_window():
    assert plan_windows(3, 0, 32, 8) == [Window(3, 0, 0, 0, 0)]
    assert plan_windows(0, 30, 32, 8) == [Window(0, 0, 30, 0, 30)]


def test_budget_batches_bucket_by_length_and_keep_every_window():
    lengths = [7, 302, 9, 122, 8, 252]
    batches = token_budget_batches(lengths, max_tokens=512)
    assert sorted(i for batch in batches for i in batch) == list(range(6))
    for batch in batches:
        assert max(lengths[i] for i in batch) * len(batch) <= 512


def test_character_parts_keep_order_and_budget_and_put_a_longer_text_alone():
    texts = ["ab", "cde", "f", "ghijklm", "", "n"]
    parts = character_parts(texts, max_chars=4)
    assert [texts[part] for part in parts] == [["ab"], ["cde", "f"], ["ghijklm"], ["", "n"]]
    assert character_parts([], max_chars=4) == []


def test_viterbi_never_emits_invalid_bio():
    rng = np.random.default_rng(0)
    num_types = 3
    transitions, start = bio_transitions(num_types)
    log_probs = [np.log(rng.dirichlet(np.ones(7), size=n)).astype(np.float32) for n in (1, 5, 40, 0, 17)]
    for path in constrained_viterbi(log_probs):
        if len(path):
            assert np.isfinite(start[path[0]])
        for previous, current in zip(path, path[1:]):
            assert np.isfinite(transitions[previous, current]), (previous, current)


def test_viterbi_keeps_entities_longer_than_two_tokens_whole():
    (path,) = constrained_viterbi([np.log(np.array([[.1, .8, .1], [.1, .1, .8], [.1, .1, .8]]))])
    assert path.tolist() == [1, 2, 2]


def test_viterbi_never_starts_a_text_inside_an_entity():
    (path,) = constrained_viterbi([np.log(np.array([[.1, .1, .8], [.1, .1, .8]]))])
    assert path.tolist() == [1, 2]


def test_argmax_spans_open_anew_where_the_type_changes():
    assert lenient_spans(np.array([1, 4])) == [(0, 1, 0), (1, 2, 1)]  # B-x then I-y: two entities


def test_an_entity_score_is_the_mean_of_its_tag_probabilities():
    assert span_score(np.array([0.9, 0.5]), 0, 2) == 0.7


def test_documents_decoded_together_get_the_paths_they_get_alone():
    """The server decodes a batch's documents at once, padded to the longest: a shorter one ending
    in an entity must keep its last token."""
    one_hot = lambda tags: np.log(np.full((len(tags), 3), 0.05) + 0.85 * np.eye(3)[tags])
    short, long = one_hot([0, 0, 1, 2]), one_hot([0] * 8)
    assert [path.tolist() for path in constrained_viterbi([short, long])] == [[0, 0, 1, 2], [0] * 8]


def test_viterbi_repairs_an_orphan_inside_tag():
    # argmax would read O I-x I-x: two fragments of nothing; the valid best is O B-x I-x
    probs = np.array([[0.9, 0.05, 0.05], [0.1, 0.4, 0.5], [0.1, 0.1, 0.8]])
    (path,) = constrained_viterbi([np.log(probs)])
    assert path.tolist() == [0, 1, 2]
    assert lenient_spans(probs.argmax(1)) == [(1, 3, 0)]


def test_spans_map_tokens_back_to_characters():
    schema = LabelSchema(entity_types=["address", "name"])
    text = "住在 北京 的王五"
    offsets = np.array([[0, 1], [1, 2], [3, 4], [4, 5], [6, 7], [7, 8], [8, 9]])
    tags = np.array([0, 0, 1, 2, 0, 3, 4])
    spans = tags_to_spans(tags, np.ones(7), offsets, text, schema)
    assert [(s["text"], s["type"]) for s in spans] == [("北京", "address"), ("王五", "name")]
    assert all(text[s["start"] : s["end"]] == s["text"] for s in spans)


def test_a_span_ends_where_its_last_token_ends_however_many_characters_it_has():
    schema = LabelSchema(entity_types=["name"])
    spans = tags_to_spans(np.array([0, 1]), np.ones(2), np.array([[0, 1], [1, 7]]), "买iPhone", schema)
    assert [(s["start"], s["end"], s["text"]) for s in spans] == [(1, 7, "iPhone")]


def test_spans_of_tokens_sharing_a_character_do_not_overlap():
    """The tokenizer spells 한 as three letters with the same offsets; a tag path may switch spans
    between them."""
    schema = LabelSchema(entity_types=["name", "organization"])
    text = "瞋한국京大"
    offsets = np.array([[0, 1], [1, 2], [1, 2], [1, 2], [2, 3], [3, 4], [4, 5]])
    tags = np.array([1, 2, 3, 4, 4, 4, 0])  # the organization opens on 한's second letter
    assert [(s["text"], s["type"]) for s in tags_to_spans(tags, np.ones(7), offsets, text, schema)] == [
        ("瞋한", "name"), ("국京", "organization")]
    tags = np.array([1, 2, 3, 0, 0, 0, 0])  # ... and ends inside it: nothing of it is left
    assert [(s["text"], s["type"]) for s in tags_to_spans(tags, np.ones(7), offsets, text, schema)] == [
        ("瞋한", "name")]


def test_tokenizer_offsets_index_the_original_string():
    tokenizer = tiny_tokenizer()
    for text, encoded in zip(MIXED_TEXTS, encode_texts(tokenizer, MIXED_TEXTS)):
        for start, end in encoded.offsets:
            assert 0 <= start < end <= len(text)


def test_a_token_ends_after_the_combining_marks_the_normalizer_stripped():
    """A decomposed accent ending a name stays in the name's span."""
    text = "Jose\u0301 和 佛\u0301\u0302山 e\u0301 ☺\ufe0f市 ชี"  # the last two marks have combining class 0
    (encoded,) = encode_texts(tiny_tokenizer(), [text])
    assert [text[start:end] for start, end in encoded.offsets] == ["Jose\u0301", "和", "佛\u0301\u0302", "山",
                                                                   "e\u0301", "☺\ufe0f", "市", "ชี"]


@pytest.mark.parametrize(("text", "pieces"), [
    ("王\u20dd市", ["王\u20dd", "王\u20dd", "市"]),  # an enclosing mark the tokenizer keeps as a token
    ("#\ufe0f\u20e3", ["#\ufe0f\u20e3"] * 2),  # a keycap
    ("王🏻", ["王🏻"] * 2),  # a skin tone
    ("王\u200d市", ["王\u200d市"] * 2),  # what follows a zero-width joiner
    ("王\u0301\u200d\u0302 张\u200c", ["王\u0301\u200d\u0302", "张\u200c"]),  # marks and joiners it drops
    ("王\ue000 \ue001明", ["王\ue000", "\ue001明"]),  # private-use characters (rare characters of names)
])
def test_tokens_begin_and_end_on_whole_characters(text, pieces):
    """So that no entity begins or ends inside a character as a reader sees it, or loses one the
    tokenizer dropped; tokens of one character share its offsets, as a Hangul syllable's letters do."""
    (encoded,) = encode_texts(tiny_tokenizer(), [text])
    assert [text[start:end] for start, end in encoded.offsets] == pieces


FLAG_OF_ENGLAND = "\U0001f3f4\U000e0067\U000e0062\U000e0065\U000e006e\U000e0067\U000e007f"


@pytest.mark.parametrize(("text", "pieces"), [
    # decomposed Korean: each letter is a character of the string, and a vowel or final continues its syllable
    ("与\u1112\u1161\u11ab\u1103\u1169\u11bc说",
     ["与", *["\u1112\u1161\u11ab"] * 3, *["\u1103\u1169\u11bc"] * 3, "说"]),
    ("长한\u0301说", ["长", *["한\u0301"] * 3, "说"]),  # the accent reaches every letter of the syllable
    (f"英{FLAG_OF_ENGLAND}队", ["英", FLAG_OF_ENGLAND, "队"]),  # the tag characters the normalizer drops
    ("王\uff9e市", ["王\uff9e", "王\uff9e", "市"]),  # a half-width kana sound mark
])
def test_tokens_of_the_shipped_vocabulary_begin_and_end_on_whole_characters(text, pieces):
    """The shipped tokenizer spells a Hangul syllable as letters, which the tiny vocabulary cannot."""
    (encoded,) = encode_texts(AutoTokenizer.from_pretrained(REPO / "models" / "default"), [text])
    assert [text[start:end] for start, end in encoded.offsets] == pieces


def test_an_entity_tagged_on_part_of_a_character_covers_all_of_it():
    (encoded,) = encode_texts(tiny_tokenizer(), ["王\u20dd"])
    spans = char_spans(np.array([1, 1]), np.ones(2), encoded.offsets)  # B- on both tokens: two entities
    assert [(start, end) for start, end, _, _ in spans] == [(0, 2)]


def test_special_token_names_in_a_story_are_text():
    tokenizer = tiny_tokenizer()
    text = "市长[CLS]和[SEP]、[PAD]"
    (encoded,) = encode_texts(tokenizer, [text])
    control = {tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id}
    assert not set(encoded.ids) & control  # this vocabulary has no "[" or "cls": those characters are [UNK]
    assert [text[start:end] for start, end in encoded.offsets][2:5] == ["[", "CLS", "]"]


def test_tag_offsets_are_exact_on_long_mixed_and_emoji_text(tagger):
    results = tagger.tag(MIXED_TEXTS)
    assert len(results) == len(MIXED_TEXTS)
    for text, result in zip(MIXED_TEXTS, results):
        assert set(result["topics"]) == set(tagger.schema.topics)
        assert all(0.0 <= score <= 1.0 for score in result["topics"].values())
        previous_end = 0
        for entity in result["entities"]:
            assert entity["text"] == text[entity["start"] : entity["end"]]
            assert entity["start"] >= previous_end  # sorted, no duplicates or overlaps from windows
            previous_end = entity["end"]
    assert results[0]["entities"] == [] and results[1]["entities"] == []


def test_a_text_without_tokens_scores_no_topic(tagger):
    """An empty or blank story is no evidence: the heads' answer to a bare [CLS] [SEP] is their prior."""
    for result in tagger.tag(["", "   \n\t ", "\u200b"]):
        assert result == {"topics": {topic: 0.0 for topic in tagger.schema.topics}, "labels": [], "entities": []}


def spans_of(result: dict) -> list[tuple[int, int, str]]:
    return [(e["start"], e["end"], e["type"]) for e in result["entities"]]


@pytest.mark.parametrize("text, neighbours", [(MIXED_TEXTS[-1], ["短句。", "另一个短句"]),
                                              ("短句。", ["一个长一些的句子，有十几个字。"])])  # padded beside it
def test_batch_neighbours_do_not_change_a_document_result(tagger, text, neighbours):
    """Bucketing and padding with other documents leave a text's spans and scores as they were."""
    alone = tagger.tag([text])[0]
    batched = tagger.tag([neighbours[0], text, *neighbours[1:]])[1]
    assert spans_of(alone) == spans_of(batched)
    for topic, score in alone["topics"].items():
        assert batched["topics"][topic] == pytest.approx(score, abs=1e-4)


class FirstTokenTopics:
    """A backend scoring each window's topics by its first token, and every tag alike."""

    batch_tokens = 4096

    def __init__(self, num_tags: int):
        self.num_tags = num_tags

    def __call__(self, input_ids, attention_mask):
        topic_logits = np.repeat((input_ids[:, 1:2] % 7 - 3).astype(np.float32), len(TOPICS), axis=1)
        return topic_logits, np.full((*input_ids.shape, self.num_tags), -np.log(self.num_tags), dtype=np.float32)


class TagsByCharacter:
    """A backend tagging the tokens of given characters with given tags, O elsewhere, every window alike."""

    batch_tokens = 4096

    def __init__(self, tagger: Tagger, tags: dict[str, str]):
        vocab, names = tagger.tokenizer.get_vocab(), tagger.schema.tags
        self.num_tags, self.tag_of = len(names), {vocab[char]: names.index(tag) for char, tag in tags.items()}

    def __call__(self, input_ids, attention_mask):
        wanted = np.vectorize(lambda token: self.tag_of.get(int(token), 0))(input_ids)
        probs = np.full((*input_ids.shape, self.num_tags), 0.02 / self.num_tags, dtype=np.float32)
        np.put_along_axis(probs, wanted[..., None], 0.98, axis=-1)
        return np.zeros((len(input_ids), len(TOPICS)), np.float32), np.log(probs)


def test_an_entity_sits_on_the_tokens_the_model_tagged_in_every_window(tagger):
    text = "昨天王五来了。" + "今天天气很好，大家都出门散步。" * 4 + "王五"  # 69 tokens: three windows of 32
    stubbed = Tagger(tagger.model, tagger.tokenizer, tagger.meta,
                     backend=TagsByCharacter(tagger, {"王": "B-name", "五": "I-name"}))
    assert spans_of(stubbed.tag([text])[0]) == [(2, 4, "name"), (len(text) - 2, len(text), "name")]


def test_the_tagger_repairs_an_inside_tag_of_another_type_than_its_begin(tagger):
    stubbed = Tagger(tagger.model, tagger.tokenizer, tagger.meta,
                     backend=TagsByCharacter(tagger, {"王": "B-name", "五": "I-company"}))
    spans = spans_of(stubbed.tag(["昨天王五来了。"])[0])
    assert (3, 4, "company") not in spans and len(spans) == 1  # one entity, never a fragment at 五


def test_topic_scores_weigh_each_window_by_the_tokens_it_owns(tagger):
    text = MIXED_TEXTS[-1][:60]  # three windows owning 26, 14 and 18 tokens
    stubbed = Tagger(tagger.model, tagger.tokenizer, tagger.meta, backend=FirstTokenTopics(len(tagger.schema.tags)))
    [encoded] = encode_texts(tagger.tokenizer, [text])
    windows = plan_windows(0, len(encoded.ids), tagger.meta.max_length, tagger.meta.stride)
    window_probs = [expit(encoded.ids[w.start] % 7 - 3) for w in windows]
    expected = np.average(window_probs, weights=[w.own_end - w.own_start for w in windows])
    assert abs(np.mean(window_probs) - expected) > 0.01  # a plain mean over windows would fail below
    assert all(abs(score - expected) < 1e-3 for score in stubbed.tag([text])[0]["topics"].values())


def test_a_topic_scoring_exactly_its_threshold_is_a_label(tagger):
    scores = tagger.tag([MIXED_TEXTS[2]])[0]["topics"]
    assert sorted(tagger.tag([MIXED_TEXTS[2]], thresholds=scores)[0]["labels"]) == tagger.schema.topics


def test_thresholds_and_type_filter(tagger):
    text = MIXED_TEXTS[-1]
    everything = tagger.tag([text], thresholds={t: 0.0 for t in tagger.schema.topics})[0]
    assert everything["labels"] == sorted(tagger.schema.topics, key=lambda t: -everything["topics"][t])
    nothing = tagger.tag([text], thresholds={t: 1.0 for t in tagger.schema.topics}, entity_types=[])[0]
    assert nothing["labels"] == [t for t, p in nothing["topics"].items() if p == 1.0] and nothing["entities"] == []


def test_entities_below_the_models_entity_threshold_are_dropped(tagger):
    text = MIXED_TEXTS[-1]
    every = tagger.tag([text], entity_threshold=0.0)[0]["entities"]
    assert len({e["score"] for e in every}) > 1, "the tiny model should find entities of different scores"
    cut = float(np.median([e["score"] for e in every]))
    kept = [e for e in every if e["score"] >= cut]

    assert tagger.tag([text], entity_threshold=cut)[0]["entities"] == kept
    picky = Tagger(tagger.model, tagger.tokenizer, replace(tagger.meta, entity_threshold=cut))
    assert picky.tag([text])[0]["entities"] == kept  # the model's own threshold is the default
    assert picky.tag([text], entity_threshold=0.0)[0]["entities"] == every
    assert picky.with_options({"topics": {}, "entities": every})["entities"] == kept


@pytest.mark.parametrize("texts, message", [(["好", "第二篇\ud800稿件"], "texts\\[1\\] has a lone surrogate at character 3"),
                                            (["好", None], "texts\\[1\\] is a NoneType, not a str")])
def test_the_python_api_names_a_text_the_tokenizer_cannot_take(tagger, texts, message):
    with pytest.raises(ValueError, match=message):
        tagger.tag(texts)


@pytest.mark.parametrize("texts, message", [("市长李明", "not a str: wrap a single text in a list"),
                                            (None, "not a NoneType"), (b"abc", "not a bytes"),
                                            ({"市长李明": 1}, "not a dict")])
def test_the_python_api_refuses_what_is_not_a_list_of_texts(tagger, texts, message):
    """A string is iterable: each character would be tagged as a story of its own."""
    with pytest.raises(TypeError, match=f"texts must be a list of str, {message}"):
        tagger.tag(texts)


def test_the_python_api_takes_any_iterable_of_texts_and_results_are_new_objects(tagger):
    texts = ["李明到青澜市。", "王芳说。"]
    expected = tagger.tag(texts, entity_threshold=0.0)
    assert tagger.tag(iter(texts), entity_threshold=0.0) == tagger.tag(np.array(texts), entity_threshold=0.0) == expected
    relabelled = tagger.with_options(expected[0])
    relabelled["topics"][TOPICS[0]] = -1.0
    assert expected[0]["topics"][TOPICS[0]] != -1.0
    with pytest.raises(ValueError, match="encoded holds 1 encodings for 2 texts"):
        tagger.tag(texts, encoded=tagger.encode(texts[:1]))


def test_the_python_api_scores_many_texts_in_parts_with_the_results_of_one_call(tagger, monkeypatch):
    """A large call is cut so its working memory stays bounded; where it is cut changes no result."""
    texts = [*MIXED_TEXTS, "短句。", "李明到青澜市。"]
    whole = tagger.tag(texts, entity_threshold=0.0)
    encoded = tagger.encode(texts)
    monkeypatch.setattr("newstagger.tagger.PART_CHARS", 20)
    scored = []
    monkeypatch.setattr(tagger, "score", lambda part, enc: scored.append(len(part)) or Tagger.score(tagger, part, enc))
    for parted in tagger.tag(texts, entity_threshold=0.0), tagger.tag(texts, entity_threshold=0.0, encoded=encoded):
        assert [spans_of(r) for r in parted] == [spans_of(r) for r in whole]
        for got, expected in zip(parted, whole):
            assert got["topics"] == pytest.approx(expected["topics"], abs=1e-4)
    assert len(scored) > 2 and sum(scored) == 2 * len(texts)


@pytest.mark.parametrize("options, message", [
    ({"entity_types": "address"}, "entity_types must be a collection of types, not the string 'address'"),
    ({"entity_types": ["adress"]}, r"entity_types: unknown \['adress'\]"),
    ({"thresholds": {"City_management": 0.0}}, "thresholds: unknown topic 'City_management'"),
    ({"thresholds": {"livelihood": -1}}, r"thresholds\['livelihood'\] must be between 0 and 1"),
    ({"thresholds": {"livelihood": 1.5}}, r"thresholds\['livelihood'\] must be between 0 and 1"),
    ({"entity_threshold": 40}, "entity_threshold must be between 0 and 1, not 40"),
])
def test_the_python_api_refuses_options_that_would_silently_change_nothing(tagger, options, message):
    """As the CLI and the server do: a typo must not quietly drop every entity or ignore a threshold."""
    with pytest.raises(ValueError, match=message):
        tagger.tag(["滨江市人民政府"], **options)
    assert tagger.tag(["滨江市人民政府"], entity_types=iter(["address"]))  # any iterable of known types is fine
