"""The RACE sketch: exact merges, batch-independent hashing, the estimator's expectation,
agreement with exact KDE, serialization and its failure modes."""

from __future__ import annotations

import hashlib
import json
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pydantic import ValidationError
from scipy.stats import spearmanr

from services.density.exact import collision_probability, exact_kde, suggest_width
from services.density.sketch import ANGULAR_SCHEME, HASH_SCHEME, RaceSketch, SketchParams
from services.runtime.errors import DecodeError, FailedPrecondition, InvalidArgument

SMALL = SketchParams(dim=8, rows=16, hashes_per_row=2, buckets=64, width=0.5, seed=3)


def clustered(n: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    """Unit vectors in Zipf-sized clusters of varying spread."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = 1.0 / np.arange(1, clusters + 1)
    labels = rng.choice(clusters, n, p=weights / weights.sum())
    spread = rng.uniform(0.2, 0.5, clusters)[labels, None]
    x = centres[labels] + spread * rng.standard_normal((n, dim)) / np.sqrt(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def sketch_of(params: SketchParams, x: np.ndarray) -> RaceSketch:
    sketch = RaceSketch(params)
    sketch.add(x)
    return sketch


points8 = arrays(
    np.float32,
    st.tuples(st.integers(0, 40), st.just(8)),
    elements=st.floats(-4, 4, width=32),
)


@settings(max_examples=60, deadline=None)
@given(a=points8, b=points8)
def test_merge_equals_sketch_of_union(a: np.ndarray, b: np.ndarray) -> None:
    union = sketch_of(SMALL, np.concatenate([b, a]))  # other order, one batch
    merged = sketch_of(SMALL, a).merge(sketch_of(SMALL, b))
    assert np.array_equal(merged.counts, union.counts)
    assert merged.n == union.n == len(a) + len(b)

    in_place = sketch_of(SMALL, b)
    in_place.merge_into(sketch_of(SMALL, a))
    assert np.array_equal(in_place.counts, union.counts)
    assert in_place.n == union.n


def test_merge_does_not_modify_its_inputs() -> None:
    x = clustered(300, 8, 3, seed=1)
    a, b = sketch_of(SMALL, x[:100]), sketch_of(SMALL, x[100:])
    before = a.counts.copy(), b.counts.copy()
    a.merge(b)
    assert np.array_equal(a.counts, before[0]) and np.array_equal(b.counts, before[1])
    assert (a.n, b.n) == (100, 200)


def test_merging_different_bandwidths_is_refused_and_says_so() -> None:
    other = SMALL.model_copy(update={"width": SMALL.width * 0.6})
    with pytest.raises(FailedPrecondition, match="different bandwidths: width"):
        RaceSketch(SMALL).merge(RaceSketch(other))
    with pytest.raises(FailedPrecondition, match="different bandwidths"):
        RaceSketch(other).merge_into(RaceSketch(SMALL))


@pytest.mark.parametrize(
    "change",
    [{"seed": 4}, {"buckets": 128}, {"rows": 17}, {"hashes_per_row": 3}, {"seed": 4, "width": 0.6}],
)
def test_merging_different_params_is_refused(change: dict[str, float]) -> None:
    other = SMALL.model_copy(update=change)
    with pytest.raises(FailedPrecondition, match="different params"):
        RaceSketch(SMALL).merge(RaceSketch(other))
    with pytest.raises(FailedPrecondition):
        RaceSketch(SMALL).merge_into(RaceSketch(other))
    assert SMALL.fingerprint() != other.fingerprint()


def test_params_are_frozen_strict_and_fingerprinted_by_value() -> None:
    with pytest.raises(ValidationError):
        SMALL.width = 2.0  # type: ignore[misc]
    with pytest.raises(ValidationError):
        SketchParams(dim=8, colour="blue")  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        SketchParams(dim=8, width=0.0)
    with pytest.raises(ValidationError, match="rows \\* buckets"):
        SketchParams(dim=8, rows=4096, buckets=1 << 18)  # 8 GiB of counts
    same = SketchParams(dim=8, rows=16, hashes_per_row=2, buckets=64, width=0.5, seed=3)
    assert same.fingerprint() == SMALL.fingerprint()
    assert SketchParams(dim=8, width=1).fingerprint() == SketchParams(dim=8).fingerprint()


def boundary_points(params: SketchParams, count: int, seed: int) -> np.ndarray:
    """Points whose projection onto one random hash lies ~1e-7 from a cell boundary,
    where float32 results of different BLAS kernels disagree. The projections are re-derived
    from the documented draw (rng(seed): normal (R*K, dim) / width, then U[0,1) offsets)."""
    rng = np.random.default_rng(params.seed)
    w = rng.standard_normal((params.rows * params.hashes_per_row, params.dim)) / params.width
    b = rng.uniform(0.0, 1.0, len(w))
    data = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        x = data.standard_normal(params.dim)
        x /= np.linalg.norm(x)
        j = data.integers(len(w))
        for _ in range(3):  # move x along w_j until its projection sits on a boundary
            v = w[j] @ x + b[j]
            x += (np.round(v) + data.choice([-1e-7, 1e-7]) - v) * w[j] / (w[j] @ w[j])
            x /= np.linalg.norm(x)
        out.append(x)
    return np.asarray(out, dtype=np.float32)


def test_bucket_ids_do_not_depend_on_the_batch() -> None:
    params = SketchParams(dim=384, rows=32, hashes_per_row=2, buckets=4096, width=0.5)
    x = boundary_points(params, 200, seed=5)
    sketch = RaceSketch(params)
    whole = sketch.bucket_ids(x)
    one_by_one = np.concatenate([sketch.bucket_ids(x[i : i + 1]) for i in range(len(x))])
    order = np.random.default_rng(0).permutation(len(x))
    shuffled = np.empty_like(whole)
    shuffled[order] = sketch.bucket_ids(x[order])
    assert np.array_equal(whole, one_by_one)
    assert np.array_equal(whole, shuffled)
    assert whole.shape == (200, 32) and whole.min() >= 0 and whole.max() < 4096
    # hashing sees only the direction (scaling by 4 is exact in float32)
    assert np.array_equal(sketch.bucket_ids(x * 4.0), whole)


def test_counts_score_and_bucket_ids_agree() -> None:
    x = clustered(500, 8, 4, seed=2)
    sketch = sketch_of(SMALL, x)
    assert sketch.counts.dtype == np.int64 and sketch.counts.shape == (16, 64)
    assert np.all(sketch.counts.sum(axis=1) == 500)
    ids = sketch.bucket_ids(x[:50])
    expected = sketch.counts[np.arange(16), ids].mean(axis=1)
    assert np.array_equal(sketch.score(x[:50]), expected)
    assert np.array_equal(sketch.score(x[:50], exclude_self=True), expected - 1.0)


def test_the_density_estimate_is_the_geometric_mean_of_row_counts() -> None:
    x = clustered(500, 8, 4, seed=2)
    sketch = sketch_of(SMALL, x)
    q = np.concatenate([x[:40], -x[:10]])  # -x: points far from the sketch, counts can be 0
    counts = sketch.counts[np.arange(16), sketch.bucket_ids(q)].astype(np.float64)
    expected = np.exp(np.log(np.maximum(counts, 1.0)).mean(axis=1))
    np.testing.assert_allclose(sketch.estimate_density(q), expected, rtol=1e-12)
    as_if_added = np.exp(np.log(counts + 1.0).mean(axis=1))
    np.testing.assert_allclose(sketch.estimate_density(q, plus_one=True), as_if_added, rtol=1e-12)
    # the same on the device path, and never above the rows' mean (AM-GM)
    on_device = RaceSketch(SMALL, sketch.counts, tensor_counts=True)
    np.testing.assert_allclose(on_device.estimate_density(q), expected, rtol=1e-12)
    assert np.all(sketch.estimate_density(x[:40]) <= sketch.score(x[:40]) + 1e-9)
    # without the point itself: G - 1, floored at one other point in one row
    floor = 2.0 ** (1 / 16) - 1.0
    assert sketch.others_floor == pytest.approx(floor)
    np.testing.assert_allclose(
        sketch.estimate_density(q, exclude_self=True), np.maximum(expected - 1.0, floor)
    )
    np.testing.assert_allclose(
        sketch.estimate_density(q, plus_one=True, exclude_self=True),
        np.maximum(as_if_added - 1.0, floor),
    )
    lone = sketch_of(SMALL, x[:1])  # alone in every row: G = 1, so it reads the floor
    np.testing.assert_allclose(lone.estimate_density(x[:1], exclude_self=True), floor)


def test_a_lone_point_scores_itself_once() -> None:
    params = SketchParams(dim=8, rows=64, buckets=1 << 16, width=0.25)
    x = clustered(2, 8, 2, seed=3)
    sketch = sketch_of(params, x[:1])
    assert sketch.score(x[:1])[0] == 1.0
    assert sketch.score(x[:1], exclude_self=True)[0] == 0.0
    assert sketch.score(-x[:1])[0] < 0.1  # the antipode almost never shares a cell


@pytest.mark.parametrize("buckets", [2048, 8])
def test_each_row_estimates_the_collision_kernel(buckets: int) -> None:
    """E[score(q)] = k(q, y) + (1 - k) / B for one point y; estimate_kde removes the B term."""
    rows, k = 2048, 2
    params = SketchParams(dim=16, rows=rows, hashes_per_row=k, buckets=buckets, width=0.8)
    rng = np.random.default_rng(11)
    y = rng.standard_normal(16)
    y /= np.linalg.norm(y)
    sketch = sketch_of(params, y[None, :].astype(np.float32))
    for dist in (0.2, 0.6, 1.2):
        d = rng.standard_normal(16)
        d -= (d @ y) * y
        # a unit vector at chord distance ``dist`` from y
        q = y * (1 - dist**2 / 2) + d / np.linalg.norm(d) * dist * np.sqrt(1 - dist**2 / 4)
        kern = float(collision_probability(np.array([dist]), 0.8, k)[0])
        expected = kern + (1 - kern) / buckets
        sigma = np.sqrt(expected * (1 - expected) / rows)
        got = sketch.score(q[None, :].astype(np.float32))[0]
        assert abs(got - expected) < 4 * sigma + 1e-9
        estimate = sketch.estimate_kde(q[None, :].astype(np.float32))[0]
        assert abs(estimate - kern) < 4 * sigma * buckets / (buckets - 1) + 1e-9


def test_sketch_ranks_points_like_exact_kde() -> None:
    x = clustered(2500, 32, 30, seed=0)
    width = suggest_width(x[:1000], 4)  # the documented way to pick the bandwidth
    params = SketchParams(dim=32, rows=200, hashes_per_row=4, buckets=4096, width=width, seed=1)
    sketch = sketch_of(params, x)
    rho = spearmanr(sketch.score(x), exact_kde(x, x, params)).statistic
    assert rho >= 0.9


def test_round_trip_is_exact() -> None:
    sketch = sketch_of(SMALL, clustered(1000, 8, 5, seed=4))
    back = RaceSketch.from_bytes(sketch.to_bytes())
    assert back.params == SMALL and back.n == 1000
    assert np.array_equal(back.counts, sketch.counts)
    assert back.counts.flags.writeable
    back.add(clustered(10, 8, 1, seed=5))  # a decoded sketch keeps working
    assert back.n == 1010
    empty = RaceSketch.from_bytes(RaceSketch(SMALL).to_bytes())
    assert empty.n == 0 and not empty.counts.any()


def _blob_with(header_update: dict[str, object], counts: np.ndarray | None = None) -> bytes:
    """A well-formed encoding with some header fields replaced (or other counts)."""
    sketch = sketch_of(SMALL, clustered(100, 8, 2, seed=6))
    data = sketch.to_bytes()
    (head_len,) = struct.unpack_from("<I", data, 12)
    header = json.loads(data[16 : 16 + head_len])
    payload = data[16 + head_len :]
    if counts is not None:
        payload = zlib.compress(counts.astype("<i8").tobytes())
        header.update(payload_bytes=len(payload), crc32=zlib.crc32(payload))
    header.update(header_update)
    head = json.dumps(header).encode()
    return data[:12] + struct.pack("<I", len(head)) + head + payload


def _corruptions() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, what the error must say)."""
    good = sketch_of(SMALL, clustered(100, 8, 2, seed=6)).to_bytes()
    flipped = bytearray(good)
    flipped[-3] ^= 0x40
    negative = np.zeros((16, 64), dtype=np.int64)
    negative[:, 0], negative[:, 1] = 101, -1
    return {
        "empty": (b"", "magic"),
        "foreign": (b'{"hello": "world"}' * 10, "magic"),
        "truncated header": (good[:40], "truncated"),
        "truncated payload": (good[:-10], "truncated"),
        "flipped payload": (bytes(flipped), "CRC"),
        "future format": (_blob_with({"format": 99}), "format"),
        "other hash scheme": (_blob_with({"hash_scheme": "minhash"}), "hashed with"),
        "bad params": (_blob_with({"params": {"dim": -1}}), "params"),
        "fingerprint": (_blob_with({"fingerprint": "00"}), "fingerprint"),
        "negative counts": (_blob_with({}, counts=negative), "negative"),
        "rows disagree with n": (_blob_with({"n": 7}), "inconsistent"),
    }


@pytest.mark.parametrize("case", list(_corruptions()))
def test_corrupt_or_foreign_bytes_are_decode_errors(case: str) -> None:
    blob, message = _corruptions()[case]
    with pytest.raises(DecodeError, match=message):
        RaceSketch.from_bytes(blob)


def test_bad_inputs_are_rejected_and_leave_the_sketch_untouched() -> None:
    sketch = sketch_of(SMALL, clustered(20, 8, 2, seed=7))
    before = sketch.counts.copy()
    bad = clustered(20000, 8, 2, seed=8)  # the NaN sits in a later chunk than the first
    bad[-1, 3] = np.nan
    with pytest.raises(InvalidArgument, match="finite"):
        sketch.add(bad)
    with pytest.raises(InvalidArgument, match="shape"):
        sketch.add(np.zeros((3, 9), dtype=np.float32))
    with pytest.raises(InvalidArgument, match="shape"):
        sketch.score(np.zeros(8, dtype=np.float32))
    assert np.array_equal(sketch.counts, before) and sketch.n == 20


def test_zero_vectors_hash_as_the_origin() -> None:
    sketch = sketch_of(SMALL, np.zeros((3, 8), dtype=np.float32))
    assert sketch.n == 3
    assert np.all(sketch.score(np.zeros((1, 8), dtype=np.float32)) == 3.0)


def test_constructor_checks_counts() -> None:
    counts = sketch_of(SMALL, clustered(30, 8, 2, seed=9)).counts
    assert RaceSketch(SMALL, counts).n == 30  # n is taken from the rows
    with pytest.raises(InvalidArgument, match="n=5"):
        RaceSketch(SMALL, counts, n=5)
    with pytest.raises(InvalidArgument, match="shape"):
        RaceSketch(SMALL, counts[:, :10])
    uneven = counts.copy()
    uneven[0, 0] += 1
    with pytest.raises(InvalidArgument, match="same points"):
        RaceSketch(SMALL, uneven)
    assert RaceSketch.empty_like(RaceSketch(SMALL, counts)).n == 0
    assert RaceSketch.empty_like(SMALL).params == SMALL


def test_a_width_too_small_for_exact_hashing_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="too small"):
        RaceSketch(SketchParams(dim=384, width=1e-6))


