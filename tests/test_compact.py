"""The compact vector layout: the parts of each tiled photo's feature instead of every view."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import make_collection

from raresift import Project
from raresift.errors import InputError
from raresift.learn.coldstart import concepts_for, text_scores
from raresift.learn.features import (
    compact_logits,
    compact_views,
    featurize,
    tile_argmax,
)


def test_compact_parts_give_the_features_of_every_view():
    rng = np.random.default_rng(0)
    block = rng.normal(size=(50, 10, 64)).astype(np.float16)  # negative values too: the sign must survive
    parts, which = compact_views(block)
    assert parts.shape == (50, 3, 64) and parts.dtype == np.float16 and which.dtype == np.uint8
    np.testing.assert_allclose(featurize(parts, layout="compact"), featurize(block), atol=2e-3)
    np.testing.assert_array_equal(which, tile_argmax(block))
    np.testing.assert_allclose(featurize(parts, "whole+max", layout="compact"), featurize(block, "whole+max"), atol=2e-3)
    with pytest.raises(ValueError, match="3 parts"):
        featurize(block, layout="compact")


def test_compact_logits_score_text_queries_as_every_views_logits_do():
    rng = np.random.default_rng(1)
    z = rng.normal(scale=3, size=(20, 10, 1000)).astype(np.float32)
    mask = np.ones(20, dtype=bool)
    ladybug = concepts_for("ladybug")[0][0]
    z[:10, 3, ladybug] += 20.0  # among the top classes of view 3 of the first 10 photos, far down elsewhere
    kept = compact_logits(z)
    assert kept.shape == (20,) and kept["c"].shape == (20, 10, 32) and kept["best"].shape == (20, 1000)
    top = np.argsort(-z, axis=2)[..., :32]
    assert (np.sort(kept["c"], axis=2) == np.sort(top, axis=2)).all()  # each view's 32 most likely classes
    # One concept: exact, whether it is among a view's top classes (the first 10) or not (the others: the
    # photos keep their order, never one flat score).
    exact = text_scores(z, mask, "ladybug")
    np.testing.assert_allclose(text_scores(kept, mask, "ladybug"), exact, atol=2e-2)
    assert len(np.unique(np.round(exact[10:], 3))) == 10
    # Several concepts: exact where a view's top classes hold them; never above the exact score.
    several, want = text_scores(kept, mask, "insect or spider"), text_scores(z, mask, "insect or spider")
    assert np.isfinite(several).all() and (several <= want + 2e-2).all()
    assert np.corrcoef(several, want)[0, 1] > 0.9


def _features(project: Project) -> np.ndarray:
    return featurize(np.asarray(project.vectors()), layout=project.embedding_info()["layout"])


def test_embed_writes_compact_by_default_and_compact_converts_a_views_project(tmp_path):
    images = tmp_path / "images"
    truth = make_collection(images, n=12, n_rare=3)
    with Project.create(tmp_path / "views", images=images) as views, \
            Project.create(tmp_path / "compact", images=images) as compact:
        for p, layout in ((views, "views"), (compact, None)):
            p.add_images()
            p.embed(batch_size=8, layout=layout)
        assert compact.embedding_info()["layout"] == "compact" and views.embedding_info()["layout"] == "views"
        assert compact.vectors().shape == (12, 3, 1280) and views.vectors().shape == (12, 10, 1280)
        np.testing.assert_allclose(_features(compact), _features(views), atol=2e-3)
        np.testing.assert_array_equal(compact.store.tile_argmax(), tile_argmax(np.asarray(views.vectors())))
        with pytest.raises(InputError, match="raresift compact"):
            views.embed(layout="compact")
        with pytest.raises(InputError, match="reembed"):
            compact.embed(layout="views")
        views.label([(path, y) for path, y in list(truth.items())[:6]])
        before = _features(views)
        index_stamp = json.loads((tmp_path / "views" / "embeddings" / "index.json").read_text()) \
            if (tmp_path / "views" / "embeddings" / "index.json").exists() else None

    out = subprocess.run([sys.executable, "-m", "raresift", "compact", str(tmp_path / "views"), "--json",
                          "--no-progress"], capture_output=True, text=True, check=True).stdout
    report = json.loads(out)
    assert report["photos"] == 12 and not report["already"]
    assert report["bytes_after"] < 0.4 * report["bytes_before"]
    emb = tmp_path / "views" / "embeddings"
    assert not (emb / "vectors.npy").exists() and not (emb / "logits.npy").exists()
    with Project.open(tmp_path / "views") as p:
        assert p.embedding_info()["layout"] == "compact"
        np.testing.assert_allclose(_features(p), before, atol=2e-3)
        assert p.status()["labels"] == 6  # labels untouched
        if index_stamp is not None:
            assert json.loads((emb / "index.json").read_text()) == index_stamp
    again = json.loads(subprocess.run([sys.executable, "-m", "raresift", "compact", str(tmp_path / "views"),
                                       "--json", "--no-progress"], capture_output=True, text=True, check=True).stdout)
    assert again["already"]
    # A round runs on the converted project; every photo can still be picked and scored.
    picked = json.loads(subprocess.run([sys.executable, "-m", "raresift", "next", str(tmp_path / "views"), "--n", "3",
                                        "--json"], capture_output=True, text=True, check=True).stdout)
    assert len(picked) == 3 and all({"region", "tiles"} <= set(item) for item in picked)


def test_compact_refuses_photos_without_tiles_and_photos_added_later_are_compact(tmp_path):
    images = tmp_path / "images"
    make_collection(images, n=4, n_rare=1)
    with Project.create(tmp_path / "p", images=images) as p:
        p.add_images()
        with pytest.raises(InputError, match="tiled photos"):
            p.embed(tiles=0, layout="compact")
        p.embed(tiles=0)
        assert p.embedding_info()["layout"] == "views"  # nothing to pool
    r = subprocess.run([sys.executable, "-m", "raresift", "compact", str(tmp_path / "p")], capture_output=True, text=True)
    assert r.returncode != 0 and "no tiles" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    with Project.open(tmp_path / "p") as p:
        p.embed(tiles=2, reembed=True, limit=2)
        assert p.embedding_info()["layout"] == "compact"
        make_collection(images / "more", n=3, n_rare=1, seed=5)
        p.add_images()
        p.embed(tiles=2)
        mask = p.embedded_mask()
        assert mask.sum() == 7 and p.vectors().shape == (7, 3, 1280)
        assert (np.abs(np.asarray(p.vectors(), np.float32)).sum(axis=(1, 2)) > 0).all()


def test_a_map_keeps_its_layout_while_compact_switches_and_a_half_switched_project_keeps_its_views(tmp_path):
    from raresift.embed.run import compact_project
    from raresift.learn.loop import load_session
    from raresift.store.vectors import layout_of

    images = tmp_path / "images"
    truth = make_collection(images, n=8, n_rare=2)
    with Project.create(tmp_path / "p", images=images) as p:
        p.add_images()
        p.embed(batch_size=8, tiles=2, layout="views")
        p.label([(path, y) for path, y in list(truth.items())[:4]])
        held = p.store.vectors()  # a reader (the page, a round) holds the views map ...
        compact_project(p.store)  # ... while `compact` finishes in another process
        assert layout_of(held) == "views" and held.shape[1] == 5
        assert featurize(np.asarray(held[:2]), layout=layout_of(held)).shape == (2, 3 * 1280)
        now = p.store.vectors()
        assert layout_of(now) == "compact" and now.shape[1] == 3
        session, _, _ = load_session(p.store)
        assert session.features.layout == "compact" and len(p.next(2, seed=0)) == 2
    # The layout says compact but its files never reached the disk (power lost before the renames did):
    # running compact again must not remove the only vectors there are.
    with Project.create(tmp_path / "q", images=images) as q:
        q.add_images()
        q.embed(batch_size=8, tiles=2, layout="views")
        q.store.set_meta(**{"embed.layout": "compact"})
        report = compact_project(q.store)
        assert report.already and (tmp_path / "q" / "embeddings" / "vectors.npy").exists()


def test_block_writer_refuses_too_few_or_too_many_rows(tmp_path):
    from raresift.store.vectors import BlockWriter, read_block

    w = BlockWriter(tmp_path / "a.npy", (5, 2), np.float16)
    w.write(np.ones((3, 2)))
    with pytest.raises(ValueError, match="6 rows written to a file of 5"):
        w.write(np.ones((3, 2)))
    with pytest.raises(ValueError, match="3 of its 5 rows"):
        w.close()
    w.write(np.full((2, 2), 2.0))
    w.close()
    arr = np.load(tmp_path / "a.npy", mmap_mode="r")
    np.testing.assert_array_equal(read_block(arr, 2, 5), [[1, 1], [2, 2], [2, 2]])
