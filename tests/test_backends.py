"""Backends: ONNX export, agreement with PyTorch fp32, and how `auto` chooses (and falls back)."""

from __future__ import annotations

import json
import shutil
import threading

import onnx
import pytest
import torch
from conftest import build_tiny_model_folder
from safetensors.torch import load_file, save_file

from newstagger.agreement import check_agreement, compare, record_agreement
from newstagger.backends import OnnxBackend, TorchBackend, available_cores, cpu_bf16_units, make_backend
from newstagger.bench import synthetic_stories
from newstagger.cli import main
from newstagger.errors import UsageError
from newstagger.export import export_onnx
from newstagger.model import load_model_folder, read_metrics, save_model_folder, weights_sha256
from newstagger.schema import LabelSchema
from newstagger.tagger import Tagger


@pytest.fixture(scope="module")
def exported_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with fp32 and int8 ONNX graphs (a copy: export writes into the folder)."""
    folder = shutil.copytree(tiny_model_dir, tmp_path_factory.mktemp("exported") / "model")
    export_onnx(folder, quantize="int8")
    return folder


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    return shutil.copytree(tiny_model_dir, tmp_path / "model")


def test_export_writes_graphs_and_a_record(exported_dir):
    record = json.loads((exported_dir / "onnx" / "export.json").read_text(encoding="utf-8"))
    assert set(record["files"]) == {"fp32", "int8"}
    assert all((exported_dir / entry["path"]).is_file() for entry in record["files"].values())
    assert record["fused_operators"].get("Attention") == 2  # both layers of the tiny model fused
    assert record["fp32_max_abs_difference_vs_torch"] < 1e-4
    assert record["weights_sha256"] == weights_sha256(exported_dir)
    int8_graph = onnx.load(str(exported_dir / "onnx" / "model.int8.onnx"))
    assert any(node.op_type == "MatMulInteger" for node in int8_graph.graph.node)
    assert not any(node.op_type == "MatMulInteger" for node in int8_graph.graph.node if "_head/" in node.name)


def test_backends_agree_with_torch_fp32_on_the_tiny_model(exported_dir):
    candidates = ["onnx-fp32", "onnx-int8", "torch-bf16"]
    results = check_agreement(exported_dir, candidates, synthetic_stories(24), "24 generated stories")
    assert set(results) == set(candidates)
    onnx_fp32 = results["onnx-fp32"]
    assert onnx_fp32["passed"] and onnx_fp32["max_topic_difference"] <= 1e-3
    assert onnx_fp32["entities"] > 0  # the comparison had something to compare
    approximate = ["onnx-int8", "torch-bf16"] if cpu_bf16_units() else ["onnx-int8"]
    for name in approximate:
        # A random tiny model is far less decisive than a trained one, so only the figures'
        # sanity is asserted here; `newstagger check` on the real model decides what passes.
        assert 0.5 <= results[name]["span_agreement"] <= 1.0
        assert results[name]["max_topic_difference"] <= 0.1
    if not cpu_bf16_units():
        assert "skipped" in results["torch-bf16"]


def test_a_model_of_entities_only_exports(tmp_path):
    folder = build_tiny_model_folder(tmp_path / "model", schema=LabelSchema(topics=[], entity_types=["team"]))
    assert main(["export", "--model", str(folder)]) == 0  # its empty topic output compared as agreeing
    assert (folder / "onnx" / "model.onnx").is_file()


def test_a_model_of_topics_only_is_judged_by_its_topic_scores(tmp_path, capsys):
    folder = build_tiny_model_folder(tmp_path / "model", schema=LabelSchema(topics=["sports"], entity_types=[]))
    assert main(["export", "--model", str(folder)]) == 0
    capsys.readouterr()
    assert main(["check", "--model", str(folder), "--candidates", "onnx-fp32", "--documents", "20"]) == 1
    assert "onnx-fp32: NO VERDICT" in capsys.readouterr().out  # 20 texts: too few
    assert main(["check", "--model", str(folder), "--candidates", "onnx-fp32", "--documents", "100"]) == 0
    assert "onnx-fp32: PASS  identical entities 100.00% of 0," in capsys.readouterr().out


def test_check_command_on_a_file_of_texts_records_its_corpus(exported_dir, tmp_path, capsys):
    folder = shutil.copytree(exported_dir, tmp_path / "model")
    texts = tmp_path / "texts.jsonl"
    # as `tag` reads them: a byte-order mark at the start of any line (files concatenated), blank lines
    texts.write_text("".join("\ufeff" + json.dumps({"text": t}, ensure_ascii=False) + "\n\u3000\n"
                             for t in synthetic_stories(5)), encoding="utf-8")
    assert main(["check", "--model", str(folder), "--texts", str(texts), "--candidates", "onnx-fp32"]) == 0
    assert "onnx-fp32: PASS" in capsys.readouterr().out
    recorded = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))["agreement"]["onnx-fp32"]
    assert recorded["corpus"] == "texts.jsonl (5 texts)" and recorded["documents"] == 5
    assert recorded["device"] == "cpu"  # ONNX Runtime runs on the CPU whatever --device says


def test_check_runs_nothing_when_no_candidate_can_run(model_copy, monkeypatch):
    def no_reference(*args, **kwargs):
        raise AssertionError("the fp32 reference ran for nothing")

    monkeypatch.setattr("newstagger.tagger.Tagger.load", no_reference)
    results = check_agreement(model_copy, ["onnx-fp32", "onnx-int8"], ["好"], "one text")
    assert list(results) == ["onnx-fp32", "onnx-int8"]
    assert all("has no ONNX export" in result["skipped"] for result in results.values())
    assert results["onnx-int8"]["skipped"].endswith("--quantize int8` first")  # one export makes both


def test_check_on_a_missing_gpu_is_a_usage_error(exported_dir, monkeypatch, capsys):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main(["check", "--model", str(exported_dir), "--device", "cuda", "--no-record"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_check_command_names_the_bad_line_of_a_file_of_texts(exported_dir, tmp_path, capsys):
    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"text": "王五住在北京"}\n{"id": 2}\n', encoding="utf-8")
    assert main(["check", "--model", str(exported_dir), "--texts", str(texts), "--no-record"]) == 2
    error = capsys.readouterr().err.strip()
    assert f"{texts}:2" in error and "'text'" in error and len(error.splitlines()) == 1


def test_compare_counts_missing_and_extra_entities_against_agreement():
    entity = lambda start, kind="name": {"start": start, "end": start + 2, "type": kind}
    expected = [{"topics": {"a": 0.5}, "entities": [entity(0), entity(5)]}]
    got = [{"topics": {"a": 0.53}, "entities": [entity(0), entity(5, "address"), entity(9)]}]
    result = compare(expected, got)
    assert result["entities"] == 4  # 0, 5/name, 5/address, 9
    assert result["span_agreement"] == 0.25
    assert result["max_topic_difference"] == pytest.approx(0.03)
    assert not result["passed"]
    assert compare(expected, expected)["passed"] is None  # 2 entities: too few for 99% to mean anything
    many = [{"topics": {"a": 0.5}, "entities": [entity(3 * i) for i in range(100)]}]
    assert compare(many, many)["passed"]


def test_a_check_on_texts_without_entities_gives_no_verdict_and_keeps_the_last_one(exported_dir, tmp_path, capsys):
    """A pass would let `auto` trust the backend on nothing; a fail would replace a real pass and make
    every run warn that the backend's answers differ."""
    folder = shutil.copytree(exported_dir, tmp_path / "model")
    earlier = {"passed": True, "weights_sha256": weights_sha256(folder)}
    record_agreement(folder, {"onnx-fp32": earlier})
    texts = tmp_path / "blanks.jsonl"
    texts.write_text('{"text": ""}\n{"text": "   "}\n', encoding="utf-8")
    assert main(["check", "--model", str(folder), "--texts", str(texts), "--candidates", "onnx-fp32"]) == 1
    out = capsys.readouterr().out
    assert ("NO VERDICT  identical entities 100.00% of 0 (too few entities to judge: a verdict needs 100; "
            "not recorded)") in out
    assert read_metrics(folder)["agreement"]["onnx-fp32"] == earlier