@pytest.mark.parametrize(
    "params",
    [
        SketchParams(dim=16, rows=24, hashes_per_row=3, buckets=512, width=0.8, seed=2),
        SketchParams(hash="angular", dim=16, rows=24, hashes_per_row=9, buckets=512, seed=2),
    ],
    ids=["pstable", "angular"],
)
def test_the_device_tensor_path_counts_and_scores_like_the_host_path(
    params: SketchParams,
) -> None:
    """``tensor_counts`` is what a CUDA sketch runs (bincount on the device, one copy back;
    lookups on a device copy): run on CPU tensors, it must equal the in-place host path."""
    x = clustered(3000, 16, 5, seed=3)
    host, tensor = RaceSketch(params), RaceSketch(params, tensor_counts=True)
    assert not host.tensor_counts and tensor.tensor_counts
    for part in (x[:1000], x[1000:]):
        host.add(part)
        tensor.add(part)
    np.testing.assert_array_equal(host.counts, tensor.counts)
    assert host.n == tensor.n == 3000
    np.testing.assert_array_equal(host.score(x[:500]), tensor.score(x[:500]))
    merged = tensor.merge(host)
    assert merged.tensor_counts is False  # a CPU sketch: the default path again
    np.testing.assert_array_equal(merged.counts, 2 * host.counts)


