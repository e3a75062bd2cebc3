"""Benchmarks: `make bench` (or `python -m bench [NAME...]`). Not part of `make test`."""
