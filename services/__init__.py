"""Sluice: streaming data curation services (one package per stage, one shared runtime)."""

__version__ = "0.1.0"