def test_auto_takes_an_approximation_only_after_it_passed_the_check(exported_dir, tmp_path, caplog):
    folder = shutil.copytree(exported_dir, tmp_path / "model")
    model = load_model_folder(folder)[0]
    unchecked = make_backend(folder, model, device="cpu")
    assert unchecked.precision == "fp32"
    weights = weights_sha256(folder)
    record_agreement(folder, {"onnx-int8": {"passed": True, "weights_sha256": "of other weights"}})
    assert make_backend(folder, model, device="cpu").precision == "fp32"  # a verdict on weights copied over
    assert "verdict on onnx-int8 was made on other weights and is not used" in caplog.text
    record_agreement(folder, {"onnx-int8": {"passed": True, "weights_sha256": weights},
                              "torch-bf16": {"passed": False, "weights_sha256": weights}})
    checked = make_backend(folder, model, device="cpu")
    assert (checked.name, checked.precision) == ("onnx", "int8")
    assert "agreement" in (folder / "README.md").read_text(encoding="utf-8")  # the card shows it
    # Re-exporting makes the recorded ONNX results meaningless: they are dropped.
    export_onnx(folder)
    assert "onnx-int8" not in json.loads((folder / "metrics.json").read_text(encoding="utf-8"))["agreement"]


def test_a_backend_named_after_it_failed_the_check_runs_with_a_warning(exported_dir, tmp_path, caplog):
    folder = shutil.copytree(exported_dir, tmp_path / "model")
    record_agreement(folder, {"onnx-int8": {"passed": False, "weights_sha256": weights_sha256(folder)}})
    backend = make_backend(folder, load_model_folder(folder)[0], backend="onnx", precision="int8", device="cpu")
    assert backend.precision == "int8" and "onnx-int8 failed `newstagger check`" in caplog.text


