"""`newstagger pretrain`: continued masked-LM pretraining into a BERT folder that `train` starts from."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertForMaskedLM

import training.pretrain
from newstagger.cli import main
from newstagger.documents import DataError
from newstagger.tagger import Tagger
from training.pretrain import RECORD_FILE, PretrainConfig, masked_lm_loss, pretrain, text_blocks
from training.train import TrainConfig, train

from conftest import SAMPLE, build_tiny_model_folder, damaged_copy, tiny_config, tiny_tokenizer


@pytest.fixture(scope="module")
def tiny_mlm_base(tmp_path_factory) -> Path:
    """A tiny BERT with its masked-LM head and a pretraining record, as ../shared's base has."""
    folder = tmp_path_factory.mktemp("tiny-mlm-base")
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    BertForMaskedLM(tiny_config(len(tokenizer))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / RECORD_FILE).write_text(json.dumps({"phase1": {"steps": 3}}))
    return folder


def tiny_pretrain_config(base: Path, output: Path, **overrides) -> PretrainConfig:
    settings = dict(text=[f"{SAMPLE}:internal"], base_model=str(base), output=str(output), max_length=32,
                    batch_size=8, learning_rate=1e-3, validation_fraction=0.2, device="cpu")
    return PretrainConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def pretrained(tiny_mlm_base, tmp_path_factory) -> tuple[Path, dict]:
    return pretrain(tiny_pretrain_config(tiny_mlm_base, tmp_path_factory.mktemp("pretrain") / "out", epochs=2))


def test_pretraining_lowers_held_out_mlm_loss_and_records_it(pretrained):
    folder, record = pretrained
    assert {"config.json", "model.safetensors", "tokenizer.json", RECORD_FILE} <= {p.name for p in folder.iterdir()}
    assert not list(folder.glob("*.bin")), "weights must be safetensors only"
    assert all(path.stat().st_mode & 0o044 == 0o044 for path in folder.glob("*.safetensors"))
    before, after = record["held_out"]["before"], record["held_out"]["after"]
    assert record["history"][-1]["held_out"] == after and set(after) == set(before)
    assert before["masked_tokens"] == after["masked_tokens"] > 0, "the same held-out tokens are masked each time"
    assert after["mlm_loss"] < before["mlm_loss"]
    assert [row["epoch"] for row in record["history"]] == [1, 2]
    saved = json.loads((folder / RECORD_FILE).read_text())
    assert saved["base_pretraining"] == {"phase1": {"steps": 3}}, "the base's own record is kept"
    assert saved["tokens_seen"] > 0 and saved["config"]["epochs"] == 2


def test_a_pretrained_folder_is_a_base_model_for_training(pretrained, tiny_mlm_base, tmp_path):
    folder, pretrained_from = pretrained[0], tiny_mlm_base
    trained, _ = train(TrainConfig(train=[f"{SAMPLE}:internal"], base_model=str(folder), output=str(tmp_path / "m"),
                                   max_length=32, stride=8, inference_max_length=32, inference_stride=8, epochs=1,
                                   batch_tokens=512, min_tuning_documents=1))
    tagger = Tagger.load(trained)
    assert tagger.meta.base_model == str(folder)

    def distance(base: Path) -> float:
        start = BertForMaskedLM.from_pretrained(base).bert.encoder.layer[0].attention.self.query.weight
        return (tagger.model.bert.encoder.layer[0].attention.self.query.weight - start).abs().max().item()

    assert distance(folder) < distance(pretrained_from)
    text = "滨江市人民政府今天宣布，地铁5号线将于年底开通。"
    (result,) = tagger.tag([text])
    assert all(text[e["start"] : e["end"]] == e["text"] for e in result["entities"])


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tiny_mlm_base, tmp_path, monkeypatch):
    """Stopped mid-epoch (a GPU lease ending), resumed: the same batches, masks and dropout follow,
    through the next epoch's shuffle too."""
    settings = dict(epochs=2, batch_size=32, checkpoint_minutes=0)  # about 6 steps an epoch, a checkpoint after each
    straight, expected = pretrain(tiny_pretrain_config(tiny_mlm_base, tmp_path / "straight", **settings))
    save, saves = training.pretrain.save_checkpoint, []

    def save_then_stop(*args):
        save(*args)
        saves.append(args)
        if len(saves) == 3:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(training.pretrain, "save_checkpoint", save_then_stop)
        with pytest.raises(KeyboardInterrupt):
            pretrain(tiny_pretrain_config(tiny_mlm_base, tmp_path / "resumed", **settings))
    assert json.loads((tmp_path / "resumed" / "checkpoint" / "trainer_state.json").read_text())["epoch"] == 0
    resumed, got = pretrain(tiny_pretrain_config(tiny_mlm_base, tmp_path / "resumed", resume=True, **settings))
    assert (got["steps"], got["tokens_seen"], got["held_out"]) == (expected["steps"], expected["tokens_seen"],
                                                                 expected["held_out"])
    assert got["history"] == expected["history"]
    weights = [load_file(folder / "model.safetensors") for folder in (straight, resumed)]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


