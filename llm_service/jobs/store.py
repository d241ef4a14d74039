"""The job store: uploaded files, batch jobs and their items, kept across restarts.

`JobStore` is the interface the rest of the daemon uses; `SqliteJobStore` is the embedded one
(one SQLite file in WAL mode, the files' bytes in a folder beside it), the default;
`postgres.PostgresJobStore` is the shared one several daemons drain (`jobs_url`).
`open_job_store` picks between them.

Crash safety rests on three rules: an item is `running` only between `claim_next_item` and the
recording of its result; a result is recorded only over a `running` item, so a second record of
the same item changes nothing; and `recover_running` at start-up puts back to `pending` what a
killed daemon was running, to be run again.

Every call is synchronous and blocking (sqlite3, file I/O): the async layer runs them in worker
threads. One connection serves them all, behind a lock.
"""
from __future__ import annotations

import errno
import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .batch_input import BatchRequest, LineError

DATABASE_NAME = "jobs.sqlite3"
FILES_FOLDER = "files"

# Job statuses, OpenAI's names.
VALIDATING = "validating"
IN_PROGRESS = "in_progress"
FINALIZING = "finalizing"
CANCELLING = "cancelling"
COMPLETED = "completed"
FAILED = "failed"
CANCELLED = "cancelled"
EXPIRED = "expired"
FINISHED_STATUSES = frozenset({COMPLETED, FAILED, CANCELLED, EXPIRED})

# A job moves only along these; the items' states decide when.
JOB_TRANSITIONS: dict[str, frozenset[str]] = {
    VALIDATING: frozenset({IN_PROGRESS, FAILED, CANCELLED, EXPIRED}),
    IN_PROGRESS: frozenset({FINALIZING, CANCELLING}),
    CANCELLING: frozenset({CANCELLED}),
    FINALIZING: frozenset({COMPLETED, EXPIRED}),
    COMPLETED: frozenset(),
    FAILED: frozenset(),
    CANCELLED: frozenset(),
    EXPIRED: frozenset(),
}

# Item states.
PENDING = "pending"
RUNNING = "running"
DONE = "done"
ITEM_FAILED = "failed"
ITEM_CANCELLED = "cancelled"
ITEM_EXPIRED = "expired"

# A byte file without its row is left by a crash inside `add_file`; one this old is no upload
# still in progress.
_ORPHAN_AGE_S = 3600.0


class JobStoreError(Exception):
    """Base of the store's errors."""


class StoreUnavailable(JobStoreError):
    """The store cannot be read or written (read-only, corrupt, missing folder): a 503."""


class StoreFull(StoreUnavailable):
    """The disk (or the database's size limit) is full: a 507."""


