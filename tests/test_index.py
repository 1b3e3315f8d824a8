"""The FAISS index: exact and inverted-file search, SEALS candidate pools, more-like-this, near-duplicates."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_collection
from PIL import Image

from raresift import Project
from raresift.errors import InputError
from raresift.index import (
    VectorIndex,
    build_index,
    candidate_pool,
    more_like_this,
    near_duplicates,
    project_index,
)


def clustered(n: int, dim: int = 64, clusters: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    return centres[rng.integers(0, clusters, n)] + 0.4 * rng.normal(size=(n, dim)).astype(np.float32)


def test_flat_index_is_exact_and_returns_rows():
    x = clustered(3000)
    rows = np.arange(3000) * 2 + 5  # the index answers with the given row numbers
    big = np.zeros((rows.max() + 1, 64), dtype=np.float32)
    big[rows] = x
    index = build_index(big, rows, kind="flat")
    assert (index.kind, index.size) == ("flat", 3000)
    sims, found = index.search(big[rows[:50]], 5)
    assert (found[:, 0] == rows[:50]).all()
    np.testing.assert_allclose(sims[:, 0], 1.0, atol=1e-5)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    exact = np.argsort(-(unit[:50] @ unit.T), axis=1)[:, :5]
    assert (found == rows[exact]).mean() > 0.99


def test_ivf_index_recall_against_exact_search():
    x = clustered(6000, seed=1)
    exact = build_index(x, kind="flat")
    ivf = build_index(x, kind="ivf-sq8", nlist=32, nprobe=8)
    assert ivf.kind == "ivf-sq8" and ivf.size == 6000
    _, a = exact.search(x[:200], 10)
    _, b = ivf.search(x[:200], 10)
    recall = np.mean([len(set(p) & set(q)) / 10 for p, q in zip(a, b)])
    assert recall >= 0.9, recall
    with pytest.raises(InputError, match="at least nlist"):
        build_index(x[:10], kind="ivf-sq8", nlist=32)
    with pytest.raises(InputError, match="unknown index kind"):
        build_index(x, kind="hnsw")


def test_zero_rows_are_left_out():
    x = clustered(500)
    x[[3, 7]] = 0  # rows never embedded hold zeros
    index = build_index(x, kind="flat")
    assert index.size == 498
    _, found = index.search(x[:20], 498)
    assert not np.isin([3, 7], found).any()


def test_candidate_pool_is_the_neighbourhood_of_the_labels_and_caches_searches():
    x = clustered(4000, seed=2)
    index = build_index(x, kind="flat")
    labelled = np.array([0, 1, 2, 3])
    exclude = np.zeros(4000, dtype=bool)
    exclude[labelled] = True
    exclude[10:2000] = True  # e.g. the test split
    calls = []
    real = index.search
    index.search = lambda q, k, **kw: calls.append(len(q)) or real(q, k, **kw)
    pool = candidate_pool(index, x, labelled, k=20, exclude=exclude)
    assert len(pool) > 0 and not exclude[pool].any()
    assert np.all(np.diff(pool) > 0)
    _, nb = real(x[labelled], 21)
    expected = np.setdiff1d(np.unique(nb), np.flatnonzero(exclude))
    np.testing.assert_array_equal(pool, expected)
    # Next round: two more labels; only they are searched.
    candidate_pool(index, x, np.array([0, 1, 2, 3, 2500, 2600]), k=20)
    assert calls == [4, 2]
    assert len(candidate_pool(index, x, np.array([], dtype=np.int64), k=20)) == 0


def test_more_like_this_and_near_duplicates_on_vectors():
    x = clustered(2000, seed=3)
    x[100] = x[50] * 1.5  # same direction: cosine 1
    x[101] = x[50] + 0.01
    x[700] = x[600] + 0.01
    index = build_index(x, kind="flat")
    rows, sims = more_like_this(index, x, [50], n=5)
    assert set(rows[:2].tolist()) == {100, 101} and 50 not in rows
    assert np.all(np.diff(sims) <= 1e-6)
    exclude = np.zeros(2000, dtype=bool)
    exclude[100] = True
    rows, _ = more_like_this(index, x, [50], n=5, exclude=exclude)
    assert 100 not in rows and rows[0] == 101
    groups = near_duplicates(index, x, threshold=0.999)
    assert groups == [[50, 100, 101], [600, 700]]


def test_project_index_on_real_photos_finds_a_resized_copy(tmp_path):
    images = tmp_path / "images"
    make_collection(images, n=16, n_rare=3, seed=5)
    src = Image.open(images / "b" / "img_0002.jpg")
    src.resize((240, 180)).save(images / "b" / "copy_of_0002.jpg", quality=70)  # bigger, re-encoded
    with Project.create(tmp_path / "p", images=images) as p:
        p.add_images()
        p.embed(batch_size=16)
        index = project_index(p.store)
        assert (p.path / "embeddings" / "index.faiss").is_file()
        vectors = p.vectors()
        a, b = p.image_id("b/img_0002.jpg") - 1, p.image_id("b/copy_of_0002.jpg") - 1
        groups = near_duplicates(index, vectors, threshold=0.95)
        assert [sorted([a, b])] == groups
        rows, sims = more_like_this(index, vectors, [a], n=3)
        assert rows[0] == b and sims[0] > 0.95
        # Reused while nothing changes, read lazily: neighbours found before come from the cache
        # beside it, so the next command does not even load the FAISS file for them.
        pool = candidate_pool(index, vectors, [a, b], k=5)
        again = project_index(p.store)
        assert again.stamp == index.stamp and again.size == 17 and again.index is None
        np.testing.assert_array_equal(candidate_pool(again, vectors, [a, b], k=5), pool)
        assert again.index is None
        candidate_pool(again, vectors, [a, b, 0], k=5)  # a new label: now it searches
        assert again.index is not None
        p.embed(reembed=True, limit=10)
        smaller = project_index(p.store)
        assert smaller.size == 10 and smaller.stamp != index.stamp


def test_index_save_and_load_roundtrip(tmp_path):
    x = clustered(3000, seed=4)
    index = build_index(x, kind="ivf-sq8", nlist=16, nprobe=4)
    index.save(tmp_path / "i.faiss")
    back = VectorIndex.load(tmp_path / "i.faiss")
    assert (back.kind, back.size, back.nprobe) == ("ivf-sq8", 3000, 4)
    np.testing.assert_array_equal(back.search(x[:10], 5)[1], index.search(x[:10], 5)[1])


def test_auto_kind_switches_to_pq_above_the_byte_budget(monkeypatch):
    from raresift import settings
    from raresift.index import auto_kind

    assert auto_kind(10_000, 512) == "flat"
    assert auto_kind(1_000_000, 512) == "ivf-sq8"  # 0.5 GB of 8-bit codes
    assert auto_kind(10_000_000, 512) == "ivf-pq"  # 5 GB of 8-bit codes: over the 2 GB budget
    monkeypatch.setitem(settings.SETTINGS, "index_sq8_max_gb", settings.Setting("index_sq8_max_gb", 0.001, "test"))
    assert auto_kind(60_000, 64) == "ivf-pq"


def test_pq_neighbours_are_reranked_by_the_exact_vectors(tmp_path):
    """Product-quantised codes only shortlist: the neighbours returned are ordered by exact cosine, and
    they match exact search far better than the codes' own order."""
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(40, 64)).astype(np.float32)
    x = (centres[rng.integers(0, 40, 8000)] + 0.6 * rng.normal(size=(8000, 64))).astype(np.float32)
    pq = build_index(x, kind="ivf-pq", nlist=32, nprobe=8)
    assert pq.approximate
    exact = build_index(x, kind="flat")
    queries = np.arange(0, 8000, 97)
    got = pq.neighbours(x, queries, 10)
    truth = exact.neighbours(x, queries, 10)
    raw = pq.search(x[queries], 10)[1]
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, truth)])
    raw_overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(raw, truth)])
    assert overlap > 0.9 and overlap > raw_overlap
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    for q, nb in zip(queries, got):
        sims = unit[nb] @ unit[q]
        assert np.all(np.diff(sims) <= 1e-6)  # best first, by the exact similarity
        assert nb[0] == q  # a photo is its own nearest neighbour
    path = tmp_path / "index.faiss"
    pq.save(path)
    back = VectorIndex.load(path, lazy=True)
    assert back.kind == "ivf-pq" and np.array_equal(back.neighbours(x, queries[:5], 10), got[:5])


