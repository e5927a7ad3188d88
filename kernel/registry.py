"""The model registry: versions on disk in Hugging Face layout, indexed in SQLite (WAL).

Layout under LLMOS_HOME::

    registry.db                       versions and serving pointers
    models/<name>/v<version>/         config.json, *.safetensors, tokenizer files
    jobs/<id>/                        a train job's checkpoint and output (compress, update:
                                      their work folders)

A version directory is written under a temporary name and renamed into place, so a crash
never leaves a half-written version that the index points to. Only safetensors weights are
copied: pickle-based weight files (.bin, .pt, .pkl) are refused.

A write that fails (a full disk, above all) fails only the request or job that made it:
:func:`writing` turns the error into ``KernelError(INTERNAL)`` naming what could not be
written ("the disk is full: could not write ...") and removes the partial file or folder;
a database write is rolled back. Opening a registry (a kernel starting) sweeps what a crash
or a failed write left half-written (:meth:`Registry.__init__`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import re
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmos.contract.protocol import ErrorCode, KernelError

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")

#: Files copied from a Hugging Face folder; everything else is ignored.
_ALLOWED_FILES = re.compile(
    r"^(config\.json|generation_config\.json|.*\.safetensors|model\.safetensors\.index\.json|"
    r"tokenizer(_config)?\.json|special_tokens_map\.json|vocab\.(txt|json)|merges\.txt|"
    r"added_tokens\.json|chat_template\.(jinja|json)|"
    r"model\.onnx|openvino_model\.(xml|bin)|meta\.json)$"
)
#: A version made by a LoRA update also keeps its adapter, in PEFT's own format, here.
ADAPTER_DIR = "adapter"
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
_PICKLE_WEIGHTS = re.compile(r".*\.(bin|pt|pth|pkl|ckpt)$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    path TEXT NOT NULL,
    parent TEXT,
    recipe TEXT NOT NULL,
    metrics TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (model, version)
);
CREATE TABLE IF NOT EXISTS models (
    name TEXT PRIMARY KEY,
    serving INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS serving_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    model TEXT NOT NULL,
    version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS journal (
    job INTEGER PRIMARY KEY,
    syscall TEXT NOT NULL,
    owner TEXT NOT NULL,
    priority INTEGER NOT NULL,
    args TEXT NOT NULL,
    state TEXT NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS placements (
    host TEXT NOT NULL,
    handle TEXT NOT NULL,
    wanted TEXT NOT NULL,
    PRIMARY KEY (host, handle)
);
CREATE TABLE IF NOT EXISTS tuning (
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    host TEXT NOT NULL,
    machine TEXT NOT NULL,
    timings TEXT NOT NULL,
    PRIMARY KEY (model, version, host, machine)
);
"""


@dataclass(frozen=True, slots=True)
class ModelVersion:
    """One immutable version of a model."""

    model: str
    version: int
    path: Path
    parent: str | None
    recipe: dict[str, Any]
    metrics: dict[str, Any]
    sha256: str
    created_at: float

    @property
    def ref(self) -> str:
        return f"{self.model}:{self.version}"

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.model, "version": self.version, "path": str(self.path),
            "parent": self.parent, "recipe": self.recipe, "metrics": self.metrics,
            "sha256": self.sha256, "created_at": self.created_at,
        }


#: What errors of libraries that do not raise OSError (safetensors, torch, sqlite) say when
#: the file system is full.
_FULL_MARKERS = ("no space left on device", "storagefull", "disk is full", "disk quota exceeded",
                 "errno 28", "os error 28")


