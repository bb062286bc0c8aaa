"""Synthesis service: Self-Instruct, Evol-Instruct and grounded QA from seeds, with output
filters (format, length, near-duplicates, optional Ask-LLM/IFD gates)."""
