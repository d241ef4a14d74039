"""The job store in PostgreSQL (`jobs_url = postgresql://…`): one queue that several boxes drain.

The same `JobStore` calls and meanings as `SqliteJobStore`, with what sharing adds:

- File bytes live in the database (rows of `file_chunks`, 1 MiB each), since boxes share no
  disk; a file's row and all its chunks are written in one transaction.
- A claim takes the next pending item with `SELECT … FOR UPDATE SKIP LOCKED`, jobs taking turns
  as in SQLite, and only of the model asked for: a box claims only for the models it serves.
- A claimed item carries a lease: the claiming store's `box_id` and `leased_until`, on the
  database server's clock (one clock for every box). The box renews it while the item runs
  (`renew_lease`, every `lease_s / 3` or so). An item whose lease ran out — its box died, hung or
  lost the database — is claimable again by any box, counting as an attempt; at `max_attempts`
  it fails instead, as `recover_running` fails an item that killed the daemon that often.
- `recover_running` takes back only items whose lease expired: a running item with a live lease
  belongs to a box that is still working on it. (Claims reap expired leases of their model
  anyway; `recover_running` at start-up and now and then covers the other models.)
- A result is recorded only over a running item held by this store's box; a second record, or
  one from a box whose item was taken over, changes nothing.

Locks are taken item first, then job (claim, record, cancel, expiry, lease reaping), and jobs in
id order when there are several, so transactions do not deadlock one another; should one still
meet a deadlock or serialization failure it is run again.

Connection failures are `StoreUnavailable` (503) and the next call connects again; a full disk
(SQLSTATE 53100) is `StoreFull` (507). Connecting gives up after `connect_timeout_s`, and each
statement after `statement_timeout_s`, so a dead server is an error, not a hang.

What a runner on each box does with it:
- `recover_running()` at start and every `lease_s` or so (claims reap only their own model).
- `claim_next_item(model)` for the models this box serves only; on None, ask again after a
  short pause (a second): other boxes' jobs and expired leases come without notice.
- `renew_lease(job_id, line)` every `lease_s / 3` while the item runs; False means the item is
  no longer this box's (taken over after a lapse, or settled): stop it, record nothing. A cancel
  made on another box shows in `get_job(job_id).status == "cancelling"`: check it then too.
- `record_*` once the item ran; on StoreUnavailable try again (still renewing) until it returns
  True or False: False means another run's result stands, or the item was settled meanwhile.
- `requeue_item` for an item given back unfinished (its model stopped; also at shutdown, so
  another box takes it at once instead of after the lease).
- `expire_due`, `purge` and finishing (`jobs_to_finish`, `add_file`, `finish_job`) may run on
  every box at once: `finish_job` lets one box finish a job, the others get JobStateError and
  should delete the output files they made.
- Every call blocks (one connection per store, behind a lock): run them in worker threads.

psycopg is imported here only: the daemon imports this module only when a PostgreSQL URL is set.
"""
from __future__ import annotations

import errno
import io
import json
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import psycopg

from .batch_input import BatchRequest, LineError
from .store import (
    CANCELLED,
    CANCELLING,
    COMPLETED,
    DONE,
    EXPIRED,
    FAILED,
    FINALIZING,
    FINISHED_STATUSES,
    IN_PROGRESS,
    ITEM_CANCELLED,
    ITEM_EXPIRED,
    ITEM_FAILED,
    JOB_TRANSITIONS,
    PENDING,
    RUNNING,
    VALIDATING,
    ClaimedItem,
    FileTooLarge,
    Item,
    Job,
    JobStateError,
    JobStoreError,
    ModelProgress,
    NotFound,
    PurgeCounts,
    StoredFile,
    StoreFull,
    StoreUnavailable,
    JOB_COLUMNS,
    _loads,
    _new_id,
    job_from_row,
)

CHUNK_BYTES = 1024 * 1024
VERSION_TABLE = "job_store_schema"
# Any constant: the migration lock of this store's tables, so two boxes starting at once do not
# both migrate.
_MIGRATION_LOCK = 0x61786D316A6F6273  # "axm1jobs"
_RETRIES = 5  # runs of a transaction that met a deadlock or a serialization failure

