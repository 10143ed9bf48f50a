import json
import logging
import random
import re
from pathlib import Path

import datasets
import pytest

from newstagger.documents import DataError, Document, Span, validate
from conftest import CLUENER_TYPES, SAMPLE, SHARED, TOPICS, needs_shared
from training.data import (
    FORMATS,
    corpus_stats,
    guess_format,
    holds_no_records,
    no_topic_documents,
    parse_data_spec,
    read_documents,
    split_validation,
    to_hf_dataset,
)

FIXTURES = Path(__file__).parent / "fixtures"
SHARED_DATA = SHARED / "data"


def mentions(doc: Document) -> list[tuple[str, str]]:
    return [(doc.text[span.start : span.end], span.type) for span in doc.entities]


def write(tmp_path: Path, name: str, content: str) -> Path:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    return path


def test_cluener_ends_become_exclusive_and_duplicates_collapse():
    docs = read_documents(FIXTURES / "cluener.json", "cluener")
    assert [doc.id for doc in docs] == ["cluener-1", "cluener-2", "cluener-3"]
    assert all(doc.topics is None for doc in docs)
    assert mentions(docs[0]) == [("杭州市西湖区政府", "government"), ("张明", "name"), ("区长助理", "position")]
    # The source lists [0, 5] twice; one span per stretch of text survives.
    assert mentions(docs[1]) == [("《江南渔事》", "book"), ("《江南渔事》", "book")]
    assert docs[2].entities == []


def test_bio_columns():
    docs = read_documents(FIXTURES / "msra.bio", "columns")
    assert [(doc.id, doc.text) for doc in docs] == [("msra-1", "王芳到南京"), ("msra-7", "新华社报道")]
    assert mentions(docs[0]) == [("王芳", "PER"), ("南京", "LOC")]
    assert mentions(docs[1]) == [("新华社", "ORG")]
    assert docs[0].topics is None


def test_bmes_columns_with_space_separator():
    docs = read_documents(FIXTURES / "resume.bmes", "columns")
    assert mentions(docs[0]) == [("李", "NAME"), ("华为公司", "ORG"), ("工程师", "TITLE")]
    assert docs[1].text == "本科" and docs[1].entities == []


def test_label_studio_uses_latest_live_annotation(caplog):
    with caplog.at_level(logging.WARNING):
        docs = read_documents(FIXTURES / "labelstudio.json", "labelstudio")
    assert "skipped 1 of 4 tasks" in caplog.text  # task 103 was never annotated
    first, market, park = docs
    assert (first.id, first.group) == ("101", "report-a")
    # Annotation 3 is newer but cancelled; annotation 2 is newer than 1.
    assert first.topics == ["city_management", "livelihood"]
    assert mentions(first) == [("滨江新区", "address"), ("市长", "position"), ("刘洋", "name")]
    # The export labels spans and topics, so a task without spans has no entities rather than unknown
    # ones, and one with no choice ticked (Label Studio then stores no choices result) no topic.
    assert market.topics == ["city_management"] and market.entities == []
    assert park.topics == [] and park.entities == []


def test_a_label_studio_export_without_choices_has_no_topic_labels(tmp_path):
    task = {"id": 1, "data": {"text": "刘洋出席。"}, "annotations": [{"id": 1, "result": [
        {"type": "labels", "value": {"start": 0, "end": 2, "labels": ["name"]}}]}]}
    path = tmp_path / "spans-only.json"
    path.write_text(json.dumps([task]), encoding="utf-8")
    (doc,) = read_documents(path, "labelstudio")
    assert doc.topics is None and doc.entities == [Span(0, 2, "name")]


def test_a_label_studio_export_of_two_projects_reads_what_each_project_labels(tmp_path):
    spans = {"type": "labels", "value": {"start": 0, "end": 2, "labels": ["name"]}}
    topics = {"type": "choices", "value": {"choices": ["livelihood"]}}
    tasks = [{"id": 1, "project": 3, "data": {"text": "刘洋出席。"}, "annotations": [{"id": 1, "result": [spans]}]},
             {"id": 2, "project": 4, "data": {"text": "刘洋出席。"}, "annotations": [{"id": 2, "result": [topics]}]},
             {"id": 3, "project": 4, "data": {"text": "今天开会。"}, "annotations": [{"id": 3, "result": []}]}]
    path = tmp_path / "two-projects.json"
    path.write_text(json.dumps(tasks), encoding="utf-8")
    spans_project, topics_project, no_topic = read_documents(path, "labelstudio")
    assert spans_project.topics is None and spans_project.entities == [Span(0, 2, "name")]
    assert topics_project.topics == ["livelihood"] and topics_project.entities is None
    assert no_topic.topics == [] and no_topic.entities is None