class FileTooLarge(JobStoreError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the file is larger than {limit} bytes")
        self.limit = limit


class NotFound(JobStoreError):
    """No file or job of that id."""


class JobStateError(JobStoreError):
    """A move the job's status does not allow (a bug of the caller)."""


@dataclass(frozen=True, slots=True)
class StoredFile:
    id: str
    purpose: str
    filename: str
    bytes: int
    created_at: float
    expires_at: float | None = None


@dataclass(frozen=True, slots=True)
class RequestCounts:
    total: int = 0
    completed: int = 0
    failed: int = 0
    pending: int = 0
    running: int = 0
    cancelled: int = 0
    expired: int = 0


@dataclass(frozen=True, slots=True)
class Job:
    id: str
    model: str | None  # known once validated
    endpoint: str
    input_file_id: str | None
    status: str
    completion_window: str
    created_at: float
    expires_at: float
    counts: RequestCounts = field(default_factory=RequestCounts)
    outcome: str | None = None  # the finished status a cancelled or expired job is heading for
    in_progress_at: float | None = None
    finalizing_at: float | None = None
    cancelling_at: float | None = None
    finished_at: float | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: tuple[dict[str, Any], ...] = ()  # a failed job's reasons
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ClaimedItem:
    job_id: str
    line: int
    custom_id: str
    endpoint: str
    model: str
    body: dict[str, Any]
    attempt: int  # 1 at the first run; more after restarts


@dataclass(frozen=True, slots=True)
class Item:
    job_id: str
    line: int
    custom_id: str | None
    state: str
    result: dict[str, Any] | None  # {"status_code", "request_id", "body"}
    error: dict[str, Any] | None  # {"code", "message", "line"?}
    attempts: int


@dataclass(frozen=True, slots=True)
class ModelProgress:
    """A model's job items for status and metrics."""

    pending: int = 0
    running: int = 0
    oldest_pending_since: float | None = None  # when the oldest job with pending items came


@dataclass(frozen=True, slots=True)
class PurgeCounts:
    jobs: int
    files: int


class JobStore(Protocol):
    """What the daemon asks of a job store."""

    # How long a claimed item stays this store's without `renew_lease`; None: no leases (one
    # daemon owns the store, `recover_running` at its start takes back what it was running).
    lease_s: float | None

    # Files.
    def add_file(self, purpose: str, filename: str, content: bytes | Iterable[bytes],
                 expires_at: float | None = None) -> StoredFile: ...
    def get_file(self, file_id: str) -> StoredFile: ...
    def file_bytes(self, file_id: str) -> bytes: ...
    def list_files(self, purpose: str | None = None) -> list[StoredFile]: ...
    def delete_file(self, file_id: str) -> bool: ...

    # Jobs.
    def create_job(self, endpoint: str, input_file_id: str | None, completion_window: str,
                   window_s: float, metadata: dict[str, str] | None = None) -> Job: ...
    def begin_job(self, job_id: str, model: str | None, requests: Sequence[BatchRequest],
                  line_errors: Sequence[LineError] = ()) -> Job: ...
    def fail_job(self, job_id: str, errors: Sequence[dict[str, Any]]) -> Job: ...
    def get_job(self, job_id: str) -> Job: ...
    def list_jobs(self, limit: int = 20, after: str | None = None) -> list[Job]: ...
    def jobs_in_status(self, *statuses: str) -> list[Job]: ...
    def jobs_to_finish(self) -> list[Job]: ...
    def finish_job(self, job_id: str, output_file_id: str | None,
                   error_file_id: str | None) -> Job: ...
    def cancel_job(self, job_id: str) -> Job: ...
    def job_items(self, job_id: str) -> list[Item]: ...
    def item_times(self, job_id: str) -> dict[int, tuple[float | None, float | None]]: ...

    # Items.
    def claim_next_item(self, model: str) -> ClaimedItem | None: ...
    def record_response(self, job_id: str, line: int, status_code: int, request_id: str,
                        body: Any) -> bool: ...
    def record_error(self, job_id: str, line: int, code: str, message: str) -> bool: ...
    def requeue_item(self, job_id: str, line: int) -> bool: ...
    # True while this store still holds the running item; the runner calls it every
    # `lease_s / 3` seconds or so for each item it runs (a store without leases: lease_s None).
    def renew_lease(self, job_id: str, line: int) -> bool: ...
    def model_progress(self) -> dict[str, ModelProgress]: ...

    # Upkeep.
    def recover_running(self, max_attempts: int = 3) -> int: ...
    def expire_due(self) -> list[str]: ...
    def purge(self, retention_s: float) -> PurgeCounts: ...
    def close(self) -> None: ...


# Each entry brings the schema from its index to the next version (PRAGMA user_version); entries
# are never edited once released, only appended.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE files (
        id TEXT PRIMARY KEY,
        purpose TEXT NOT NULL,
        filename TEXT NOT NULL,
        bytes INTEGER NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL
    );
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        model TEXT,
        endpoint TEXT NOT NULL,
        input_file_id TEXT,
        status TEXT NOT NULL,
        outcome TEXT,
        completion_window TEXT NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        in_progress_at REAL,
        finalizing_at REAL,
        cancelling_at REAL,
        finished_at REAL,
        output_file_id TEXT,
        error_file_id TEXT,
        errors TEXT,
        metadata TEXT NOT NULL DEFAULT '{}',
        last_claim INTEGER NOT NULL DEFAULT 0  -- round-robin: the claim sequence it last won
    );
    CREATE INDEX jobs_by_model ON jobs (model, status, last_claim);
    CREATE INDEX jobs_by_status ON jobs (status);
    CREATE TABLE items (
        job_id TEXT NOT NULL,
        line INTEGER NOT NULL,
        custom_id TEXT,
        body TEXT,
        state TEXT NOT NULL,
        result TEXT,
        error TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        started_at REAL,
        finished_at REAL,
        PRIMARY KEY (job_id, line)
    ) WITHOUT ROWID;
    CREATE INDEX items_by_state ON items (job_id, state, line);
    CREATE INDEX items_running ON items (state) WHERE state = 'running';
    """,
]


def schema_version() -> int:
    return len(MIGRATIONS)


JOBS_FOLDER = "jobs"  # the SQLite store's folder in the daemon's data_dir
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def open_job_store(where: Any, jobs_url: str | None = None, **options: Any) -> JobStore:
    """The daemon's job store: SQLite in `<data_dir>/jobs/` by default, PostgreSQL when
    `jobs_url` is a postgresql:// URL. `where` is the daemon's settings (their `data_dir` and
    `jobs_url`, `jobs_lease_s`; an explicit `jobs_url` wins) or a data folder. psycopg is
    imported only for PostgreSQL.
    `options` go to the store's constructor (max_file_bytes, clock; for PostgreSQL also
    box_id, lease_s, max_attempts, connect_timeout_s, statement_timeout_s)."""
    lease_s = None
    if isinstance(where, (str, os.PathLike)):
        data_dir = Path(where)
    else:
        data_dir = Path(where.data_dir)
        if jobs_url is None:
            jobs_url = getattr(where, "jobs_url", None)
        lease_s = getattr(where, "jobs_lease_s", None)
    if jobs_url:
        if not jobs_url.startswith(POSTGRES_SCHEMES):
            raise ValueError(f"jobs_url must be a postgresql:// URL, not {jobs_url.split(':', 1)[0]}:")
        from .postgres import PostgresJobStore

        if lease_s is not None:
            options.setdefault("lease_s", lease_s)
        return PostgresJobStore(jobs_url, **options)
    return SqliteJobStore(data_dir / JOBS_FOLDER, **options)


def _new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex


# A job's columns in the order `job_from_row` reads them (both stores' jobs tables).
JOB_COLUMNS = ("id, model, endpoint, input_file_id, status, completion_window, created_at, expires_at, outcome, "
               "in_progress_at, finalizing_at, cancelling_at, finished_at, output_file_id, error_file_id, errors, "
               "metadata")


def job_from_row(row: Sequence[Any], by_state: dict[str, int]) -> Job:
    """A job from its row (JOB_COLUMNS) and its items counted by state. Pure."""
    counts = RequestCounts(
        total=sum(by_state.values()), completed=by_state.get(DONE, 0),
        failed=by_state.get(ITEM_FAILED, 0), pending=by_state.get(PENDING, 0),
        running=by_state.get(RUNNING, 0), cancelled=by_state.get(ITEM_CANCELLED, 0),
        expired=by_state.get(ITEM_EXPIRED, 0))
    (id_, model, endpoint, input_file_id, status, window, created_at, expires_at, outcome,
     in_progress_at, finalizing_at, cancelling_at, finished_at, output_file_id, error_file_id,
     errors, metadata) = row
    return Job(id_, model, endpoint, input_file_id, status, window, created_at, expires_at,
               counts, outcome, in_progress_at, finalizing_at, cancelling_at, finished_at,
               output_file_id, error_file_id, tuple(_loads(errors) or ()), _loads(metadata) or {})


class SqliteJobStore:
    """The job store in `<directory>/jobs.sqlite3`, the files' bytes in `<directory>/files/`."""

    lease_s: float | None = None  # one daemon per file: no leases

    def __init__(self, directory: Path, max_file_bytes: int = 200 * 1024 * 1024,
                 clock: Callable[[], float] = time.time) -> None:
        self.directory = Path(directory)
        self.path = self.directory / DATABASE_NAME
        self.files_dir = self.directory / FILES_FOLDER
        self.max_file_bytes = max_file_bytes
        self._clock = clock
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None
        with self._translated("open"):
            self.files_dir.mkdir(parents=True, exist_ok=True)
            # Autocommit: every write below opens its own BEGIN IMMEDIATE, so a transaction
            # never waits half-way for another writer.
            connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                         timeout=10.0)
            try:
                connection.execute("PRAGMA journal_mode = WAL")
                # In WAL mode NORMAL survives a killed process; only a power cut may roll back
                # the last commits, which at worst runs an item again (never records it twice).
                connection.execute("PRAGMA synchronous = NORMAL")
                self._migrate(connection)
            except BaseException:
                connection.close()
                raise
            self._connection = connection

    # -- the database -------------------------------------------------------------------------

    def _migrate(self, connection: sqlite3.Connection) -> None:
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise StoreUnavailable(
                f"the job store {self.path} has schema version {version}, newer than this "
                f"daemon's {len(MIGRATIONS)}: it was written by a newer version")
        for number in range(version, len(MIGRATIONS)):
            # The version moves in the same transaction as the schema: a crash leaves either.
            try:
                connection.executescript(
                    f"BEGIN IMMEDIATE;\n{MIGRATIONS[number]}\nPRAGMA user_version = {number + 1};\nCOMMIT;")
            except BaseException:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise

    @contextmanager
    def _translated(self, doing: str) -> Iterator[None]:
        """sqlite3 and OS errors as the store's own, saying what the operator can do."""
        try:
            yield
        except JobStoreError:
            raise
        except sqlite3.Error as error:
            code = getattr(error, "sqlite_errorcode", None)
            primary = code & 0xFF if isinstance(code, int) else None
            if primary == sqlite3.SQLITE_FULL:
                raise StoreFull(f"the job store {self.path} is full ({doing}): {error}") from None
            if primary == sqlite3.SQLITE_READONLY:
                raise StoreUnavailable(
                    f"the job store {self.path} is read-only ({doing}): check the permissions of "
                    f"the file and its folder and the mount") from None
            if primary == sqlite3.SQLITE_CANTOPEN:
                raise StoreUnavailable(
                    f"the job store {self.path} cannot be opened ({doing}): check that its folder "
                    f"exists and is writable") from None
            if primary in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
                raise StoreUnavailable(
                    f"the job store {self.path} is damaged ({doing}): {error}") from None
            raise StoreUnavailable(f"the job store {self.path} failed ({doing}): {error}") from None
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise StoreFull(f"no space left for the job store in {self.directory} ({doing})") from None
            raise StoreUnavailable(
                f"the job store's folder {self.directory} failed ({doing}): {error}") from None

    @contextmanager
    def _reading(self, doing: str) -> Iterator[sqlite3.Connection]:
        with self._lock, self._translated(doing):
            if self._connection is None:
                raise StoreUnavailable("the job store is closed")
            yield self._connection

    @contextmanager
    def _writing(self, doing: str) -> Iterator[sqlite3.Connection]:
        """One write transaction; taken at BEGIN so that a read inside it cannot go stale."""
        with self._lock, self._translated(doing):
            connection = self._connection
            if connection is None:
                raise StoreUnavailable("the job store is closed")
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection
                connection.execute("COMMIT")
            except BaseException:
                # SQLite may have rolled back already (a full disk does); a COMMIT that failed
                # (busy, full) leaves the transaction open, which would block every later one.
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    # -- files --------------------------------------------------------------------------------

    def _bytes_path(self, file_id: str) -> Path:
        return self.files_dir / file_id

    def add_file(self, purpose: str, filename: str, content: bytes | Iterable[bytes],
                 expires_at: float | None = None) -> StoredFile:
        """Store a file: its bytes first (written whole, then renamed), then its row, so a row
        never names bytes that are not all there."""
        file_id = _new_id("file-")
        chunks = [content] if isinstance(content, (bytes, bytearray, memoryview)) else content
        target = self._bytes_path(file_id)
        partial = target.with_name(file_id + ".partial")
        size = 0
        try:
            with self._translated("writing a file"):
                with open(partial, "wb") as out:
                    for chunk in chunks:
                        size += len(chunk)
                        if size > self.max_file_bytes:
                            raise FileTooLarge(self.max_file_bytes)
                        out.write(chunk)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(partial, target)
            stored = StoredFile(file_id, purpose, filename, size, self._clock(), expires_at)
            with self._writing("adding a file") as db:
                db.execute("INSERT INTO files VALUES (?, ?, ?, ?, ?, ?)",
                           (stored.id, purpose, filename, size, stored.created_at, expires_at))
        except BaseException:
            partial.unlink(missing_ok=True)
            target.unlink(missing_ok=True)
            raise
        return stored

    def get_file(self, file_id: str) -> StoredFile:
        with self._reading("reading a file") as db:
            row = db.execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone()
        if row is None:
            raise NotFound(f"no file {file_id!r}")
        return StoredFile(*row)

    def list_files(self, purpose: str | None = None) -> list[StoredFile]:
        """Every file (of `purpose`), oldest first."""
        with self._reading("listing files") as db:
            if purpose is None:
                rows = db.execute("SELECT * FROM files ORDER BY rowid").fetchall()
            else:
                rows = db.execute("SELECT * FROM files WHERE purpose = ? ORDER BY rowid", (purpose,)).fetchall()
        return [StoredFile(*row) for row in rows]

    def file_bytes(self, file_id: str) -> bytes:
        self.get_file(file_id)
        with self._translated("reading a file"):
            return self._bytes_path(file_id).read_bytes()

    def delete_file(self, file_id: str) -> bool:
        with self._writing("deleting a file") as db:
            deleted = db.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount > 0
        # The row is the truth: bytes left by a failed unlink are swept by `purge`.
        if deleted:
            self._bytes_path(file_id).unlink(missing_ok=True)
        return deleted

    # -- jobs ---------------------------------------------------------------------------------

    def create_job(self, endpoint: str, input_file_id: str | None, completion_window: str,
                   window_s: float, metadata: dict[str, str] | None = None) -> Job:
        """A job in `validating`: accepted and stored before its input is read."""
        job_id = _new_id("batch_")
        now = self._clock()
        with self._writing("creating a job") as db:
            db.execute(
                "INSERT INTO jobs (id, endpoint, input_file_id, status, completion_window, "
                "created_at, expires_at, metadata) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, endpoint, input_file_id, VALIDATING, completion_window, now,
                 now + window_s, json.dumps(metadata or {})))
            return self._job(db, job_id)

    def begin_job(self, job_id: str, model: str | None, requests: Sequence[BatchRequest],
                  line_errors: Sequence[LineError] = ()) -> Job:
        """The validated input as items, and the job `in_progress`, in one transaction. Bad lines
        are items failed from the start, so the error file reports them. A job cancelled or
        expired while it was validated stays as it is."""
        now = self._clock()
        with self._writing("starting a job") as db:
            job = self._job(db, job_id)
            if job.status != VALIDATING:
                return job
            db.executemany(
                "INSERT INTO items (job_id, line, custom_id, body, state) VALUES (?, ?, ?, ?, ?)",
                ((job_id, r.line, r.custom_id, json.dumps(r.body), PENDING) for r in requests))
            db.executemany(
                "INSERT INTO items (job_id, line, custom_id, state, error, finished_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                ((job_id, e.line, e.custom_id, ITEM_FAILED,
                  json.dumps({"code": e.code, "message": e.message, "line": e.line}), now)
                 for e in line_errors))
            db.execute("UPDATE jobs SET model = ?, in_progress_at = ? WHERE id = ?",
                       (model, now, job_id))
            self._move(db, job, IN_PROGRESS)
            self._settle(db, job_id, now)
            return self._job(db, job_id)

    def fail_job(self, job_id: str, errors: Sequence[dict[str, Any]]) -> Job:
        """A job whose input cannot be used at all (OpenAI's failed batch, with `errors`)."""
        now = self._clock()
        with self._writing("failing a job") as db:
            job = self._job(db, job_id)
            self._move(db, job, FAILED)
            db.execute("UPDATE jobs SET errors = ?, finished_at = ? WHERE id = ?",
                       (json.dumps(list(errors)), now, job_id))
            return self._job(db, job_id)

    def get_job(self, job_id: str) -> Job:
        with self._reading("reading a job") as db:
            return self._job(db, job_id)

    def list_jobs(self, limit: int = 20, after: str | None = None) -> list[Job]:
        """Newest first, as OpenAI pages them: `after` is the last id of the previous page."""
        with self._reading("listing jobs") as db:
            if after is None:
                rows = db.execute("SELECT id FROM jobs ORDER BY rowid DESC LIMIT ?", (limit,))
            else:
                rows = db.execute(
                    "SELECT id FROM jobs WHERE rowid < (SELECT rowid FROM jobs WHERE id = ?) "
                    "ORDER BY rowid DESC LIMIT ?", (after, limit))
            return [self._job(db, job_id) for (job_id,) in rows.fetchall()]

    def jobs_in_status(self, *statuses: str) -> list[Job]:
        with self._reading("listing jobs") as db:
            rows = db.execute(
                f"SELECT id FROM jobs WHERE status IN ({','.join('?' * len(statuses))}) "
                "ORDER BY rowid", statuses).fetchall()
            return [self._job(db, job_id) for (job_id,) in rows]

    def jobs_to_finish(self) -> list[Job]:
        """Jobs whose items are all settled and whose output files are still to be written:
        `finalizing`, and `cancelling` once nothing runs."""
        with self._reading("listing jobs") as db:
            rows = db.execute(
                "SELECT id FROM jobs j WHERE status = ? OR (status = ? AND NOT EXISTS ("
                "SELECT 1 FROM items i WHERE i.job_id = j.id AND i.state IN (?, ?))) ORDER BY rowid",
                (FINALIZING, CANCELLING, PENDING, RUNNING)).fetchall()
            return [self._job(db, job_id) for (job_id,) in rows]

    def finish_job(self, job_id: str, output_file_id: str | None,
                   error_file_id: str | None) -> Job:
        """The output files are written: the job takes its finished status."""
        now = self._clock()
        with self._writing("finishing a job") as db:
            job = self._job(db, job_id)
            if job.counts.pending or job.counts.running:
                raise JobStateError(f"job {job_id} still has items to run")
            target = job.outcome or COMPLETED
            self._move(db, job, target)
            db.execute("UPDATE jobs SET output_file_id = ?, error_file_id = ?, finished_at = ? "
                       "WHERE id = ?", (output_file_id, error_file_id, now, job_id))
            return self._job(db, job_id)

    def cancel_job(self, job_id: str) -> Job:
        """Pending items are cancelled at once; a running item finishes (the caller interrupts
        it) and the job is `cancelling` until then. A job past in_progress is left as it is."""
        now = self._clock()
        with self._writing("cancelling a job") as db:
            job = self._job(db, job_id)
            if job.status == VALIDATING:
                self._move(db, job, CANCELLED)
                db.execute("UPDATE jobs SET cancelling_at = ?, finished_at = ? WHERE id = ?",
                           (now, now, job_id))
            elif job.status == IN_PROGRESS:
                db.execute("UPDATE items SET state = ?, finished_at = ? WHERE job_id = ? AND state = ?",
                           (ITEM_CANCELLED, now, job_id, PENDING))
                self._move(db, job, CANCELLING)
                db.execute("UPDATE jobs SET outcome = ?, cancelling_at = ? WHERE id = ?",
                           (CANCELLED, now, job_id))
            return self._job(db, job_id)

    def job_items(self, job_id: str) -> list[Item]:
        """Every item of a job in line order: what the output and error files are made of."""
        with self._reading("reading items") as db:
            self._job(db, job_id)
            rows = db.execute(
                "SELECT job_id, line, custom_id, state, result, error, attempts FROM items "
                "WHERE job_id = ? ORDER BY line", (job_id,)).fetchall()
        return [Item(j, line, c, s, _loads(r), _loads(e), a) for j, line, c, s, r, e, a in rows]

    def item_times(self, job_id: str) -> dict[int, tuple[float | None, float | None]]:
        """line -> (when its last run started, when it was settled); None where it did not."""
        with self._reading("reading items") as db:
            self._job(db, job_id)
            rows = db.execute("SELECT line, started_at, finished_at FROM items WHERE job_id = ?",
                              (job_id,)).fetchall()
        return {line: (started, finished) for line, started, finished in rows}

    # -- items --------------------------------------------------------------------------------

    def claim_next_item(self, model: str) -> ClaimedItem | None:
        """The next pending item of `model`, now `running`. Jobs take turns: the job whose last
        claim is oldest goes first (a new job at once), and within a job, lines in order."""
        now = self._clock()
        with self._writing("claiming an item") as db:
            row = db.execute(
                "SELECT id, endpoint FROM jobs j WHERE model = ? AND status = ? AND expires_at > ? "
                "AND EXISTS (SELECT 1 FROM items i WHERE i.job_id = j.id AND i.state = ?) "
                "ORDER BY last_claim, rowid LIMIT 1", (model, IN_PROGRESS, now, PENDING)).fetchone()
            if row is None:
                return None
            job_id, endpoint = row
            line, custom_id, body, attempts = db.execute(
                "SELECT line, custom_id, body, attempts FROM items WHERE job_id = ? AND state = ? "
                "ORDER BY line LIMIT 1", (job_id, PENDING)).fetchone()
            db.execute("UPDATE items SET state = ?, attempts = ?, started_at = ? "
                       "WHERE job_id = ? AND line = ?", (RUNNING, attempts + 1, now, job_id, line))
            db.execute("UPDATE jobs SET last_claim = (SELECT MAX(last_claim) + 1 FROM jobs) "
                       "WHERE id = ?", (job_id,))
        return ClaimedItem(job_id, line, custom_id, endpoint, model, json.loads(body), attempts + 1)

    def record_response(self, job_id: str, line: int, status_code: int, request_id: str,
                        body: Any) -> bool:
        """The answer of a running item; an error status counts as failed, as OpenAI counts it.
        False (and nothing changed) when the item is not running: recorded already, or
        cancelled or expired meanwhile."""
        state = DONE if 200 <= status_code < 300 else ITEM_FAILED
        result = {"status_code": status_code, "request_id": request_id, "body": body}
        return self._finish_item(job_id, line, state, json.dumps(result), None)

    def record_error(self, job_id: str, line: int, code: str, message: str) -> bool:
        """A running item that got no answer (the model failed to run it); as record_response."""
        return self._finish_item(job_id, line, ITEM_FAILED, None,
                                 json.dumps({"code": code, "message": message}))

    def _finish_item(self, job_id: str, line: int, state: str, result: str | None,
                     error: str | None) -> bool:
        now = self._clock()
        with self._writing("recording a result") as db:
            changed = db.execute(
                "UPDATE items SET state = ?, result = ?, error = ?, finished_at = ? "
                "WHERE job_id = ? AND line = ? AND state = ?",
                (state, result, error, now, job_id, line, RUNNING)).rowcount
            if changed:
                self._settle(db, job_id, now)
        return changed > 0

    def requeue_item(self, job_id: str, line: int) -> bool:
        """A running item given back unfinished (its model was stopped): pending again, and its
        job keeps its turn."""
        with self._writing("requeueing an item") as db:
            changed = db.execute(
                "UPDATE items SET state = ?, started_at = NULL WHERE job_id = ? AND line = ? "
                "AND state = ?", (PENDING, job_id, line, RUNNING)).rowcount > 0
            if changed:
                self._sweep(db)  # its job may be cancelling or expiring meanwhile
            return changed

    def renew_lease(self, job_id: str, line: int) -> bool:
        """Whether the item still runs: an embedded store has no leases to renew (one daemon
        owns it), but the answer tells the runner as PostgreSQL's does whether to go on."""
        with self._reading("reading an item") as db:
            return db.execute("SELECT 1 FROM items WHERE job_id = ? AND line = ? AND state = ?",
                              (job_id, line, RUNNING)).fetchone() is not None

    def model_progress(self) -> dict[str, ModelProgress]:
        """Pending and running items per model, over the jobs that run."""
        with self._reading("reading progress") as db:
            rows = db.execute(
                "SELECT j.model, i.state, COUNT(*), MIN(j.created_at) FROM items i "
                "JOIN jobs j ON j.id = i.job_id WHERE i.state IN (?, ?) GROUP BY j.model, i.state",
                (PENDING, RUNNING)).fetchall()
        progress: dict[str, dict[str, Any]] = {}
        for model, state, count, since in rows:
            entry = progress.setdefault(model, {})
            entry[state] = count
            if state == PENDING:
                entry["oldest_pending_since"] = since
        return {model: ModelProgress(e.get(PENDING, 0), e.get(RUNNING, 0), e.get("oldest_pending_since"))
                for model, e in progress.items()}

    # -- upkeep -------------------------------------------------------------------------------

    def recover_running(self, max_attempts: int = 3) -> int:
        """At start-up: items a killed daemon was running are pending again; returns how many.
        Only one daemon uses an embedded store, so every running item is an orphan. An item
        that was running at `max_attempts` deaths fails instead: it may be what kills the
        daemon, and would otherwise do it at every start."""
        now = self._clock()
        error = json.dumps({"code": "internal_error", "message":
                            f"the daemon stopped {max_attempts} times while running this request"})
        with self._writing("recovering items") as db:
            given_up = db.execute(
                "SELECT DISTINCT job_id FROM items WHERE state = ? AND attempts >= ?",
                (RUNNING, max_attempts)).fetchall()
            db.execute("UPDATE items SET state = ?, error = ?, finished_at = ? "
                       "WHERE state = ? AND attempts >= ?",
                       (ITEM_FAILED, error, now, RUNNING, max_attempts))
            for (job_id,) in given_up:
                self._settle(db, job_id, now)
            recovered = db.execute("UPDATE items SET state = ?, started_at = NULL WHERE state = ?",
                                   (PENDING, RUNNING)).rowcount
            self._sweep(db)  # those of a job that was cancelling or expiring
            return recovered

    def expire_due(self) -> list[str]:
        """Jobs past their completion window: pending items expire and the job heads for
        `expired` (after the running item, if one runs). Returns the ids of the jobs expired."""
        now = self._clock()
        with self._writing("expiring jobs") as db:
            due = db.execute(
                "SELECT id FROM jobs WHERE expires_at <= ? AND status IN (?, ?) AND outcome IS NULL",
                (now, VALIDATING, IN_PROGRESS)).fetchall()
            for (job_id,) in due:
                job = self._job(db, job_id)
                if job.status == VALIDATING:
                    self._move(db, job, EXPIRED)
                    db.execute("UPDATE jobs SET finished_at = ? WHERE id = ?", (now, job_id))
                    continue
                db.execute("UPDATE items SET state = ?, finished_at = ? WHERE job_id = ? AND state = ?",
                           (ITEM_EXPIRED, now, job_id, PENDING))
                db.execute("UPDATE jobs SET outcome = ? WHERE id = ?", (EXPIRED, job_id))
                self._settle(db, job_id, now)
        return [job_id for (job_id,) in due]

    def purge(self, retention_s: float) -> PurgeCounts:
        """Jobs finished, and files made, more than `retention_s` ago (or past their own
        expiry) are deleted; a file an unfinished job still reads is kept."""
        now = self._clock()
        cutoff = now - retention_s
        finished = tuple(FINISHED_STATUSES)
        with self._writing("purging") as db:
            old_jobs = [job_id for (job_id,) in db.execute(
                f"SELECT id FROM jobs WHERE status IN ({','.join('?' * len(finished))}) "
                "AND finished_at <= ?", (*finished, cutoff)).fetchall()]
            for job_id in old_jobs:
                db.execute("DELETE FROM items WHERE job_id = ?", (job_id,))
                db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
            old_files = [file_id for (file_id,) in db.execute(
                "SELECT id FROM files f WHERE (created_at <= ? OR expires_at <= ?) AND NOT EXISTS ("
                f"SELECT 1 FROM jobs j WHERE j.input_file_id = f.id AND j.status NOT IN "
                f"({','.join('?' * len(finished))}))", (cutoff, now, *finished)).fetchall()]
            db.executemany("DELETE FROM files WHERE id = ?", ((f,) for f in old_files))
            known = {file_id for (file_id,) in db.execute("SELECT id FROM files").fetchall()}
        with self._translated("purging files"):
            for file_id in old_files:
                self._bytes_path(file_id).unlink(missing_ok=True)
            self._sweep_orphans(known)
        return PurgeCounts(len(old_jobs), len(old_files))

    def _sweep_orphans(self, known: set[str]) -> None:
        horizon = time.time() - _ORPHAN_AGE_S  # file times are the OS clock's
        for path in self.files_dir.iterdir():
            name = path.name.removesuffix(".partial")
            if name not in known and path.stat().st_mtime < horizon:
                path.unlink(missing_ok=True)

    # -- inside a transaction -----------------------------------------------------------------

    def _job(self, db: sqlite3.Connection, job_id: str) -> Job:
        row = db.execute(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"no batch {job_id!r}")
        by_state = dict(db.execute(
            "SELECT state, COUNT(*) FROM items WHERE job_id = ? GROUP BY state", (job_id,)).fetchall())
        return job_from_row(row, by_state)

    def _move(self, db: sqlite3.Connection, job: Job, target: str) -> None:
        if target not in JOB_TRANSITIONS[job.status]:
            raise JobStateError(f"batch {job.id} cannot go from {job.status} to {target}")
        db.execute("UPDATE jobs SET status = ? WHERE id = ?", (target, job.id))

    def _sweep(self, db: sqlite3.Connection) -> None:
        """Pending items of a job that is cancelling, or expiring, are cancelled or expired, and
        the job settled. Only a running item given back (requeued, or recovered after a kill)
        while its job was being cancelled or expired leaves one, and nothing would ever claim it:
        the job would never finish."""
        now = self._clock()
        rows = db.execute(
            "SELECT i.job_id, i.line, j.status FROM items i JOIN jobs j ON j.id = i.job_id "
            "WHERE i.state = ? AND (j.status = ? OR (j.status = ? AND j.outcome = ?))",
            (PENDING, CANCELLING, IN_PROGRESS, EXPIRED)).fetchall()
        for job_id, line, status in rows:
            db.execute("UPDATE items SET state = ?, finished_at = ? WHERE job_id = ? AND line = ?",
                       (ITEM_CANCELLED if status == CANCELLING else ITEM_EXPIRED, now, job_id, line))
        for job_id in sorted({job_id for job_id, _, _ in rows}):
            self._settle(db, job_id, now)

    def _settle(self, db: sqlite3.Connection, job_id: str, now: float) -> None:
        """An in-progress job with nothing left to run goes to `finalizing`."""
        left = db.execute("SELECT 1 FROM items WHERE job_id = ? AND state IN (?, ?) LIMIT 1",
                          (job_id, PENDING, RUNNING)).fetchone()
        if left is None:
            db.execute("UPDATE jobs SET status = ?, finalizing_at = ? WHERE id = ? AND status = ?",
                       (FINALIZING, now, job_id, IN_PROGRESS))


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)
