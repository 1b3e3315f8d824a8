"""Fast paths for rounds at scale return exactly what the plain code returns; the cache module."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest

from raresift import Project
from raresift.learn.features import featurize, linear_scores, sqrt_features, sqrt_norms
from raresift.store.cache import Cache


@pytest.fixture(scope="module")
def vectors_template(tmp_path_factory):
    root = tmp_path_factory.mktemp("vectors")
    rng = np.random.default_rng(0)
    n = 70_000  # more than one scoring block
    matrix = rng.gamma(0.6, 1.0, size=(n, 32)).astype(np.float32)
    matrix[5] = 0.0  # a zero vector must not divide by zero
    np.save(root / "m.npy", matrix)
    (root / "ids.txt").write_text("".join(f"img_{i}.jpg\n" for i in range(n)))
    with Project.create(root / "p", test_fraction=0.3) as p:
        p.import_embeddings(root / "m.npy", root / "ids.txt")
    return root / "p", matrix


@pytest.fixture
def vectors_project(vectors_template, tmp_path):
    src, matrix = vectors_template
    shutil.copytree(src, tmp_path / "p")
    p = Project(tmp_path / "p")
    yield p, matrix
    p.close()


def _plain_mask(p):
    """The embedded mask read row by row."""
    n = p.db.execute("SELECT MAX(id) FROM images").fetchone()[0]
    mask = np.zeros(n, dtype=bool)
    for (image_id,) in p.db.execute("SELECT id FROM images WHERE status = 'embedded'"):
        mask[image_id - 1] = True
    return mask


def test_masks_equal_the_plain_reads(vectors_project):
    p, _ = vectors_project
    np.testing.assert_array_equal(p.embedded_mask(), _plain_mask(p))
    splits = p.splits()
    plain = np.array([r[0] for r in p.db.execute("SELECT split FROM images ORDER BY id")])
    assert splits.dtype == np.dtype("<U4") and 0 < (splits == "test").sum() < len(splits)
    np.testing.assert_array_equal(splits, plain)
    with p.store.tx() as db:  # some images not embedded
        db.execute("UPDATE images SET status = 'error' WHERE id IN (1, 7, 70000)")
    mask = p.embedded_mask()
    np.testing.assert_array_equal(mask, _plain_mask(p))
    assert not mask[[0, 6, 69999]].any() and mask.sum() == 69997
    with p.store.tx() as db:  # most not embedded: the other branch
        db.execute("UPDATE images SET status = 'new' WHERE id > 100")
    mask = p.embedded_mask()
    np.testing.assert_array_equal(mask, _plain_mask(p))
    assert mask.sum() == 98


def test_cached_sqrt_scores_equal_the_learning_features(vectors_project):
    p, _ = vectors_project
    vectors = p.vectors()
    coef = np.random.default_rng(2).normal(size=32).astype(np.float32)
    want = featurize(np.asarray(vectors)) @ coef + np.float32(0.25)
    cache = p.store.vector_cache
    feats, norms = sqrt_features(vectors, cache), sqrt_norms(vectors, cache)
    assert isinstance(feats, np.memmap) and feats.dtype == np.float32
    np.testing.assert_allclose(linear_scores(feats, coef, 0.25, norms), want, rtol=1e-4, atol=1e-4)
    assert linear_scores(feats, coef, 0.25, norms)[5] == pytest.approx(0.25)  # a zero vector scores the intercept
    names = sorted(f.name.split("-")[0] for f in (p.path / "embeddings").glob("sqrt*.npy"))
    assert names == ["sqrtfeat", "sqrtnorm"]  # written by init --embeddings already, reused here


def test_caches_follow_the_vectors_generation_not_file_times(vectors_project):
    p, matrix = vectors_project
    first = np.array(sqrt_norms(p.vectors(), p.store.vector_cache))
    # Vectors change through the store (one embedded batch): the generation moves, the cache is rebuilt.
    vec = np.load(p.path / "embeddings" / "vectors.npy", mmap_mode="r+")
    vec[0, 0, :] *= 4
    vec.flush()
    del vec
    assert np.asarray(sqrt_norms(p.vectors(), p.store.vector_cache))[0] == first[0]  # same generation: cached
    p.store.mark_embedded([1], [])
    again = np.asarray(sqrt_norms(p.vectors(), p.store.vector_cache))
    assert again[0] == pytest.approx(2 * first[0], rel=1e-5)  # sqrt of 4x: norm doubles
    assert len(list((p.path / "embeddings").glob("sqrtnorm-*.npy"))) == 1  # the old one removed


def test_a_cache_is_built_once_by_concurrent_writers(tmp_path):
    built = []
    cache = Cache(tmp_path, lambda: 7)
    gate = threading.Barrier(4)

    def build():
        built.append(1)
        return np.arange(1000)

    def worker(out):
        gate.wait()
        out.append(cache.array("x", ("a",), build))

    results: list = []
    threads = [threading.Thread(target=worker, args=(results,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(built) == 1 and len(results) == 4 and all((r == np.arange(1000)).all() for r in results)
    # Across processes too: a second process reads the file the first one wrote.
    code = (f"import numpy as np; from raresift.store.cache import Cache; "
            f"a = Cache(__import__('pathlib').Path({str(tmp_path)!r}), lambda: 7).array('x', ('a',), "
            "lambda: (_ for _ in ()).throw(SystemExit('rebuilt'))); print(int(a.sum()))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == str(sum(range(1000))), done.stderr


def test_a_damaged_cache_is_rebuilt(tmp_path):
    cache = Cache(tmp_path, lambda: 1)
    target = cache.path("x", ("a",), ".npy")
    target.write_bytes(b"not an array")
    np.testing.assert_array_equal(cache.array("x", ("a",), lambda: np.ones(3)), np.ones(3))


def test_init_embeddings_builds_the_knn_index_from_the_auto_size_on(tmp_path, monkeypatch):
    """Above `pool_auto_min` photos, rounds score knn pools by default; `init --embeddings` builds their index,
    so the first round does not (below that size it builds none)."""
    from raresift import settings

    rng = np.random.default_rng(0)
    np.save(tmp_path / "m.npy", rng.normal(size=(300, 16)).astype(np.float32))
    (tmp_path / "ids.txt").write_text("".join(f"{i}.jpg\n" for i in range(300)))
    with Project.create(tmp_path / "small") as p:
        p.import_embeddings(tmp_path / "m.npy", tmp_path / "ids.txt")
        assert not p.store.paths.index.exists()
    monkeypatch.setitem(settings.SETTINGS, "pool_auto_min", settings.Setting("pool_auto_min", 200, "test"))
    with Project.create(tmp_path / "big") as p:
        p.import_embeddings(tmp_path / "m.npy", tmp_path / "ids.txt")
        assert p.store.paths.index.is_file()
        assert not list(p.store.paths.embed_dir.glob("sqrt*"))  # knn rounds need no full-scan caches
        p.label([(f"{i}.jpg", int(i < 10)) for i in range(0, 300, 7)])
        p.next(10, seed=0)
        import json

        params = json.loads(p.db.execute("SELECT params FROM rounds ORDER BY id DESC LIMIT 1").fetchone()[0])
        assert params["pool"]["kind"] == "knn"
        assert not list(p.store.paths.embed_dir.glob("sqrt*"))
        evaluated = p.next(5, evaluate=True, seed=1)  # a full pass over the test split, featurised on the fly
        assert 1 <= len(evaluated) <= 5 and all(e["split"] == "test" for e in evaluated)


def test_a_tiled_photo_counts_as_its_views_for_the_auto_pool(embedded_project, monkeypatch):
    """A full scan reads every view vector: with 3 x 3 tiles (10 views) `--pool auto` turns to knn pools at a
    tenth of the photos, and the index is built by `prepare_scoring` then."""
    import json

    from raresift import settings
    from raresift.learn.loop import prepare_scoring
    from raresift.learn.session import knn_by_default

    assert knn_by_default(200_000, 10) and not knn_by_default(200_000, 1) and knn_by_default(2_000_000)
    project, _, truth = embedded_project
    monkeypatch.setitem(settings.SETTINGS, "pool_auto_min", settings.Setting("pool_auto_min", 300, "test"))
    with Project.open(project) as p:
        assert p.store.embedding_info()["views"] == 10 and p.store.count_status("embedded") == 40  # 400 views
        prepare_scoring(p.store)
        assert p.store.paths.index.is_file()
        p.label([(path, v) for path, v in sorted(truth.items())[:12]] + [(path, 1) for path, v in truth.items() if v][:2])
        p.next(5, seed=0)
        params = json.loads(p.db.execute("SELECT params FROM rounds ORDER BY id DESC LIMIT 1").fetchone()[0])
        assert params["pool"]["kind"] == "knn"
    monkeypatch.setitem(settings.SETTINGS, "pool_auto_min", settings.Setting("pool_auto_min", 401, "test"))
    with Project.open(project) as p:
        p.next(5, seed=1)
        params = json.loads(p.db.execute("SELECT params FROM rounds ORDER BY id DESC LIMIT 1").fetchone()[0])
        assert params["pool"] == "full"


def test_splits_are_cached_and_follow_new_photos(tmp_path, monkeypatch):
    import raresift.store.store as store_module

    monkeypatch.setattr(store_module, "_SPLIT_CACHE_MIN", 1)
    rng = np.random.default_rng(0)
    np.save(tmp_path / "m.npy", rng.normal(size=(500, 8)).astype(np.float32))
    (tmp_path / "ids.txt").write_text("".join(f"{i}.jpg\n" for i in range(500)))
    with Project.create(tmp_path / "p") as p:
        p.import_embeddings(tmp_path / "m.npy", tmp_path / "ids.txt")
        truth = np.array([r[0] for r in p.db.execute("SELECT split FROM images ORDER BY id")])
        first = p.store.splits()
        assert np.array_equal(first, truth) and list(p.store.paths.learn_dir.glob("splits-*.npy"))
        assert np.array_equal(p.store.splits(), truth)  # from the cache file
        p.db.execute("INSERT INTO images (path, status, split, added_at) VALUES ('new.jpg', 'new', 'test', 0)")
        p.db.commit()
        grown = p.store.splits()
        assert len(grown) == 501 and grown[-1] == "test"
        assert np.array_equal(grown, np.array([r[0] for r in p.db.execute("SELECT split FROM images ORDER BY id")]))
        assert np.array_equal(p.store.test_mask(), grown == "test")


@pytest.mark.parametrize("shape", [(3000, 16), (3000, 3, 8)])
def test_scattered_rows_are_read_as_the_memory_map_holds_them(tmp_path, shape):
    """A few scattered rows of a map opened by map_file come by pread (no pages mapped into the process);
    a slice of a map, an array in memory, many or dense rows, negative rows go through plain indexing.
    The same values either way, and a file replaced or removed since it was mapped is never read."""
    from raresift.store import vectors as vec

    rng = np.random.default_rng(0)
    np.save(tmp_path / "v.npy", rng.normal(size=shape).astype(np.float16))
    m = vec.map_file(tmp_path / "v.npy")
    reads = []
    real = vec.os.preadv

    def counted(*args):
        reads.append(args[2])
        return real(*args)

    rows = np.array([2999, 5, 5, 17, 1200, 0], dtype=np.int64)  # any order, repeats
    view = 2 if len(shape) == 3 else None
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(vec.os, "preadv", counted)
        assert np.array_equal(vec.read_rows(m, rows), m[rows])
        assert len(reads) == len(rows)
        if view is not None:
            assert np.array_equal(vec.read_rows(m, rows, view=view), m[rows, view])
            assert np.array_equal(vec.whole_rows(m, rows), m[rows, 0].astype(np.float32))
            with pytest.raises(IndexError):
                vec.read_rows(m, rows, view=3)
        reads.clear()
        tail = m[1000:]  # a map of part of the file: its offset is not the file's, so plain indexing
        assert np.array_equal(vec.read_rows(tail, rows[rows < 2000]), tail[rows[rows < 2000]])
        assert np.array_equal(vec.read_rows(np.asarray(m), rows), m[rows])
        assert np.array_equal(vec.read_rows(np.load(tmp_path / "v.npy", mmap_mode="r"), rows), m[rows])
        for dense in (np.arange(0, 3000, 2), np.arange(100, 400, 3)):  # many rows; rows filling their span
            assert np.array_equal(vec.read_rows(m, dense), m[dense])
        assert np.array_equal(vec.read_rows(m, np.array([-1, 3])), m[[-1, 3]])
        with pytest.raises(IndexError):
            vec.read_rows(m, np.array([3000, 0]))
        assert not reads
        assert vec.read_rows(m, np.array([], dtype=np.int64)).shape == (0, *shape[1:])
        # The file replaced (another shape) or removed after it was mapped: the map's rows, never the new file's.
        held = np.asarray(m[rows])
        np.save(tmp_path / "new.npy", np.ones((10, *shape[1:]), dtype=np.float32))
        (tmp_path / "new.npy").replace(tmp_path / "v.npy")
        assert np.array_equal(vec.read_rows(m, rows), held)
        (tmp_path / "v.npy").unlink()
        assert np.array_equal(vec.read_rows(m, rows), held)
        assert not reads


def test_tiled_features_cached_at_knn_scale_score_as_featurised(embedded_views_project, monkeypatch):
    """Tiled photos kept as every view, where rounds score knn pools: their features are written once (float16)
    and a round reads them instead of featurising 10 views a photo; rows and full scans match the featurised
    values."""
    from raresift import settings
    from raresift.learn.features import VectorFeatures, pooled_features
    from raresift.learn.loop import load_session, prepare_scoring

    project, _, truth = embedded_views_project
    monkeypatch.setitem(settings.SETTINGS, "pool_auto_min", settings.Setting("pool_auto_min", 300, "test"))
    with Project.open(project) as p:
        prepare_scoring(p.store)
        assert list(p.store.paths.embed_dir.glob("pooled-*.npy"))
        session, _, _ = load_session(p.store)
        cached = session.features
        assert cached.pooled is not None
        plain = VectorFeatures(p.vectors())
        rows = np.array([7, 3, 30, 3])
        np.testing.assert_allclose(cached[rows], plain[rows], atol=2e-3)
        coef = np.random.default_rng(0).normal(size=plain[rows].shape[1]).astype(np.float32)
        np.testing.assert_allclose(cached.linear(coef, 0.5), plain.linear(coef, 0.5), atol=0.05)
        written = next(p.store.paths.embed_dir.glob("pooled-*.npy")).stat()
        assert np.array_equal(pooled_features(p.vectors(), p.store.vector_cache), cached.pooled)
        again = next(p.store.paths.embed_dir.glob("pooled-*.npy")).stat()
        assert (again.st_ino, again.st_mtime_ns) == (written.st_ino, written.st_mtime_ns)  # built once
        # The feature settings changed since (an upgrade): the next round writes the cache for the new
        # ones once, in place of the old, and reads it from then on.
        from raresift.learn.features import PART_WEIGHTS

        before, whole = plain[rows], PART_WEIGHTS["whole"]
        monkeypatch.setitem(PART_WEIGHTS, "whole", whole / 2)
        rewritten = load_session(p.store)[0].features
        assert rewritten.pooled is not None
        files = list(p.store.paths.embed_dir.glob("pooled-*.npy"))
        assert len(files) == 1 and files[0].stat().st_ino != written.st_ino
        np.testing.assert_allclose(rewritten[rows], VectorFeatures(p.vectors())[rows], atol=2e-3)
        assert not np.allclose(rewritten[rows], before, atol=2e-3)
        monkeypatch.setitem(PART_WEIGHTS, "whole", whole)
        p.label([(path, v) for path, v in sorted(truth.items())[:12]] + [(path, 1) for path, v in truth.items() if v][:2])
        assert len(p.next(5, seed=0)) == 5