def test_a_failed_export_leaves_the_folder_as_it_was(exported_dir, tmp_path, monkeypatch, capsys):
    folder = shutil.copytree(exported_dir, tmp_path / "model")
    before = {path.name: path.read_bytes() for path in (folder / "onnx").iterdir()}
    monkeypatch.setattr("newstagger.export.EXPORT_TOLERANCE", -1.0)  # as if the trace had gone wrong
    record_agreement(folder, {"onnx-int8": {"passed": True, "weights_sha256": weights_sha256(folder)}})
    metrics_before = (folder / "metrics.json").read_bytes()
    assert main(["export", "--model", str(folder), "--quantize", "int8"]) == 1
    assert "disagrees with PyTorch" in capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in (folder / "onnx").iterdir()} == before
    assert not (folder / "onnx.partial").exists()
    assert (folder / "metrics.json").read_bytes() == metrics_before  # the kept graphs keep their check too


def test_onnx_under_device_auto_runs_on_the_cpu_of_a_gpu_machine(exported_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    backend = make_backend(exported_dir, load_model_folder(exported_dir)[0], backend="onnx")
    assert isinstance(backend, OnnxBackend)


def test_check_that_could_measure_nothing_does_not_pass(model_copy, monkeypatch, capsys):
    # no export, and (as on CPUs without bf16 instructions) torch-bf16 skipped
    monkeypatch.setattr("newstagger.backends.cpu_bf16_units", lambda: None)
    assert main(["check", "--model", str(model_copy), "--documents", "2", "--no-record"]) == 1
    assert "nothing was checked" in capsys.readouterr().err


@pytest.mark.parametrize("units, auto, named", [("amx", "bf16", "bf16"), ("avx512_bf16", "fp32", "bf16"),
                                                 (None, "fp32", "no bf16 matrix instructions")])
def test_bf16_is_auto_only_with_amx_and_runs_when_named_where_the_cpu_has_it(model_copy, monkeypatch, units, auto,
                                                                              named):
    monkeypatch.setattr("newstagger.backends.cpu_bf16_units", lambda: units)
    record_agreement(model_copy, {"torch-bf16": {"passed": True, "weights_sha256": weights_sha256(model_copy)}})
    model = load_model_folder(model_copy)[0]
    assert make_backend(model_copy, model, device="cpu").precision == auto
    if units:
        assert make_backend(model_copy, model, precision="bf16", device="cpu").precision == named
    else:
        with pytest.raises(UsageError, match=named):
            make_backend(model_copy, model, precision="bf16", device="cpu")


def test_auto_falls_back_to_torch_when_there_is_no_export(model_copy):
    model = load_model_folder(model_copy)[0]
    backend = make_backend(model_copy, model, device="cpu")
    assert isinstance(backend, TorchBackend) and backend.precision == "fp32"
    # A pass recorded for a graph that is no longer there does not make auto reach for it.
    record_agreement(model_copy, {"onnx-int8": {"passed": True}})
    assert isinstance(make_backend(model_copy, model, device="cpu"), TorchBackend)
    with pytest.raises(UsageError, match="newstagger export"):
        make_backend(model_copy, model, backend="onnx")


def test_asking_for_missing_onnx_on_the_command_line_exits_2(model_copy, tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": 1, "text": "滨江市人民政府"}\n', encoding="utf-8")
    code = main(["tag", "--model", str(model_copy), "-i", str(source), "-o", str(tmp_path / "out.jsonl"),
                 "--backend", "onnx"])
    assert code == 2
    assert "newstagger export" in capsys.readouterr().err


def test_saving_a_model_over_a_folder_drops_its_export_of_the_old_weights(exported_dir, tmp_path):
    folder = shutil.copytree(exported_dir, tmp_path / "model")
    model, tokenizer, meta = load_model_folder(folder)
    save_model_folder(folder, model, tokenizer, meta)
    assert not (folder / "onnx").exists()
    with pytest.raises(UsageError, match="newstagger export"):
        make_backend(folder, model, backend="onnx")


@pytest.mark.parametrize("change, reason", [("weights", "export was not made from the model.safetensors it holds now"),
                                            ("record", "export was not made from the model.safetensors it holds now"),
                                            ("no record", "export.json cannot be read")])
def test_graphs_of_other_weights_are_never_used(exported_dir, tmp_path, caplog, change, reason):
    """Weights copied over the folder by hand leave its graphs behind: they answer for another model.
    An export record without the hash cannot tell, so it is not used either."""
    folder = shutil.copytree(exported_dir, tmp_path / "model")
    record_agreement(folder, {"onnx-int8": {"passed": True, "weights_sha256": weights_sha256(folder)}})
    model = load_model_folder(folder)[0]
    assert make_backend(folder, model, device="cpu").name == "onnx"
    if change == "weights":
        weights = load_file(folder / "model.safetensors")
        save_file({name: tensor + 0.01 for name, tensor in weights.items()}, folder / "model.safetensors")
    elif change == "no record":
        (folder / "onnx" / "export.json").unlink()
    else:
        record = json.loads((folder / "onnx" / "export.json").read_text())
        (folder / "onnx" / "export.json").write_text(json.dumps({k: v for k, v in record.items()
                                                                 if k != "weights_sha256"}))
    model = load_model_folder(folder)[0]
    fallback = make_backend(folder, model, device="cpu")
    assert (fallback.name, fallback.precision) == ("torch", "fp32")
    assert reason in caplog.text and "export --model" in caplog.text  # said, not silently slower
    with pytest.raises(UsageError, match=f"{reason}.*; run `newstagger export --model .*` again"):
        make_backend(folder, model, backend="onnx")


def test_impossible_combinations_say_why(model_copy):
    model = load_model_folder(model_copy)[0]
    with pytest.raises(UsageError, match="fp32 or bf16"):
        make_backend(model_copy, model, backend="torch", precision="int8")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA device"):
            make_backend(model_copy, model, device="cuda")


def test_auto_device_runs_on_cpu_without_cuda(tiny_model_dir):
    tagger = Tagger.load(tiny_model_dir)  # every argument auto: what `tag` and the server do
    expected_device = "cuda" if torch.cuda.is_available() else "cpu"
    assert tagger.backend.device.type == expected_device
    assert len(tagger.tag(["滨江市人民政府发布通知。"])) == 1


def test_onnx_backend_matches_the_torch_backend_on_a_padded_batch(exported_dir):
    model = load_model_folder(exported_dir)[0]
    input_ids = torch.randint(5, 1000, (3, 29)).numpy()
    attention_mask = (torch.arange(29)[None, :] < torch.tensor([[29], [17], [3]])).long().numpy()
    expected = TorchBackend(model)(input_ids, attention_mask)
    got = OnnxBackend(exported_dir / "onnx" / "model.onnx", "fp32", threads=1)(input_ids, attention_mask)
    for e, g in zip(expected, got):
        assert g.dtype == e.dtype and g.shape == e.shape
        assert abs(e - g).max() < 1e-4


def test_bf16_on_cpu_pads_rows_to_few_shapes_but_answers_each_row(tiny_model_dir):
    model = load_model_folder(tiny_model_dir)[0]
    backend = TorchBackend(model, "bf16")
    input_ids = torch.randint(5, 1000, (8, 12)).numpy()
    attention_mask = (torch.arange(12)[None, :] < torch.arange(5, 13)[:, None]).long().numpy()
    topic_logits, tag_log_probs = backend(input_ids[:5], attention_mask[:5])  # run as 8 rows
    assert topic_logits.shape[0] == 5 and tag_log_probs.shape[:2] == (5, 12)
    full_topics, full_tags = backend(input_ids, attention_mask)
    assert (topic_logits == full_topics[:5]).all() and (tag_log_probs == full_tags[:5]).all()


@pytest.mark.parametrize("files, cores", [({"cpu.max": "max 100000\n"}, None),
                                          ({"cpu.max": "150000 100000\n"}, 1),
                                          ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2),
                                          ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
                                          ({}, None)])
def test_a_containers_cpu_quota_caps_the_cores_torch_threads_count_on(tmp_path, monkeypatch, files, cores):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(32)))  # a big host, seen from a container
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert available_cores(tmp_path) == (cores or 32)


def test_the_thread_count_holds_in_a_thread_that_ran_torch_before_the_tagger_was_loaded(tmp_path):
    """torch keeps its count per thread once a thread has used it: set at load alone, it missed such threads."""
    folder = build_tiny_model_folder(tmp_path / "model")
    counts = {}
    ready, loaded = threading.Event(), threading.Event()

    def worker():
        torch.ones(1_000_000).sum()  # torch work before the load: a warm-up, another library
        ready.set()
        loaded.wait(60)
        tagger.tag(["李明到青澜市。"])
        counts["tagging"] = torch.get_num_threads()

    thread = threading.Thread(target=worker)
    thread.start()
    ready.wait(60)
    before = torch.get_num_threads()
    try:
        tagger = Tagger.load(folder, backend="torch", precision="fp32", threads=1)
        loaded.set()
        thread.join(60)
    finally:
        torch.set_num_threads(before)  # the rest of the suite keeps its threads
    assert counts == {"tagging": 1}
