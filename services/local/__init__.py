"""The local embedded run (`sluice run INPUT --out DIR`): every stage in one process, no Kafka."""