def is_disk_full(exc: BaseException) -> bool:
    """True if ``exc`` says the file system (or the user's quota) is full."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if isinstance(exc, sqlite3.Error) and getattr(exc, "sqlite_errorname", "") == "SQLITE_FULL":
        return True
    return says_disk_full(str(exc))


def says_disk_full(text: str) -> bool:
    """True if an error message (e.g. a subprocess's stderr) says the disk is full."""
    return any(marker in text.lower() for marker in _FULL_MARKERS)


def write_error(what: str, path: Path | str, exc: BaseException) -> KernelError:
    """KernelError(INTERNAL) for a failed write of ``what`` at ``path``: "the disk is full:
    could not write ..." when the file system is full, else the system's reason."""
    if is_disk_full(exc):
        return KernelError(ErrorCode.INTERNAL, f"the disk is full: could not write {what} ({path})")
    return KernelError(ErrorCode.INTERNAL,
                       f"could not write {what} ({path}): {type(exc).__name__}: {exc}")


def remove_path(path: Path) -> None:
    """Delete a file or folder if it exists (errors ignored: this is clean-up)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with suppress(OSError):
            path.unlink(missing_ok=True)


@contextmanager
def writing(what: str, path: Path | str, partial: Path | None = None) -> Iterator[None]:
    """Run a block that writes ``what`` to ``path``. If it fails, ``partial`` (the file or
    folder the block was writing, if given) is removed; an OSError, a sqlite error or any
    error that says the disk is full becomes KernelError(INTERNAL) naming ``what`` and
    ``path`` (see :func:`write_error`); other errors pass through unchanged."""
    try:
        yield
    except BaseException as exc:
        if partial is not None:
            remove_path(Path(partial))
        if isinstance(exc, KernelError) or not (
                isinstance(exc, OSError | sqlite3.Error) or is_disk_full(exc)):
            raise
        raise write_error(what, path, exc) from exc


def check_name(name: str) -> str:
    """``name`` if it is a valid model name, else KernelError(BAD_REQUEST)."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise KernelError(
            ErrorCode.BAD_REQUEST,
            f"invalid model name {name!r}: use 1-64 of a-z 0-9 . _ - starting with a letter/digit",
        )
    return name


