"""Scoring service: heuristic quality rules, Ask-LLM and perplexity, with keep policies."""
