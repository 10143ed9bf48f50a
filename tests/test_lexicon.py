"""Dictionary-word features: matching on token ids, and a lexicon travelling with the model folder."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from newstagger import Tagger
from newstagger.backends import OnnxBackend, TorchBackend
from newstagger.export import export_onnx
from newstagger.lexicon import CATEGORIES, ROLES, build_lexicon
from newstagger.model import load_model_folder, save_model_folder

from conftest import tiny_tokenizer

WORDS = [("北京", "place"), ("人民政府", "organization"), ("张伟", "person"), ("京人", "other"), ("北京", "noun")]


def marks(features: torch.Tensor, tokens: str) -> list[set[tuple[str, str]]]:
    """The (role, category) pairs set at each position of a [1, L, F] feature tensor."""
    grid = features[0].view(len(tokens), len(ROLES), len(CATEGORIES))
    return [{(ROLES[r], list(CATEGORIES)[c]) for r, c in grid[i].nonzero().tolist()} for i in range(len(tokens))]


def test_words_mark_their_tokens_begin_inside_end_by_category():
    tokenizer = tiny_tokenizer()
    lexicon = build_lexicon(WORDS, tokenizer, "test")
    assert lexicon.config["words"] == 4  # the repeated 北京 keeps its first category
    text = "北京人民政府"
    got = marks(lexicon(torch.tensor([tokenizer.convert_tokens_to_ids(list(text))])), text)
    assert got == [
        {("begin", "place")},
        {("end", "place"), ("begin", "other")},
        {("end", "other"), ("begin", "organization")},
        {("inside", "organization")},
        {("inside", "organization")},
        {("end", "organization")},
    ]


def test_a_word_matches_only_a_run_of_exactly_its_tokens():
    tokenizer = tiny_tokenizer()
    too_long = "北京市长江大桥"  # 7 tokens: more than four 15-bit ids fit in a key
    lexicon = build_lexicon([("北京", "place"), ("😀北", "place"), (too_long, "place")], tokenizer, "test")
    assert lexicon.config["words"] == 1 and lexicon.config["max_word_tokens"] == 4
    ids = tokenizer.convert_tokens_to_ids(["北", "京"]) + [tokenizer.pad_token_id] * 2
    features = lexicon(torch.tensor([ids]))
    assert features[0, :2].sum() == 2 and features[0, 2:].sum() == 0


def test_an_attached_lexicon_changes_nothing_until_trained_and_travels_with_the_folder(tiny_model_dir, tmp_path):
    model, tokenizer, meta = load_model_folder(tiny_model_dir)
    input_ids = torch.tensor([tokenizer.convert_tokens_to_ids(list("[北京人民政府]"))] * 2).numpy()
    attention_mask = np.ones_like(input_ids)
    attention_mask[1, 5:] = 0
    before = TorchBackend(model)(input_ids, attention_mask)
    model.attach_lexicon(build_lexicon(WORDS, tokenizer, "test"))
    assert all(np.array_equal(b, a) for b, a in zip(before, TorchBackend(model)(input_ids, attention_mask)))

    torch.nn.init.normal_(model.lexicon_projection.weight, std=0.5)  # as if trained
    expected = TorchBackend(model)(input_ids, attention_mask)
    assert not np.allclose(expected[1], before[1])
    folder = save_model_folder(tmp_path / "with-lexicon", model, tokenizer, meta, weights_dtype=torch.float32)
    loaded = load_model_folder(folder)[0]
    assert torch.equal(loaded.lexicon.keys, model.lexicon.keys)
    assert all(np.array_equal(e, g) for e, g in zip(expected, TorchBackend(loaded)(input_ids, attention_mask)))

    record = export_onnx(folder)
    assert any(entry.startswith("lexicon_features") for entry in record["inputs"])
    onnx = OnnxBackend(folder / "onnx" / "model.onnx", "fp32", threads=1, lexicon=loaded.lexicon)
    assert all(np.abs(e - g).max() < 1e-4 for e, g in zip(expected, onnx(input_ids, attention_mask)))
    TorchBackend(loaded, device="meta")  # moves the model that lent the lexicon, as `check --device cuda` does
    assert all(np.abs(e - g).max() < 1e-4 for e, g in zip(expected, onnx(input_ids, attention_mask)))
