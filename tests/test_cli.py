"""`newstagger tag`: the JSONL contract, and bad input ending in exit code 2 with a one-line reason."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from conftest import SAMPLE, TOPICS, build_tiny_model_folder

from newstagger.cli import main
from newstagger.schema import LabelSchema
from newstagger.tag_command import _check_paths


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def read_results(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_tag_writes_one_result_per_story_in_order(tiny_model_dir, tmp_path):
    stories = [{"id": "a", "text": "滨江市人民政府发布通知。"}, {"id": 7, "text": ""},
               {"id": "c", "text": "全角ＡＢＣ和emoji😀" * 30}]
    source = write_lines(tmp_path / "in.jsonl", [json.dumps(s, ensure_ascii=False) for s in stories])
    target = tmp_path / "out.jsonl"
    assert main(["tag", "--model", str(tiny_model_dir), "-i", str(source), "-o", str(target), "--chunk", "2"]) == 0
    results = read_results(target)
    assert [r["id"] for r in results] == ["a", 7, "c"]
    for story, result in zip(stories, results):
        assert set(result) == {"id", "topics", "labels", "entities"}
        assert set(result["labels"]) <= set(result["topics"])
        for entity in result["entities"]:
            assert set(entity) == {"start", "end", "type", "text", "score"}
            assert story["text"][entity["start"] : entity["end"]] == entity["text"]


@pytest.mark.parametrize(
    ("bad_line", "reason"),
    [
        ("{not json", "line 2: not valid JSON (Expecting property name enclosed in double quotes at column 2)"),
        ('{"id": "x"}', "line 2: field 'text' must be a string"),
        ('{"text": "没有编号"}', "line 2: field 'id' is missing"),
        ('["a", "b"]', "line 2: expected a JSON object"),
        ('{"id": true, "text": "x"}', "line 2: field 'id' must be a string or an integer"),
        # JSON can escape a lone surrogate; neither the tokenizer nor UTF-8 output can take one
        ('{"id": "s", "text": "北\\ud800京"}', "line 2: field 'text' has an unpaired surrogate at index 1"),
        ('{"id": "\\udfff", "text": "x"}', "line 2: field 'id' has an unpaired surrogate at index 0"),
        # json.loads itself fails on these with RecursionError / a plain ValueError, not JSONDecodeError
        ("[" * 100_000, "line 2: not valid JSON (nested too deeply)"),
        ('{"id": ' + "9" * 5000 + ', "text": "x"}', "line 2: not valid JSON (Exceeds the limit"),
    ],
)
def test_bad_line_exits_2_with_its_line_number_earlier_lines_written_aside(
        tiny_model_dir, tmp_path, capsys, bad_line, reason):
    source = write_lines(tmp_path / "in.jsonl", ['{"id": "ok", "text": "好的"}', bad_line, '{"id": "z", "text": "后"}'])
    target = tmp_path / "out.jsonl"
    target.write_text("an earlier run's results\n")
    assert main(["tag", "--model", str(tiny_model_dir), "-i", str(source), "-o", str(target)]) == 2
    error = capsys.readouterr().err.strip()
    assert f"--input {source}: {reason}" in error and len(error.splitlines()) == 1
    assert error.endswith(f"(the lines before it are in {os.path.realpath(target)}.partial)")
    assert [r["id"] for r in read_results(tmp_path / "out.jsonl.partial")] == ["ok"]
    assert target.read_text() == "an earlier run's results\n"  # a stopped run does not look complete


def test_an_output_through_a_link_is_written_to_its_target(tiny_model_dir, tmp_path):
    source = write_lines(tmp_path / "in.jsonl", ['{"id": "ok", "text": "好的"}'])
    (tmp_path / "results.jsonl").write_text("")
    (tmp_path / "latest.jsonl").symlink_to(tmp_path / "results.jsonl")
    assert main(["tag", "--model", str(tiny_model_dir), "-i", str(source), "-o", str(tmp_path / "latest.jsonl")]) == 0
    assert (tmp_path / "latest.jsonl").is_symlink()
    assert [r["id"] for r in read_results(tmp_path / "results.jsonl")] == ["ok"]


def test_record_mode_answers_bad_lines_in_place(tiny_model_dir, tmp_path, capsys):
    source = write_lines(tmp_path / "in.jsonl", ['{"id": "ok", "text": "好的"}', '{"id": "bad"}', '{"id": "z", "text": "后"}'])
    target = tmp_path / "out.jsonl"
    assert main(["tag", "--model", str(tiny_model_dir), "-i", str(source), "-o", str(target),
                 "--on-error", "record"]) == 0
    results = read_results(target)
    assert [r["id"] for r in results] == ["ok", "bad", "z"]
    assert "field 'text'" in results[1]["error"]
    assert "1 line(s) could not be tagged" in capsys.readouterr().err


def test_record_mode_answers_an_unwritable_id_by_its_line_number(tiny_model_dir, tmp_path):
    source = write_lines(tmp_path / "in.jsonl", ['{"id": "\\ud800", "text": "好的"}', "[" * 100_000,
                                                 '{"id": NaN, "text": "好"}', '{"id": {"x": 1}, "text": 5}',
                                                 '{"id": true, "text": 5}', '{"id": 7, "text": 5}',
                                                 '{"id": "z", "text": "后"}'])
    target = tmp_path / "out.jsonl"
    assert main(["tag", "--model", str(tiny_model_dir), "-i", str(source), "-o", str(target),
                 "--on-error", "record"]) == 0
    assert [r["id"] for r in read_results(target)] == ["line-1", "line-2", "line-3", "line-4", "line-5", 7, "z"]


def test_a_line_that_is_not_utf8_is_that_lines_error_and_a_bom_is_ignored(tiny_model_dir, tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_bytes("\ufeff".encode() + '{"id": "ok", "text": "好的"}\n'.encode()
                      + '{"id": "gbk", "text": "市民政局"}\n'.encode("gbk") + '{"id": "z", "text": "后"}\n'.encode())
    target = tmp_path / "out.jsonl"
    assert main(["tag", "--model", str(tiny_model_dir), "-i", str(source), "-o", str(target)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "line 2: not UTF-8" in line and "iconv" in line
    assert [r["id"] for r in read_results(tmp_path / "out.jsonl.partial")] == ["ok"]
    assert main(["tag", "--model", str(tiny_model_dir), "-i", str(source), "-o", str(target),
                 "--on-error", "record"]) == 0
    assert not (tmp_path / "out.jsonl.partial").exists()
    assert [r.get("error", "")[:17] for r in read_results(target)] == ["", "line 2: not UTF-8", ""]


def test_tag_does_not_write_through_a_link_planted_at_its_partial_output(tiny_model_dir, tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("kept")
    (tmp_path / "out.jsonl.partial").symlink_to(victim)
    source = write_lines(tmp_path / "in.jsonl", ['{"id": "a", "text": "好的"}'])
    assert main(["tag", "--model", str(tiny_model_dir), "-i", str(source), "-o", str(tmp_path / "out.jsonl")]) == 2
    assert "out.jsonl.partial, where the output is written first, is a symbolic link" in capsys.readouterr().err
    assert victim.read_text() == "kept" and not (tmp_path / "out.jsonl").exists()


def test_a_line_blank_once_decoded_is_skipped(tiny_model_dir, tmp_path):
    """A line of a byte-order mark alone, or of full-width spaces, is a blank line; a mark at the start
    of any line (concatenated files) is dropped."""
    source = tmp_path / "in.jsonl"
    source.write_bytes("\ufeff\r\n".encode() + '{"id": "a", "text": "好的"}\r\n'.encode() + "\u3000\r\n".encode()
                       + "\ufeff".encode() + '{"id": "b", "text": "后"}\n'.encode() + "\ufeff\n".encode())
    target = tmp_path / "out.jsonl"
    assert main(["tag", "--model", str(tiny_model_dir), "-i", str(source), "-o", str(target)]) == 0
    assert [r["id"] for r in read_results(target)] == ["a", "b"]


def test_a_line_of_other_control_or_separator_characters_is_reported_not_skipped(tiny_model_dir, tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_bytes('{"id": "a", "text": "好"}\n\x1c\n\u00a0\n{"id": "b", "text": "后"}\n'.encode())
    target = tmp_path / "out.jsonl"
    assert main(["tag", "--model", str(tiny_model_dir), "-i", str(source), "-o", str(target),
                 "--on-error", "record"]) == 0
    assert [(r["id"], "error" in r) for r in read_results(target)] == [("a", False), ("line-2", True),
                                                                       ("line-3", True), ("b", False)]


def test_stdout_is_utf8_whatever_the_locale(tiny_model_dir, tmp_path):
    source = write_lines(tmp_path / "in.jsonl", ['{"id": "😀-1", "text": "张伟在北京"}'])
    done = subprocess.run([sys.executable, "-m", "newstagger.cli", "tag", "--model", str(tiny_model_dir),
                           "-i", str(source), "-o", "-"], capture_output=True, env={**os.environ, "PYTHONIOENCODING": "gbk"})
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert json.loads(done.stdout.decode("utf-8"))["id"] == "😀-1"


def test_a_bad_line_is_the_one_line_on_stderr(tiny_model_dir, tmp_path):
    """Commands that write their results to stdout say nothing on stderr but what went wrong: no log
    line stands before the error."""
    source = write_lines(tmp_path / "in.jsonl", ['{"id": "ok", "text": "好的"}', "oops"])
    done = subprocess.run([sys.executable, "-m", "newstagger.cli", "tag", "--model", str(tiny_model_dir),
                           "-i", str(source), "-o", "-"], capture_output=True)
    assert done.returncode == 2
    assert done.stderr.decode().splitlines() == ["newstagger tag: error: --input " + str(source)
                                                 + ": line 2: not valid JSON (Expecting value at column 1)"]
    assert json.loads(done.stdout)["id"] == "ok"  # the line before it, tagged
    gold = write_lines(tmp_path / "gold.jsonl", ['{"id": "g", "text": "好的", "topics": ["sport"]}'])
    done = subprocess.run([sys.executable, "-m", "newstagger.cli", "evaluate", "--model", str(tiny_model_dir),
                           "--data", str(gold)], capture_output=True)
    assert done.returncode == 2
    assert [line.split(": ")[:3] for line in done.stderr.decode().splitlines()] == [
        ["newstagger evaluate", "error", f"{gold}:1"]]


def test_stdin_to_stdout(tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO('{"id": 1, "text": "市民政局"}\n'))
    assert main(["tag", "--model", str(tiny_model_dir), "-i", "-", "-o", "-"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert json.loads(line)["id"] == 1


def test_an_output_that_is_the_input_is_refused_before_it_is_emptied(tiny_model_dir, tmp_path, capsys):
    source = write_lines(tmp_path / "in.jsonl", ['{"id": "ok", "text": "好的"}'])
    (tmp_path / "link.jsonl").symlink_to(source)
    before = source.read_bytes()
    for output in (source, tmp_path / "link.jsonl"):
        assert main(["tag", "--model", str(tiny_model_dir), "-i", str(source), "-o", str(output)]) == 2
        assert "is also an input" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(tiny_model_dir), "--data", f"{source}:internal", "-o", str(source)]) == 2
    assert "is also an input" in capsys.readouterr().err
    assert source.read_bytes() == before


def test_an_output_that_is_the_file_stdin_reads_is_refused(tiny_model_dir, tmp_path):
    """`newstagger tag -i - -o stories.jsonl < stories.jsonl` would empty the stories before reading them."""
    source = write_lines(tmp_path / "in.jsonl", ['{"id": "ok", "text": "好的"}'])
    before = source.read_bytes()
    with source.open("rb") as stdin:
        done = subprocess.run([sys.executable, "-m", "newstagger.cli", "tag", "--model", str(tiny_model_dir),
                               "-i", "-", "-o", str(source)], stdin=stdin, capture_output=True)
    assert done.returncode == 2 and b"is also an input (-)" in done.stderr
    assert source.read_bytes() == before


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("output", ["/dev/full", "-"])
def test_a_full_disk_is_a_one_line_error(tiny_model_dir, tmp_path, output):
    source = write_lines(tmp_path / "in.jsonl", ['{"id": "ok", "text": "好的"}'])
    with open("/dev/full", "wb") as full:
        done = subprocess.run([sys.executable, "-m", "newstagger.cli", "tag", "--model", str(tiny_model_dir),
                               "-i", str(source), "-o", output], stdout=full, stderr=subprocess.PIPE)
    assert done.returncode == 1
    assert done.stderr.decode().strip().splitlines()[-1] == "newstagger tag: error: [Errno 28] No space left on device"


def test_missing_input_output_folder_or_model_exits_2_before_the_model_loads(tiny_model_dir, tmp_path, capsys):
    never_loaded = str(tmp_path / "no-model")  # the paths are named first, not the model
    assert main(["tag", "--model", never_loaded, "-i", str(tmp_path / "nope.jsonl"), "-o", "-"]) == 2
    assert f"--input {tmp_path / 'nope.jsonl'}: no such file" in capsys.readouterr().err
    assert main(["tag", "--model", never_loaded, "-i", str(tmp_path), "-o", "-"]) == 2
    assert f"--input {tmp_path}: a folder" in capsys.readouterr().err
    assert main(["tag", "--model", never_loaded, "-i", "-", "-o", str(tmp_path / "no" / "out.jsonl")]) == 2
    assert f"--output {tmp_path / 'no' / 'out.jsonl'}: no folder {tmp_path / 'no'}" in capsys.readouterr().err
    assert main(["tag", "--model", str(tmp_path), "-i", "-", "-o", "-"]) == 2
    assert "not a newstagger model folder" in capsys.readouterr().err


def test_a_pipe_is_an_input_tag_takes(tmp_path):
    fifo = tmp_path / "stories.fifo"
    os.mkfifo(fifo)
    _check_paths(str(fifo), "-")  # process substitution and /dev/stdin are such paths


def test_without_a_model_where_the_install_has_none_says_how_to_give_one(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("NEWSTAGGER_MODEL", raising=False)
    monkeypatch.setattr("newstagger.folders.DEFAULT_MODEL_DIR", tmp_path / "site-packages" / "models" / "default")
    assert main(["tag", "-i", "-", "-o", "-"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "no --model given, and the shipped model is not at" in line and "set NEWSTAGGER_MODEL" in line


@pytest.mark.parametrize("value", ["1.5", "-0.2", "nan"])
def test_an_entity_threshold_outside_0_to_1_exits_2(tiny_model_dir, value, capsys):
    assert main(["tag", "--model", str(tiny_model_dir), "-i", "-", "-o", "-", "--entity-threshold", value]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--entity-threshold must be between 0 and 1" in line


@pytest.mark.parametrize("types", ["name,weapon", "name,", ""])
def test_unknown_entity_types_exit_2_naming_them(tiny_model_dir, types, capsys):
    assert main(["tag", "--model", str(tiny_model_dir), "-i", "-", "-o", "-", "--types", types]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--types: entity_types: unknown" in line and "the model knows" in line


def edit_meta(**changes):
    def edit(folder):
        meta = json.loads((folder / "newstagger.json").read_text())
        (folder / "newstagger.json").write_text(json.dumps({**meta, **changes}))
    return edit


def edit_weights(edit):
    def damage(folder):
        weights = load_file(folder / "model.safetensors")
        edit(weights)
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return damage


def edit_config(edit):
    def damage(folder):
        config = json.loads((folder / "config.json").read_text())
        edit(config)
        (folder / "config.json").write_text(json.dumps(config))
    return damage


@pytest.mark.parametrize(("damage", "reason"), [
    (lambda folder: (folder / "model.safetensors").unlink(), "is not a complete model folder"),
    (edit_weights(lambda w: w.pop("entity_head.weight")), "does not fit its config.json (missing: entity_head.weight)"),
    (edit_weights(lambda w: w.update({"entity_head.bias": w["entity_head.bias"][:-1]})),
     "does not fit its config.json (of another shape: entity_head.bias)"),
    (edit_weights(lambda w: w.update({"extra.weight": w["entity_head.bias"].clone()})), "(not in the model: extra.weight)"),
    (lambda folder: (folder / "config.json").unlink(), "is not a complete model folder: no config.json"),
    (edit_config(lambda c: c.pop("newstagger_schema")), "its config.json has no newstagger_schema"),
    (lambda folder: (folder / "model.safetensors").write_bytes(b"\xff" * 64), "is not a complete model folder"),
    (lambda folder: (folder / "tokenizer.json").unlink(), "no tokenizer"),
    (lambda folder: (folder / "metrics.json").write_text("{"), "metrics.json is not valid JSON"),
    (lambda folder: (folder / "newstagger.json").write_text("{"), "cannot be read as a model description"),
    (lambda folder: (folder / "newstagger.json").write_text("{}"), "cannot be read as a model description"),
    (edit_meta(stride=64), "stride must be an integer from 0 to under max_length - 2"),
    (edit_meta(thresholds={"economy": "high"}), "thresholds must be an object of numbers from 0 to 1"),
    (edit_meta(entity_threshold=None), "entity_threshold must be a number from 0 to 1"),
    (edit_meta(schema="x"), "schema must be an object"),
    (edit_meta(max_length=256), "max_length 256 is more than the encoder's 128 positions"),
    (edit_meta(schema={"topics": ["economy"], "entity_types": ["name"], "coarse": {}}),  # loads, fails every text
     "its labels do not match the ones the weights were saved with"),
])
def test_a_broken_model_folder_exits_2_saying_what_is_wrong(tiny_model_dir, tmp_path, capsys, damage, reason):
    folder = shutil.copytree(tiny_model_dir, tmp_path / "model")
    damage(folder)
    source = write_lines(tmp_path / "in.jsonl", ['{"id": "a", "text": "好的"}'])
    assert main(["tag", "--model", str(folder), "-i", str(source), "-o", str(tmp_path / "out.jsonl")]) == 2
    error = capsys.readouterr().err.strip()
    assert reason in error and len(error.splitlines()) == 1


def test_a_model_folder_naming_code_of_its_own_is_refused_without_running_it_or_reading_stdin(
        tiny_model_dir, tmp_path, capsys, monkeypatch):
    folder = shutil.copytree(tiny_model_dir, tmp_path / "model")
    edit_config(lambda c: (c.pop("model_type"), c.update(auto_map={"AutoConfig": "planted.PlantedConfig"})))(folder)
    ran = tmp_path / "ran"
    (folder / "planted.py").write_text(f"open({str(ran)!r}, 'w').close()\n")
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))  # what transformers' prompt would read as consent
    source = write_lines(tmp_path / "in.jsonl", ['{"id": "a", "text": "好的"}'])
    assert main(["tag", "--model", str(folder), "-i", str(source), "-o", str(tmp_path / "out.jsonl")]) == 2
    assert "is not a complete model folder" in capsys.readouterr().err and not ran.exists()


def test_check_refuses_an_empty_texts_file_rather_than_pass_on_nothing(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    assert main(["check", "--model", str(tiny_model_dir), "--texts", str(tmp_path / "empty.jsonl"),
                 "--candidates", "torch-bf16", "--no-record"]) == 2
    assert "--texts: no texts in" in capsys.readouterr().err


def test_check_names_a_texts_file_that_is_not_utf8(tiny_model_dir, tmp_path, capsys):
    texts = tmp_path / "gbk.jsonl"
    texts.write_bytes('{"text": "青澜市"}\n'.encode("gbk"))
    assert main(["check", "--model", str(tiny_model_dir), "--texts", str(texts), "--candidates", "torch-bf16",
                 "--no-record"]) == 2
    assert "gbk.jsonl: not UTF-8" in capsys.readouterr().err


def test_a_reader_that_goes_away_ends_the_run_quietly(tiny_model_dir):
    """`newstagger tag ... -o - | head`: exit as a program killed by SIGPIPE would, no traceback."""
    tagging = subprocess.Popen([sys.executable, "-m", "newstagger.cli", "tag", "--model", str(tiny_model_dir),
                                "-i", str(SAMPLE), "-o", "-", "--chunk", "1"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    tagging.stdout.read(10)
    tagging.stdout.close()
    assert tagging.wait(timeout=120) == 141
    assert b"Traceback" not in tagging.stderr.read()


def test_evaluate_scores_a_single_task_model_on_its_task_and_says_the_other_is_left_out(tmp_path, capsys):
    folder = build_tiny_model_folder(tmp_path / "model", schema=LabelSchema(topics=list(TOPICS), entity_types=[]))
    assert main(["evaluate", "--model", str(folder), "--data", str(SAMPLE)]) == 0
    captured = capsys.readouterr()
    assert set(json.loads(captured.out)) == {"decoding", "topics"}
    assert "this model has no entities; the data's entities are not scored" in captured.err
    entities_only = write_lines(tmp_path / "entities.jsonl", ['{"id": "a", "text": "王五", "entities": []}'])
    assert main(["evaluate", "--model", str(folder), "--data", str(entities_only)]) == 2
    assert "entities.jsonl: it labels only entities, which this model has not" in capsys.readouterr().err
    assert main(["tag", "--model", str(folder), "-i", str(SAMPLE), "-o", str(tmp_path / "out.jsonl"),
                 "--types", "name"]) == 2
    assert "unknown ['name']; the model has no entity types" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--help"], ["-h", "serve"], ["-vh", "serve"], ["nonsense"]])
def test_the_help_before_a_command_or_without_one_lists_every_command(argv, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    listed = capsys.readouterr()
    assert all(command in listed.out + listed.err for command in ("export", "bench", "evaluate", "retrain", "models"))


def test_evaluate_refuses_data_without_labels(tiny_model_dir, tmp_path, capsys):
    source = write_lines(tmp_path / "plain.jsonl", ['{"id": "a", "text": "招商引资"}'])
    labelled = write_lines(tmp_path / "gold.jsonl", ['{"id": "a", "text": "招商引资", "topics": ["economy"]}'])
    assert main(["evaluate", "--model", str(tiny_model_dir), "--data", f"{source}:internal"]) == 2
    assert f"--data {source}:internal: none of its 1 documents has topics or entities" in capsys.readouterr().err
    # beside a labelled file too: it would be left out of the scores without a word
    assert main(["evaluate", "--model", str(tiny_model_dir), "--data", str(labelled), "--data",
                 f"{source}:internal"]) == 2
    assert f"--data {source}:internal: none of its 1 documents has topics or entities" in capsys.readouterr().err


@pytest.mark.parametrize("output, reason", [("missing/metrics.json", "no folder"), (".", "a folder; name a file")])
def test_evaluate_refuses_an_output_it_cannot_write_before_scoring(tiny_model_dir, tmp_path, capsys, monkeypatch,
                                                                    output, reason):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("training.evaluate.evaluate_tagger", lambda *args, **kwargs: pytest.fail("it scored"))
    assert main(["evaluate", "--model", str(tiny_model_dir), "--data", str(SAMPLE), "-o", output]) == 2
    assert f"--output {output}: {reason}" in capsys.readouterr().err


def test_evaluate_output_dash_is_stdout_not_a_file(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", "--model", str(tiny_model_dir), "--data", str(SAMPLE), "-o", "-"]) == 0
    assert not (tmp_path / "-").exists() and "topics" in json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("gold, named", [('"topics": ["economics"]', "unknown topic 'economics'"),
                                         ('"entities": [{"start": 0, "end": 2, "type": "athlete"}]',
                                          "unknown entity type 'athlete'")])
def test_evaluate_refuses_a_gold_label_the_model_does_not_know(tiny_model_dir, tmp_path, capsys, gold, named):
    source = write_lines(tmp_path / "gold.jsonl", ['{"id": "a", "text": "招商引资", %s}' % gold])
    assert main(["evaluate", "--model", str(tiny_model_dir), "--data", str(source)]) == 2
    assert named in capsys.readouterr().err


def test_evaluate_scores_coarse_gold_beside_the_fine_types(tiny_model_dir, tmp_path, capsys):
    source = write_lines(tmp_path / "gold.jsonl", ['{"id": "a", "text": "王五在北京", "entities": ['
                                                   '{"start": 0, "end": 2, "type": "PER"}]}'])
    assert main(["evaluate", "--model", str(tiny_model_dir), "--data", str(source)]) == 0
    assert "entities_coarse" in json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("argv", [["tag", "-i", "-", "-o", "-", "--chunk", "0"],
                                  ["tag", "-i", "-", "-o", "-", "--threads", "two"],
                                  ["tag", "-i", "-", "-o", "-", "--threads", "99999999999"],  # was a traceback
                                  ["bench", "--repeats", "0"], ["check", "--documents", "-1"]])
def test_counts_below_one_exit_2_naming_the_option(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert f"argument {argv[-2]}: must be" in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("argv", [["bench", "--configs", "torch-fp32,torch-fp64"], ["check", "--candidates", "bf16"],
                                  ["check", "--candidates", "onnx-int8,"]])
def test_a_misspelt_backend_pair_exits_2_naming_it_and_the_known_ones(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {argv[-2]}: unknown '{argv[-1].split(',')[-1]}'; choose from " in line and "onnx-fp32" in line


def test_bench_watching_a_missing_corpus_starts_no_tag_process(tiny_model_dir, tmp_path, monkeypatch, capsys):
    def no_child(*args, **kwargs):
        raise AssertionError("a `newstagger tag` process was started for a corpus that is not there")

    monkeypatch.setattr("subprocess.Popen", no_child)
    assert main(["bench", "--model", str(tiny_model_dir), "--watch-tag", str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl" in capsys.readouterr().err


@pytest.mark.parametrize("seconds", ["0", "-1", "nan", "inf"])
def test_bench_watches_only_for_a_positive_time(tiny_model_dir, tmp_path, capsys, seconds):
    with pytest.raises(SystemExit) as stopped:
        main(["bench", "--model", str(tiny_model_dir), "--watch-tag", str(SAMPLE), "--seconds", seconds])
    assert stopped.value.code == 2 and "argument --seconds: must be over 0 and finite" in capsys.readouterr().err
