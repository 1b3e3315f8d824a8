"""Fast paths for rounds at scale return exactly what the plain code returns."""

from __future__ import annotations

import os
import shutil
import threading
import time

import numpy as np
import pytest

from raresift import Project
from raresift.learn.features import featurize
from raresift.scale import scoring


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
    p = Project.open(tmp_path / "p")
    yield p, matrix
    p.close()


def _plain_mask(p):
    """The embedded mask read row by row (what Project.embedded_mask did before the fast path)."""
    n = p.db.execute("SELECT MAX(id) FROM images").fetchone()[0]
    mask = np.zeros(n, dtype=bool)
    for (image_id,) in p.db.execute("SELECT id FROM images WHERE status = 'embedded'"):
        mask[image_id - 1] = True
    return mask


def _plain_splits(p):
    return np.array([r[0] for r in p.db.execute("SELECT split FROM images ORDER BY id")], dtype=object)


def test_masks_equal_the_plain_reads(vectors_project):
    p, _ = vectors_project
    np.testing.assert_array_equal(scoring.embedded_mask(p), _plain_mask(p))
    splits = scoring.split_names(p)
    assert splits.dtype == np.dtype("<U4") and 0 < (splits == "test").sum() < len(splits)
    np.testing.assert_array_equal(splits, _plain_splits(p).astype(str))
    # The project's methods are these fast paths.
    np.testing.assert_array_equal(p.splits(), splits)
    np.testing.assert_array_equal(p.embedded_mask(), _plain_mask(p))
    with p._tx() as db:  # some images not embedded
        db.execute("UPDATE images SET status = 'error' WHERE id IN (1, 7, 70000)")
    mask = scoring.embedded_mask(p)
    np.testing.assert_array_equal(mask, _plain_mask(p))
    assert not mask[[0, 6, 69999]].any() and mask.sum() == 69997
    with p._tx() as db:  # most not embedded: the other branch
        db.execute("UPDATE images SET status = 'new' WHERE id > 100")
    mask = scoring.embedded_mask(p)
    np.testing.assert_array_equal(mask, _plain_mask(p))
    assert mask.sum() == 98


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("power", [False, True])
def test_linear_scores_equal_normalise_then_dot(vectors_project, dtype, power):
    p, matrix = vectors_project
    vectors = p.vectors() if dtype == np.float32 else matrix.astype(np.float16)[:, None, :]
    rng = np.random.default_rng(1)
    coef, intercept = rng.normal(size=32).astype(np.float32), -0.7
    x = np.asarray(vectors[:, 0, :], dtype=np.float32)
    if power:
        x = np.sign(x) * np.sqrt(np.abs(x))
    norms = np.linalg.norm(x, axis=1)
    if dtype == np.float32:
        np.testing.assert_allclose(scoring.row_norms(p, power=power), norms, rtol=1e-4)
    got = scoring.linear_scores(vectors, coef, intercept, norms.astype(np.float32), power=power)
    unit = x / np.where(norms > 0, norms, 1.0)[:, None]
    np.testing.assert_allclose(got, unit @ coef + np.float32(intercept), rtol=1e-4, atol=1e-4)
    assert got[5] == pytest.approx(intercept)


def test_power_scores_equal_the_learning_features(vectors_project):
    p, _ = vectors_project
    vectors = p.vectors()
    coef = np.random.default_rng(2).normal(size=32).astype(np.float32)
    want = featurize(np.asarray(vectors)) @ coef + np.float32(0.25)
    norms = scoring.row_norms(p, power=True)
    got = scoring.linear_scores(vectors, coef, 0.25, norms, power=True)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # The same from the cached features file: one plain product per block.
    feats = scoring.whole_features(p, power=True)
    assert isinstance(feats, np.memmap) and feats.dtype == np.float32
    assert len(list((p.path / "embeddings").glob("features-power-*.npy"))) == 1
    np.testing.assert_allclose(scoring.linear_scores(feats, coef, 0.25, norms), want, rtol=1e-4, atol=1e-4)
    assert scoring.whole_features(p, power=False).base is not None  # float32 file, no power: a view


def test_row_norms_are_cached_and_follow_the_vector_file(vectors_project):
    p, matrix = vectors_project
    first = scoring.row_norms(p)
    np.testing.assert_allclose(first, np.linalg.norm(matrix, axis=1), rtol=1e-5)
    caches = list((p.path / "embeddings").glob("norms-plain-*.npy"))
    assert len(caches) == 1
    assert isinstance(scoring.row_norms(p), np.memmap)  # second call: read from the cache
    vec = np.load(p.path / "embeddings" / "vectors.npy", mmap_mode="r+")
    vec[0, 0, :] *= 2  # the file changes: the cache is rebuilt
    vec.flush()
    del vec
    os.utime(p.path / "embeddings" / "vectors.npy", ns=(time.time_ns(), time.time_ns() + 10**9))
    again = scoring.row_norms(p)
    assert again[0] == pytest.approx(2 * first[0], rel=1e-5)
    assert len(list((p.path / "embeddings").glob("norms-plain-*.npy"))) == 1


def test_cache_files_of_dead_processes_and_old_vectors_are_dropped(vectors_project):
    p, _ = vectors_project
    folder = p.path / "embeddings"
    norms = scoring.row_norms(p, power=True)
    (cache,) = folder.glob("norms-power-*.npy")
    stale = folder / "norms-power-1-2.npy"  # of an earlier vector file
    dead = folder / f"{cache.stem}.tmp999999999-5.npy"  # half written by a process that is gone
    live = folder / f"{cache.stem}.tmp1-5.npy"  # being written by a live process (pid 1)
    gone = folder / f"{cache.stem}.tmp{os.getpid()}-1.npy"  # by a thread of this process that is gone
    writer = threading.Thread(target=threading.Event().wait, args=(5,), daemon=True)
    writer.start()  # a thread of this process that is still writing
    busy = folder / f"{cache.stem}.tmp{os.getpid()}-{writer.ident}.npy"
    for f in (stale, dead, live, gone, busy):
        f.write_bytes(b"x")
    os.utime(folder / "vectors.npy", ns=(time.time_ns(), time.time_ns() + 10**9))
    again = scoring.row_norms(p, power=True)
    np.testing.assert_array_equal(again, norms)
    left = {f.name for f in folder.glob("norms-power-*")}
    assert {live.name, busy.name} <= left and not {stale.name, dead.name, gone.name, cache.name} & left
    assert len(left) == 3  # the new cache, the live process's file and the running thread's
