"""The image registry: which files count, stable ids, hashes, the test split, growing folders."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

from raresift import InputError, Project, ProjectExistsError
from raresift.store.registry import walk_images

from conftest import make_photo


def _photo(path, seed=0, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    make_photo(np.random.default_rng(seed), rare=False, size=(48, 40)).save(path, format=fmt)


def test_walk_finds_every_extension_in_any_case_and_nothing_else(tmp_path):
    names = ["a.jpg", "b.JPEG", "c.Png", "d.webp", "e.BMP", "f.gif", "g.tif", "h.TIFF", "sub/deep/i.jpg"]
    for i, n in enumerate(names):
        (tmp_path / n).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / n).write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("no")
    (tmp_path / "noext").write_bytes(b"x")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "j.jpg").write_bytes(b"x")
    found = sorted(p.decode() for p in walk_images(tmp_path))
    assert found == sorted(names)


def test_non_utf8_file_name_gets_a_printable_stable_id(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    raw = os.path.join(os.fsencode(images), b"caf\xe9.jpg")
    _photo(tmp_path / "x.jpg")
    os.rename(tmp_path / "x.jpg", raw)
    with Project.create(tmp_path / "p", images=images) as project:
        project.add_images()
        assert project.image_ids() == ["caf\\xe9.jpg"]
        assert os.path.exists(project.file_path(1))
        report = project.embed()
        assert report.embedded == 1 and report.errors == 0


def test_ids_size_hash_and_rescan_adds_only_new_files(tmp_path):
    images = tmp_path / "images"
    for i in range(5):
        _photo(images / f"d{i % 2}" / f"{i}.png", seed=i)
    with Project.create(tmp_path / "p", images=images) as project:
        first = project.add_images()
        assert (first.added, first.errors, first.total) == (5, 0, 5)
        row = project.db.execute("SELECT size, sha256 FROM images WHERE path = 'd0/0.png'").fetchone()
        data = (images / "d0" / "0.png").read_bytes()
        assert row["size"] == len(data) and row["sha256"] == hashlib.sha256(data).hexdigest()
        ids_before = project.image_ids()
        _photo(images / "d1" / "new.png", seed=9)
        again = project.add_images()
        assert (again.added, again.total) == (1, 6)
        assert project.image_ids()[:5] == ids_before


def test_test_split_is_exact_and_replays_from_the_seed(tmp_path):
    images = tmp_path / "images"
    for i in range(50):
        (images).mkdir(exist_ok=True)
        (images / f"{i:02d}.png").write_bytes(b"not decoded at registration")

    made = []

    def split(seed, frac):
        made.append(1)
        name = f"p{len(made)}"
        with Project.create(tmp_path / name, images=images, seed=seed, test_fraction=frac) as project:
            project.add_images()
            return list(project.splits())

    a, b, c = split(1, 0.4), split(1, 0.4), split(2, 0.4)
    assert a.count("test") == 20
    assert a == b and a != c
    assert split(3, 0.1).count("test") == 5


def test_init_twice_on_same_folder_is_allowed_but_not_for_another_folder(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    Project.create(tmp_path / "p", images=tmp_path / "one").close()
    Project.create(tmp_path / "p", images=tmp_path / "one", exist_ok=True).close()
    with pytest.raises(ProjectExistsError, match="already holds a project"):
        Project.create(tmp_path / "p", images=tmp_path / "two", exist_ok=True)


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "does not exist"),
    (lambda p: p.write_text("file"), "is not a folder"),
])
def test_bad_images_folder_is_refused(tmp_path, make, message):
    target = tmp_path / "images"
    make(target)
    with pytest.raises(InputError, match=message):
        Project.create(tmp_path / "p", images=target)
    assert not (tmp_path / "p").exists()


def test_bring_your_own_vectors(tmp_path):
    rng = np.random.default_rng(0)
    matrix = rng.normal(size=(30, 16)).astype(np.float32)
    np.save(tmp_path / "emb.npy", matrix)
    ids = [f"s3://bucket/img{i}.jpg" for i in range(30)]
    (tmp_path / "ids.txt").write_text("\n".join(ids) + "\n")
    with Project.create(tmp_path / "p") as project:
        assert project.import_embeddings(tmp_path / "emb.npy", tmp_path / "ids.txt") == 30
        got_ids, got = project.embeddings()
        assert got_ids == ids
        np.testing.assert_allclose(got, matrix)
        assert project.status()["test"] == 12


@pytest.mark.parametrize("rows, ids, message", [
    (30, 29, "has 30 rows but"),
    (3, ["a", "a", "b"], "repeats line 1"),
    (3, ["a", "", "b"], "line 2: empty id"),
])
def test_bring_your_own_vectors_checks_the_ids(tmp_path, rows, ids, message):
    np.save(tmp_path / "emb.npy", np.zeros((rows, 4), dtype=np.float32))
    if isinstance(ids, int):
        ids = [f"i{k}" for k in range(ids)]
    (tmp_path / "ids.txt").write_text("\n".join(ids) + "\n")
    with Project.create(tmp_path / "p") as project:
        with pytest.raises(InputError, match=message):
            project.import_embeddings(tmp_path / "emb.npy", tmp_path / "ids.txt")
        assert project.status()["images"] == 0


def test_a_folder_that_cannot_be_listed_is_recorded(tmp_path, monkeypatch):
    images = tmp_path / "images"
    _photo(images / "ok" / "a.png")
    _photo(images / "locked" / "b.png")
    real_scandir = os.scandir

    def scandir(path):
        if os.fsdecode(path).endswith("locked"):
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with Project.create(tmp_path / "p", images=images) as project:
        report = project.add_images()
        assert (report.added, report.errors) == (1, 1)
        (err,) = project.errors()
        assert err["path"] == "locked/" and "Permission denied" in err["reason"]
        assert project.status()["errors"] == 1
        monkeypatch.setattr(os, "scandir", real_scandir)
        again = project.add_images()  # readable now: the photo comes in, the error goes
        assert (again.added, again.errors) == (1, 0)
        assert project.errors() == []


def test_bring_your_own_vectors_prepares_fast_rounds(tmp_path):
    """init --embeddings writes the scoring caches, so the first round pays nothing extra."""
    
    matrix = np.random.default_rng(1).normal(size=(200, 12)).astype(np.float32)
    np.save(tmp_path / "emb.npy", matrix)
    (tmp_path / "ids.txt").write_text("\n".join(f"img{i}" for i in range(200)) + "\n")
    with Project.create(tmp_path / "p") as project:
        project.import_embeddings(tmp_path / "emb.npy", tmp_path / "ids.txt")
        caches = sorted((tmp_path / "p" / "embeddings").glob("sqrt*.npy"))
        assert [c.name.split("-")[0] for c in caches] == ["sqrtfeat", "sqrtnorm"]
        stamps = [c.stat().st_mtime_ns for c in caches]
        project.label([(f"img{i}", int(i < 5)) for i in range(20)])
        assert len(project.next(10, seed=0)) == 10
        assert [c.stat().st_mtime_ns for c in caches] == stamps  # reused, not rebuilt


def _shards(folder, X, ids, sizes, kind="npy"):
    folder.mkdir()
    start = 0
    for k, size in enumerate(sizes):
        part, names = X[start : start + size], ids[start : start + size]
        if kind == "npy":
            np.save(folder / f"part-{k:03d}.npy", part)
            (folder / f"part-{k:03d}.txt").write_text("\n".join(names) + "\n")
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.table({"id": names, "embedding": [list(map(float, r)) for r in part]}),
                           folder / f"part-{k:03d}.parquet")
        start += size
    return folder


@pytest.mark.parametrize("kind", ["npy", "parquet"])
def test_sharded_imports_equal_the_single_matrix(tmp_path, kind):
    """A folder of shards (npy + ids, or Parquet with id and embedding columns) registers the same photos and
    vectors, in name order, as one matrix with one ids file."""
    if kind == "parquet":
        pytest.importorskip("pyarrow")
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 12)).astype(np.float32)
    ids = [f"s3://bucket/{i:03d}.jpg" for i in range(50)]
    np.save(tmp_path / "all.npy", X)
    (tmp_path / "all.txt").write_text("\n".join(ids) + "\n")
    folder = _shards(tmp_path / "shards", X, ids, [20, 0, 17, 13], kind)
    with Project.create(tmp_path / "one") as a, Project.create(tmp_path / "many") as b:
        assert a.import_embeddings(tmp_path / "all.npy", tmp_path / "all.txt") == 50
        assert b.import_embeddings(folder) == 50
        assert a.image_ids() == b.image_ids() == ids
        np.testing.assert_array_equal(np.asarray(a.vectors()), np.asarray(b.vectors()))
        assert b.embedding_info()["dim"] == 12 and b.status()["embedded"] == 50
    if kind == "parquet":  # one Parquet file alone, through the CLI
        from raresift.cli import main

        assert main(["init", str(tmp_path / "single"), "--embeddings", str(folder / "part-000.parquet")]) == 0
        with Project(tmp_path / "single") as p:
            assert p.image_ids() == ids[:20]


def test_bad_shards_are_refused_before_anything_is_written(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(10, 4)).astype(np.float32)
    ids = [f"{i}.jpg" for i in range(10)]
    bad = _shards(tmp_path / "dup", X, ids[:5] + ids[:5], [5, 5])  # the same ids in two shards
    with Project.create(tmp_path / "p1") as p:
        with pytest.raises(InputError, match="repeats"):
            p.import_embeddings(bad)
    missing = _shards(tmp_path / "noids", X, ids, [10])
    (missing / "part-000.txt").unlink()
    with Project.create(tmp_path / "p2") as p:
        with pytest.raises(InputError, match="no ids file"):
            p.import_embeddings(missing)
    dims = _shards(tmp_path / "dims", X, ids, [10])
    np.save(dims / "part-001.npy", rng.normal(size=(2, 5)).astype(np.float32))
    (dims / "part-001.txt").write_text("a\nb\n")
    with Project.create(tmp_path / "p3") as p:
        with pytest.raises(InputError, match="different lengths"):
            p.import_embeddings(dims)
        assert p.status()["images"] == 0
    (tmp_path / "empty").mkdir()
    with Project.create(tmp_path / "p4") as p:
        with pytest.raises(InputError, match="holds no shards"):
            p.import_embeddings(tmp_path / "empty")
        with pytest.raises(InputError, match="leave --ids out"):
            p.import_embeddings(tmp_path / "empty", tmp_path / "x.txt")
