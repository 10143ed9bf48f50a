"""The model registry: versioned model folders, a manifest, and the `current` production pointer.

    registry/
      manifest.json     {"current": "1.0.1", "history": ["1.0.0", "1.0.1"], "models": [entry, ...]}
      current -> 1.0.1  symlink: serve with `--model registry/current`
      1.0.0/  1.0.1/    complete model folders (newstagger.model layout)
      .staging/         models being written

An entry is {version, parent, data: [{path, format, sha256}], metrics, created, status}: the data
it was trained on (replayed by the next retrain), its headline scores per evaluation (validation,
gold), and one of candidate | production | retired | rejected. `history` is the stack of versions
that have been current: promoting pushes, rolling back pops.

Nothing is ever half-written where readers look: a model is written under .staging/ and renamed
into place, the manifest and the `current` link are replaced by rename (atomic on POSIX), and
writers take a lock on the registry. A process that dies mid-training leaves only a staging folder,
which the next writer removes. The manifest is the truth; the link follows it.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from newstagger.errors import UsageError
from newstagger.folders import replace_text

log = logging.getLogger("newstagger.registry")

MANIFEST = "manifest.json"
CURRENT_LINK = "current"
STAGING = ".staging"
# What `models add` leaves out of a model folder: training state (weights twice more, optimizer
# state) that serving never reads.
NOT_COPIED = shutil.ignore_patterns("checkpoint*")
LOCK = ".lock"
RETRAIN_LOCK = ".retrain.lock"
DEPLOY_LOCK = ".deploy.lock"
STATUSES = ("candidate", "production", "retired", "rejected")
DEFAULT_REGISTRY = "registry"
TOKEN_VARIABLE = "NEWSTAGGER_ADMIN_TOKEN"
HEADLINE_SCORES = [f"{task}.{average}.f1" for task in ("entities", "entities_coarse", "topics")
                   for average in ("micro", "macro")]
RELOAD_TIMEOUT_S = 300  # loading a model on a busy server can take a while
# A version names a folder in the registry: no path separators, no leading dot ("." or ".." would be
# the registry itself or its parent), and not one of the registry's own entries.
VERSION_PATTERN = re.compile(r"[0-9A-Za-z][0-9A-Za-z._+-]*")
RESERVED_NAMES = (MANIFEST, CURRENT_LINK)
OWN_ENTRIES = {MANIFEST, CURRENT_LINK, STAGING, LOCK, RETRAIN_LOCK, DEPLOY_LOCK}


class RegistryError(UsageError):
    """A registry operation that cannot be done as asked; the message says why (exit code 2)."""


ANY_VERSION = object()  # promote() without a condition on the production model


class ProductionChanged(RegistryError):
    """Another version went into production since a promotion was decided."""


def check_version(version: str) -> str:
    """`version` when it can name a registry folder; RegistryError otherwise."""
    if not isinstance(version, str) or not VERSION_PATTERN.fullmatch(version) or version in RESERVED_NAMES:
        raise RegistryError(f"version {version!r} cannot name a registry folder: use letters, digits and "
                            f"'.', '_', '+', '-', starting with a letter or digit (not {', '.join(RESERVED_NAMES)})")
    return version


@dataclass
class Entry:
    version: str
    parent: str | None = None
    data: list[dict] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    status: str = "candidate"
    # Refused by the retraining gate once: promoting it needs --force even after its status moved on
    # (a forced promotion and a rollback leave it "retired").
    rejected_by_gate: bool = False


@dataclass
class Manifest:
    models: list[Entry] = field(default_factory=list)
    history: list[str] = field(default_factory=list)

    @property
    def current(self) -> str | None:
        return self.history[-1] if self.history else None

    def entry(self, version: str) -> Entry:
        for entry in self.models:
            if entry.version == version:
                return entry
        raise RegistryError(f"no model {version!r} in the registry (known: {[e.version for e in self.models]})")

    def to_dict(self) -> dict:
        return {"current": self.current, "history": self.history, "models": [asdict(e) for e in self.models]}

    @classmethod
    def from_dict(cls, obj: dict) -> "Manifest":
        return cls(models=[Entry(**e) for e in obj.get("models", [])], history=list(obj.get("history", [])))


def metric(metrics: dict, name: str) -> float | None:
    """`entities.micro.f1` looked up in evaluate_tagger's result; None where it has no such score."""
    value = metrics
    for key in name.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def scores(metrics: dict) -> dict[str, float]:
    """The headline scores of an evaluation: what the manifest keeps and what verdicts compare."""
    return {name: metric(metrics, name) for name in HEADLINE_SCORES if metric(metrics, name) is not None}


