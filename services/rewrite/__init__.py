"""Rewriting service: quality rewrites (Wikipedia-style, QA, simplify, custom) under a
toxicity control and a drift guard."""