def write_tasks(path, results, **task):
    path.write_text(json.dumps([{"id": 1, "data": {"text": "刘洋出席。", "title": "刘洋"}, **task,
                                 "annotations": [{"id": 1, "result": results}]}]), encoding="utf-8")
    return path


def test_a_label_studio_export_with_a_second_control_of_a_kind_is_refused_naming_both(tmp_path):
    topics = {"from_name": "topics", "to_name": "text", "type": "choices", "value": {"choices": ["livelihood"]}}
    quality = {"from_name": "quality", "to_name": "text", "type": "choices", "value": {"choices": ["needs_review"]}}
    with pytest.raises(DataError, match=r"choices results come from 2 controls \(quality on text, topics on text\)"):
        read_documents(write_tasks(tmp_path / "two-choices.json", [topics, quality]), "labelstudio")
    title_span = {"from_name": "title_ner", "to_name": "title", "type": "labels",
                  "value": {"start": 0, "end": 2, "labels": ["name"]}}
    text_span = {**title_span, "from_name": "ner", "to_name": "text"}
    with pytest.raises(DataError, match=r"labels results come from 2 controls \(ner on text, title_ner on title\)"):
        read_documents(write_tasks(tmp_path / "two-labels.json", [text_span, title_span]), "labelstudio")


def test_a_control_name_that_is_not_a_string_is_read_not_a_traceback(tmp_path):
    span = {"from_name": ["ner"], "to_name": "text", "type": "labels", "value": {"start": 0, "end": 2, "labels": ["name"]}}
    (doc,) = read_documents(write_tasks(tmp_path / "odd-names.json", [span]), "labelstudio")
    assert doc.entities == [Span(0, 2, "name")]


def test_a_per_region_choice_is_not_read_as_a_topic(tmp_path):
    per_region = {"from_name": "ner", "to_name": "text", "type": "choices",
                  "value": {"start": 0, "end": 2, "choices": ["economy"]}}
    with pytest.raises(DataError, match=r"\[0\]: a choices result with a span \(from_name 'ner'\) is a per-region"):
        read_documents(write_tasks(tmp_path / "per-region.json", [per_region]), "labelstudio")


def test_a_label_studio_export_from_before_1_0_reads_its_completions(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps([{"id": 1, "data": {"text": "刘洋出席。"}, "completions": [{"id": 1, "result": [
        {"type": "labels", "value": {"start": 0, "end": 2, "labels": ["name"]}}]}]}]), encoding="utf-8")
    (doc,) = read_documents(path, "labelstudio")
    assert doc.entities == [Span(0, 2, "name")]


def test_doccano_entities_as_lists_are_guessed_as_doccano(tmp_path):
    path = tmp_path / "lists.jsonl"
    path.write_text('{"id": 1, "text": "刘洋出席。", "entities": [[0, 2, "name"]]}\n', encoding="utf-8")
    assert guess_format(path) == "doccano"


def test_doccano_span_labels():
    docs = read_documents(FIXTURES / "doccano_spans.jsonl", "doccano")
    assert [doc.id for doc in docs] == ["1", "2", "doccano_spans-3"]
    assert mentions(docs[0]) == [("深圳湾公园", "scene"), ("市图书馆", "organization")]
    assert docs[1].entities == [] and docs[1].topics is None
    assert mentions(docs[2]) == [("绿源科技", "company"), ("开发区", "address")]


def test_doccano_categories_and_entity_objects():
    docs = read_documents(FIXTURES / "doccano_cats.jsonl", "doccano")
    assert docs[0].topics == ["livelihood"] and mentions(docs[0]) == [("市人社局", "government")]
    assert docs[1].topics == ["ecology", "city_management"] and docs[1].entities is None
    # Elsewhere in the file 'label' holds categories, so an empty one means no topic.
    assert docs[2].topics == [] and docs[2].entities is None