# Each entry brings the schema from its index to the next version (the one row of
# job_store_schema); entries are never edited once released, only appended.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE files (
        id TEXT PRIMARY KEY,
        purpose TEXT NOT NULL,
        filename TEXT NOT NULL,
        bytes BIGINT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION
    );
    CREATE TABLE file_chunks (
        file_id TEXT NOT NULL REFERENCES files (id) ON DELETE CASCADE,
        n INTEGER NOT NULL,
        data BYTEA NOT NULL,
        PRIMARY KEY (file_id, n)
    );
    CREATE SEQUENCE job_claims;
    CREATE TABLE jobs (
        seq BIGSERIAL UNIQUE,  -- creation order (SQLite's rowid)
        id TEXT PRIMARY KEY,
        model TEXT,
        endpoint TEXT NOT NULL,
        input_file_id TEXT,
        status TEXT NOT NULL,
        outcome TEXT,
        completion_window TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL,
        in_progress_at DOUBLE PRECISION,
        finalizing_at DOUBLE PRECISION,
        cancelling_at DOUBLE PRECISION,
        finished_at DOUBLE PRECISION,
        output_file_id TEXT,
        error_file_id TEXT,
        errors TEXT,
        metadata TEXT NOT NULL DEFAULT '{}',
        last_claim BIGINT NOT NULL DEFAULT 0  -- round-robin: the claim sequence it last won
    );
    CREATE INDEX jobs_by_model ON jobs (model, status, last_claim, seq);
    CREATE INDEX jobs_by_status ON jobs (status);
    CREATE TABLE items (
        job_id TEXT NOT NULL,
        line INTEGER NOT NULL,
        custom_id TEXT,
        body TEXT,  -- JSON as text: jsonb would not keep the keys' order
        state TEXT NOT NULL,
        result TEXT,
        error TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        started_at DOUBLE PRECISION,
        finished_at DOUBLE PRECISION,
        box TEXT,  -- the store that holds the running item
        leased_until TIMESTAMPTZ,  -- the server's clock
        PRIMARY KEY (job_id, line)
    );
    CREATE INDEX items_by_state ON items (job_id, state, line);
    CREATE INDEX items_leases ON items (leased_until) WHERE state = 'running';
    """,
]


def schema_version() -> int:
    return len(MIGRATIONS)


class _Retry(Exception):
    """The rows moved under a transaction: roll it back and run it again."""


def default_box_id() -> str:
    """Host, process and a random part: unique per store, readable in the items table."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def describe_url(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://(unparsable URL)"
    host = info.get("host") or "localhost"
    port = f":{info['port']}" if info.get("port") else ""
    user = f"{info['user']}@" if info.get("user") else ""
    return f"postgresql://{user}{host}{port}/{info.get('dbname', '')}"


class PostgresJobStore:
    """The job store in the PostgreSQL database at `url`, shared by every box that names it."""

    def __init__(self, url: str, max_file_bytes: int = 200 * 1024 * 1024,
                 clock: Callable[[], float] = time.time, *, box_id: str | None = None,
                 lease_s: float = 60.0, max_attempts: int = 3, connect_timeout_s: float = 5.0,
                 statement_timeout_s: float = 30.0) -> None:
        if lease_s <= 0:
            raise ValueError("lease_s must be positive")
        self.url = url
        self.where = describe_url(url)
        self.max_file_bytes = max_file_bytes
        self.box_id = box_id or default_box_id()
        self.lease_s = float(lease_s)
        self.max_attempts = max_attempts
        self.connect_timeout_s = connect_timeout_s
        self.statement_timeout_s = statement_timeout_s
        self._clock = clock
        self._lock = threading.Lock()
        self._connection: psycopg.Connection | None = None
        self._closed = False
        with self._lock:
            connection = self._connect("open")
            try:
                with self._translated("migrating"):
                    self._migrate(connection)
            except BaseException:
                self._drop()
                raise

    # -- the connection -----------------------------------------------------------------------

    def _connect(self, doing: str) -> psycopg.Connection:
        """The connection, made again when the last one broke. Called under the lock."""
        if self._closed:
            raise StoreUnavailable("the job store is closed")
        connection = self._connection
        if connection is not None and not connection.closed and not connection.broken:
            return connection
        self._drop()
        with self._translated(f"connecting ({doing})"):
            connection = psycopg.connect(
                self.url, autocommit=True, connect_timeout=max(1, round(self.connect_timeout_s)),
                # Over TCP, a server host that vanished is noticed in about 20 s.
                keepalives=1, keepalives_idle=10, keepalives_interval=5, keepalives_count=2,
                application_name=f"axm1-llm jobs {self.box_id}"[:63])
            try:
                timeout_ms = str(int(self.statement_timeout_s * 1000))
                connection.execute(
                    "SELECT set_config('statement_timeout', %s, false), "
                    "set_config('lock_timeout', %s, false), "
                    "set_config('idle_in_transaction_session_timeout', %s, false)",
                    (timeout_ms, timeout_ms, str(int(max(self.statement_timeout_s, 60) * 1000))))
            except BaseException:
                connection.close()
                raise
        self._connection = connection
        return connection

    def _drop(self) -> None:
        if self._connection is not None:
            try:
                self._connection.close()
            except Exception:  # noqa: BLE001 - a broken connection may refuse even that
                pass
            self._connection = None

    def close(self) -> None:
        with self._lock:
            self._drop()
            self._closed = True

    class _Translated:
        def __init__(self, store: PostgresJobStore, doing: str) -> None:
            self.store, self.doing = store, doing

        def __enter__(self) -> None:
            return None

        def __exit__(self, kind, error, traceback) -> bool:
            if error is None or isinstance(error, (JobStoreError, _Retry)):
                return False
            if not isinstance(error, psycopg.Error):
                return False  # the caller's own (an upload stream that broke off, say)
            store, doing = self.store, self.doing
            sqlstate = getattr(error, "sqlstate", None)
            if sqlstate == "53100":  # disk_full
                raise StoreFull(f"the job store {store.where} is full ({doing}): {error}") from None
            if sqlstate in ("40P01", "40001"):
                raise _Retry() from error
            if sqlstate in ("57014", "55P03"):  # statement or lock timeout: the session is fine
                raise StoreUnavailable(
                    f"the job store {store.where} timed out ({doing}) after "
                    f"{store.statement_timeout_s:g} s: the server is overloaded or another "
                    f"session holds the rows") from None
            connection = store._connection
            if (isinstance(error, psycopg.OperationalError) or connection is None
                    or connection.closed or connection.broken):
                store._drop()
                raise StoreUnavailable(
                    f"the job store {store.where} cannot be reached ({doing}): "
                    f"{str(error).strip() or type(error).__name__}") from None
            raise StoreUnavailable(f"the job store {store.where} failed ({doing}): {error}") from None

    def _translated(self, doing: str) -> PostgresJobStore._Translated:
        """psycopg's errors as the store's own."""
        return PostgresJobStore._Translated(self, doing)

    def _run(self, doing: str, work: Callable[[psycopg.Connection], Any]) -> Any:
        """`work` in one transaction, run again (up to a few times) when it met a deadlock,
        a serialization failure, or rows that moved under it; and once on a new connection when
        the old one was found dead before the work began (the server restarted, or ended the
        idle session): nothing was done on it, so nothing can be done twice."""
        reconnected = False
        for attempt in range(_RETRIES):
            with self._lock:
                had_connection = self._connection is not None
                connection = self._connect(doing)
                began = False

                def working(db: psycopg.Connection) -> Any:
                    nonlocal began
                    began = True
                    return work(db)

                try:
                    with self._translated(doing), connection.transaction():
                        return working(connection)
                except _Retry:
                    if attempt == _RETRIES - 1:
                        raise StoreUnavailable(
                            f"the job store {self.where} is too busy ({doing}): the same rows kept "
                            f"changing under {_RETRIES} tries") from None
                except StoreUnavailable:
                    if began or reconnected or not had_connection or self._connection is not None:
                        raise
                    reconnected = True  # the old connection died idle: once more on a new one
                    continue
            time.sleep(0.01 * (attempt + 1))
        raise AssertionError("unreachable")

    def _migrate(self, connection: psycopg.Connection) -> None:
        with connection.transaction():
            # Waits for a box migrating at the same time; the lock ends with the transaction.
            connection.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            connection.execute(f"CREATE TABLE IF NOT EXISTS {VERSION_TABLE} (version INTEGER NOT NULL)")
            row = connection.execute(f"SELECT version FROM {VERSION_TABLE}").fetchone()
            if row is None:
                connection.execute(f"INSERT INTO {VERSION_TABLE} VALUES (0)")
                version = 0
            else:
                version = row[0]
            if version > len(MIGRATIONS):
                raise StoreUnavailable(
                    f"the job store {self.where} has schema version {version}, newer than this "
                    f"daemon's {len(MIGRATIONS)}: it was written by a newer version")
            # The version moves in the same transaction as the schema: a failure leaves neither.
            for number in range(version, len(MIGRATIONS)):
                connection.execute(MIGRATIONS[number])
                connection.execute(f"UPDATE {VERSION_TABLE} SET version = %s", (number + 1,))

    # -- files --------------------------------------------------------------------------------

    def add_file(self, purpose: str, filename: str, content: bytes | Iterable[bytes],
                 expires_at: float | None = None) -> StoredFile:
        """Store a file: its row and its bytes (in chunks) in one transaction, so a row never
        names bytes that are not all there. A stream is read whole first, into a local spool
        (memory, then a temporary file), outside the transaction: a slow upload neither holds
        this box's connection nor idles in a transaction the server would end."""
        file_id = _new_id("file-")
        created_at = self._clock()
        if isinstance(content, (bytes, bytearray, memoryview)):
            if len(content) > self.max_file_bytes:
                raise FileTooLarge(self.max_file_bytes)
            spool: Any = io.BytesIO(bytes(content))
            size = len(content)
        else:
            spool, size = self._spool(content)

        def work(db: psycopg.Connection) -> StoredFile:
            spool.seek(0)  # again when the transaction is run again
            db.execute("INSERT INTO files VALUES (%s, %s, %s, %s, %s, %s)",
                       (file_id, purpose, filename, size, created_at, expires_at))
            number = 0
            while True:
                chunk = spool.read(CHUNK_BYTES)
                if not chunk and number:
                    break
                db.execute("INSERT INTO file_chunks VALUES (%s, %s, %s)", (file_id, number, chunk))
                number += 1
                if not chunk:
                    break  # an empty file: one empty chunk
            return StoredFile(file_id, purpose, filename, size, created_at, expires_at)

        try:
            return self._run("adding a file", work)
        finally:
            spool.close()

    def _spool(self, chunks: Iterable[bytes]) -> tuple[Any, int]:
        spool = tempfile.SpooledTemporaryFile(max_size=8 * 1024 * 1024, prefix="axm1-upload-")
        size = 0
        try:
            for chunk in chunks:  # the caller's errors (a client gone) pass through as they are
                size += len(chunk)
                if size > self.max_file_bytes:
                    raise FileTooLarge(self.max_file_bytes)
                try:
                    spool.write(chunk)
                except OSError as error:
                    if error.errno in (errno.ENOSPC, errno.EDQUOT):
                        raise StoreFull(
                            f"no space left for an upload's temporary file: {error}") from None
                    raise StoreUnavailable(f"an upload's temporary file failed: {error}") from None
        except BaseException:
            spool.close()
            raise
        return spool, size

    def get_file(self, file_id: str) -> StoredFile:
        row = self._run("reading a file", lambda db: db.execute(
            "SELECT id, purpose, filename, bytes, created_at, expires_at FROM files WHERE id = %s",
            (file_id,)).fetchone())
        if row is None:
            raise NotFound(f"no file {file_id!r}")
        return StoredFile(*row)

    def list_files(self, purpose: str | None = None) -> list[StoredFile]:
        """Every file (of `purpose`), oldest first."""
        columns = "SELECT id, purpose, filename, bytes, created_at, expires_at FROM files"
        rows = self._run("listing files", lambda db: db.execute(
            f"{columns} ORDER BY created_at, id" if purpose is None else f"{columns} WHERE purpose = %s "
            "ORDER BY created_at, id", () if purpose is None else (purpose,)).fetchall())
        return [StoredFile(*row) for row in rows]

    def file_bytes(self, file_id: str) -> bytes:
        def work(db: psycopg.Connection) -> bytes | None:
            if db.execute("SELECT 1 FROM files WHERE id = %s", (file_id,)).fetchone() is None:
                return None
            rows = db.execute("SELECT data FROM file_chunks WHERE file_id = %s ORDER BY n",
                              (file_id,)).fetchall()
            return b"".join(bytes(data) for (data,) in rows)

        content = self._run("reading a file", work)
        if content is None:
            raise NotFound(f"no file {file_id!r}")
        return content

    def delete_file(self, file_id: str) -> bool:
        return self._run("deleting a file", lambda db: db.execute(
            "DELETE FROM files WHERE id = %s", (file_id,)).rowcount > 0)

    # -- jobs ---------------------------------------------------------------------------------

    def create_job(self, endpoint: str, input_file_id: str | None, completion_window: str,
                   window_s: float, metadata: dict[str, str] | None = None) -> Job:
        """A job in `validating`: accepted and stored before its input is read."""
        job_id = _new_id("batch_")
        now = self._clock()

        def work(db: psycopg.Connection) -> Job:
            db.execute(
                "INSERT INTO jobs (id, endpoint, input_file_id, status, completion_window, "
                "created_at, expires_at, metadata) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                (job_id, endpoint, input_file_id, VALIDATING, completion_window, now,
                 now + window_s, json.dumps(metadata or {})))
            return self._job(db, job_id)

        return self._run("creating a job", work)

    def begin_job(self, job_id: str, model: str | None, requests: Sequence[BatchRequest],
                  line_errors: Sequence[LineError] = ()) -> Job:
        """The validated input as items, and the job `in_progress`, in one transaction. Bad lines
        are items failed from the start. A job cancelled or expired meanwhile stays as it is."""
        now = self._clock()

        def work(db: psycopg.Connection) -> Job:
            job = self._job(db, job_id, lock=True)
            if job.status != VALIDATING:
                return job
            with db.cursor() as cursor:
                cursor.executemany(
                    "INSERT INTO items (job_id, line, custom_id, body, state) "
                    "VALUES (%s, %s, %s, %s, %s)",
                    [(job_id, r.line, r.custom_id, json.dumps(r.body), PENDING) for r in requests])
                cursor.executemany(
                    "INSERT INTO items (job_id, line, custom_id, state, error, finished_at) "
                    "VALUES (%s, %s, %s, %s, %s, %s)",
                    [(job_id, e.line, e.custom_id, ITEM_FAILED,
                      json.dumps({"code": e.code, "message": e.message, "line": e.line}), now)
                     for e in line_errors])
            db.execute("UPDATE jobs SET model = %s, in_progress_at = %s WHERE id = %s",
                       (model, now, job_id))
            self._move(db, job, IN_PROGRESS)
            self._settle(db, job_id, now)
            return self._job(db, job_id)

        return self._run("starting a job", work)

    def fail_job(self, job_id: str, errors: Sequence[dict[str, Any]]) -> Job:
        """A job whose input cannot be used at all (OpenAI's failed batch, with `errors`)."""
        now = self._clock()

        def work(db: psycopg.Connection) -> Job:
            job = self._job(db, job_id, lock=True)
            self._move(db, job, FAILED)
            db.execute("UPDATE jobs SET errors = %s, finished_at = %s WHERE id = %s",
                       (json.dumps(list(errors)), now, job_id))
            return self._job(db, job_id)

        return self._run("failing a job", work)

    def get_job(self, job_id: str) -> Job:
        return self._run("reading a job", lambda db: self._job(db, job_id))

    def list_jobs(self, limit: int = 20, after: str | None = None) -> list[Job]:
        """Newest first, as OpenAI pages them: `after` is the last id of the previous page."""
        def work(db: psycopg.Connection) -> list[Job]:
            if after is None:
                rows = db.execute("SELECT id FROM jobs ORDER BY seq DESC LIMIT %s", (limit,))
            else:
                rows = db.execute(
                    "SELECT id FROM jobs WHERE seq < (SELECT seq FROM jobs WHERE id = %s) "
                    "ORDER BY seq DESC LIMIT %s", (after, limit))
            return [self._job(db, job_id) for (job_id,) in rows.fetchall()]

        return self._run("listing jobs", work)

    def jobs_in_status(self, *statuses: str) -> list[Job]:
        def work(db: psycopg.Connection) -> list[Job]:
            rows = db.execute("SELECT id FROM jobs WHERE status = ANY(%s) ORDER BY seq",
                              (list(statuses),)).fetchall()
            return [self._job(db, job_id) for (job_id,) in rows]

        return self._run("listing jobs", work)

    def jobs_to_finish(self) -> list[Job]:
        """Jobs whose items are all settled and whose output files are still to be written:
        `finalizing`, and `cancelling` once nothing runs."""
        def work(db: psycopg.Connection) -> list[Job]:
            rows = db.execute(
                "SELECT id FROM jobs j WHERE status = %s OR (status = %s AND NOT EXISTS ("
                "SELECT 1 FROM items i WHERE i.job_id = j.id AND i.state IN (%s, %s))) ORDER BY seq",
                (FINALIZING, CANCELLING, PENDING, RUNNING)).fetchall()
            return [self._job(db, job_id) for (job_id,) in rows]

        return self._run("listing jobs", work)

    def finish_job(self, job_id: str, output_file_id: str | None,
                   error_file_id: str | None) -> Job:
        """The output files are written: the job takes its finished status."""
        now = self._clock()

        def work(db: psycopg.Connection) -> Job:
            job = self._job(db, job_id, lock=True)
            if job.counts.pending or job.counts.running:
                raise JobStateError(f"job {job_id} still has items to run")
            self._move(db, job, job.outcome or COMPLETED)
            db.execute("UPDATE jobs SET output_file_id = %s, error_file_id = %s, finished_at = %s "
                       "WHERE id = %s", (output_file_id, error_file_id, now, job_id))
            return self._job(db, job_id)

        return self._run("finishing a job", work)

    def cancel_job(self, job_id: str) -> Job:
        """Pending items are cancelled at once; a running item finishes (the box running it
        interrupts it) and the job is `cancelling` until then. A job past in_progress is left as
        it is."""
        now = self._clock()

        def work(db: psycopg.Connection) -> Job:
            # Items before the job (the order claims lock in): the job's row is only updated
            # under a condition, and a job that moved meanwhile is read again.
            job = self._job(db, job_id)
            if job.status == VALIDATING:
                if not db.execute(
                        "UPDATE jobs SET status = %s, cancelling_at = %s, finished_at = %s "
                        "WHERE id = %s AND status = %s",
                        (CANCELLED, now, now, job_id, VALIDATING)).rowcount:
                    raise _Retry()
            elif job.status == IN_PROGRESS:
                db.execute("UPDATE items SET state = %s, finished_at = %s "
                           "WHERE job_id = %s AND state = %s", (ITEM_CANCELLED, now, job_id, PENDING))
                if not db.execute(
                        "UPDATE jobs SET status = %s, outcome = %s, cancelling_at = %s "
                        "WHERE id = %s AND status = %s",
                        (CANCELLING, CANCELLED, now, job_id, IN_PROGRESS)).rowcount:
                    raise _Retry()
            return self._job(db, job_id)

        return self._run("cancelling a job", work)

    def job_items(self, job_id: str) -> list[Item]:
        """Every item of a job in line order: what the output and error files are made of."""
        def work(db: psycopg.Connection) -> list[tuple]:
            self._job(db, job_id)
            return db.execute(
                "SELECT job_id, line, custom_id, state, result, error, attempts FROM items "
                "WHERE job_id = %s ORDER BY line", (job_id,)).fetchall()

        rows = self._run("reading items", work)
        return [Item(j, line, c, s, _loads(r), _loads(e), a) for j, line, c, s, r, e, a in rows]

    def item_times(self, job_id: str) -> dict[int, tuple[float | None, float | None]]:
        """line -> (when its last run started, when it was settled); None where it did not."""
        def work(db: psycopg.Connection) -> list[tuple]:
            self._job(db, job_id)
            return db.execute("SELECT line, started_at, finished_at FROM items WHERE job_id = %s",
                              (job_id,)).fetchall()

        return {line: (started, finished) for line, started, finished in self._run("reading items", work)}

    # -- items --------------------------------------------------------------------------------

    def claim_next_item(self, model: str) -> ClaimedItem | None:
        """The next pending item of `model`, now `running` under this box's lease. Jobs take
        turns as in SQLite; an item another box is claiming at this instant is skipped, not
        waited for. Items of `model` whose lease expired are pending again first (or failed, at
        `max_attempts`)."""
        now = self._clock()

        def work(db: psycopg.Connection) -> ClaimedItem | None:
            self._reap(db, self.max_attempts, model)
            candidates = db.execute(
                "SELECT id, endpoint FROM jobs j WHERE model = %s AND status = %s "
                "AND expires_at > %s AND EXISTS (SELECT 1 FROM items i WHERE i.job_id = j.id "
                "AND i.state = %s) ORDER BY last_claim, seq LIMIT 16",
                (model, IN_PROGRESS, now, PENDING)).fetchall()
            for job_id, endpoint in candidates:
                row = db.execute(
                    "SELECT line, custom_id, body, attempts FROM items WHERE job_id = %s "
                    "AND state = %s ORDER BY line LIMIT 1 FOR UPDATE SKIP LOCKED",
                    (job_id, PENDING)).fetchone()
                if row is None:
                    continue  # another box is claiming this job's last pending items
                line, custom_id, body, attempts = row
                db.execute(
                    "UPDATE items SET state = %s, attempts = %s, started_at = %s, box = %s, "
                    "leased_until = statement_timestamp() + make_interval(secs => %s) "
                    "WHERE job_id = %s AND line = %s",
                    (RUNNING, attempts + 1, now, self.box_id, self.lease_s, job_id, line))
                if not db.execute(
                        "UPDATE jobs SET last_claim = nextval('job_claims') WHERE id = %s "
                        "AND status = %s", (job_id, IN_PROGRESS)).rowcount:
                    raise _Retry()
                return ClaimedItem(job_id, line, custom_id, endpoint, model, json.loads(body),
                                   attempts + 1)
            return None

        return self._run("claiming an item", work)

    def renew_lease(self, job_id: str, line: int) -> bool:
        """The running item's lease runs `lease_s` from now again. False when this box no
        longer holds it (recorded, requeued, cancelled meanwhile, or its lease expired and
        another box took it): the run is then someone else's and its result will be refused."""
        return self._run("renewing a lease", lambda db: db.execute(
            "UPDATE items SET leased_until = statement_timestamp() + make_interval(secs => %s) "
            "WHERE job_id = %s AND line = %s AND state = %s AND box = %s",
            (self.lease_s, job_id, line, RUNNING, self.box_id)).rowcount > 0)

    def record_response(self, job_id: str, line: int, status_code: int, request_id: str,
                        body: Any) -> bool:
        """The answer of a running item this box holds; an error status counts as failed.
        False (and nothing changed) otherwise: recorded already, cancelled or expired
        meanwhile, or taken over by another box after this box's lease ran out."""
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

        def work(db: psycopg.Connection) -> bool:
            changed = db.execute(
                "UPDATE items SET state = %s, result = %s, error = %s, finished_at = %s, "
                "leased_until = NULL WHERE job_id = %s AND line = %s AND state = %s AND box = %s",
                (state, result, error, now, job_id, line, RUNNING, self.box_id)).rowcount
            if changed:
                self._settle(db, job_id, now)
            return changed > 0

        return self._run("recording a result", work)

    def requeue_item(self, job_id: str, line: int) -> bool:
        """A running item this box gives back unfinished (its model was stopped): pending
        again, for any box, and its job keeps its turn."""
        def work(db: psycopg.Connection) -> bool:
            changed = db.execute(
                "UPDATE items SET state = %s, started_at = NULL, box = NULL, leased_until = NULL "
                "WHERE job_id = %s AND line = %s AND state = %s AND box = %s",
                (PENDING, job_id, line, RUNNING, self.box_id)).rowcount > 0
            if changed:
                self._sweep(db)  # its job may be cancelling or expiring meanwhile
            return changed

        return self._run("requeueing an item", work)

    def model_progress(self) -> dict[str, ModelProgress]:
        """Pending and running items per model, over every box."""
        rows = self._run("reading progress", lambda db: db.execute(
            "SELECT j.model, i.state, COUNT(*), MIN(j.created_at) FROM items i "
            "JOIN jobs j ON j.id = i.job_id WHERE i.state IN (%s, %s) GROUP BY j.model, i.state",
            (PENDING, RUNNING)).fetchall())
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
        """Items whose lease expired (their box died, hung, or lost the database) are pending
        again; returns how many. Unlike SQLite's, items with a live lease are left alone: another
        box is running them. An item whose lease ran out at its `max_attempts`-th run fails
        instead: it may be what kills the boxes."""
        return self._run("recovering items", lambda db: self._reap(db, max_attempts))

    def expire_due(self) -> list[str]:
        """Jobs past their completion window: pending items expire and the job heads for
        `expired` (after the running items, if some run). Returns the ids of the jobs expired."""
        now = self._clock()

        def work(db: psycopg.Connection) -> list[str]:
            due = db.execute(
                "SELECT id, status FROM jobs WHERE expires_at <= %s AND status IN (%s, %s) "
                "AND outcome IS NULL ORDER BY id", (now, VALIDATING, IN_PROGRESS)).fetchall()
            expired = []
            for job_id, status in due:
                if status == VALIDATING:
                    if db.execute("UPDATE jobs SET status = %s, finished_at = %s WHERE id = %s "
                                  "AND status = %s", (EXPIRED, now, job_id, VALIDATING)).rowcount:
                        expired.append(job_id)
                        continue
                    raise _Retry()  # it began meanwhile: read again
                db.execute("UPDATE items SET state = %s, finished_at = %s WHERE job_id = %s "
                           "AND state = %s", (ITEM_EXPIRED, now, job_id, PENDING))
                if db.execute("UPDATE jobs SET outcome = %s WHERE id = %s AND status = %s "
                              "AND outcome IS NULL", (EXPIRED, job_id, IN_PROGRESS)).rowcount:
                    expired.append(job_id)
                    self._settle(db, job_id, now)
            self._sweep(db)
            return expired

        return self._run("expiring jobs", work)

    def purge(self, retention_s: float) -> PurgeCounts:
        """Jobs finished, and files made, more than `retention_s` ago (or past their own
        expiry) are deleted; a file an unfinished job still reads is kept."""
        now = self._clock()
        cutoff = now - retention_s
        finished = list(FINISHED_STATUSES)

        def work(db: psycopg.Connection) -> PurgeCounts:
            old_jobs = [job_id for (job_id,) in db.execute(
                "SELECT id FROM jobs WHERE status = ANY(%s) AND finished_at <= %s",
                (finished, cutoff)).fetchall()]
            db.execute("DELETE FROM items WHERE job_id = ANY(%s)", (old_jobs,))
            db.execute("DELETE FROM jobs WHERE id = ANY(%s)", (old_jobs,))
            files = db.execute(
                "DELETE FROM files f WHERE (created_at <= %s OR expires_at <= %s) AND NOT EXISTS ("
                "SELECT 1 FROM jobs j WHERE j.input_file_id = f.id AND NOT j.status = ANY(%s))",
                (cutoff, now, finished)).rowcount
            return PurgeCounts(len(old_jobs), files)

        return self._run("purging", work)

    # -- inside a transaction -----------------------------------------------------------------

    def _reap(self, db: psycopg.Connection, max_attempts: int, model: str | None = None) -> int:
        """Running items whose lease expired (of `model`, or all): pending again, or failed at
        `max_attempts`, or cancelled or expired with their job. Returns how many are pending
        again. Items another transaction is reaping or recording are skipped."""
        now = self._clock()
        rows = db.execute(
            "SELECT i.job_id, i.line, i.attempts, j.status, j.outcome FROM items i "
            "JOIN jobs j ON j.id = i.job_id WHERE i.state = %s "
            "AND i.leased_until < statement_timestamp()"
            + (" AND j.model = %s" if model is not None else "")
            + " ORDER BY i.job_id, i.line FOR UPDATE OF i SKIP LOCKED",
            (RUNNING, model) if model is not None else (RUNNING,)).fetchall()
        error = json.dumps({"code": "internal_error", "message":
                            f"the daemon running this request stopped {max_attempts} times "
                            "(its lease expired each time)"})
        settled: list[tuple] = []
        back: list[tuple] = []
        for job_id, line, attempts, status, outcome in rows:
            if status == CANCELLING:
                settled.append((ITEM_CANCELLED, None, now, job_id, line))
            elif outcome == EXPIRED:
                settled.append((ITEM_EXPIRED, None, now, job_id, line))
            elif attempts >= max_attempts:
                settled.append((ITEM_FAILED, error, now, job_id, line))
            else:
                back.append((PENDING, job_id, line))
        with db.cursor() as cursor:
            if settled:
                cursor.executemany(
                    "UPDATE items SET state = %s, error = %s, finished_at = %s, leased_until = NULL "
                    "WHERE job_id = %s AND line = %s", settled)
            if back:
                cursor.executemany(
                    "UPDATE items SET state = %s, started_at = NULL, box = NULL, leased_until = NULL "
                    "WHERE job_id = %s AND line = %s", back)
        for job_id in sorted({row[3] for row in settled}):
            self._settle(db, job_id, now)
        self._sweep(db)
        return len(back)

    def _sweep(self, db: psycopg.Connection) -> None:
        """Pending items of a job that is cancelling, or expiring, are cancelled or expired,
        and the job settled. Only a running item given back (requeued, or its lease expired)
        while its job was being cancelled or expired on another box leaves one, and nothing
        would ever claim it: the job would never finish. Run at each claim, recovery, requeue
        and expiry, it is a cheap no-op otherwise."""
        now = self._clock()
        rows = db.execute(
            "UPDATE items SET state = s.target, finished_at = %s FROM ("
            "SELECT i.job_id, i.line, CASE WHEN j.status = %s THEN %s ELSE %s END AS target "
            "FROM items i JOIN jobs j ON j.id = i.job_id WHERE i.state = %s AND (j.status = %s "
            "OR (j.status = %s AND j.outcome = %s)) ORDER BY i.job_id, i.line "
            "FOR UPDATE OF i SKIP LOCKED) s "
            "WHERE items.job_id = s.job_id AND items.line = s.line RETURNING items.job_id",
            (now, CANCELLING, ITEM_CANCELLED, ITEM_EXPIRED, PENDING, CANCELLING, IN_PROGRESS,
             EXPIRED)).fetchall()
        for job_id in sorted({job_id for (job_id,) in rows}):
            self._settle(db, job_id, now)

    def _job(self, db: psycopg.Connection, job_id: str, lock: bool = False) -> Job:
        row = db.execute(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = %s" + (" FOR UPDATE" if lock else ""),
                         (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"no batch {job_id!r}")
        by_state = dict(db.execute(
            "SELECT state, COUNT(*) FROM items WHERE job_id = %s GROUP BY state", (job_id,)).fetchall())
        return job_from_row(row, by_state)

    def _move(self, db: psycopg.Connection, job: Job, target: str) -> None:
        """Over a job read with `lock=True`."""
        if target not in JOB_TRANSITIONS[job.status]:
            raise JobStateError(f"batch {job.id} cannot go from {job.status} to {target}")
        db.execute("UPDATE jobs SET status = %s WHERE id = %s", (target, job.id))

    def _settle(self, db: psycopg.Connection, job_id: str, now: float) -> None:
        """An in-progress job with nothing left to run goes to `finalizing`. The job's row is
        locked first: two boxes recording a job's last two items at once each wait for the
        other's commit, so the second sees the first's item settled."""
        db.execute("SELECT 1 FROM jobs WHERE id = %s FOR UPDATE", (job_id,))
        left = db.execute("SELECT 1 FROM items WHERE job_id = %s AND state IN (%s, %s) LIMIT 1",
                          (job_id, PENDING, RUNNING)).fetchone()
        if left is None:
            db.execute("UPDATE jobs SET status = %s, finalizing_at = %s WHERE id = %s AND status = %s",
                       (FINALIZING, now, job_id, IN_PROGRESS))


__all__ = ["MIGRATIONS", "PostgresJobStore", "default_box_id", "describe_url", "schema_version"]
