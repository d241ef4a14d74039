"""What the tests and the benchmarks share: loopback ports, waiting for an answer, the real daemon
as a process, and card-shaped model folders for it.

- `harness.net`: `free_port()`, `wait_http()` (the one way to wait until something answers),
  `wait_until()` (any other condition), and `WaitFailed`, what a wait raises when it gives up.
- `harness.daemon`: `running_daemon(...)` starts `axm1-llm serve` on free loopback ports with a
  unique marker in every child's environment, stops it, and kills (and, for the tests, reports)
  leftovers by that marker; `Daemon`, `write_descriptor`, `processes_with_marker`.
- `harness.models`: model folders served by the emulator (`scripted_model`, `shell_runner_model`)
  and the emulator's flags (`emulator_flags`).

The package lives at the top of the checkout and is not installed: pytest puts the checkout on
`sys.path` (the `pythonpath` ini option) and `python -m bench`, run from the checkout, has it there.
"""
