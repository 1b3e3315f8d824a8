"""Example photos from outside the collection: a file given to `next --examples` starts the ranking, and
it never counts as a photo of the collection (status, export, evaluate)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_photo

from raresift import InputError, Project
from raresift.cli import main


def test_an_outside_file_starts_the_ranking_and_stays_outside(embedded_project, tmp_path, capsys):
    project_dir, images, truth = embedded_project
    # A new photo of the rare class, made outside the collection (not a copy of any registered file).
    outside = tmp_path / "phone.jpg"
    make_photo(np.random.default_rng(99), rare=True).save(outside)
    with Project(project_dir) as p:
        before = p.status()
        key = p.add_example(outside)
        assert key.startswith("file:") and (project_dir / "examples" / f"{key[5:]}.jpg").is_file()
        vec = p.store.example_vectors(key)
        assert vec.shape == (p.embedding_info()["views"], p.embedding_info()["dim"])
        # its nearest photo of the project, by the features the learner uses
        from raresift.learn.features import featurize

        feats = featurize(np.asarray(p.vectors()))
        sims = feats @ featurize(vec[None])[0]
        pool = np.flatnonzero(p.splits() == "pool")
        nearest = int(pool[np.argmax(sims[pool])]) + 1
    assert main(["next", str(project_dir), "--examples", str(outside), "--n", "5", "--json", "--seed", "0"]) == 0
    batch = json.loads(capsys.readouterr().out)
    assert batch[0]["image_id"] == nearest and batch[0]["strategy"] == "top"  # the example trained the head
    assert sum(truth[b["path"]] for b in batch) >= 3  # the rare class comes first
    with Project(project_dir) as p:
        assert p.status()["images"] == before["images"] and p.status()["labels"] == 0
        assert all(not path.startswith("file:") for path in p.image_ids())
        p.label([(b["path"], truth[b["path"]]) for b in batch])
        rows = p.export(top=100, fmt="jsonl", out=tmp_path / "top.jsonl").read_text().splitlines()
        assert rows and not any("phone" in r or "file:" in r for r in rows)
        assert {json.loads(r)["path"] for r in rows} <= set(truth)
        report = p.evaluate(k=5)
        assert report["collection_photos"] == before["embedded"]
        # the same file again: the same key, nothing embedded twice
        assert p.add_example(outside) == key and len(list((project_dir / "examples").glob("*.npy"))) == 1


def test_a_crop_and_not_like_examples(embedded_project, tmp_path):
    project_dir, _images, truth = embedded_project
    with Project(project_dir) as p:
        rare = next(i for i, path in enumerate(p.image_ids(), 1) if truth[path])
        key = p.add_example_crop(rare, (10, 10, 100, 80))
        assert key.startswith("file:") and list((project_dir / "examples").glob("*.png"))
        plain = tmp_path / "plain.jpg"
        make_photo(np.random.default_rng(7), rare=False).save(plain)
        batch = p.next(4, examples=[key], not_like=[plain], seed=1)
        params = json.loads(p.db.execute("SELECT params FROM rounds ORDER BY id DESC LIMIT 1").fetchone()[0])
        assert params["examples"] == [key] and len(params["not_like"]) == 1 and params["model"] == "model"
        assert len(batch) == 4
        with pytest.raises(InputError, match="not inside"):
            p.add_example_crop(rare, (0, 0, 5000, 5000))
        with pytest.raises(InputError, match="neither a photo of this project nor an image file"):
            p.next(3, examples=[str(tmp_path / "nothing.jpg")])
        (tmp_path / "text.jpg").write_text("not an image")
        with pytest.raises(InputError, match="not a readable image"):
            p.add_example(tmp_path / "text.jpg")