def test_a_device_without_hardware_is_refused() -> None:
    params = SketchParams(dim=4)
    with pytest.raises(InvalidArgument, match="cpu or cuda"):
        RaceSketch(params, device="meta")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidArgument, match="no CUDA device"):
            RaceSketch(params, device="cuda")


# -- the angular family (sign random projections) ------------------------------------------

ANGULAR = SketchParams(hash="angular", dim=8, rows=16, hashes_per_row=6, buckets=64, seed=3)


def test_angular_params_tie_buckets_to_k_and_have_no_width() -> None:
    with pytest.raises(ValidationError, match="2\\^6 = 64"):
        SketchParams(hash="angular", dim=8, hashes_per_row=6, buckets=4096)
    with pytest.raises(ValidationError, match="no width"):
        SketchParams(hash="angular", dim=8, hashes_per_row=6, buckets=64, width=0.5)
    assert ANGULAR.scheme == ANGULAR_SCHEME
    # the family is part of the identity ...
    pstable = SketchParams(dim=8, rows=16, hashes_per_row=6, buckets=64, seed=3)
    assert pstable.fingerprint() != ANGULAR.fingerprint()
    # ... and p-stable fingerprints are those of the releases before the field existed
    # (store folders and pins are keyed by them)
    fields = {"dim": 8, "rows": 16, "hashes_per_row": 6, "buckets": 64, "width": 1.0, "seed": 3}
    doc = json.dumps({"scheme": HASH_SCHEME, **fields}, sort_keys=True, separators=(",", ":"))
    assert pstable.fingerprint() == hashlib.blake2b(doc.encode(), digest_size=16).hexdigest()


