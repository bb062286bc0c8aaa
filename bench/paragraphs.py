"""A labelled set of short, single-line technical paragraphs (many opening with markdown
emphasis or naming their subject more than once) and paragraph-sized junk made from them.

Written for this repository (no hub data here): the kind of text a documentation or
Q&A crawl yields paragraph by paragraph, where document-level rules misfire. Used by
``bench.quality --paragraphs`` and the heuristics tests.
"""

from __future__ import annotations

import random

REAL_PARAGRAPHS: tuple[str, ...] = (
    (
        "**Note:** the consumer group must be unique per stage, because two stages that share a "
        "group split the partitions between them and each sees only half of the stream."
    ),
    (
        "*Idempotence* means that sending the same request twice has the same effect as sending "
        "it once, which is what lets a producer retry after a timeout without writing duplicates."
    ),
    (
        "**Warning:** deleting the topic also deletes the committed offsets of every group that "
        "read it, so a worker restarted afterwards starts again from the earliest offset."
    ),
    (
        "The scheduler places a pod on a node only if the node has enough free CPU and memory for"
        " the pod's requests; limits are enforced later by the kernel, not by the scheduler."
    ),
    (
        "*Backpressure* is what keeps a fast producer from overwhelming a slow consumer: the "
        "consumer reads only as fast as it can process, and the lag grows in the broker instead "
        "of in memory."
    ),
    (
        "**Tip:** run the migration in a transaction so that a failure halfway leaves the schema "
        "exactly as it was, and the next deploy can simply try again."
    ),
    (
        "A hash index answers equality lookups in constant time, but it cannot answer range "
        "queries, so a query with `BETWEEN` on that column still scans the table."
    ),
    (
        "*Note that* the cache key includes the model version: a new model never serves answers "
        "cached by the old one, and rolling back restores the old entries."
    ),
    (
        "The garbage collector pauses the program only for the marking of roots; most of the work"
        " happens concurrently, which is why pause times stay short even with large heaps."
    ),
    (
        "**Important:** the token expires after one hour, so a long-running job must refresh it "
        "before that, or every request after the hour fails with an authentication error."
    ),
    (
        "A B-tree keeps its keys sorted, so a range scan reads neighbouring pages; a hash table "
        "spreads them out, which is faster for single lookups and slower for ranges."
    ),
    (
        "*Exactly-once* delivery in Kafka is a property of the whole pipeline: the producer must "
        "be transactional, the consumer must read committed data only, and the offsets must "
        "commit in the same transaction."
    ),
    (
        "The learning rate warm-up matters most in the first few hundred steps, when the gradient"
        " statistics of the optimizer are still poor estimates and large updates can push the "
        "model into a bad region."
    ),
    (
        "**Note:** the default batch size of 64 fits a 16 GB GPU for the base model; the large "
        "model needs a batch size of 16 or gradient accumulation to reach the same effective "
        "batch."
    ),
    (
        "When the replica count changes, the load balancer drains connections from the removed "
        "pods first, so requests in flight finish instead of failing with a reset."
    ),
    (
        "*Quantization* stores each weight in fewer bits, which shrinks the model and speeds up "
        "memory-bound inference, at the cost of a small loss in accuracy that depends on the "
        "method."
    ),
    (
        "The embedding model maps each sentence to a vector of 384 numbers, and sentences with "
        "similar meaning end up close together, which is what the nearest-neighbour search relies"
        " on."
    ),
    (
        "**Caution:** the `--force` flag overwrites the existing merged version without asking, "
        "so keep a copy of the old sketch if you may need to compare against it later."
    ),
    (
        "A read replica serves queries from a copy of the primary that may lag by a few seconds, "
        "so a read right after a write can miss that write unless it goes to the primary."
    ),
    (
        "*Sharding* splits the data by key across several servers; a query that names the key "
        "goes to one shard, while a query without it must ask every shard and merge the answers."
    ),
    (
        "The compiler inlines small functions so that the call overhead disappears, and the "
        "inlined body can then be optimized together with the code around it."
    ),
    (
        "**Note:** the retry policy uses exponential backoff with jitter, so that many clients "
        "failing at the same moment do not all retry at the same moment and overload the server "
        "again."
    ),
    (
        "Each partition of the topic is an ordered log, and ordering holds only within a "
        "partition: records with the same key go to the same partition and keep their order."
    ),
    (
        "*Tokenization* splits text into the units the model reads; the same sentence can be ten "
        "tokens for one tokenizer and fourteen for another, so token counts are not comparable "
        "across models."
    ),
    (
        "The health check returns NOT_SERVING during shutdown, so the load balancer stops sending"
        " new requests while the server finishes the ones it already accepted."
    ),
    (
        "**Tip:** set the memory request equal to the limit for latency-sensitive pods; the pod "
        "then gets the guaranteed quality of service class and is the last to be evicted under "
        "pressure."
    ),
    (
        "A write-ahead log records every change before it is applied to the data files, so after "
        "a crash the database replays the log and reaches the state it had before the crash."
    ),
    (
        "*Deduplication* by exact hash removes copies that match byte for byte, while "
        "near-duplicate detection with MinHash also catches copies that differ by a few words or "
        "a changed header."
    ),
    (
        "The optimizer keeps two extra values per parameter, the running mean and the running "
        "variance of the gradient, so its memory is twice the size of the model weights."
    ),
    (
        "**Note:** the config file is read once at start; change it, then restart the worker, and"
        " the new settings apply from the first batch the restarted worker reads."
    ),
    (
        "A circuit breaker stops calling a failing service for a while after too many errors, "
        "which gives the service time to recover and keeps callers from waiting on timeouts."
    ),
    (
        "*Perplexity* measures how surprised a language model is by a text: fluent prose in the "
        "model's training domain gets a low perplexity, while shuffled words get a very high one."
    ),
    (
        "The model server loads the weights once and keeps them in GPU memory, so only the first "
        "request after start pays the loading time and the rest see the normal latency."
    ),
    (
        "**Warning:** the access key in this example is a placeholder; never commit a real key to"
        " the repository, and rotate any key that was committed by mistake."
    ),
    (
        "A bloom filter answers whether an item might be in a set using a few bits per item; it "
        "can say yes for an item that is not there but never says no for an item that is."
    ),
    (
        "*Static membership* lets a restarted consumer rejoin its group under the same identity, "
        "so the group does not rebalance every time a pod restarts during a rolling update."
    ),
    (
        "The index is rebuilt in the background and swapped in when it is complete, so queries "
        "keep using the old index until the new one is ready and never see a half-built one."
    ),
    (
        "**Note:** the timeout applies to each attempt, not to the whole request; with three "
        "retries a request can take up to three times the timeout before it finally fails."
    ),
    (
        "Mixed precision training keeps a copy of the weights in full precision and computes in "
        "half precision, which halves memory traffic while the updates stay accurate."
    ),
    (
        "*Rate limiting* with a token bucket allows short bursts up to the bucket size while "
        "holding the average rate to the refill rate, which suits clients that send requests in "
        "bursts."
    ),
)
"""Real paragraphs: 24-38 words, one line, most opening with markdown emphasis."""


def paragraph_junk(seed: int = 0, per_type: int = 8) -> list[tuple[str, str]]:
    """(junk type, text) pairs of paragraph length, made from ``REAL_PARAGRAPHS`` with the
    demo corpus's generators (shuffled words, spam, navigation, gibberish, repeats), so
    junk and real text share a vocabulary and length."""
    from services.demo.corpus import _GENERATORS, JUNK_TYPES

    rng = random.Random(seed)
    out: list[tuple[str, str]] = []
    for kind in JUNK_TYPES:
        for _ in range(per_type):
            if kind == "repeated":  # one sentence of a paragraph, over and over
                text = " ".join([rng.choice(REAL_PARAGRAPHS)] * rng.randint(3, 6))
            else:
                text = _GENERATORS[kind](rng, REAL_PARAGRAPHS)
            out.append((kind, text))
    return out
