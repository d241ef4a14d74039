"""Jobs that outlive one HTTP request: OpenAI's Batch API, stored so a restart loses nothing.

  batch_input.py  the JSONL input of a batch parsed into requests and bad lines (each with its
                  line number), and the output and error file lines in OpenAI's shapes; pure
  output_files.py a settled job's output and error files from its stored items; pure
  store.py        the `JobStore` interface and its SQLite implementation: files, jobs and their
                  items, claimed one at a time, each result recorded exactly once; synchronous
  runner.py       the `JobRunner`: the store opened lazily, items fed to the models at job
                  priority (after interactive requests) through the /v1 routes' code, settled
                  jobs finished, cancel and completion windows; progress for status and metrics
  postgres.py     the same interface in PostgreSQL (`jobs_url`), so several boxes drain one
                  queue: claims per model with SKIP LOCKED, leases, recovery by lease expiry

The routes are `api/openai/batches.py` (`/v1/files`, `/v1/batches`). Importing this package
imports neither the store nor sqlite3.
"""
