"""Jobs that outlive one HTTP request: OpenAI's Batch API, stored so a restart loses nothing.

What exists so far:
  batch_input.py  the JSONL input of a batch parsed into requests and bad lines (each with its
                  line number), and the output and error file lines in OpenAI's shapes; pure
  output_files.py a settled job's output and error files from its stored items; pure
  store.py        the `JobStore` interface and its SQLite implementation: files, jobs and their
                  items, claimed one at a time, each result recorded exactly once; synchronous
  postgres.py     the same interface in PostgreSQL (`jobs_url`), so several boxes drain one
                  queue: claims per model with SKIP LOCKED, leases, recovery by lease expiry

Not yet: the routes (`/v1/files`, `/v1/batches`), the worker that feeds items to the models
behind interactive requests, status and metrics.
"""