def test_doccano_labels_is_read_as_label_and_a_misspelt_label_field_is_an_error(tmp_path):
    """Some doccano versions write "labels"; a misspelt field would otherwise drop its record's labels."""
    labels = write(tmp_path, "labels.jsonl", '{"id": 1, "text": "李四在上海", "labels": [[0, 2, "name"], [3, 5, "address"]]}\n')
    assert guess_format(labels) == "doccano"
    assert mentions(read_documents(labels)[0]) == [("李四", "name"), ("上海", "address")]
    both = write(tmp_path, "both.jsonl", '{"id": 1, "text": "李四", "label": [[0, 2, "name"]], "labels": [[0, 2, "name"]]}\n')
    with pytest.raises(DataError, match=r"both.jsonl:1: both 'label' and 'labels' given"):
        read_documents(both, "doccano")
    misspelt = write(tmp_path, "misspelt.jsonl", '{"id": 1, "text": "张三在北京", "label": [[0, 2, "name"]]}\n'
                     '{"id": 2, "text": "李四在上海", "lable": [[0, 2, "name"]]}\n')
    with pytest.raises(DataError, match=r"misspelt.jsonl:2: field 'lable' is not read; did you mean 'label'\?"):
        read_documents(misspelt, "doccano")


def test_a_doccano_file_whose_first_line_json_cannot_read_fails_on_that_line(tmp_path):
    for name, line in [("deep.jsonl", "[" * 100_000), ("long.jsonl", '{"id": ' + "9" * 5000 + ', "text": "x"}')]:
        with pytest.raises(DataError, match=rf"{name}:1: not valid JSON"):
            read_documents(write(tmp_path, name, line + "\n"), "doccano")


def test_a_cluener_span_given_as_two_mentions_is_an_error(tmp_path):
    line = '{"text": "青澜市叶老桂出席", "label": {"name": {"叶老": [[3, 5]], "叶老桂": [[3, 5]]}}}\n'
    with pytest.raises(DataError, match=r"two.json:1: name span \[3, 5\] is given as both '叶老' and '叶老桂'"):
        read_documents(write(tmp_path, "two.json", line), "cluener")


def test_internal_jsonl():
    docs = read_documents(FIXTURES / "internal.jsonl", "internal")
    assert [(doc.id, doc.group) for doc in docs] == [("a1", "city-a"), ("a2", "city-a"), ("b1", "city-b"), ("c1", None)]
    assert mentions(docs[0]) == [("东湖新城", "address")]
    assert docs[1].entities is None and docs[3].topics is None


