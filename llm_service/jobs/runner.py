"""The batch runner: feeds the job store's items to the models behind interactive requests.

One `JobRunner` per daemon, started in the app's lifespan. It owns the job store, opened only
when a jobs database already exists in `data_dir/jobs` or at the first files/batches request,
so a daemon that never sees a batch never imports sqlite3 nor holds a connection.

At start it puts back what a killed daemon was running (`recover_running`) and validates the
jobs a crash left in `validating`. Then, per model with pending items, one worker runs ONE item
at a time at job priority (admission.py: after every waiting interactive request, never
preempting one) through the code the /v1 routes use (`api/openai/routes.answer_body`), and
records its answer, or its error, exactly once. A job whose items are all settled gets its output
and error files and its finished status. Submissions wake the runner (an event); a small poll
(`job_poll_s`) handles completion windows. Cancelling a job cancels its pending items in the
store and the running item's generation here (the engine stops it on its backend).

At shutdown the running items are given back (`requeue_item`), so a restart runs them again.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

from ..engines.base import EngineError, ModelNotFound, ModelUnavailable

if TYPE_CHECKING:  # the store imports sqlite3: only when the store is opened
    from .store import ClaimedItem, Job, SqliteJobStore

log = logging.getLogger(__name__)

T = TypeVar("T")

JOBS_FOLDER = "jobs"
# store.DATABASE_NAME, known here without importing the store (and sqlite3) at start.
DATABASE_NAME = "jobs.sqlite3"
# Finished jobs and old files are purged this often (and once at start).
_PURGE_EVERY_S = 3600.0
# An item answered 503 (the model restarting, loading failed) is tried again this many times,
# this long apart, before its 503 is its answer.
_UNAVAILABLE_RETRIES = 3
_UNAVAILABLE_PAUSE_S = 2.0


class JobsError(EngineError):
    """A files/batches request that fails, with its status and OpenAI's code (the EngineError
    handler writes it in OpenAI's envelope)."""

    def __init__(self, message: str, status_code: int, code: str, param: str | None = None) -> None:
        super().__init__(message, status_code=status_code)
        self.code = code
        self.param = param


def translated(exc: Exception) -> JobsError:
    """A store error as the client sees it: 404, 413, 507 (full) or 503 (unavailable)."""
    from .store import FileTooLarge, JobStateError, NotFound, StoreFull, StoreUnavailable

    if isinstance(exc, NotFound):
        return JobsError(str(exc), 404, "not_found")
    if isinstance(exc, FileTooLarge):
        return JobsError(f"{exc} (job_file_max_bytes)", 413, "file_too_large")
    if isinstance(exc, StoreFull):
        return JobsError(str(exc), 507, "insufficient_storage")
    if isinstance(exc, StoreUnavailable):
        return JobsError(str(exc), 503, "store_unavailable")
    if isinstance(exc, JobStateError):
        return JobsError(str(exc), 409, "invalid_state")
    return JobsError(f"job store error: {exc}", 500, "internal_error")