class Registry:
    """Versions of models under ``home``; safe to use from several threads.

    One kernel owns a home (its pid file says so), so this object is the database's only
    writer while it lives: :meth:`resolve`, on every request's path, answers from memory,
    and every write drops what it remembered."""

    def __init__(self, home: Path) -> None:
        """Open (or create) the registry of ``home`` and sweep what a crash or a failed
        write left half-written there. Only a starting kernel opens it (a running kernel
        owns its home), so nothing found half-written can still be in use:

        - first, before the database opens (a disk filled by them may have no room for its
          files): import staging folders, half-built exports of a version
          (``artifacts/.onnx-new-*``), and partial checkpoints (``jobs/*/*.tmp``);
        - then, with the index and the journal: version folders renamed into place whose
          index row was never committed (never indexed, so never served), and under
          ``jobs/`` the folder of every job but a train job that can be resumed (not DONE,
          with a checkpoint); of those, the stale ``checkpoint.old`` beside a complete
          checkpoint and the ``output`` a finishing job had begun to write.
        """
        self.home = Path(home)
        self.models_dir = self.home / "models"
        self.jobs_dir = self.home / "jobs"
        swept = _remove([*self.models_dir.glob("*/.staging-*"),
                         *self.models_dir.glob("*/v*/artifacts/.*-*-*"),
                         *self.jobs_dir.glob("*/*.tmp")])
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.db_path = self.home / "registry.db"
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.db_path, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._resolved: dict[tuple[str, int | None], ModelVersion] = {}
        #: Journal rows that could not be written (a full disk), by job: retried with the
        #: next journal write, and what :meth:`journal_get` answers meanwhile.
        self._journal_backlog: dict[int, tuple[Any, ...]] = {}
        self._db.commit()
        swept += _remove(self._orphans())
        if swept:
            log.info("removed %d half-written file(s) or folder(s) left by a crash or a failed "
                     "write: %s", len(swept), ", ".join(str(p) for p in swept[:10]))

    def close(self) -> None:
        with self._lock:
            if self._journal_backlog:
                with suppress(KernelError):
                    self._flush_journal_backlog()
            self._db.close()

    # --- queries ----------------------------------------------------------------------

    def versions(self, model: str | None = None) -> list[ModelVersion]:
        sql = "SELECT * FROM versions" + (" WHERE model = ?" if model else "")
        sql += " ORDER BY model, version"
        with self._lock:
            rows = self._db.execute(sql, (model,) if model else ()).fetchall()
        return [self._row(r) for r in rows]

    def serving(self) -> dict[str, int]:
        """Model name -> the version that serves it."""
        with self._lock:
            return dict(self._db.execute("SELECT name, serving FROM models").fetchall())

    def resolve(self, model: str, version: int | None = None) -> ModelVersion:
        """The named version, or the serving one; KernelError(NOT_FOUND) if there is none."""
        check_name(model)
        with self._lock:
            known = self._resolved.get((model, version))
            if known is not None:
                return known
            if version is None:
                row = self._db.execute(
                    "SELECT v.* FROM versions v JOIN models m ON v.model = m.name "
                    "AND v.version = m.serving WHERE m.name = ?", (model,)).fetchone()
            else:
                row = self._db.execute(
                    "SELECT * FROM versions WHERE model = ? AND version = ?", (model, version)
                ).fetchone()
            if row is not None:
                found = self._resolved[(model, version)] = self._row(row)
                return found
        what = f"model {model!r}" + (f" version {version}" if version is not None else "")
        raise KernelError(ErrorCode.NOT_FOUND, f"{what} is not in the registry (see `llmos models`)")

    # --- writes -----------------------------------------------------------------------

    @contextmanager
    def scratch(self, name: str) -> Iterator[Path]:
        """An empty folder beside ``name``'s versions (same file system, so an import can
        move from it), removed afterwards; a crash leaves it to the orphan cleanup."""
        check_name(name)
        parent = self.models_dir / name
        with writing(f"a scratch folder for {name}", parent):
            parent.mkdir(parents=True, exist_ok=True)
            folder = Path(tempfile.mkdtemp(prefix=".staging-scratch-", dir=parent))
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def import_folder(
        self, name: str, source: Path, recipe: dict[str, Any], parent: str | None = None,
        metrics: dict[str, Any] | None = None, move: bool = False,
    ) -> tuple[ModelVersion, bool]:
        """Copy (or, with ``move``, move: same file system, instant) a Hugging Face folder
        in as a new version of ``name``.

        Returns (version, created). Importing weights identical to an existing version of
        ``name`` returns that version with created=False. A failed write (a full disk)
        leaves nothing behind: KernelError(INTERNAL) naming the version (see :func:`writing`).
        """
        check_name(name)
        source = Path(source)
        files = _select_files(source)
        digest = digest_files(files, source)
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM versions WHERE model = ? AND sha256 = ?", (name, digest)
            ).fetchone()
        if row is not None:
            return self._row(row), False
        target_dir = self.models_dir / name
        existed = target_dir.exists()
        try:
            staging = _stage(name, source, files, target_dir, move)
            try:
                with self._lock:
                    version = 1 + (self._db.execute(
                        "SELECT COALESCE(MAX(version), 0) FROM versions WHERE model = ?", (name,)
                    ).fetchone()[0])
                    final = target_dir / f"v{version}"
                    record = ModelVersion(name, version, final, parent, recipe, metrics or {},
                                          digest, time.time())
                    with writing(f"version {version} of {name}", final, partial=final), \
                            self._writing(f"the index entry of {name}:{version}"):
                        staging.rename(final)
                        self._db.execute(
                            "INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            (name, version, str(final), parent, json.dumps(recipe),
                             json.dumps(record.metrics), digest, record.created_at))
                        first = self._db.execute(
                            "INSERT INTO models VALUES (?, ?) ON CONFLICT(name) DO NOTHING",
                            (name, version)).rowcount
                        if first:
                            self._db.execute("INSERT INTO serving_log (model, version) "
                                             "VALUES (?, ?)", (name, version))
            finally:
                shutil.rmtree(staging, ignore_errors=True)  # gone once renamed into place
        finally:
            if not existed:  # a failed first version: the model's folder goes (if empty)
                with suppress(OSError):
                    target_dir.rmdir()
        return record, True

    def set_serving(self, model: str, version: int) -> None:
        """Make ``version`` the one that serves ``model`` (it must exist); remembered in the
        serving history that :meth:`pop_serving` walks back."""
        with self._lock, self._writing(f"the serving version of {model}"):
            self._db.execute("UPDATE models SET serving = ? WHERE name = ?", (version, model))
            self._db.execute("INSERT INTO serving_log (model, version) VALUES (?, ?)",
                             (model, version))

    def previous_serving(self, model: str) -> int | None:
        """The version that served ``model`` before the current one (None: none did)."""
        with self._lock:
            rows = self._db.execute("SELECT version FROM serving_log WHERE model = ? "
                                    "ORDER BY id DESC LIMIT 2", (model,)).fetchall()
        return int(rows[1][0]) if len(rows) == 2 else None

    def pop_serving(self, model: str) -> int:
        """Roll back: forget the latest entry of the serving history and serve the one
        before it again; returns that version. KernelError(BAD_REQUEST) if there is none."""
        with self._lock:
            rows = self._db.execute("SELECT id, version FROM serving_log WHERE model = ? "
                                    "ORDER BY id DESC LIMIT 2", (model,)).fetchall()
            if len(rows) < 2:
                raise KernelError(ErrorCode.BAD_REQUEST,
                                  f"{model} has no earlier serving version to roll back to")
            with self._writing(f"the serving version of {model}"):
                self._db.execute("DELETE FROM serving_log WHERE id = ?", (rows[0][0],))
                self._db.execute("UPDATE models SET serving = ? WHERE name = ?",
                                 (rows[1][1], model))
        return int(rows[1][1])

    def add_metrics(self, version: ModelVersion, key: str, metrics: dict[str, Any]) -> None:
        """Record measured metrics (e.g. an evaluation) on a version under ``key``."""
        with self._lock:
            row = self._db.execute("SELECT metrics FROM versions WHERE model = ? AND version = ?",
                                   (version.model, version.version)).fetchone()
            merged = {**json.loads(row[0]), key: metrics}
            with self._writing(f"the metrics of {version.ref}"):
                self._db.execute("UPDATE versions SET metrics = ? WHERE model = ? AND version = ?",
                                 (json.dumps(merged), version.model, version.version))

    # --- the job journal: durable jobs survive a kernel restart -----------------------

    def journal_put(self, job_id: int, syscall: str, owner: str, priority: int,
                    args: dict[str, Any], state: str) -> None:
        """Record a job's state (with rows an earlier failed write left in the backlog).

        KernelError(INTERNAL) naming registry.db if it cannot be written; the row then
        waits in memory (what :meth:`journal_get` answers) and goes in with the next write.
        """
        row = (job_id, syscall, owner, priority, json.dumps(args), state, time.time())
        with self._lock:
            self._journal_backlog[job_id] = row
            self._flush_journal_backlog()

    def _flush_journal_backlog(self) -> None:
        """Write the waiting journal rows in one transaction (the caller holds the lock)."""
        jobs = ", ".join(str(job) for job in sorted(self._journal_backlog))
        with self._writing(f"the job journal (job {jobs})"):
            self._db.executemany("INSERT OR REPLACE INTO journal VALUES (?, ?, ?, ?, ?, ?, ?)",
                                 list(self._journal_backlog.values()))
        self._journal_backlog.clear()

    def journal_unfinished(self) -> list[tuple[int, str, str, int, dict[str, Any]]]:
        """(id, syscall, owner, priority, args) of journalled jobs that never ended."""
        with self._lock:
            rows = self._db.execute(
                "SELECT job, syscall, owner, priority, args FROM journal "
                "WHERE state IN ('QUEUED', 'RUNNING', 'PREEMPTED') ORDER BY job").fetchall()
        return [(r[0], r[1], r[2], r[3], json.loads(r[4])) for r in rows]

    def journal_get(self, job_id: int) -> tuple[str, str, dict[str, Any]] | None:
        """(syscall, state, args) of a journalled job, or None."""
        with self._lock:
            waiting = self._journal_backlog.get(job_id)
            if waiting is not None:
                return waiting[1], waiting[5], json.loads(waiting[4])
            row = self._db.execute("SELECT syscall, state, args FROM journal WHERE job = ?",
                                   (job_id,)).fetchone()
        return None if row is None else (row[0], row[1], json.loads(row[2]))

    def journal_last_id(self) -> int:
        with self._lock:
            written = int(self._db.execute("SELECT COALESCE(MAX(job), 0) FROM journal").fetchone()[0])
            return max([written, *self._journal_backlog])

    def save_tuning(self, version: ModelVersion, host: str, machine: str,
                    timings: dict[str, float]) -> None:
        """Remember a driver host's measured timings for a version on this machine;
        KernelError(INTERNAL) if they cannot be written."""
        with self._lock, self._writing(f"the timings of {version.ref} on {host}"):
            self._db.execute("INSERT OR REPLACE INTO tuning VALUES (?, ?, ?, ?, ?)",
                             (version.model, version.version, host, machine, json.dumps(timings)))

    def tuning(self, version: ModelVersion, machine: str) -> dict[str, dict[str, float]]:
        """Host name -> timings measured for ``version`` on ``machine`` (empty if none)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT host, timings FROM tuning WHERE model = ? AND version = ? AND machine = ?",
                (version.model, version.version, machine)).fetchall()
        return {host: json.loads(timings) for host, timings in rows}

    def save_placement(self, host: str, handle: str, wanted: dict[str, Any]) -> None:
        """Remember that ``handle`` is loaded on ``host`` (path, memory, load options), so a
        restarted kernel loads it there again; KernelError(INTERNAL) if it cannot be written."""
        with self._lock, self._writing(f"the placement of {handle} on {host}"):
            self._db.execute("INSERT OR REPLACE INTO placements VALUES (?, ?, ?)",
                             (host, handle, json.dumps(wanted)))

    def drop_placement(self, host: str, handle: str) -> None:
        """Forget ``handle`` on ``host`` (unloaded, or its load failed)."""
        with self._lock, self._writing(f"the placement of {handle} on {host}"):
            self._db.execute("DELETE FROM placements WHERE host = ? AND handle = ?", (host, handle))

    def placements(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Host name -> handle -> what its load asked for (see :meth:`save_placement`)."""
        with self._lock:
            rows = self._db.execute("SELECT host, handle, wanted FROM placements").fetchall()
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for host, handle, wanted in rows:
            out.setdefault(host, {})[handle] = json.loads(wanted)
        return out

    # --- internals --------------------------------------------------------------------

    @contextmanager
    def _writing(self, what: str) -> Iterator[None]:
        """A transaction (the caller holds the lock): committed after the block; rolled back
        if the block or the commit fails, an OSError or sqlite error then raised as
        KernelError(INTERNAL) naming ``what`` and registry.db. Either way every remembered
        resolution is forgotten."""
        try:
            with writing(what, self.db_path):
                try:
                    yield
                    self._db.commit()
                except BaseException:
                    with suppress(sqlite3.Error):
                        self._db.rollback()
                    raise
        finally:
            self._resolved.clear()

    def _row(self, row: tuple[Any, ...]) -> ModelVersion:
        model, version, path, parent, recipe, metrics, sha256, created_at = row
        return ModelVersion(model, version, Path(path), parent, json.loads(recipe),
                            json.loads(metrics), sha256, created_at)

    def _orphans(self) -> list[Path]:
        """What :meth:`__init__` removes once the index and the journal can be read."""
        indexed = {Path(v.path) for v in self.versions()}
        found = [p for p in self.models_dir.glob("*/v*") if p.is_dir() and p not in indexed]
        with self._lock:
            resumable = {str(job) for (job,) in self._db.execute(
                "SELECT job FROM journal WHERE syscall = 'train' AND state != 'DONE'")}
        for folder in self.jobs_dir.glob("*"):
            checkpoint = folder / "checkpoint"
            if folder.name not in resumable or not (
                    checkpoint.exists() or folder.joinpath("checkpoint.old").exists()):
                found.append(folder)
                continue
            found.append(folder / "output")
            if checkpoint.exists():
                found.append(folder / "checkpoint.old")
        return found