def test_pq_codes_are_64_bytes_of_4_bit_fast_scan_where_the_dimension_splits_evenly():
    import faiss

    rng = np.random.default_rng(5)
    pq = build_index(rng.normal(size=(4000, 256)).astype(np.float32), kind="ivf-pq", nlist=16)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(pq._faiss()))
    assert isinstance(ivf, faiss.IndexIVFPQFastScan) and (ivf.pq.M, ivf.pq.nbits) == (128, 4)
    x = rng.normal(size=(4000, 7)).astype(np.float32)
    odd = build_index(x, kind="ivf-pq", nlist=16)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(odd._faiss()))
    assert not isinstance(ivf, faiss.IndexIVFPQFastScan) and ivf.pq.nbits == 8  # 7 parts of 1: 8-bit codes
    found = odd.neighbours(x, np.array([0, 9]), 3)
    assert found.shape == (2, 3) and found.min() >= 0


def test_neighbours_cached_by_one_index_are_not_served_by_its_replacement(tmp_path):
    from raresift.index import project_index

    rng = np.random.default_rng(0)
    np.save(tmp_path / "v.npy", rng.normal(size=(3000, 16)).astype(np.float32))
    (tmp_path / "ids.txt").write_text("".join(f"{i}.jpg\n" for i in range(3000)))
    with Project.create(tmp_path / "p") as p:
        p.import_embeddings(tmp_path / "v.npy", tmp_path / "ids.txt")
        flat = project_index(p.store, kind="flat")
        flat.neighbours(p.vectors(), np.arange(10), 5)
        knn = p.store.paths.index.with_name("index-knn.npz")
        assert knn.is_file()
        # A saved neighbour file of another kind of index over the same vectors is ignored ...
        saved = knn.read_bytes()
        ivf = project_index(p.store, kind="ivf-pq", nlist=16)
        assert ivf.kind == "ivf-pq" and not knn.is_file()  # ... and a rebuild drops it
        knn.write_bytes(saved)
        again = project_index(p.store)
        assert again.kind == "ivf-pq" and not again._knn_cache