def fingerprint(path: str | Path, format: str | None = None) -> dict:
    """What a data file (or a saved dataset's folder) was when a model was trained on it: where, how
    it was read, the sha256 of its bytes (of a folder: of each file's name and bytes, in name order)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if file != path:
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return {"path": str(path.resolve()), "format": format, "sha256": digest.hexdigest()}


class Registry:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise RegistryError(f"{self.root} is a file, not a registry folder")

    # ------------------------------------------------------------------ reading

    def manifest(self) -> Manifest:
        path = self.root / MANIFEST
        if not path.is_file():
            return Manifest()
        try:
            return Manifest.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, TypeError, KeyError, AttributeError) as err:  # not JSON, or not a manifest's fields
            raise RegistryError(f"{path} cannot be read as a registry manifest ({err!r}); restore it from a "
                                f"backup or fix it by hand") from None

    def folder(self, version: str) -> Path:
        """The model folder of a registered version (absolute: it is handed to servers)."""
        self.manifest().entry(version)
        return (self.root / version).absolute()

    # ------------------------------------------------------------------ writing

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """An empty folder to write a model into, then hand to `register`; removed if that never happens.

        It holds a lock for as long as it is in use, so a writer can tell an abandoned staging
        folder (its process died) from one still being written, and clear only the former.
        """
        self._check_not_foreign()
        staging_root = self.root / STAGING
        staging_root.mkdir(parents=True, exist_ok=True)
        # The lock exists, and is held, before the folder does: a writer clearing abandoned
        # folders can never take one that is only starting.
        handle, lock_path = tempfile.mkstemp(dir=staging_root, suffix=".lock")
        with os.fdopen(handle, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            folder = Path(lock_path).with_suffix("")
            folder.mkdir()
            try:
                yield folder
            finally:
                shutil.rmtree(folder, ignore_errors=True)  # gone already if it was registered
                Path(lock_path).unlink(missing_ok=True)

    def register(self, staged: Path, entry: Entry) -> Entry:
        """Move a complete model folder from staging into the registry under `entry.version`."""
        check_version(entry.version)
        if entry.status not in STATUSES:
            raise RegistryError(f"status must be one of {STATUSES}, not {entry.status!r}")
        with self._writing() as manifest:
            if any(e.version == entry.version for e in manifest.models):
                raise RegistryError(f"version {entry.version} is already in the registry")
            target = self.root / entry.version
            if target.exists():  # left by a crash between the rename and the manifest write
                shutil.rmtree(target)
            os.rename(staged, target)
            manifest.models.append(entry)
        return entry

    def promote(self, version: str, replacing: str | None | object = ANY_VERSION, force: bool = False) -> Entry:
        """Make `version` the production model; the one it replaces is retired.

        `replacing`: promote only if that version (None: no version) is still in production, as when a
        gate compared the candidate with it. A candidate the gate rejected is promoted only with `force`.
        """
        with self._writing() as manifest:
            entry = manifest.entry(version)
            if version == manifest.current:
                raise RegistryError(f"{version} is already in production")
            if replacing is not ANY_VERSION and manifest.current != replacing:
                raise ProductionChanged(f"production changed from {replacing} to {manifest.current} while {version} "
                                        f"was being made; it was gated against {replacing} only")
            if entry.rejected_by_gate and not force:
                raise RegistryError(f"{version} was rejected by the retraining gate; pass --force to promote it "
                                    f"anyway")
            if manifest.current is not None:
                manifest.entry(manifest.current).status = "retired"
            entry.status = "production"
            manifest.history.append(version)
        return entry

    def rollback(self) -> tuple[Entry, Entry]:
        """Put the previous production model back; returns (restored, retired)."""
        with self._writing() as manifest:
            if len(manifest.history) < 2:
                raise RegistryError("there is no earlier production model to roll back to")
            retired = manifest.entry(manifest.history.pop())
            retired.status = "retired"
            restored = manifest.entry(manifest.current)
            restored.status = "production"
        return restored, retired

    def next_version(self, parent: str) -> str:
        """The parent's version with the patch number raised past every registered version."""
        parts = parent.split(".")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise RegistryError(f"cannot derive a new version from {parent!r}; name one explicitly")
        taken = {e.version for e in self.manifest().models}
        patch = int(parts[2]) + 1
        while f"{parts[0]}.{parts[1]}.{patch}" in taken:
            patch += 1
        return f"{parts[0]}.{parts[1]}.{patch}"

    @contextmanager
    def retraining(self) -> Iterator[None]:
        """Held for a whole retrain: a second one on the same registry would pick the same version and
        find out only when registering it, hours later, so it is refused at once instead."""
        self.check_exists()
        with open(self.root / RETRAIN_LOCK, "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RegistryError(f"another retrain is running on {self.root}; wait for it to finish") from None
            yield

    @contextmanager
    def deploying(self) -> Iterator[Path]:
        """The production model's folder, read and held under the deploy lock while a server is told to
        serve it: of two commands changing production at once, the one that tells the server last
        tells it what production is then, whichever version it changed it to."""
        self.check_exists()
        with open(self.root / DEPLOY_LOCK, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = self._linked_production()
            if current is None:
                raise RegistryError(f"{self.root} has no production model to deploy")
            yield self.folder(current)

    def _linked_production(self) -> str | None:
        """The production version, with the `current` link pointed at it: a crash between the manifest's
        write and the link's leaves them apart, and a server restarted on the link would serve another."""
        with open(self.root / LOCK, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = self.manifest().current
            self._point_current_at(current)
            return current

    def check_exists(self) -> None:
        if not self.root.is_dir():
            raise RegistryError(f"{self.root}: no registry here (`newstagger models add FOLDER --registry "
                                f"{self.root}` starts one)")
        self._check_not_foreign()

    def _check_not_foreign(self) -> None:
        """RegistryError for a folder that holds other things and no manifest: a mistyped --registry,
        whose folder named like a version the registry would take for a crash's leftover and replace."""
        if not self.root.is_dir() or (self.root / MANIFEST).is_file():
            return
        foreign = sorted(entry.name for entry in self.root.iterdir() if entry.name not in OWN_ENTRIES)
        if foreign:
            raise RegistryError(f"{self.root} holds {foreign[0]!r} and no {MANIFEST}: not a registry; name a new or "
                                f"empty folder to start one")

    @contextmanager
    def _writing(self) -> Iterator[Manifest]:
        """The manifest to change, under the registry lock; written back (with the link) on success."""
        self.check_exists()  # a mistyped --registry must not leave a folder behind
        with open(self.root / LOCK, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._clear_abandoned_staging()
            manifest = self.manifest()
            yield manifest
            replace_text(self.root / MANIFEST, json.dumps(manifest.to_dict(), ensure_ascii=False, indent=2) + "\n")
            self._point_current_at(manifest.current)

    def _point_current_at(self, version: str | None) -> None:
        link = self.root / CURRENT_LINK
        if version is None or (link.is_symlink() and os.readlink(link) == version):
            return
        temporary = self.root / f".{CURRENT_LINK}.{os.getpid()}"
        temporary.unlink(missing_ok=True)
        os.symlink(version, temporary)  # relative: the registry can be moved or mounted elsewhere
        os.replace(temporary, link)

    def _clear_abandoned_staging(self) -> None:
        staging_root = self.root / STAGING
        if not staging_root.is_dir():
            return
        for lock_path in staging_root.glob("*.lock"):
            with open(lock_path, "a") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # still being written by a live process
                folder = lock_path.with_suffix("")
                log.info("removing %s, left by a run that did not finish", folder)
                shutil.rmtree(folder, ignore_errors=True)
                lock_path.unlink()


def once_per_path(sources: list[dict]) -> list[dict]:
    """Data fingerprints with a file both new and replayed (a re-exported feedback file) kept once, at
    its last place: the list runs oldest first, and retraining takes a story's labels from the last."""
    return list(reversed({source["path"]: source for source in reversed(sources)}.values()))


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs) -> None:
        return None  # urllib then raises the 3xx as an HTTPError


_NO_REDIRECTS = urllib.request.build_opener(_RefuseRedirects)


def reload_server(server: str, folder: Path, token: str | None) -> dict:
    """Ask a running `newstagger serve` to swap in `folder` (POST /v1/admin/reload); its JSON answer.

    The folder path must mean the same on the server, as it does when both share the registry.
    """
    try:
        request = urllib.request.Request(
            server.rstrip("/") + "/v1/admin/reload", method="POST",
            data=json.dumps({"model": str(folder)}).encode(),
            headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})})
        with _NO_REDIRECTS.open(request, timeout=RELOAD_TIMEOUT_S) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        if 300 <= err.code < 400:
            raise DeployError(f"{server} redirects to {err.headers.get('Location')} ({err.code}); give --server the "
                              "server's own address (a redirect would carry the admin token elsewhere)") from None
        raise DeployError(f"{server} refused the reload ({err.code}): {err.read().decode(errors='replace')}",
                          needs_restart=err.code == 409) from None  # 409: its workers hold a model each
    except (urllib.error.URLError, OSError, ValueError) as err:  # ValueError: not a URL
        raise DeployError(f"could not reach {server}: {err}") from None


