"""The model registry: promote/rollback bookkeeping, the `current` link, and atomic writes under crashes."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from conftest import REPO, SAMPLE, build_tiny_model_folder

from newstagger.cli import main
from newstagger.documents import Document
from newstagger.lexical import LexicalTopicModel
from newstagger.model import read_meta
from newstagger.tagger import Tagger
from training import registry as registry_module
from training.data import read_documents, to_hf_dataset
from training.registry import (STAGING, DeployError, Entry, ProductionChanged, Registry, RegistryError, fingerprint,
                               reload_server)


def add_model(registry: Registry, version: str, parent: str | None = None, **entry) -> Entry:
    with registry.staging() as staged:
        build_tiny_model_folder(staged, version=version)
        return registry.register(staged, Entry(version=version, parent=parent, **entry))


@pytest.fixture
def registry(tmp_path) -> Registry:
    registry = Registry(tmp_path / "registry")
    add_model(registry, "1.0.0")
    registry.promote("1.0.0")
    add_model(registry, "1.0.1", parent="1.0.0")
    return registry


def served_version(registry: Registry) -> str:
    return Tagger.load(registry.root / "current").meta.version


def statuses(registry: Registry) -> dict[str, str]:
    return {e.version: e.status for e in registry.manifest().models}


def test_promote_moves_the_current_link_and_retires_the_old_model(registry):
    assert served_version(registry) == "1.0.0"
    assert statuses(registry) == {"1.0.0": "production", "1.0.1": "candidate"}
    registry.promote("1.0.1")
    assert served_version(registry) == "1.0.1"
    assert statuses(registry) == {"1.0.0": "retired", "1.0.1": "production"}
    assert json.loads((registry.root / "manifest.json").read_text())["current"] == "1.0.1"


def test_rollback_restores_the_previous_model_step_by_step(registry):
    add_model(registry, "1.0.2", parent="1.0.1")
    registry.promote("1.0.1")
    registry.promote("1.0.2")
    restored, retired = registry.rollback()
    assert (restored.version, retired.version) == ("1.0.1", "1.0.2")
    assert served_version(registry) == "1.0.1"
    registry.rollback()
    assert served_version(registry) == "1.0.0"
    assert statuses(registry) == {"1.0.0": "production", "1.0.1": "retired", "1.0.2": "retired"}
    with pytest.raises(RegistryError, match="no earlier production model"):
        registry.rollback()


def test_versions_cannot_be_registered_twice_or_promoted_when_unknown(registry):
    with pytest.raises(RegistryError, match="already in the registry"):
        add_model(registry, "1.0.1")
    with pytest.raises(RegistryError, match="no model '9.9.9'"):
        registry.promote("9.9.9")
    with pytest.raises(RegistryError, match="already in production"):
        registry.promote("1.0.0")
    assert registry.next_version("1.0.0") == "1.0.2"


def test_an_unreadable_manifest_or_a_file_for_a_registry_is_a_registry_error(registry, tmp_path):
    (registry.root / "manifest.json").write_text("{")
    with pytest.raises(RegistryError, match="cannot be read as a registry manifest"):
        registry.manifest()
    (tmp_path / "file").write_text("")
    with pytest.raises(RegistryError, match="is a file, not a registry folder"):
        Registry(tmp_path / "file")


def test_a_server_address_that_is_no_url_is_a_deploy_error(tmp_path):
    with pytest.raises(DeployError, match="could not reach"):
        reload_server("http://[::1", tmp_path, None)


def test_a_redirecting_server_is_a_deploy_error_and_the_token_stays_home(tmp_path):
    """urllib follows a 302 by default, resending the Authorization header to wherever it points."""
    seen = []

    class Redirect(BaseHTTPRequestHandler):
        def do_POST(self):
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{self.server.server_port}/elsewhere")
            self.end_headers()

        def do_GET(self):
            seen.append(self.headers.get("Authorization"))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(DeployError, match="redirects to .*/elsewhere"):
            reload_server(f"http://127.0.0.1:{server.server_port}", tmp_path, "admin-secret")
    finally:
        server.shutdown()
    assert seen == []


def test_a_saved_datasets_folder_is_fingerprinted_by_its_files(tmp_path):
    folder = tmp_path / "saved"
    to_hf_dataset([Document("a", "青澜市")]).save_to_disk(folder)
    before = fingerprint(folder, "hf")
    assert fingerprint(folder, "hf") == before and before["format"] == "hf"
    to_hf_dataset([Document("a", "青澜县")]).save_to_disk(tmp_path / "other")
    assert fingerprint(tmp_path / "other", "hf")["sha256"] != before["sha256"]


@pytest.mark.parametrize("version", [".", "..", "../x", "a/b", "current", "manifest.json", ".hidden", ""])
def test_a_version_that_cannot_name_a_folder_is_refused_and_the_registry_kept(registry, version):
    with pytest.raises(RegistryError, match="cannot name a registry folder"):
        add_model(registry, version)
    assert served_version(registry) == "1.0.0"
    assert set(statuses(registry)) >= {"1.0.0", "1.0.1"}


def test_a_failed_manifest_write_leaves_the_old_manifest_and_link(registry, monkeypatch):
    before = (registry.root / "manifest.json").read_bytes()

    def crash(fd):
        raise OSError("disk gone")

    monkeypatch.setattr(registry_module.os, "fsync", crash)  # after the new manifest is half written
    with pytest.raises(OSError, match="disk gone"):
        registry.promote("1.0.1")
    assert (registry.root / "manifest.json").read_bytes() == before
    assert served_version(registry) == "1.0.0"
    assert sorted(p.name for p in registry.root.iterdir()) == [".lock", STAGING, "1.0.0", "1.0.1", "current",
                                                                "manifest.json"]


def test_a_crash_after_moving_a_model_in_but_before_the_manifest_is_recovered(registry, monkeypatch):
    def crash(path, text):
        raise OSError("killed")

    with monkeypatch.context() as patch:
        patch.setattr(registry_module, "replace_text", crash)
        with pytest.raises(OSError):
            add_model(registry, "1.0.2")
    assert (registry.root / "1.0.2").is_dir() and "1.0.2" not in statuses(registry)
    add_model(registry, "1.0.2")  # the orphan folder is replaced, not an error
    assert statuses(registry)["1.0.2"] == "candidate"


def test_a_folder_that_holds_other_things_is_no_registry_and_stays_as_it_was(registry, tmp_path, capsys):
    """A mistyped --registry: its folder named like the version used to be taken for a crash's leftover."""
    source = registry.folder("1.0.0")
    elsewhere = tmp_path / "my stuff"
    (elsewhere / "1.0.0").mkdir(parents=True)
    (elsewhere / "1.0.0" / "notes.txt").write_text("precious")
    for argv in (["add", str(source)], ["list"]):
        assert main(["models", *argv, "--registry", str(elsewhere)]) == 2
        assert "holds '1.0.0' and no manifest.json: not a registry" in capsys.readouterr().err
    assert sorted(p.name for p in elsewhere.iterdir()) == ["1.0.0"]
    assert (elsewhere / "1.0.0" / "notes.txt").read_text() == "precious"
    # nor may a registry sit inside the folder it would copy
    assert main(["models", "add", str(source), "--registry", str(source / "registry")]) == 2
    assert "inside the model folder" in capsys.readouterr().err and not (source / "registry").exists()


