"""Benchmarks: one command per benchmark (``python -m bench.<name>``), each printing a table
and a final machine-readable ``RESULT <name> key=value ...`` line."""