class DeployError(RuntimeError):
    """The registry changed but the server did not take the new model (`needs_restart`: it cannot take
    one without a restart)."""

    def __init__(self, message: str, needs_restart: bool = False):
        super().__init__(message)
        self.needs_restart = needs_restart


# --------------------------------------------------------------------------- command line


def add_registry_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--registry", default=DEFAULT_REGISTRY, help=f"registry folder (default: {DEFAULT_REGISTRY})")


def add_server_arguments(parser: argparse.ArgumentParser, required: bool = False) -> None:
    what = "the running server that loads the model" if required else "also make this running server load the model"
    parser.add_argument("--server", required=required, help=f"{what}, e.g. http://127.0.0.1:8000")
    parser.add_argument("--token", default=os.environ.get(TOKEN_VARIABLE),
                        help=f"the server's admin token (default: ${TOKEN_VARIABLE})")


DEPLOY_FAILED = 3  # exit code: the registry changed, the server did not (retrain's 1 means "refused")


def check_server_arguments(args) -> None:
    """What makes `deploy` fail for certain fails before the registry changes, or training starts: a
    command run again after a failed deploy would promote or roll back once more."""
    if not args.server:
        return
    if not args.server.startswith(("http://", "https://")):
        raise UsageError(f"--server: give the server's URL, such as http://127.0.0.1:8000, not {args.server!r}")
    if not args.token:
        raise UsageError(f"--server needs the server's admin token: --token or ${TOKEN_VARIABLE}")