def test_near_duplicates_on_a_pq_index_use_exact_similarities():
    """Product-quantised similarities are rough: groups above the threshold come out as with exact search."""
    from raresift.index import near_duplicates

    rng = np.random.default_rng(4)
    x = rng.normal(size=(6000, 64)).astype(np.float32)
    x[3000:3300] = x[:300] + 0.05 * rng.normal(size=(300, 64)).astype(np.float32)  # near copies (cosine ~0.999)
    # related photos around the threshold (cosine ~0.95): the rough similarities put some on the wrong side
    x[4000:4300] = x[300:600] + 0.3 * rng.normal(size=(300, 64)).astype(np.float32)
    exact = near_duplicates(build_index(x, kind="flat"), x, threshold=0.95, nprobe=None)
    index = build_index(x, kind="ivf-pq", nlist=16, nprobe=16)
    assert near_duplicates(index, x, threshold=0.95, nprobe=16) == exact
    index.kind = "rough"  # the same index with its own similarities: not the exact groups
    assert near_duplicates(index, x, threshold=0.95, nprobe=16) != exact


def test_auto_kind_of_compact_tiled_photos_is_pq_above_flat():
    from raresift.index import auto_kind

    assert auto_kind(10_000, 1280, compact=True) == "flat"
    assert auto_kind(1_000_000, 1280, compact=True) == "ivf-pq"
    assert auto_kind(1_000_000, 1280) == "ivf-sq8"