CRASH_MID_TRAINING = """
import os, sys
from training.registry import Registry
with Registry(sys.argv[1]).staging() as staged:
    (staged / "model.safetensors").write_bytes(b"half a model")
    os._exit(9)  # killed: no cleanup runs
"""


def test_a_process_killed_mid_training_corrupts_nothing_and_its_leftovers_are_cleared(registry):
    manifest = (registry.root / "manifest.json").read_bytes()
    killed = subprocess.run([sys.executable, "-c", CRASH_MID_TRAINING, str(registry.root)], cwd=REPO)
    assert killed.returncode == 9
    [leftover] = [p for p in (registry.root / STAGING).iterdir() if p.is_dir()]
    assert (leftover / "model.safetensors").is_file()
    assert (registry.root / "manifest.json").read_bytes() == manifest
    assert served_version(registry) == "1.0.0"

    with registry.staging() as in_use:  # a live run's folder must survive the clean-up
        registry.promote("1.0.1")
        assert not leftover.exists()
        assert in_use.is_dir()
    assert served_version(registry) == "1.0.1"


def test_a_deploy_tells_the_server_what_production_is_when_it_tells_it(registry, monkeypatch):
    """Two commands changing production at once: whichever tells the server last tells it the
    production model of that moment, not the version it changed it to."""
    told = []
    monkeypatch.setattr(registry_module, "reload_server", lambda server, folder, token: told.append(folder.name) or
                        {"model": {"name": "m", "version": folder.name}, "previous": None})
    monkeypatch.setenv("NEWSTAGGER_ADMIN_TOKEN", "admin-secret")
    root = str(registry.root)
    registry.promote("1.0.1")  # another command's promotion, made before this one's deploy runs
    registry.rollback()
    assert main(["models", "deploy", "--registry", root, "--server", "http://127.0.0.1:9"]) == 0
    assert main(["models", "promote", "1.0.1", "--registry", root, "--server", "http://127.0.0.1:9"]) == 0
    assert told == ["1.0.0", "1.0.1"]
    assert (registry.root / ".deploy.lock").exists()  # the registry's own: not a reason to call the folder foreign
    assert main(["models", "list", "--registry", root]) == 0