@pytest.mark.parametrize(
    "name, format, content, labels, message",
    [
        ("out.json", "cluener", '{"text": "青澜市", "label": {"address": {"青澜市": [[1, 3]]}}}\n', {},
         r"out.json:1: .*outside the text"),
        ("bad.json", "cluener", '{"text": "青澜市", "label": {"address": {"青澜": [[1, 2]]}}}\n', {},
         r"bad.json:1: .*'澜市' but the source says '青澜'"),
        ("crossing.json", "cluener", '{"text": "青澜市长", "label": {"address": {"青澜市": [[0, 2]]}, "position": {"市长": [[2, 3]]}}}\n', {},
         r"crossing.json:1: .*overlap"),
        ("types.json", "cluener", '{"text": "青澜市", "label": {"city": {"青澜市": [[0, 2]]}}}\n', {"entity_types": CLUENER_TYPES},
         r"types.json:1: unknown entity type 'city'"),
        ("stray.bio", "columns", "王\tB-PER\n芳\tI-PER\n\n到\tO\n京\tI-LOC\n", {},
         r"stray.bio:5: tag 'I-LOC' continues no open LOC span"),
        ("switch.bmes", "columns", "南 B-LOC\n京 E-ORG\n", {},
         r"switch.bmes:2: tag 'E-ORG' continues no open ORG span"),
        ("notag.bio", "columns", "王\tB-PER\n芳\n", {},
         r"notag.bio:2: expected a character and a tag"),
        ("topics.jsonl", "internal", '{"id": "x", "text": "新闻", "topics": ["sports"]}\n', {"topic_labels": TOPICS},
         r"topics.jsonl:1: unknown topic 'sports'"),
        ("dup.jsonl", "internal", '{"id": "x", "text": "一", "topics": []}\n{"id": "x", "text": "二", "topics": []}\n', {},
         r"dup.jsonl:2: duplicate id 'x'"),
        ("broken.jsonl", "internal", '{"id": "x", "text": \n', {},
         r"broken.jsonl:1: not valid JSON"),
        ("bool.jsonl", "internal", '{"id": "x", "text": "青澜", "entities": [{"start": false, "end": true, "type": "address"}]}\n', {},
         r"bool.jsonl:1: entities\[0\] must be"),
        ("surrogate.jsonl", "internal", '{"id": "x", "text": "青\\ud800澜", "topics": []}\n', {},
         r"surrogate.jsonl:1: field 'text' has an unpaired surrogate at index 1"),
        ("surrogate.json", "cluener", '{"text": "\\udfff青澜市", "label": {"address": {"青澜市": [[1, 3]]}}}\n', {},
         r"surrogate.json:1: field 'text' has an unpaired surrogate at index 0"),
        ("ls.json", "labelstudio",
         '[{"id": 1, "data": {"text": "青澜市"}, "annotations": [{"result": [{"type": "labels", "value": {"start": 0, "end": 2, "text": "青澜市", "labels": ["address"]}}]}]}]', {},
         r"ls.json\[0\]: .*'青澜' but the source says '青澜市'"),
        ("far.jsonl", "doccano", '{"text": "青澜市", "label": [[2, 9, "address"]]}\n', {},
         r"far.jsonl:1: .*outside the text"),
        # wrong on its own, so an error even inside a longer span (not dropped as nested)
        ("reversed.jsonl", "doccano", '{"text": "青澜大学好", "label": [[0, 4, "organization"], [3, 2, "address"]]}\n', {},
         r"reversed.jsonl:1: span \[3, 2\) .* or empty"),
        ("nestedwrong.json", "cluener", '{"text": "青澜大学", "label": {"organization": {"青澜大学": [[0, 3]]}, "address": {"上海": [[0, 1]]}}}\n', {},
         r"nestedwrong.json:1: .*'青澜' but the source says '上海'"),
        ("pos.bio", "columns", "北\tNR\tB-LOC\n京\tNR\tI-LOC\n", {},
         r"pos.bio:1: expected a character and a tag"),
        ("min.json", "labelstudio", '[{"id": 1, "text": "青澜", "label": [{"start": 0, "end": 2, "labels": ["address"]}]}]', {},
         r"min.json\[0\]: not a Label Studio task with 'annotations'; export as \"JSON\""),
        ("deep.json", "labelstudio", "[" * 100_000 + "]" * 100_000, {},
         r"deep.json: not readable JSON"),
        ("single.bmes", "columns", "王\tS-PER\n芳\tI-PER\n", {},
         r"single.bmes:2: tag 'I-PER' continues no open PER span"),
        ("twotypes.json", "cluener", '{"text": "王五来了", "label": {"name": {"王五": [[0, 1]]}, "company": {"王五": [[0, 1]]}}}\n',
         {}, r"twotypes.json:1: .*overlap"),
        ("bothspans.jsonl", "doccano", '{"text": "张三在青澜", "entities": [[0, 2, "name"]], "label": [[3, 5, "address"]]}\n',
         {}, r"bothspans.jsonl:1: spans given both in 'label' and in 'entities'"),
        ("duptopic.jsonl", "internal", '{"id": "x", "text": "新闻", "topics": ["economy", "economy"]}\n', {},
         r"duptopic.jsonl:1: duplicate topic in \['economy', 'economy'\]"),
    ],
)
def test_errors_name_file_line_and_problem(tmp_path, name, format, content, labels, message):
    with pytest.raises(DataError, match=message):
        read_documents(write(tmp_path, name, content), format, **labels)


def test_column_files_with_unicode_space_characters_and_conll_document_markers(tmp_path):
    path = write(tmp_path, "spaced.conll", "-DOCSTART- O\n\n张 B-PER\n\u3000 O\n三\u00a0 O\n\n-DOCSTART- O\n李 B-PER\n")
    docs = read_documents(path)
    assert [(doc.text, doc.entities) for doc in docs] == [("张\u3000三\u00a0", [Span(0, 1, "PER")]),
                                                           ("李", [Span(0, 1, "PER")])]


def test_doccano_intent_and_slot_export_gives_spans_and_topics(tmp_path):
    path = write(tmp_path, "intent.jsonl", '{"text": "张三在青澜", "entities": [[0, 2, "name"]], "cats": ["economy"]}\n')
    [doc] = read_documents(path, "doccano")
    assert (doc.topics, doc.entities) == (["economy"], [Span(0, 2, "name")])


def test_nested_span_is_dropped_with_a_warning(tmp_path, caplog):
    line = {"text": "《青澜银行年报》", "label": {"book": {"《青澜银行年报》": [[0, 7]]}, "company": {"青澜银行": [[1, 4]]}}}
    path = write(tmp_path, "nested.json", json.dumps(line, ensure_ascii=False) + "\n")
    with caplog.at_level(logging.WARNING):
        [doc] = read_documents(path, "cluener")
    assert mentions(doc) == [("《青澜银行年报》", "book")]
    assert "nested.json:1: dropped company span [1, 5) nested inside book span [0, 8)" in caplog.text