@pytest.mark.parametrize("k", [1, 3])
def test_angular_rows_estimate_the_sign_projection_kernel(k: int) -> None:
    """E[score(q)] = (1 - angle(q, y) / pi)^K for one point y, exactly: no rehash term."""
    rows = 4096
    params = SketchParams(hash="angular", dim=16, rows=rows, hashes_per_row=k, buckets=1 << k)
    rng = np.random.default_rng(12)
    y = rng.standard_normal(16)
    y /= np.linalg.norm(y)
    sketch = sketch_of(params, y[None, :].astype(np.float32))
    for angle in (0.3, 1.0, 2.0, 3.0):
        d = rng.standard_normal(16)
        d -= (d @ y) * y
        q = np.cos(angle) * y + np.sin(angle) * d / np.linalg.norm(d)
        expected = (1.0 - angle / np.pi) ** k
        sigma = np.sqrt(expected * (1 - expected) / rows)
        got = sketch.score(q[None, :].astype(np.float32))[0]
        assert abs(got - expected) < 4 * sigma + 1e-9
        assert sketch.estimate_kde(q[None, :].astype(np.float32))[0] == got
        # the exact reference evaluates the same kernel
        np.testing.assert_allclose(exact_kde(q[None, :], y[None, :], params), expected, rtol=1e-9)
    # the antipode never shares a bucket: every sign differs
    assert sketch.score(-y[None, :].astype(np.float32))[0] == 0.0