def test_a_deploy_after_a_crash_between_the_manifest_and_the_link_repairs_the_link(registry, monkeypatch):
    monkeypatch.setattr(registry_module, "reload_server", lambda server, folder, token:
                        {"model": {"name": "m", "version": folder.name}, "previous": None})
    monkeypatch.setenv("NEWSTAGGER_ADMIN_TOKEN", "admin-secret")
    registry.promote("1.0.1")
    (registry.root / "current").unlink()  # the manifest written, the process gone before the link moved
    (registry.root / "current").symlink_to("1.0.0")
    assert main(["models", "deploy", "--registry", str(registry.root), "--server", "http://127.0.0.1:9"]) == 0
    assert served_version(registry) == "1.0.1"  # what a server restarted on registry/current loads


def test_models_commands(registry, tmp_path, capsys):
    root = str(registry.root)
    assert main(["models", "promote", "1.0.1", "--registry", root]) == 0
    assert main(["models", "list", "--registry", root]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].split()[:3] == ["*", "1.0.1", "production"]
    assert main(["models", "rollback", "--registry", root]) == 0
    assert "1.0.0 is in production again" in capsys.readouterr().out

    folder = build_tiny_model_folder(tmp_path / "outside", version="2.0.0")
    assert main(["models", "add", str(folder), "--registry", root, "--promote"]) == 0
    assert served_version(registry) == "2.0.0"
    capsys.readouterr()
    assert main(["models", "list", "--registry", root, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["history"] == ["1.0.0", "2.0.0"]


def test_a_rejected_candidate_is_promoted_only_with_force(registry, capsys):
    add_model(registry, "1.0.2", parent="1.0.0", status="rejected", rejected_by_gate=True)  # as retrain registers it
    root = str(registry.root)
    assert main(["models", "promote", "1.0.2", "--registry", root]) == 2
    assert "rejected by the retraining gate; pass --force" in capsys.readouterr().err
    assert served_version(registry) == "1.0.0"
    assert main(["models", "promote", "1.0.2", "--registry", root, "--force"]) == 0
    assert served_version(registry) == "1.0.2"
    assert main(["models", "rollback", "--registry", root]) == 0
    assert statuses(registry)["1.0.2"] == "retired"
    assert main(["models", "promote", "1.0.2", "--registry", root]) == 2  # still needs --force


def test_a_promotion_gated_against_one_production_model_is_refused_once_another_replaced_it(registry):
    add_model(registry, "2.0.0")
    registry.promote("2.0.0")  # while 1.0.1 was being compared with 1.0.0
    with pytest.raises(ProductionChanged, match="production changed from 1.0.0 to 2.0.0"):
        registry.promote("1.0.1", replacing="1.0.0")
    assert served_version(registry) == "2.0.0" and statuses(registry)["1.0.1"] == "candidate"
    registry.promote("1.0.1", replacing="2.0.0")
    assert served_version(registry) == "1.0.1"


def test_a_folder_that_cannot_be_loaded_is_not_added(registry, tmp_path, capsys):
    folder = build_tiny_model_folder(tmp_path / "broken", version="9.9.9")
    (folder / "model.safetensors").unlink()
    assert main(["models", "add", str(folder), "--registry", str(registry.root), "--promote"]) == 2
    assert "not a complete model folder" in capsys.readouterr().err
    assert "9.9.9" not in statuses(registry) and served_version(registry) == "1.0.0"


def test_a_folder_whose_lexical_topic_model_cannot_serve_is_not_added(registry, tmp_path, capsys):
    folder = build_tiny_model_folder(tmp_path / "broken", version="9.9.9")
    docs = [doc for doc in read_documents(SAMPLE) if doc.topics is not None]
    lexical = LexicalTopicModel.fit([doc.text for doc in docs], [doc.topics for doc in docs],
                                    read_meta(folder).schema.topics)
    lexical.weight = 5.0  # topic scores below 0
    lexical.save(folder)
    assert main(["models", "add", str(folder), "--registry", str(registry.root)]) == 2
    assert "blend_weight must be from 0 to 1" in capsys.readouterr().err
    assert "9.9.9" not in statuses(registry)


def test_models_add_records_the_training_data_it_finds_and_says_so_once_added(registry, tmp_path, capsys):
    data = tmp_path / "stories.jsonl"
    data.write_text('{"id": "a", "text": "滨江市", "topics": ["economy"]}\n', encoding="utf-8")
    folder = build_tiny_model_folder(tmp_path / "trained", version="3.0.0")
    meta = json.loads((folder / "newstagger.json").read_text())
    meta["training"] = {"config": {"train": [f"{data}:internal", str(tmp_path / "gone.jsonl")]}}
    (folder / "newstagger.json").write_text(json.dumps(meta))
    assert main(["models", "add", str(folder), "--registry", str(registry.root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["added 3.0.0 to " + str(registry.root), f"recorded for replay: {data} (internal)"]
    assert [source["path"] for source in registry.manifest().entry("3.0.0").data] == [str(data)]


def test_models_add_reads_a_recorded_folder_only_as_a_saved_dataset(registry, tmp_path, capsys):
    """A model folder from elsewhere may record any path: hashing a folder reads every file under it."""
    folder = build_tiny_model_folder(tmp_path / "trained", version="3.0.0")
    meta = json.loads((folder / "newstagger.json").read_text())
    meta["training"] = {"config": {"train": [f"{tmp_path / 'trained'}:hf"]}}
    (folder / "newstagger.json").write_text(json.dumps(meta))
    assert main(["models", "add", str(folder), "--registry", str(registry.root)]) == 2
    assert "is a folder, not a data file or a saved Hugging Face dataset" in capsys.readouterr().err
    assert "3.0.0" not in statuses(registry)


def test_a_folder_with_a_link_is_not_added(registry, tmp_path, capsys):
    """Copying follows links: what one points at (a secret, a folder elsewhere) would enter the registry."""
    folder = build_tiny_model_folder(tmp_path / "linked", version="9.9.9")
    (tmp_path / "private").write_text("AWS_SECRET=x")
    (folder / "NOTES.txt").symlink_to(tmp_path / "private")
    assert main(["models", "add", str(folder), "--registry", str(registry.root)]) == 2
    assert "NOTES.txt is a symbolic link" in capsys.readouterr().err
    assert "9.9.9" not in statuses(registry)
    # A checkpoint kept on other storage is fine: it is never copied.
    (folder / "NOTES.txt").unlink()
    (tmp_path / "scratch").mkdir()
    (folder / "checkpoint").symlink_to(tmp_path / "scratch")
    assert main(["models", "add", str(folder), "--registry", str(registry.root)]) == 0
    assert not (registry.folder("9.9.9") / "checkpoint").exists()


@pytest.mark.parametrize("argv, message", [
    (["models", "promote", "7.7.7"], "no model '7.7.7'"),
    (["models", "rollback"], "no earlier production model"),
    (["models", "add", "."], "not a newstagger model folder"),
])
def test_models_command_errors_are_exit_2_with_one_line(registry, argv, message, capsys, monkeypatch):
    monkeypatch.chdir(registry.root.parent)
    assert main([*argv, "--registry", str(registry.root)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