@pytest.mark.parametrize(
    "name, format",
    [
        ("cluener.json", "cluener"),
        ("msra.bio", "columns"),
        ("resume.bmes", "columns"),
        ("labelstudio.json", "labelstudio"),
        ("doccano_spans.jsonl", "doccano"),
        ("doccano_cats.jsonl", "doccano"),
        ("internal.jsonl", "internal"),
    ],
)
def test_format_guessing(name, format):
    assert guess_format(FIXTURES / name) == format
    assert read_documents(FIXTURES / name) == read_documents(FIXTURES / name, format)


def test_an_empty_entities_list_does_not_decide_the_format(tmp_path):
    relations = write(tmp_path, "relations.jsonl", '{"id": 1, "text": "无", "entities": [], "relations": []}\n'
                      '{"id": 2, "text": "青澜市", "entities": [{"id": 7, "label": "address", "start_offset": 0, '
                      '"end_offset": 3}], "relations": []}\n')
    assert guess_format(relations) == "doccano"
    later = write(tmp_path, "later.jsonl", '{"id": 1, "text": "无", "entities": []}\n'
                  '{"id": 2, "text": "青澜市", "entities": [{"id": 7, "label": "address", "start_offset": 0, '
                  '"end_offset": 3}]}\n')
    assert guess_format(later) == "doccano"
    assert guess_format(write(tmp_path, "none.jsonl", '{"id": "x", "text": "无", "entities": []}\n')) == "internal"


def test_a_label_studio_export_without_spans_labels_no_entities(tmp_path):
    export = '[{"id": 1, "data": {"text": "青澜"}, "annotations": [{"id": 1, "result": [{"type": "choices", "value": {"choices": ["economy"]}}]}]}]'
    (doc,) = read_documents(write(tmp_path, "topics.json", export), "labelstudio")
    assert doc.topics == ["economy"] and doc.entities is None  # not "no entities here": nothing said of them


def test_label_studio_annotations_with_mixed_id_and_timestamp_types(tmp_path):
    annotation = '{{"id": {id}, "updated_at": {at}, "result": [{{"type": "labels", "value": {{"start": 0, "end": {end}, "labels": ["address"]}}}}]}}'
    def task(first: str, second: str) -> str:
        return f'[{{"id": 1, "data": {{"text": "青澜市"}}, "annotations": [{first}, {second}]}}]'

    same_time = task(annotation.format(id='"a"', at='"2024-05-01"', end=2),
                     annotation.format(id=3, at='"2024-05-01"', end=3))
    (doc,) = read_documents(write(tmp_path, "ls.json", same_time), "labelstudio")
    assert doc.entities == [Span(0, 3, "address")]  # the integer id breaks the tie
    number_and_text = task(annotation.format(id=1, at=5, end=2), annotation.format(id=2, at='"2024-05-01"', end=3))
    assert len(read_documents(write(tmp_path, "ls2.json", number_and_text), "labelstudio")) == 1


def test_a_record_with_topics_is_internal_whatever_else_it_holds(tmp_path):
    """A source's own `label` list beside the internal fields is metadata, not doccano categories."""
    path = write(tmp_path, "stories.jsonl", '{"id": "a", "text": "国足晋级", "topics": ["economy"], "label": ["头条"]}\n')
    assert guess_format(path) == "internal"
    assert read_documents(path)[0].topics == ["economy"]


def test_format_guessing_gives_up_with_advice(tmp_path):
    path = write(tmp_path, "plain.jsonl", '{"id": "x", "text": "只有正文"}\n')
    with pytest.raises(DataError, match=r"plain.jsonl: cannot guess the data format; name it as .*plain.jsonl:FORMAT"):
        guess_format(path)
    with pytest.raises(DataError, match=r"empty.jsonl: no documents \(the file is empty\)"):
        guess_format(write(tmp_path, "empty.jsonl", "\n \n"))


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("data/train.json", (Path("data/train.json"), None)),
        ("data/train.json:cluener", (Path("data/train.json"), "cluener")),
        ("runs/2024-05-01T10:00/export.json:labelstudio", (Path("runs/2024-05-01T10:00/export.json"), "labelstudio")),
        ("runs/2024-05-01T10:00", (Path("runs/2024-05-01T10:00"), None)),
        (":doccano", (Path(":doccano"), None)),
    ],
)
def test_parse_data_spec(spec, expected):
    assert parse_data_spec(spec) == expected
    assert expected[1] is None or expected[1] in FORMATS