def deploy(args, registry: Registry) -> int:
    """Exit code after telling `--server`, if given, to serve the registry's production model."""
    if not args.server:
        return 0
    try:
        with registry.deploying() as folder:
            answer = reload_server(args.server, folder, args.token)
    except DeployError as err:
        then = ("restart it to serve production (it runs several workers, which reloads cannot reach)"
                if err.needs_restart else
                f"once it can be reached, `newstagger models deploy --server {args.server}` makes it serve production")
        print(f"newstagger {args.command}: the registry is updated but the server is not: {err}; {then}",
              file=sys.stderr)
        return DEPLOY_FAILED
    previous = answer["previous"]["version"] if answer["previous"] else "no model"
    # stderr: retrain's stdout is its JSON verdict alone
    print(f"{args.server} now serves {answer['model']['name']} {answer['model']['version']} (was {previous})",
          file=sys.stderr)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("models", help="the model registry: list, add, promote, roll back, deploy",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    listing = actions.add_parser("list", help="registered versions, newest last; * marks production")
    add_registry_argument(listing)
    listing.add_argument("--json", action="store_true", help="print the manifest as JSON")
    listing.set_defaults(handler=run_list)

    adding = actions.add_parser("add", help="copy a model folder into the registry (e.g. the first model)")
    adding.add_argument("folder", help="a newstagger model folder; its newstagger.json gives the version")
    add_registry_argument(adding)
    adding.add_argument("--data", action="append", metavar="PATH[:FORMAT]",
                        help="data it was trained on, kept for replay (default: what its newstagger.json "
                             "records, where those files are found); repeatable")
    adding.add_argument("--promote", action="store_true", help="make it the production model")
    add_server_arguments(adding)
    adding.set_defaults(handler=run_add)

    promoting = actions.add_parser("promote", help="make VERSION the production model")
    promoting.add_argument("version")
    promoting.add_argument("--force", action="store_true", help="promote it even if the retraining gate rejected it")
    add_registry_argument(promoting)
    add_server_arguments(promoting)
    promoting.set_defaults(handler=run_promote)

    rolling_back = actions.add_parser("rollback", help="bring the previous production model back")
    add_registry_argument(rolling_back)
    add_server_arguments(rolling_back)
    rolling_back.set_defaults(handler=run_rollback)

    deploying = actions.add_parser("deploy", help="make --server serve the production model (after a failed deploy)")
    add_registry_argument(deploying)
    add_server_arguments(deploying, required=True)
    deploying.set_defaults(handler=run_deploy)


def run_list(args) -> int:
    registry = Registry(args.registry)
    registry.check_exists()
    manifest = registry.manifest()
    if args.json:
        print(json.dumps(manifest.to_dict(), ensure_ascii=False, indent=2))
        return 0
    if not manifest.models:
        print(f"{args.registry}: no models yet")
        return 0
    rows = [("", "version", "status", "parent", "created", "metrics")]
    for e in manifest.models:
        rows.append(("*" if e.version == manifest.current else "", e.version, e.status, e.parent or "-",
                     e.created, metrics_summary(e.metrics)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def metrics_summary(metrics: dict) -> str:
    """`gold: entities 0.712 topics 0.801` — micro-F1 per task of each evaluation recorded."""
    parts = []
    for where, result in metrics.items():
        micro = [f"{task} {result[f'{task}.micro.f1']:.3f}" for task in ("entities", "topics")
                 if f"{task}.micro.f1" in result]
        if micro:
            parts.append(f"{where}: {' '.join(micro)}")
    return "; ".join(parts) or "-"


def run_add(args) -> int:
    from newstagger.model import read_meta, read_metrics
    from newstagger.tagger import Tagger
    from training.data import guess_format, parse_data_spec

    if args.promote:
        check_server_arguments(args)
    source = Path(args.folder)
    meta = read_meta(source)
    links = _links_to_copy(source)
    if links:  # copying would follow it: a link to a secret or a folder elsewhere would enter the registry
        raise RegistryError(f"{links[0]} is a symbolic link; a registry takes only a model's own files "
                            "(copy in what it points to)")
    retrained_from = [f"{source['path']}:{source['format']}" for kind in ("replayed", "new")  # oldest first
                      for source in meta.training.get("retraining", {}).get(kind, [])]
    specs = args.data or meta.training.get("config", {}).get("train", []) + retrained_from
    data = []
    for spec in specs:
        path, format = parse_data_spec(spec)
        if path.exists():
            # A folder is guessed even where a format is named: only a saved dataset's folder may be one (else a
            # DataError), since a folder's every file is read
            guessed = guess_format(path) if path.is_dir() or not format else None
            data.append(fingerprint(path, format or guessed))
        elif args.data:
            raise UsageError(f"--data: no file {path}")
        else:
            log.warning("%s was trained on %s, which is not here: it will not be replayed", source, path)
    data = once_per_path(data)
    metrics = {where: scores(result) for where, result in read_metrics(source).items()}
    Tagger.load_exact(source)  # a folder that cannot serve never enters the registry
    if Path(args.registry).absolute().resolve().is_relative_to(source.absolute().resolve()):
        raise RegistryError(f"--registry {args.registry} is inside the model folder {source}, which would be "
                            f"copied into itself")
    registry = Registry(args.registry)
    with registry.staging() as staged:
        shutil.copytree(source, staged, dirs_exist_ok=True, ignore=NOT_COPIED)
        entry = registry.register(staged, Entry(version=meta.version, parent=meta.parent_version,
                                                data=data, metrics=metrics))
    print(f"added {entry.version} to {args.registry}")
    for recorded in data:  # retraining will read these: the operator sees what the folder named
        print(f"recorded for replay: {recorded['path']} ({recorded['format']})")
    if args.promote:
        registry.promote(entry.version)
        print(f"{entry.version} is now in production")
    return deploy(args, registry) if args.promote else 0


def _links_to_copy(folder: Path) -> list[Path]:
    """Symbolic links in what `models add` copies of a model folder: at any depth, and never in what
    NOT_COPIED leaves out."""
    links = []
    for root, folders, files in os.walk(folder):
        skipped = NOT_COPIED(root, folders + files)
        folders[:] = [name for name in folders if name not in skipped]
        links += [Path(root, name) for name in folders + files
                  if name not in skipped and os.path.islink(os.path.join(root, name))]
    return links


def run_promote(args) -> int:
    check_server_arguments(args)
    registry = Registry(args.registry)
    entry = registry.promote(args.version, force=args.force)
    print(f"{entry.version} is now in production")
    return deploy(args, registry)


def run_rollback(args) -> int:
    check_server_arguments(args)
    registry = Registry(args.registry)
    restored, retired = registry.rollback()
    print(f"rolled back: {restored.version} is in production again ({retired.version} retired)")
    return deploy(args, registry)


def run_deploy(args) -> int:
    check_server_arguments(args)
    return deploy(args, Registry(args.registry))
