"""Learned tag transitions: the CRF's likelihood against brute force, decoding, and the model folder."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from newstagger import Tagger
from newstagger.crf import BioCrf
from newstagger.decoding import bio_transitions, constrained_viterbi, tag_marginals
from newstagger.export import export_onnx
from newstagger.model import load_model_folder, save_model_folder
from newstagger.schema import LabelSchema

from conftest import build_tiny_model_folder

NUM_TAGS = 5  # O, B-a, I-a, B-b, I-b


def random_crf(seed: int = 0) -> BioCrf:
    crf = BioCrf(NUM_TAGS)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        crf.transitions.copy_(torch.randn(NUM_TAGS, NUM_TAGS, generator=generator))
        crf.start.copy_(torch.randn(NUM_TAGS, generator=generator))
    return crf


def valid_paths(length: int):
    transitions, start = bio_transitions((NUM_TAGS - 1) // 2)
    for path in itertools.product(range(NUM_TAGS), repeat=length):
        if np.isfinite(start[path[0]]) and all(np.isfinite(transitions[a, b]) for a, b in zip(path, path[1:])):
            yield path


def path_score(crf: BioCrf, emissions: torch.Tensor, path) -> float:
    score = crf.start[path[0]] + emissions[0, path[0]]
    for t in range(1, len(path)):
        score = score + crf.transitions[path[t - 1], path[t]] + emissions[t, path[t]]
    return float(score.detach())


def test_log_partition_sums_every_valid_path_and_ignores_positions_past_the_length():
    crf = random_crf()
    emissions = torch.randn(2, 4, NUM_TAGS, generator=torch.Generator().manual_seed(1))
    got = crf.log_partition(emissions, torch.tensor([4, 3]))
    for row, length in enumerate([4, 3]):
        expected = np.logaddexp.reduce([path_score(crf, emissions[row], p) for p in valid_paths(length)])
        assert got[row].item() == pytest.approx(expected, abs=1e-4)


def test_likelihood_of_an_exact_path_and_of_a_partial_label():
    crf = random_crf()
    emissions = torch.randn(1, 3, NUM_TAGS, generator=torch.Generator().manual_seed(2))
    log_z = np.logaddexp.reduce([path_score(crf, emissions[0], p) for p in valid_paths(3)])

    gold = (1, 2, 0)  # B-a I-a O
    exact = torch.zeros(1, 3, NUM_TAGS, dtype=torch.bool)
    exact[0, torch.arange(3), torch.tensor(gold)] = True
    nll = crf.negative_log_likelihood(emissions, exact, torch.tensor([3]))
    assert nll.item() == pytest.approx(log_z - path_score(crf, emissions[0], gold), abs=1e-4)

    # "a span of either type, then O": the paths B-a I-a O and B-b I-b O together
    partial = torch.zeros(1, 3, NUM_TAGS, dtype=torch.bool)
    partial[0, 0, [1, 3]] = partial[0, 1, [2, 4]] = partial[0, 2, 0] = True
    either = np.logaddexp(path_score(crf, emissions[0], (1, 2, 0)), path_score(crf, emissions[0], (3, 4, 0)))
    nll = crf.negative_log_likelihood(emissions, partial, torch.tensor([3]))
    assert nll.item() == pytest.approx(log_z - either, abs=1e-4)

    everything = torch.ones(1, 3, NUM_TAGS, dtype=torch.bool)
    assert crf.negative_log_likelihood(emissions, everything, torch.tensor([3])).item() == pytest.approx(0.0, abs=1e-4)


def test_viterbi_with_the_crfs_scores_finds_the_best_valid_path():
    crf = random_crf(3)
    emissions = torch.randn(5, NUM_TAGS, generator=torch.Generator().manual_seed(4))
    (path,) = constrained_viterbi([emissions.numpy()], crf.decoding_scores())
    best = max(valid_paths(5), key=lambda p: path_score(crf, emissions, p))
    assert tuple(path.tolist()) == best


def test_learned_transitions_change_what_the_tagger_decodes(tmp_path):
    folder = build_tiny_model_folder(tmp_path / "model")
    text = "滨江市人民政府今天宣布，地铁5号线将于年底开通。"
    model, tokenizer, meta = load_model_folder(folder)
    def spans(tagger):
        return [(e["start"], e["end"], e["type"]) for e in tagger.tag([text])[0]["entities"]]

    plain = spans(Tagger(model, tokenizer, meta))
    model.attach_crf()  # zero transitions: the constrained Viterbi's spans (scored by marginals)
    assert spans(Tagger(model, tokenizer, meta)) == plain

    with torch.no_grad():
        model.crf.start.fill_(-50.0)
        model.crf.start[0] = 0.0  # every text must start outside an entity
        model.crf.transitions[0, 1:] = -50.0  # and never leave O
    meta.training["crf"] = True
    save_model_folder(folder, model, tokenizer, meta)
    tagger = Tagger.load(folder, backend="torch", precision="fp32")
    assert tagger.model.crf is not None and tagger.model.crf.start[1].item() == -50.0
    assert tagger.tag([text])[0]["entities"] == []
    assert "learned tag transitions" in (folder / "README.md").read_text()

    export_onnx(folder)
    assert Tagger.load(folder, backend="onnx", precision="fp32").tag([text])[0]["entities"] == []


def test_a_loaded_crf_scores_like_the_one_that_was_saved(tmp_path):
    folder = build_tiny_model_folder(tmp_path / "model")
    model, tokenizer, meta = load_model_folder(folder)
    model.attach_crf()
    with torch.no_grad():
        model.crf.transitions.normal_()
    save_model_folder(folder, model, tokenizer, meta, weights_dtype=torch.float32)
    loaded = load_model_folder(folder)[0].crf
    for saved, reloaded in zip(model.crf.scores(), loaded.scores()):
        assert torch.equal(saved, reloaded)  # the BIO rules included, which are no weights


def test_growing_the_labels_keeps_the_learned_transitions(tmp_path):
    model, _, meta = load_model_folder(build_tiny_model_folder(tmp_path / "model"))
    model.attach_crf()
    with torch.no_grad():
        model.crf.transitions.fill_(0.5)
    old_tags = len(meta.schema.tags)
    model.grow_labels(LabelSchema(topics=meta.schema.topics, entity_types=[*meta.schema.entity_types, "event"],
                                  coarse=meta.schema.coarse))
    assert model.crf.num_tags == old_tags + 2
    assert (model.crf.transitions[:old_tags, :old_tags] == 0.5).all()
    assert (model.crf.transitions[old_tags:] == 0.0).all()


def test_log_probs_of_an_older_schemas_tags_decode_with_the_transitions_cut_to_them(tmp_path):
    model, tokenizer, meta = load_model_folder(build_tiny_model_folder(tmp_path / "model"))
    model.attach_crf()
    with torch.no_grad():
        model.crf.transitions.normal_()
    tagger = Tagger(model, tokenizer, meta)
    older_tags = len(meta.schema.tags) - 4  # the schema before two types were appended
    log_probs = [np.log(np.random.default_rng(5).dirichlet(np.ones(older_tags), size=7)).astype(np.float32)]
    transitions, start = model.decoding_transitions()
    (expected,) = constrained_viterbi(log_probs, (transitions[:older_tags, :older_tags], start[:older_tags]))
    (path,) = tagger.best_paths(log_probs)
    assert (path == expected).all() and path.max() < older_tags


def test_tag_marginals_match_brute_force_over_the_valid_paths():
    crf = random_crf(6)
    emissions = torch.randn(2, 4, NUM_TAGS, generator=torch.Generator().manual_seed(7))
    log_probs = [emissions[0].numpy(), emissions[1, :3].numpy()]  # two lengths in one batch
    for lp, got in zip(log_probs, tag_marginals(log_probs, crf.decoding_scores())):
        paths = list(valid_paths(len(lp)))
        weights = np.exp([path_score(crf, torch.from_numpy(lp), p) for p in paths])
        expected = np.zeros((len(lp), NUM_TAGS))
        for path, weight in zip(paths, weights / weights.sum()):
            expected[np.arange(len(lp)), list(path)] += weight
        assert np.allclose(got, expected, atol=1e-5)