@pytest.mark.parametrize("name, format", [("gbk.jsonl", "internal"), ("gbk.json", None), ("gbk.bio", "columns")])
def test_a_file_that_is_not_utf8_is_named(tmp_path, name, format):
    path = tmp_path / name
    text = "王\tB-PER\n芳\tI-PER\n" if name.endswith(".bio") else '{"text": "青澜市", "label": {}}\n'
    path.write_bytes(text.encode("gbk"))
    with pytest.raises(DataError, match=rf"{name}:1: not UTF-8 .*iconv"):  # its line too
        read_documents(path, format)
    with pytest.raises(DataError, match=rf"{name}:1: not UTF-8 .*iconv"):
        read_documents(path)  # when the format is guessed, the guess says so


def test_a_misspelt_format_is_named_rather_than_read_as_part_of_the_path(tmp_path):
    path = write(tmp_path, "news.json", "[]")
    with pytest.raises(DataError, match=r"news.json:clunear: unknown data format 'clunear'; FORMAT is one of internal"):
        parse_data_spec(f"{path}:clunear")


def grouped_docs() -> list[Document]:
    docs = [Document(f"g{g}-{i}", "文", topics=[], group=f"report-{g}") for g in range(20) for i in range(5)]
    return docs + [Document(f"loose-{i}", "文", topics=[]) for i in range(10)]


def test_grouped_split_keeps_groups_whole_and_is_deterministic():
    docs = grouped_docs()
    train, validation = split_validation(docs, fraction=0.2, seed=13)
    assert len(train) + len(validation) == len(docs)
    assert {d.group for d in train if d.group}.isdisjoint({d.group for d in validation if d.group})
    assert validation and any(d.group is None for d in train + validation)
    assert split_validation(docs, fraction=0.2, seed=13) == (train, validation)
    assert split_validation(docs, fraction=0.2, seed=14) != (train, validation)


def test_a_set_of_one_document_or_one_group_is_all_training():
    one = [Document("a", "一")]
    assert split_validation(one, fraction=0.2) == (one, [])
    grouped = [Document(str(i), "文", group="report-1") for i in range(5)]
    assert split_validation(grouped, fraction=0.2) == (grouped, [])


def test_a_share_that_leaves_nothing_to_train_on_is_a_data_error():
    docs = [Document(str(i), "文") for i in range(5)]
    with pytest.raises(DataError, match="holding out 0.99 of 5 documents leaves none to train on"):
        split_validation(docs, fraction=0.99)


def test_plain_split_without_groups():
    docs = [Document(str(i), "文", topics=[]) for i in range(50)]
    train, validation = split_validation(docs, fraction=0.1)
    assert (len(train), len(validation)) == (45, 5)
    assert [d.id for d in train] == sorted((d.id for d in train), key=int)  # input order kept
    assert split_validation(docs, fraction=0.1) == (train, validation)


def test_a_saved_hf_dataset_round_trips_keeping_missing_tasks_apart_from_empty_ones(tmp_path):
    docs = read_documents(FIXTURES / "internal.jsonl") + read_documents(FIXTURES / "doccano_cats.jsonl")
    dataset = to_hf_dataset(docs)
    assert dataset.column_names == ["id", "text", "topics", "entities", "group"]
    assert dataset[1]["entities"] is None and dataset[2]["entities"] == []
    dataset.save_to_disk(tmp_path / "saved")
    assert guess_format(tmp_path / "saved") == "hf"
    assert read_documents(tmp_path / "saved") == docs
    assert len(to_hf_dataset([])) == 0


def test_a_parquet_file_is_read_through_datasets_like_a_saved_one(tmp_path):
    docs = read_documents(FIXTURES / "internal.jsonl") + read_documents(FIXTURES / "doccano_cats.jsonl")
    to_hf_dataset(docs).to_parquet(tmp_path / "export.parquet")
    assert guess_format(tmp_path / "export.parquet") == "hf"
    assert not holds_no_records(tmp_path / "export.parquet")
    assert read_documents(tmp_path / "export.parquet") == docs
    to_hf_dataset([Document("ok", "好"), Document("x", "青澜", entities=[Span(0, 9, "address")])]).to_parquet(
        tmp_path / "bad-row.parquet")
    with pytest.raises(DataError, match=r"bad-row\.parquet\[1\]: .*outside the text"):
        read_documents(tmp_path / "bad-row.parquet")
    to_hf_dataset([]).to_parquet(tmp_path / "none.parquet")
    assert read_documents(tmp_path / "none.parquet") == []