def test_angular_bucket_ids_do_not_depend_on_the_batch() -> None:
    """Points whose projection onto one direction is ~1e-7 from 0 (the sign boundary)
    hash alike in any batch; the code of a row is its K sign bits."""
    params = SketchParams(hash="angular", dim=384, rows=32, hashes_per_row=8, buckets=256)
    rng = np.random.default_rng(params.seed)
    w = rng.standard_normal((params.rows * params.hashes_per_row, params.dim))
    data = np.random.default_rng(5)
    pts = []
    for _ in range(200):
        x = data.standard_normal(params.dim)
        x /= np.linalg.norm(x)
        j = data.integers(len(w))
        x += (data.choice([-1e-7, 1e-7]) - w[j] @ x) * w[j] / (w[j] @ w[j])
        pts.append(x / np.linalg.norm(x))
    x = np.asarray(pts, dtype=np.float32)
    sketch = RaceSketch(params)
    whole = sketch.bucket_ids(x)
    one_by_one = np.concatenate([sketch.bucket_ids(x[i : i + 1]) for i in range(len(x))])
    assert np.array_equal(whole, one_by_one)
    assert whole.min() >= 0 and whole.max() < 256
    assert np.array_equal(sketch.bucket_ids(x * 4.0), whole)  # only the direction counts
    # row r's code: bit k is sign(w[k * R + r] . x) (float64: the reference)
    signs = (x.astype(np.float64) @ w.T >= 0).reshape(len(x), 8, 32)
    codes = (signs * (1 << np.arange(8))[None, :, None]).sum(axis=1)
    margin = np.abs(x.astype(np.float64) @ w.T).reshape(len(x), 8, 32).min(axis=1) < 1e-9
    assert np.array_equal(whole[~margin], codes[~margin])  # (ties at 0 aside)