class JobRunner:
    def __init__(self, settings: Any, manager: Any, metrics: Any, services: Any = None) -> None:
        self.services = services  # the prompt services' folder: services run as jobs
        self.settings = settings
        self.manager = manager
        self.metrics = metrics
        self.directory = Path(settings.data_dir) / JOBS_FOLDER
        self._store: SqliteJobStore | None = None
        self._open_lock = anyio.Lock()
        self._opened = anyio.Event()
        self._wake = anyio.Event()
        self._workers: set[str] = set()
        # The item each worker runs, and the scope that interrupts it: job id -> (item, scope).
        self._current: dict[str, tuple[ClaimedItem, anyio.CancelScope]] = {}
        self._cancelled_running: set[tuple[str, int]] = set()
        self._tg: Any = None
        self._stopping = False
        self._done = anyio.Event()
        self._last_purge = 0.0
        self.progress: dict[str, Any] = {}  # model -> ModelProgress, refreshed by the loop
        self._finished_events: dict[str, anyio.Event] = {}  # job id -> set when it finishes
        self._expiry: dict[str, float] = {}  # job id -> its expires_at (wall clock)
        self._last_recovery = time.monotonic()

    # ---- the store ---------------------------------------------------------------------------

    @property
    def opened(self) -> bool:
        return self._store is not None

    def database_exists(self) -> bool:
        """A store to open at start: a shared one (PostgreSQL: other boxes' jobs), or a SQLite
        file an earlier run left."""
        return bool(getattr(self.settings, "jobs_url", None)) or (self.directory / DATABASE_NAME).exists()

    async def store(self) -> SqliteJobStore:
        """The store, opened at the first call; its errors as JobsError (503, 507)."""
        if self._store is not None:
            return self._store
        async with self._open_lock:
            if self._store is None:
                from .store import JobStoreError, open_job_store

                options: dict[str, Any] = {"max_file_bytes": self.settings.job_file_max_bytes}
                if getattr(self.settings, "jobs_url", None):
                    options["max_attempts"] = self.settings.job_max_attempts
                try:
                    store = await anyio.to_thread.run_sync(lambda: open_job_store(self.settings, **options))
                    recovered = await anyio.to_thread.run_sync(store.recover_running, self.settings.job_max_attempts)
                except JobStoreError as exc:
                    raise translated(exc) from None
                if recovered:
                    log.info("jobs: %d batch item(s) a stopped daemon was running will run again", recovered)
                self._store = store
                self._opened.set()
        return self._store

    async def call(self, method: Callable[..., T], *args: Any) -> T:
        """A store call in a worker thread, its errors as JobsError. `method` is looked up on
        the store by name when given as a string."""
        from .store import JobStoreError

        store = await self.store()
        function = getattr(store, method) if isinstance(method, str) else method
        try:
            return await anyio.to_thread.run_sync(lambda: function(*args))
        except JobStoreError as exc:
            raise translated(exc) from None

    def wake(self) -> None:
        self._wake.set()

    # ---- life cycle --------------------------------------------------------------------------

    async def run(self, *, task_status=anyio.TASK_STATUS_IGNORED) -> None:
        try:
            await self._run(task_status)
        finally:
            self._done.set()

    async def _run(self, task_status) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            task_status.started()
            if self.database_exists():
                try:
                    await self.store()
                except JobsError as exc:
                    log.error("jobs: the job store cannot be opened: %s", exc.message)
            await self._opened.wait()
            await self._validate_leftovers()
            while True:
                try:
                    await self._round()
                except JobsError as exc:
                    log.error("jobs: %s", exc.message)
                except Exception:
                    log.exception("jobs: the runner's round failed")
                with anyio.move_on_after(self.settings.job_poll_s):
                    await self._wake.wait()
                self._wake = anyio.Event()

    async def shutdown(self) -> None:
        """Stop the workers and give their items back to the store (run again at the next start)."""
        self._stopping = True
        if self._tg is not None:
            self._tg.cancel_scope.cancel()
            with anyio.move_on_after(10):
                await self._done.wait()
        if self._store is not None:
            self._store.close()

    async def _round(self) -> None:
        store = await self.store()
        lease_s = getattr(store, "lease_s", None)
        if lease_s is not None and time.monotonic() - self._last_recovery > lease_s:
            # A shared store: items of boxes that died come back once their lease is over.
            self._last_recovery = time.monotonic()
            recovered = await self.call(store.recover_running, self.settings.job_max_attempts)
            if recovered:
                log.info("jobs: %d item(s) whose box stopped renewing them will run again", recovered)
        expired = await self.call(store.expire_due)
        for job_id in expired:
            self._interrupt(job_id)
        for job in await self.call(store.jobs_to_finish):
            try:
                await self._finish(job)
            except JobsError as exc:  # this job again at the next round; the others go on
                log.error("jobs: finishing batch %s failed: %s", job.id, exc.message)
        now = time.monotonic()
        if now - self._last_purge > _PURGE_EVERY_S:
            self._last_purge = now
            counts = await self.call(store.purge, self.settings.job_retention_s)
            if counts.jobs or counts.files:
                log.info("jobs: purged %d finished batch(es) and %d file(s)", counts.jobs, counts.files)
        self.progress = await self.call(store.model_progress)
        self._publish_progress()
        for model, progress in self.progress.items():
            if progress.pending and model not in self._workers and not self._stopping:
                self._workers.add(model)
                self._tg.start_soon(self._worker, model)

    def _publish_progress(self) -> None:
        known = {entry.spec.name: entry for entry in self.manager.entries()}
        now = time.time()
        for name, entry in known.items():
            progress = self.progress.get(name)
            if progress is None:
                entry.metrics.job_progress(0, 0, 0.0)
            else:
                since = progress.oldest_pending_since
                entry.metrics.job_progress(progress.pending, progress.running,
                                           max(0.0, now - since) if since and progress.pending else 0.0)

    # ---- validation ----------------------------------------------------------------------------

    async def _validate_leftovers(self) -> None:
        from .store import VALIDATING

        for job in await self.call((await self.store()).jobs_in_status, VALIDATING):
            try:
                await self.validate(job.id)
            except Exception:
                log.exception("jobs: validating batch %s failed", job.id)

    async def validate(self, job_id: str) -> Job:
        """Read a `validating` job's input: its items and its bad lines, or its failure."""
        from .batch_input import parse_batch_input

        store = await self.store()
        job = await self.call(store.get_job, job_id)
        try:
            content = await self.call(store.file_bytes, job.input_file_id)
        except JobsError as exc:
            if exc.status_code != 404:
                raise
            return await self.call(store.fail_job, job_id, [
                {"code": "input_file_missing", "message": f"the input file {job.input_file_id} does not exist",
                 "param": "input_file_id", "line": None}])
        parsed = await anyio.to_thread.run_sync(parse_batch_input, content, job.endpoint)
        if parsed.fatal is not None:
            return await self.call(store.fail_job, job_id, [
                {"code": parsed.fatal.code, "message": parsed.fatal.message, "param": None, "line": None}])
        model = parsed.model
        if model is not None:
            try:
                model = self.manager.resolve(model)
            except (ModelNotFound, ModelUnavailable) as exc:
                first = parsed.requests[0].line if parsed.requests else None
                return await self.call(store.fail_job, job_id, [
                    {"code": "model_not_found" if isinstance(exc, ModelNotFound) else "model_unavailable",
                     "message": exc.message, "param": "body.model", "line": first}])
        job = await self.call(store.begin_job, job_id, model, parsed.requests, parsed.errors)
        self._job_event(job, "in_progress")
        self.wake()
        return job

    # ---- items ---------------------------------------------------------------------------------

    async def _worker(self, model: str) -> None:
        try:
            store = await self.store()
            while not self._stopping:
                item = await self.call(store.claim_next_item, model)
                if item is None:
                    break
                await self._run_item(store, item)
        except JobsError as exc:
            log.error("jobs: model %s: %s", model, exc.message)
            await anyio.sleep(self.settings.job_poll_s)
        finally:
            self._workers.discard(model)
            self.wake()

    async def _run_item(self, store: SqliteJobStore, item: ClaimedItem) -> None:
        from ..api.ollama.routes import answer_body as ollama_answer_body
        from ..api.openai.routes import answer_body
        from ..services.run import SERVICE_ENDPOINT, service_answer

        scope = anyio.CancelScope()
        self._current[item.job_id] = (item, scope)
        answer: tuple[int, str, dict[str, Any]] | None = None
        failure: tuple[str, str] | None = None
        try:
            with scope:
                if getattr(store, "lease_s", None) is not None:
                    self._tg.start_soon(self._keep_lease, store, item, scope)
                deadline = await self._item_deadline(item)
                for attempt in range(_UNAVAILABLE_RETRIES + 1):
                    try:
                        if item.endpoint == SERVICE_ENDPOINT and self.services is not None:
                            answer = await service_answer(self.manager, self.services, item.body,
                                                          f"{item.job_id}-{item.line}", deadline)
                        elif item.endpoint in ("/api/generate", "/api/chat"):  # async Ollama requests
                            answer = await ollama_answer_body(self.manager, self.settings, item.endpoint, item.body,
                                                              priority="job", deadline=deadline)
                        else:
                            answer = await answer_body(self.manager, self.settings, item.endpoint, item.body,
                                                       priority="job", deadline=deadline)
                    except Exception as exc:  # a bug must cost this item, not the runner
                        log.exception("jobs: item %d of %s failed", item.line, item.job_id)
                        failure = ("internal_error", f"internal error: {exc!r}")
                        break
                    if answer[0] != 503 or attempt == _UNAVAILABLE_RETRIES or self._stopping:
                        break
                    await anyio.sleep(_UNAVAILABLE_PAUSE_S)
        finally:
            self._current.pop(item.job_id, None)
            with anyio.CancelScope(shield=True):
                await self._settle_item(store, item, answer, failure)

    async def _keep_lease(self, store: Any, item: ClaimedItem, scope: anyio.CancelScope) -> None:
        """While the item runs, renew its lease (a shared store hands it to another box when a
        lease runs out) and notice a cancel made on another box."""
        from .store import CANCELLING, JobStoreError

        while not scope.cancel_called:
            await anyio.sleep(store.lease_s / 3)
            if self._current.get(item.job_id, (None,))[0] is not item:
                return
            try:
                held = await anyio.to_thread.run_sync(store.renew_lease, item.job_id, item.line)
                job = await anyio.to_thread.run_sync(store.get_job, item.job_id)
            except JobStoreError as exc:  # the database is away: the lease may run out; go on
                log.warning("jobs: renewing the lease of item %d of %s failed: %s", item.line, item.job_id, exc)
                continue
            if not held or job.status == CANCELLING:
                self._cancelled_running.add((item.job_id, item.line))
                scope.cancel()
                return

    async def _item_deadline(self, item: ClaimedItem) -> float:
        """A job item waits behind interactive requests for as long as they come: its deadline
        is its job's completion window (which interrupts it), never shorter than
        request_deadline_s. A hung generation is still caught by hang_timeout_s."""
        expires_at = self._expiry.get(item.job_id)
        if expires_at is None:
            job = await self.call((await self.store()).get_job, item.job_id)
            expires_at = self._expiry[item.job_id] = job.expires_at
            if len(self._expiry) > 1000:
                self._expiry.clear()
        return time.monotonic() + max(self.settings.request_deadline_s, expires_at - time.time())

    async def _settle_item(self, store: SqliteJobStore, item: ClaimedItem,
                           answer: tuple[int, str, dict[str, Any]] | None, failure: tuple[str, str] | None) -> None:
        key = (item.job_id, item.line)
        interrupted = key in self._cancelled_running
        self._cancelled_running.discard(key)
        metrics = self._metrics(item.model)
        try:
            # An error answered while the daemon stops (engines stopping) is no answer: run again.
            if answer is not None and not (self._stopping and not 200 <= answer[0] < 300):
                status, request_id, body = answer
                if await self.call(store.record_response, item.job_id, item.line, status, request_id, body):
                    outcome = "completed" if 200 <= status < 300 else "failed"
                    if metrics is not None:
                        metrics.job_item_finished(outcome)
                    self._item_event(item, outcome)
            elif failure is not None and not self._stopping:
                if await self.call(store.record_error, item.job_id, item.line, *failure):
                    if metrics is not None:
                        metrics.job_item_finished("failed")
                    self._item_event(item, "failed")
            elif interrupted:
                # Cancelled or expired while it ran: its generation was closed.
                job = await self.call(store.get_job, item.job_id)
                code, what = ("batch_expired", "the completion window ended") if job.outcome == "expired" \
                    else ("batch_cancelled", "the batch was cancelled")
                if await self.call(store.record_error, item.job_id, item.line, code,
                                   f"{what} while this request ran; its generation was stopped") and metrics is not None:
                    metrics.job_item_finished("cancelled" if code == "batch_cancelled" else "expired")
            else:
                # The daemon is stopping: the item runs again at the next start.
                await self.call(store.requeue_item, item.job_id, item.line)
        except JobsError as exc:
            log.error("jobs: recording item %d of %s failed: %s", item.line, item.job_id, exc.message)
        self.wake()

    def _job_event(self, job: Job, status: str) -> None:
        """A batch's progress on the live events (/api/events, type `job`)."""
        events = getattr(self.manager, "events", None)  # none in the runner's in-process tests
        if events is not None:
            counts = job.counts
            events.publish("job", job.model, job_id=job.id, status=status, total=counts.total,
                           completed=counts.completed, failed=counts.failed)

    def _item_event(self, item: ClaimedItem, outcome: str) -> None:
        events = getattr(self.manager, "events", None)
        if events is not None:
            events.publish("job", item.model, job_id=item.job_id, line=item.line, item=outcome)

    def _metrics(self, model: str) -> Any:
        for entry in self.manager.entries():
            if entry.spec.name == model:
                return entry.metrics
        return None

    def _interrupt(self, job_id: str) -> None:
        """Stop the running item of a cancelled or expired job (its generation is closed)."""
        current = self._current.get(job_id)
        if current is not None:
            item, scope = current
            self._cancelled_running.add((item.job_id, item.line))
            scope.cancel()

    async def cancel(self, job_id: str) -> Job:
        store = await self.store()
        job = await self.call(store.cancel_job, job_id)
        self._interrupt(job_id)
        self.wake()
        return job

    # ---- finishing -----------------------------------------------------------------------------

    async def _finish(self, job: Job) -> None:
        from .output_files import render_output_files

        store = await self.store()
        items = await self.call(store.job_items, job.id)
        files = await anyio.to_thread.run_sync(render_output_files, job.id, items)
        # A daemon stopped between writing the files and finishing the job left them: the same
        # items render the same bytes, so they are taken as they are, not written twice.
        written = {f.filename: f for f in await self.call(store.list_files, "batch_output")
                   if f.filename.startswith(job.id + "_")}

        async def file_id(name: str, text: str) -> str | None:
            if not text:
                return None
            data = text.encode()
            found = written.get(name)
            if found is not None and found.bytes == len(data):
                return found.id
            return (await self.call(store.add_file, "batch_output", name, data)).id

        output_id = await file_id(f"{job.id}_output.jsonl", files.output)
        error_id = await file_id(f"{job.id}_error.jsonl", files.errors)
        finished = await self.call(store.finish_job, job.id, output_id, error_id)
        self._job_event(finished, finished.status)
        event = self._finished_events.pop(job.id, None)
        if event is not None:
            event.set()
        log.info("jobs: batch %s %s (%d completed, %d failed of %d)", job.id, finished.status,
                 finished.counts.completed, finished.counts.failed, finished.counts.total)

    async def wait_finished(self, job_id: str, timeout_s: float) -> Job:
        """The job once finished, or as it is after `timeout_s` (woken by its finish, no polling)."""
        from .store import FINISHED_STATUSES

        store = await self.store()
        event = self._finished_events.setdefault(job_id, anyio.Event())
        job = await self.call(store.get_job, job_id)
        if job.status not in FINISHED_STATUSES:
            with anyio.move_on_after(timeout_s):
                await event.wait()
            job = await self.call(store.get_job, job_id)
        if job.status in FINISHED_STATUSES and self._finished_events.get(job_id) is event:
            self._finished_events.pop(job_id, None)
        return job

    # ---- status ----------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Per model: job items queued, running, done (since start), for /api/status."""
        models: dict[str, Any] = {}
        for name, progress in self.progress.items():
            models[name] = {"queued": progress.pending, "running": progress.running}
        for entry in self.manager.entries():
            done = entry.metrics.job_items_done()
            if done or entry.spec.name in models:
                models.setdefault(entry.spec.name, {"queued": 0, "running": 0})["done"] = done
        return {"store_open": self.opened, "models": models}