def test_a_parquet_file_is_read_by_its_exact_name(tmp_path):
    """Not as a glob pattern, which would add the rows of week2.parquet to those of week?.parquet."""
    to_hf_dataset([Document("other", "别的")]).to_parquet(tmp_path / "week2.parquet")
    for name in ("week?.parquet", "export[1].parquet"):
        to_hf_dataset([Document("mine", "我的")]).to_parquet(tmp_path / name)
        assert read_documents(tmp_path / name) == [Document("mine", "我的")]


def test_a_mention_left_null_is_not_checked(tmp_path):
    """A table's column of mentions holds null where an entity has none: as absent, not as a mention."""
    import pyarrow
    import pyarrow.parquet

    entities = [{"start": 0, "end": 2, "type": "name", "text": "刘洋"}, {"start": 3, "end": 5, "type": "address"}]
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist([{"id": "a", "text": "刘洋在北京", "entities": entities}]),
                                tmp_path / "mixed.parquet")
    expected = [Document("a", "刘洋在北京", entities=[Span(0, 2, "name"), Span(3, 5, "address")])]
    assert read_documents(tmp_path / "mixed.parquet") == expected
    entities[1]["text"] = None
    assert read_documents(write(tmp_path, "mixed.jsonl", json.dumps({"id": "a", "text": "刘洋在北京",
                                                                     "entities": entities}) + "\n")) == expected


@pytest.mark.parametrize("damage", ["no Parquet", "empty", "pages overwritten"])
def test_a_damaged_parquet_file_is_one_data_error(tmp_path, damage):
    path = tmp_path / "export.parquet"
    to_hf_dataset([Document(str(i), "青澜市" * 50) for i in range(200)]).to_parquet(path)
    data = bytearray(path.read_bytes())
    if damage == "pages overwritten":  # the footer stays readable, the data behind it does not
        data[8 : len(data) // 2] = b"\xab" * (len(data) // 2 - 8)
    path.write_bytes({"no Parquet": b"id,text\n1,x\n", "empty": b""}.get(damage, bytes(data)))
    with pytest.raises(DataError, match=r"export\.parquet: not a readable Parquet file \(.+\)$"):
        read_documents(path)


def test_a_saved_hf_dataset_is_validated_row_by_row(tmp_path):
    bad = Document("x", "青澜", entities=[Span(0, 9, "address")])
    to_hf_dataset([Document("ok", "好"), bad]).save_to_disk(tmp_path / "saved")
    with pytest.raises(DataError, match=r"saved\[1\]: .*outside the text"):
        read_documents(tmp_path / "saved", "hf")
    splits = datasets.DatasetDict({"train": to_hf_dataset([Document("ok", "好")])})
    splits.save_to_disk(tmp_path / "splits")
    with pytest.raises(DataError, match=r"holds the splits train; name one, e\.g\. .*splits/train"):
        read_documents(tmp_path / "splits")
    assert read_documents(tmp_path / "splits" / "train") == [Document("ok", "好")]
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="is a folder, not a data file"):
        read_documents(tmp_path / "plain")


def test_corpus_stats():
    docs = read_documents(FIXTURES / "internal.jsonl")
    stats = corpus_stats(docs)
    assert stats["documents"] == 4
    assert stats["labelled_for_topics"] == 3 and stats["labelled_for_entities"] == 3
    assert stats["topics"] == {"city_management": 1, "livelihood": 1, "ecology": 1}
    assert stats["entity_types"] == {"address": 1} and stats["entities"] == 1


def test_sample_corpus_is_complete_and_valid():
    docs = read_documents(SAMPLE, topic_labels=TOPICS, entity_types=CLUENER_TYPES)
    stats = corpus_stats(docs)
    assert len(docs) >= 40
    assert set(stats["topics"]) == set(TOPICS) and stats["without_topic"] > 0
    assert set(stats["entity_types"]) == set(CLUENER_TYPES)
    assert any("\n" in doc.text and len(doc.text) > 1000 for doc in docs)
    for doc in docs:
        for span in doc.entities:
            mention = doc.text[span.start : span.end]
            assert mention == mention.strip() and "\n" not in mention, (doc.id, span)