def test_angular_sketch_ranks_like_its_exact_kde_and_merges_and_round_trips() -> None:
    x = clustered(2500, 32, 30, seed=0)
    params = SketchParams(hash="angular", dim=32, rows=200, hashes_per_row=8, buckets=256)
    sketch = sketch_of(params, x)
    exact = exact_kde(x, x, params, exclude_self=True)
    rho = spearmanr(sketch.estimate_density(x, exclude_self=True), exact).statistic
    assert rho >= 0.9
    merged = sketch_of(params, x[:1000]).merge(sketch_of(params, x[1000:]))
    assert np.array_equal(merged.counts, sketch.counts)
    back = RaceSketch.from_bytes(sketch.to_bytes())
    assert back.params == params and np.array_equal(back.counts, sketch.counts)
    with pytest.raises(FailedPrecondition, match="hash"):
        sketch.merge(sketch_of(SketchParams(dim=32, rows=200, hashes_per_row=8, buckets=256), x))
    # a header whose scheme and params disagree is refused
    raw = sketch.to_bytes()
    fixed = len(b"SLUICE-RACE\x00") + 4
    (head_len,) = struct.unpack_from("<I", raw, fixed - 4)
    header = json.loads(raw[fixed : fixed + head_len])
    header["hash_scheme"] = HASH_SCHEME
    head = json.dumps(header, sort_keys=True).encode()
    forged = raw[: fixed - 4] + struct.pack("<I", len(head)) + head + raw[fixed + head_len :]
    with pytest.raises(DecodeError, match="angular"):
        RaceSketch.from_bytes(forged)
