"""The SQLite store: schema migrations, refusal of foreign or newer databases, label events."""

from __future__ import annotations

import sqlite3

import pytest

from raresift import NotAProjectError, Project, SchemaTooNewError
from raresift.store import db as store_db
from raresift.store.labels import LabelConflict


def test_create_records_migrations_and_uses_wal(tmp_path):
    with Project.create(tmp_path / "p") as project:
        rows = project.db.execute("SELECT version, description FROM schema_migrations ORDER BY version").fetchall()
        assert [r[0] for r in rows] == [m[0] for m in store_db.MIGRATIONS]
        assert project.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert project.meta("test_fraction") == "0.4"


def test_open_refuses_a_folder_without_project(tmp_path):
    with pytest.raises(NotAProjectError, match="not a raresift project"):
        Project.open(tmp_path)
    with pytest.raises(NotAProjectError, match="no such folder"):
        Project.open(tmp_path / "missing")


def test_open_refuses_a_file_that_is_not_sqlite(tmp_path):
    (tmp_path / store_db.DB_NAME).write_bytes(b"this is not a database" * 100)
    with pytest.raises(NotAProjectError, match="not a readable raresift database"):
        Project.open(tmp_path)


def test_newer_schema_is_refused_and_left_untouched(tmp_path):
    Project.create(tmp_path / "p").close()
    db_path = tmp_path / "p" / store_db.DB_NAME
    conn = sqlite3.connect(db_path)
    conn.execute("INSERT INTO schema_migrations VALUES (999, 'from the future', 0)")
    conn.commit()
    conn.close()
    before = db_path.read_bytes()
    with pytest.raises(SchemaTooNewError, match="schema version 999"):
        Project.open(tmp_path / "p")
    assert db_path.read_bytes() == before


def test_label_events_are_appended_never_overwritten(embedded_project):
    path, _images, truth = embedded_project
    some = sorted(truth)[:3]
    with Project.open(path) as project:
        project.label([(some[0], 1), (some[1], 0)], who="ann")
        project.label([(some[0], 0)], who="ann")  # ann changes her mind
        project.label([(some[1], None)], who="ann")  # undo
        assert project.labels() == {some[0]: 0}
        events = project.db.execute("SELECT image_id, value FROM labels ORDER BY id").fetchall()
        assert len(events) == 4  # every event kept
        # Bob relabels Ann's photo: kept as a new event marked as a conflict.
        project.label([(some[0], 1)], who="bob")
        assert project.status()["conflicts"] == 1
        assert project.labels()[some[0]] == 1


def test_expected_previous_label_detects_concurrent_change(embedded_project):
    path, _images, truth = embedded_project
    photo = sorted(truth)[0]
    with Project.open(path) as project:
        image_id = project.image_id(photo)
        (first,) = project.label([(photo, 1)], who="ann", expected={image_id: None})
        project.label([(photo, 0)], who="bob", expected={image_id: first.id})
        with pytest.raises(LabelConflict):
            project.label([(photo, 1)], who="ann", expected={image_id: first.id})
        assert project.labels()[photo] == 0


def test_label_rejects_values_other_than_0_1_unsure(embedded_project):
    path, _images, truth = embedded_project
    with Project.open(path) as project:
        for bad in (3, -1, "maybe", True, 0.5):
            with pytest.raises(Exception, match="1, 0 or 'unsure'"):
                project.label([(sorted(truth)[0], bad)])
        assert project.labels() == {}
        project.label([(sorted(truth)[0], "unsure")])
        assert project.labels() == {sorted(truth)[0]: 2}


def _plain_counts(p) -> dict:
    return {(s, sp): n for s, sp, n in p.db.execute(
        "SELECT status, split, COUNT(*) FROM images GROUP BY status, split").fetchall()}


def _kept_counts(p) -> dict:
    return {(s, sp): n for s, sp, n in p.db.execute("SELECT status, split, n FROM image_counts").fetchall() if n}


def test_image_counts_follow_every_change_and_an_old_project_migrates(tmp_path, monkeypatch):
    from conftest import make_collection

    from raresift.store import db as store_db

    images = tmp_path / "images"
    make_collection(images, n=12, n_rare=2)
    (images / "a" / "copy.jpg").write_bytes((images / "a" / "img_0001.jpg").read_bytes())  # an exact copy
    (images / "a" / "bad.jpg").write_bytes(b"not a photo")
    with Project.create(tmp_path / "p", images=images) as p:
        p.add_images()
        assert _kept_counts(p) == _plain_counts(p)
        p.store.mark_embedded([1, 2, 3], [(4, "unreadable")])
        assert _kept_counts(p) == _plain_counts(p)
        p.store.reset_embeddings()
        assert _kept_counts(p) == _plain_counts(p)
        status = p.status()
        assert status["images"] == 14 and status["duplicates"] == 1
        assert status["test"] + status["pool"] == 13  # the photo recorded as unreadable is in neither
    # A project written by a raresift before migration 3 (schema 2), with labels (one withdrawn, one replaced):
    # opened now, its counts are made from the images and every label event is kept, in concept "default".
    full, version = store_db.MIGRATIONS, store_db.SCHEMA_VERSION
    monkeypatch.setattr(store_db, "MIGRATIONS", full[:2])
    monkeypatch.setattr(store_db, "SCHEMA_VERSION", 2)
    with Project.create(tmp_path / "old", images=images) as p:
        p.add_images()
        p.store.mark_embedded([1, 2, 3], [(4, "unreadable")])
        p.db.execute("INSERT INTO labels (image_id, value, who, at, source) VALUES (1, 1, 'ann', 1.0, 'web')")
        p.db.execute("INSERT INTO labels (image_id, value, who, at, source) VALUES (2, 0, 'ann', 2.0, 'web')")
        p.db.execute("INSERT INTO labels (image_id, value, who, at, source, replaces) VALUES (2, 1, 'bob', 3.0, 'web', 2)")
        p.db.execute("INSERT INTO labels (image_id, value, who, at, source) VALUES (3, 0, 'ann', 4.0, 'web')")
        p.db.execute("INSERT INTO labels (image_id, value, who, at, source, replaces) VALUES (3, NULL, 'ann', 5.0, 'web', 4)")
        events = p.db.execute("SELECT id, image_id, value, who, replaces FROM labels ORDER BY id").fetchall()
    monkeypatch.setattr(store_db, "MIGRATIONS", full)
    monkeypatch.setattr(store_db, "SCHEMA_VERSION", version)
    with Project(tmp_path / "old") as p:
        assert p.db.execute("SELECT MAX(version) FROM schema_migrations").fetchone()[0] == store_db.SCHEMA_VERSION
        assert _kept_counts(p) == _plain_counts(p)
        assert [tuple(r) for r in p.db.execute("SELECT id, image_id, value, who, replaces FROM labels ORDER BY id")] \
            == [tuple(r) for r in events]
        assert {r[0] for r in p.db.execute("SELECT DISTINCT concept FROM labels")} == {"default"}
        assert p.labels() == {p.store.paths_of([1])[1]: 1, p.store.paths_of([2])[2]: 1}
        new_status = p.status()
        assert (new_status["images"], new_status["labels"], new_status["positives"]) == (14, 2, 2)
        assert new_status["concept"] == "default" and new_status["unsure"] == 0
        assert p.concepts() == [{"concept": "default", "labels": 2, "positives": 2, "negatives": 0, "unsure": 0,
                                 "rounds": 0}]