def test_resuming_pretraining_under_other_settings_is_refused(tiny_mlm_base, tmp_path, capsys):
    output = tmp_path / "out"
    pretrain(tiny_pretrain_config(tiny_mlm_base, output, max_steps=1))
    with pytest.raises(DataError, match="from a run with other learning_rate; resume with the same settings"):
        pretrain(tiny_pretrain_config(tiny_mlm_base, output, max_steps=2, resume=True, learning_rate=5e-4))
    # the texts' contents too, not only their paths: an archive edited in place would move the blocks
    edited = tmp_path / "news.jsonl"
    edited.write_text(SAMPLE.read_text(encoding="utf-8"), encoding="utf-8")
    pretrain(tiny_pretrain_config(tiny_mlm_base, tmp_path / "edited", text=[f"{edited}:internal"], max_steps=1))
    edited.write_text("\n".join(SAMPLE.read_text(encoding="utf-8").splitlines()[1:]) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="from a run with other data_sha256"):
        pretrain(tiny_pretrain_config(tiny_mlm_base, tmp_path / "edited", text=[f"{edited}:internal"], max_steps=2,
                                      resume=True))
    # without --resume, the folder is refused, and the message says a run waits there
    capsys.readouterr()
    assert main(["pretrain", "--text", f"{SAMPLE}:internal", "--base-model", str(tiny_mlm_base),
                 "--output", str(output)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--resume continues the run there" in line
    one_step = load_file(output / "model.safetensors")
    _, record = pretrain(tiny_pretrain_config(tiny_mlm_base, output, max_steps=2, resume=True))
    assert record["steps"] == 2
    # the step past the old schedule's end trains at the new schedule's rate, not the old end's 0
    two_steps = load_file(output / "model.safetensors")
    assert not all(torch.equal(one_step[name], two_steps[name]) for name in one_step)


def test_a_run_that_replaces_another_deletes_its_checkpoint_first(tiny_mlm_base, tmp_path, monkeypatch):
    """Else a crash before the new run's first checkpoint, then --resume, would continue the old run."""
    output = tmp_path / "out"
    pretrain(tiny_pretrain_config(tiny_mlm_base, output, max_steps=1))
    assert (output / "checkpoint").is_dir()

    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(training.pretrain, "save_checkpoint", crash)
    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny_pretrain_config(tiny_mlm_base, output, max_steps=1, overwrite_output=True, learning_rate=5e-4))
    assert not list(output.glob("checkpoint*"))


def test_resumed_with_fewer_epochs_than_a_mid_epoch_checkpoint_holds_the_record_describes_the_weights(
        tiny_mlm_base, tmp_path, monkeypatch):
    output, save, saves = tmp_path / "out", training.pretrain.save_checkpoint, []

    def save_then_stop(*args):
        save(*args)
        saves.append(args)
        if len(saves) == 8:  # in epoch 2, after the first epoch's checkpoint and history row
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(training.pretrain, "save_checkpoint", save_then_stop)
        with pytest.raises(KeyboardInterrupt):
            pretrain(tiny_pretrain_config(tiny_mlm_base, output, epochs=2, batch_size=32, checkpoint_minutes=0))
    _, record = pretrain(tiny_pretrain_config(tiny_mlm_base, output, epochs=1, batch_size=32, checkpoint_minutes=0,
                                              resume=True))
    assert record["history"][-1]["step"] == record["steps"] > record["history"][0]["step"]
    assert 1 < record["history"][-1]["epoch"] < 2 and record["held_out"]["after"] == record["history"][-1]["held_out"]


def test_text_is_cut_into_blocks_with_cls_and_sep():
    tokenizer = tiny_tokenizer()
    blocks = text_blocks(["一二三四五", "六七"], tokenizer, max_length=5)
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    tokens = [tokenizer.convert_ids_to_tokens(block.tolist()) for block in blocks]
    assert tokens == [["[CLS]", "一", "二", "三", "[SEP]"], ["[CLS]", "四", "五", "[SEP]"],
                      ["[CLS]", "六", "七", "[SEP]"]]
    assert all(block[0] == cls and block[-1] == sep for block in blocks)
    assert text_blocks([], tokenizer, max_length=5) == []
    # a text that fills its block exactly: its [SEP] neither makes an empty block nor opens the next one
    tokens = [tokenizer.convert_ids_to_tokens(block.tolist()) for block in text_blocks(["一二", "三"], tokenizer, 4)]
    assert tokens == [["[CLS]", "一", "二", "[SEP]"], ["[CLS]", "三", "[SEP]"]]
    assert text_blocks(["\u200b\u200b", "\u200b"], tokenizer, 8) == []


def test_the_loss_counts_masked_tokens_only(tiny_mlm_base):
    model = BertForMaskedLM.from_pretrained(tiny_mlm_base).eval()
    ids = torch.tensor([[2, 10, 11, 12, 3]])
    labels = torch.tensor([[-100, -100, 11, -100, -100]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    loss, right = masked_lm_loss(model, batch, bf16=False)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    assert loss.item() == pytest.approx(full.loss.item(), abs=1e-5)
    assert int(right) == int(full.logits[0, 2].argmax() == 11)


@pytest.mark.parametrize("flags, named", [
    (["--mlm-probability", "1.5"], "mlm_probability"),
    (["--device", "tpu"], "device"),
    (["--batch-size", "0"], "batch_size"),
    (["--seed", "4294967296"], "seed"),
    (["--attention-dropout=-0.1"], "attention_dropout"),
    (["--checkpoint-minutes=-1"], "checkpoint_minutes"),
])
def test_pretrain_command_rejects_settings_that_cannot_work(flags, named, capsys):
    assert main(["pretrain", "--text", str(SAMPLE), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert named in err and len(err.splitlines()) == 1


def test_pretrain_command_without_text_or_with_blank_text_exits_2(tiny_mlm_base, tmp_path, capsys):
    assert main(["pretrain", "--base-model", str(tiny_mlm_base)]) == 2
    assert "--text" in capsys.readouterr().err
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"id": 1, "text": "  "}\n', encoding="utf-8")
    assert main(["pretrain", "--text", f"{blank}:internal", "--base-model", str(tiny_mlm_base),
                 "--output", str(tmp_path / "out")]) == 2
    assert "no text to pretrain on" in capsys.readouterr().err


def test_blocks_longer_than_the_encoder_exit_2_before_training(tiny_mlm_base, tmp_path, capsys):
    assert main(["pretrain", "--text", f"{SAMPLE}:internal", "--base-model", str(tiny_mlm_base), "--max-length", "512",
                 "--output", str(tmp_path / "out")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "max_length 512: more than the encoder's 128 positions" in line
    assert not (tmp_path / "out").exists()


def test_text_with_no_token_the_tokenizer_knows_exits_2(tiny_mlm_base, tmp_path, capsys):
    invisible = tmp_path / "invisible.jsonl"
    invisible.write_text("".join(json.dumps({"id": i, "text": "\u200b" * (i + 1)}) + "\n" for i in range(5)))
    assert main(["pretrain", "--text", f"{invisible}:internal", "--base-model", str(tiny_mlm_base),
                 "--output", str(tmp_path / "out")]) == 2
    assert "no token the base's tokenizer knows" in capsys.readouterr().err


@pytest.mark.parametrize("damage, named", [("missing", "no such folder"), ("no tokenizer", "has no tokenizer"),
                                           ("truncated weights", "cannot be loaded"),
                                           ("config of another size", "weights do not fit its config"),
                                           ("pickled weights", "has no safetensors weights"),
                                           ("weights under other names", "of the BERT encoder's tensors unset"),
                                           ("another architecture", "it is a 'roberta' checkpoint, not BERT"),
                                           ("a decoder", "it is a BERT decoder"),
                                           ("encoder tensors BERT does not use", "encoder tensors BERT does not use"),
                                           ("tokenizer past the embeddings", "more than the encoder's"),
                                           ("no pad token", "its tokenizer has no pad token"),
                                           ("newstagger model", "continue it with train --init-model"),
                                           ("its config file", "is a file; give the checkpoint's folder")])
def test_a_base_that_cannot_be_pretrained_exits_2_naming_it(tiny_mlm_base, tiny_model_dir, tmp_path, capsys, damage,
                                                             named):
    base = {"missing": tmp_path / "missing", "newstagger model": tiny_model_dir,
            "its config file": tiny_mlm_base / "config.json"}.get(damage)
    base = base or damaged_copy(tiny_mlm_base, tmp_path / "base", damage)
    assert main(["pretrain", "--text", f"{SAMPLE}:internal", "--base-model", str(base),
                 "--output", str(tmp_path / "out")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "base_model" in line and named in line


def test_pretraining_into_a_model_folder_is_refused(tiny_mlm_base, tmp_path, capsys):
    model = build_tiny_model_folder(tmp_path / "model")
    before = (model / "model.safetensors").read_bytes()
    assert main(["pretrain", "--text", f"{SAMPLE}:internal", "--base-model", str(tiny_mlm_base),
                 "--output", str(model)]) == 2
    assert "holds a newstagger model" in capsys.readouterr().err
    assert (model / "model.safetensors").read_bytes() == before


def test_a_text_held_out_is_not_trained_on_however_often_it_repeats(tiny_mlm_base, tmp_path, caplog):
    repeated = tmp_path / "repeated.jsonl"
    repeated.write_text("".join(json.dumps({"id": i, "text": "滨江市地铁5号线将于年底开通。"}) + "\n" for i in range(4))
                        + "".join(json.dumps({"id": 4 + i, "text": f"青澜港第{i}号码头今天复工。"}) + "\n" for i in range(6)),
                        encoding="utf-8")
    _, record = pretrain(tiny_pretrain_config(tiny_mlm_base, tmp_path / "out", text=[f"{repeated}:internal"],
                                              validation_fraction=0.3, max_steps=1))
    held_out = record["text"]["held_out"]["documents"]
    assert record["text"]["train"]["documents"] + held_out < 10
    assert "training documents out: their text or group is also held out" in caplog.text


def test_an_archive_of_one_text_over_and_over_has_nothing_left_to_train_on(tiny_mlm_base, tmp_path, capsys):
    repeated = tmp_path / "repeated.jsonl"
    repeated.write_text("".join(json.dumps({"id": i, "text": "滨江市地铁5号线将于年底开通。"}) + "\n" for i in range(10)),
                        encoding="utf-8")
    assert main(["pretrain", "--text", f"{repeated}:internal", "--base-model", str(tiny_mlm_base),
                 "--output", str(tmp_path / "out"), "--validation-fraction", "0.2"]) == 2
    assert "every text is also held out" in capsys.readouterr().err


def test_text_too_short_to_mask_trains_nothing_and_exits_2(tiny_mlm_base, tmp_path, capsys):
    one = tmp_path / "one.jsonl"
    one.write_text('{"id": 1, "text": "滨"}\n', encoding="utf-8")
    assert main(["pretrain", "--text", f"{one}:internal", "--base-model", str(tiny_mlm_base),
                 "--output", str(tmp_path / "out"), "--max-length", "32", "--mlm-probability", "0.001"]) == 2
    assert "nothing was trained" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_one_document_trains_with_nothing_held_out_and_says_so(tiny_mlm_base, tmp_path, caplog):
    one = tmp_path / "one.jsonl"
    one.write_text('{"id": 1, "text": "滨江市人民政府今天宣布，地铁5号线将于年底开通。"}\n', encoding="utf-8")
    _, record = pretrain(tiny_pretrain_config(tiny_mlm_base, tmp_path / "out", text=[f"{one}:internal"], batch_size=1))
    assert record["held_out"] == {"before": {}, "after": {}}
    assert "nothing held out" in caplog.text