@needs_shared
@pytest.mark.slow
def test_shared_data_loads(caplog):
    with caplog.at_level(logging.WARNING):
        cluener = read_documents(SHARED_DATA / "cluener" / "train.json", entity_types=CLUENER_TYPES)
    msra = read_documents(SHARED_DATA / "msra" / "train.bio")
    topics = read_documents(SHARED_DATA / "topics" / "train.jsonl", topic_labels=TOPICS)
    assert (len(cluener), len(msra), len(topics)) == (10_748, 45_000, 1_932)
    # 23,971 mentions minus two companies nested inside a book title (line 1507).
    assert corpus_stats(cluener)["entities"] == 23_969
    assert caplog.text.count("nested inside") == 2
    assert set(corpus_stats(msra)["entity_types"]) == {"PER", "LOC", "ORG"}
    assert all(doc.group for doc in topics)


def test_an_entity_that_carries_its_text_is_checked_against_its_offsets(tmp_path):
    """As `tag` output carries it: corrected output whose story was edited after tagging is caught."""
    path = tmp_path / "corrected.jsonl"
    line = {"id": "a", "text": "刘洋出席。", "entities": [{"start": 0, "end": 2, "type": "name", "text": "刘洋"}]}
    path.write_text(json.dumps(line, ensure_ascii=False) + "\n", encoding="utf-8")
    assert read_documents(path)[0].entities == [Span(0, 2, "name")]
    line["entities"][0]["text"] = "出席"
    path.write_text(json.dumps(line, ensure_ascii=False) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"corrected.jsonl:1: span \[0, 2\) covers '刘洋' but the source says '出席'"):
        read_documents(path)


@pytest.mark.parametrize("topics, entities", [([" economy"], None), ([""], None), (None, [Span(0, 2, "")])])
def test_an_empty_label_or_one_with_spaces_around_it_is_an_error(topics, entities):
    with pytest.raises(DataError, match="is empty or has spaces around it"):
        validate(Document("a", "刘洋出席。", topics=topics, entities=entities))


@pytest.mark.parametrize("topics, entities, field", [(["\ud800体育"], None, "topics"),
                                                     (None, [Span(0, 2, "ORG\udfff")], "entities")])
def test_a_label_with_an_unpaired_surrogate_is_an_error(topics, entities, field):
    with pytest.raises(DataError, match=rf"field '{field}' has an unpaired surrogate"):
        validate(Document("a", "刘洋出席。", topics=topics, entities=entities))


def test_a_misspelt_label_field_is_an_error_and_metadata_is_not(tmp_path):
    metadata = [{"id": "b", "text": "刘洋出席。", "topics": [], "group_id": "r1", "pred_topics": ["economy"]},
                {"id": "c", "text": "刘洋出席。", "topic": "体育", "entity_ids": [3]}]  # a CMS's own fields
    path = tmp_path / "stories.jsonl"
    path.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in metadata), encoding="utf-8")
    assert [doc.topics for doc in read_documents(path)] == [[], None]
    misspelt = {"id": "a", "text": "刘洋出席。", "topics": [], "entites": [{"start": 0, "end": 2, "type": "name"}]}
    path.write_text(json.dumps(misspelt, ensure_ascii=False) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"stories.jsonl:1: field 'entites' is not read; did you mean 'entities'\?"):
        read_documents(path)


def test_no_topic_documents_are_bare_mentions_newsroom_credits_and_text_without_chinese():
    docs = read_documents(SAMPLE, "internal")
    mentions = {doc.text[span.start : span.end] for doc in docs for span in doc.entities or ()}
    made = no_topic_documents(docs, 41, ["hello", "world"], random.Random(7))
    assert len(made) == 41 and len({doc.id for doc in made}) == 41
    assert all(doc.topics == [] and doc.entities is None and doc.text.strip() for doc in made)
    texts = [doc.text for doc in made]
    assert all(text in mentions for text in texts[:13])
    newsroom = texts[13:26]
    assert not any(text in mentions for text in newsroom)
    people = {doc.text[span.start : span.end] for doc in docs for span in doc.entities or () if span.type == "name"}
    assert sum(any(name in text for name in people) for text in newsroom) >= 7  # credits name people
    assert not any(re.search(r"[\u4e00-\u9fff]", text) for text in texts[26:])
    assert texts == [doc.text for doc in no_topic_documents(docs, 41, ["hello", "world"], random.Random(7))]
    # nothing to take mentions from: all of them without Chinese
    assert len(no_topic_documents([Document("a", "无实体", topics=[])], 3, [], random.Random(7))) == 3
