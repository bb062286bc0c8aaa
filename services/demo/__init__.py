"""The `sluice demo` corpus: real news text with labelled junk mixed in, so curation is visible."""

from services.demo.corpus import DemoRecord, build_demo_corpus, write_jsonl

__all__ = ["DemoRecord", "build_demo_corpus", "write_jsonl"]
