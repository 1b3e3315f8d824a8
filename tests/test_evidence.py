"""Where a score comes from: per-tile contributions of the head, the region in original pixels."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import beetle_photo

from raresift import Project
from raresift.learn.evidence import contributions, contributions_from_pooled, tile_boxes
from raresift.learn.features import featurize, tile_argmax
from raresift.learn.head import RareHead


def test_tile_contributions_add_up_to_the_heads_logit():
    rng = np.random.default_rng(0)
    block = np.abs(rng.normal(size=(7, 10, 32))).astype(np.float16)  # 1 whole photo + 3 x 3 tiles
    X = featurize(block)
    head = RareHead.from_coefficients(rng.normal(size=X.shape[1]).astype(np.float32), 0.3)
    rest, per_tile = contributions(head, block)
    assert per_tile.shape == (7, 9)
    np.testing.assert_allclose(rest + per_tile.sum(axis=1), head.decision_function(X), rtol=1e-3, atol=1e-3)
    # a tile that alone carries the head's direction gets the largest share
    coef = np.zeros(X.shape[1], dtype=np.float32)
    coef[2 * 32 + 5] = 1.0  # the max part, dimension 5
    block2 = np.full((1, 10, 32), 0.1, dtype=np.float16)
    block2[0, 7, 5] = 4.0
    _, tiles = contributions(RareHead.from_coefficients(coef, 0.0), block2)
    assert int(np.argmax(tiles[0])) == 6 and tiles[0, 6] > 0 and np.allclose(np.delete(tiles[0], 6), 0)
    whole_head = RareHead.from_coefficients(rng.normal(size=32).astype(np.float32), 0.0)
    rest1, none = contributions(whole_head, block[:, :1, :])  # no tiles: nothing to split
    assert none.shape == (7, 0)
    np.testing.assert_allclose(rest1, whole_head.decision_function(featurize(block[:, :1, :])), rtol=1e-3, atol=1e-3)


def test_a_photos_feature_and_its_max_tiles_place_the_score_as_every_view_does():
    """What compact storage would keep (the feature and one byte a value of the max part) splits the logit
    too: the max part's terms go to the same tiles, the mean part's share is spread evenly."""
    rng = np.random.default_rng(1)
    block = np.abs(rng.normal(size=(6, 10, 32))).astype(np.float16)
    X, which = featurize(block), tile_argmax(block)
    assert which.shape == (6, 32) and which.dtype == np.uint8 and which.max() <= 8
    head = RareHead.from_coefficients(rng.normal(size=X.shape[1]).astype(np.float32), -0.2)
    rest, per_tile = contributions_from_pooled(head, X, which, 9)
    np.testing.assert_allclose(rest + per_tile.sum(axis=1), head.decision_function(X), rtol=1e-4, atol=1e-4)
    coef = head.coef_.copy()
    coef[32:64] = 0.0  # no mean part: both splits are the same
    no_mean = RareHead.from_coefficients(coef, -0.2)
    exact = contributions(no_mean, block)[1]
    np.testing.assert_allclose(contributions_from_pooled(no_mean, X, which, 9)[1], exact, rtol=1e-3, atol=1e-3)
    assert tile_argmax(block[:, :1, :]).shape == (6, 0)
    whole_head = RareHead.from_coefficients(rng.normal(size=32).astype(np.float32), 0.1)
    whole = featurize(block[:, :1, :])
    plain, none = contributions_from_pooled(whole_head, whole, tile_argmax(block[:, :1, :]), 0)
    assert none.shape == (6, 0)
    np.testing.assert_allclose(plain, whole_head.decision_function(whole), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="do not match"):
        contributions_from_pooled(head, X[:, :64], which, 9)


def test_tile_boxes_follow_the_overlapping_grid():
    boxes = tile_boxes(400, 300, 3)
    assert boxes.shape == (9, 4)
    np.testing.assert_allclose(boxes[0], [0, 0, 200, 150])
    np.testing.assert_allclose(boxes[4], [100, 75, 200, 150])
    np.testing.assert_allclose(boxes[8], [200, 150, 200, 150])
    assert tile_boxes(400, 300, 0).shape == (0, 4)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["compact", "views"])
def test_the_region_points_at_the_small_object(tmp_path, layout):
    """Rare photos hold a beetle in one corner; the region of each must hold the beetle's centre, whether the
    project keeps every view or the compact parts."""
    rng = np.random.default_rng(3)
    images = tmp_path / "images"
    images.mkdir()
    where = {}
    for i in range(36):
        corner = i % 4 if i % 3 == 0 else None
        beetle_photo(rng, corner).save(images / f"p{i:02d}.jpg")
        where[f"p{i:02d}.jpg"] = corner
    with Project.create(tmp_path / "proj", images=images, test_fraction=0.0) as p:
        p.add_images()
        p.embed(batch_size=16, layout=layout)
        assert p.embedding_info()["layout"] == layout
        assert p.evidence([1])[1] == {"region": None, "tiles": []}  # no head yet
        p.label([(path, int(c is not None)) for path, c in list(where.items())[:30]])  # 6 left for `next`
        ids = {path: p.image_id(path) for path in where}
        rare = [path for path, c in where.items() if c is not None]
        found = p.evidence([ids[path] for path in rare])
        hits = 0
        for path in rare:
            e = found[ids[path]]
            assert len(e["tiles"]) == 9 and all(set(t) == {"x", "y", "width", "height", "score"} for t in e["tiles"])
            r = e["region"]
            assert r["width"] == 160 and r["height"] == 120  # half of 320 x 240: a 3 x 3 grid's tile
            c = where[path]
            cx = 80 if c in (0, 2) else 240
            cy = 60 if c in (0, 1) else 180
            hits += r["x"] <= cx <= r["x"] + r["width"] and r["y"] <= cy <= r["y"] + r["height"]
        assert hits >= 0.75 * len(rare), (hits, len(rare))
    # next --json carries the region of each picked photo
    out = subprocess.run([sys.executable, "-m", "raresift", "next", str(tmp_path / "proj"), "--n", "3", "--json"],
                         capture_output=True, text=True, check=True).stdout
    batch = json.loads(out)
    assert batch and all({"region", "tiles"} <= set(item) for item in batch)
    assert all(item["region"] is None or item["region"]["width"] == 160 for item in batch)
