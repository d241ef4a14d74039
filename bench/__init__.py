"""Benchmarks of the daemon against the raw runner (`python -m bench`, `./run bench`)."""
