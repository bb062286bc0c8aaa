"""The sink stage: the curated stream written out as Parquet shards a trainer reads."""