def _stage(name: str, source: Path, files: list[Path], target_dir: Path, move: bool) -> Path:
    """Copy (or move) ``files`` from ``source`` into a new staging folder in ``target_dir``;
    KernelError(INTERNAL) and no staging folder left if a write fails."""
    with writing(f"a new version of {name}", target_dir):
        target_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target_dir))
        with writing(f"a new version of {name}", target_dir, partial=staging):
            for file in files:
                target = staging / file.relative_to(source)
                target.parent.mkdir(exist_ok=True)
                (shutil.move if move else shutil.copy2)(file, target)
    return staging


def _remove(paths: list[Path]) -> list[Path]:
    """Delete the files and folders among ``paths`` that exist; those it deleted."""
    removed = [path for path in paths if path.exists() or path.is_symlink()]
    for path in removed:
        remove_path(path)
    return removed


def _select_files(source: Path) -> list[Path]:
    """The files of a Hugging Face folder that llmos keeps; errors if it is not usable."""
    if not source.is_dir():
        raise KernelError(ErrorCode.NOT_FOUND, f"model folder {str(source)!r} does not exist")
    if not (source / "config.json").is_file():
        raise KernelError(ErrorCode.BAD_REQUEST, f"{source} has no config.json")
    names = sorted(p.name for p in source.iterdir() if p.is_file())
    graphs = {"model.onnx", "openvino_model.xml"}  # compressed versions: a runtime's graph
    if not any(n.endswith(".safetensors") or n in graphs for n in names):
        pickled = [n for n in names if _PICKLE_WEIGHTS.match(n)]
        hint = f" (found {', '.join(pickled)}: pickle-based weights are refused)" if pickled else ""
        raise KernelError(ErrorCode.BAD_REQUEST, f"{source} has no .safetensors weights{hint}")
    kept = [source / n for n in names if _ALLOWED_FILES.match(n)]
    adapter = source / ADAPTER_DIR  # a LoRA adapter in PEFT's format, beside merged weights
    return kept + [adapter / n for n in _ADAPTER_FILES if (adapter / n).is_file()]


def digest_files(files: list[Path], root: Path | None = None) -> str:
    """sha256 over the names (relative to ``root``, else bare) and contents of ``files``."""
    sha = hashlib.sha256()
    for file in files:
        sha.update((file.relative_to(root).as_posix() if root else file.name).encode())
        with file.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                sha.update(chunk)
    return sha.hexdigest()
