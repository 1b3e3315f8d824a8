"""The labelling loop on real projects: rounds, queue, retraining, cold start, CLI `next`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from raresift import Project
from raresift.cli import main
from raresift.errors import InputError, NotReadyError

KEYS = {"path", "image_id", "score", "strategy", "round", "split"}


def vectors_project(tmp_path, *, n=300, n_pos=30, d=24, seed=0):
    """A project of external vectors (no photos, no model): positives form their own cluster."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)).astype(np.float32)
    truth = np.zeros(n, dtype=int)
    pos = rng.choice(n, size=n_pos, replace=False)
    truth[pos] = 1
    X[pos] += 1.5
    np.save(tmp_path / "emb.npy", X)
    ids = [f"img/{i:04d}.jpg" for i in range(n)]
    (tmp_path / "ids.txt").write_text("\n".join(ids) + "\n")
    project = Project.create(tmp_path / "proj")
    project.import_embeddings(tmp_path / "emb.npy", tmp_path / "ids.txt")
    return project, dict(zip(ids, truth.tolist()))


def oracle(project, batch, truth):
    project.label([(b["path"], truth[b["path"]]) for b in batch], who="oracle", source="test",
                  round_id=batch[0]["round"], strategy=batch[0]["strategy"])


def test_next_batch_records_round_and_queue_and_learns(tmp_path):
    project, truth = vectors_project(tmp_path)
    first = project.next(30, seed=1)
    assert len(first) == 30 and all(KEYS <= set(b) for b in first)
    assert {b["split"] for b in first} == {"pool"}
    assert {b["strategy"] for b in first} == {"coldstart-explore"}  # no labels, no query: explore clusters
    rnd = project.db.execute("SELECT strategy, n, seed, purpose, params FROM rounds").fetchall()
    assert len(rnd) == 1 and tuple(rnd[0])[:4] == ("default", 30, 1, "label")
    assert json.loads(rnd[0][4])["model"] == "random"
    assert len(list((tmp_path / "proj" / "learn").glob("clusters-*.npz"))) == 1
    assert project.db.execute("SELECT COUNT(*) FROM queue").fetchone()[0] == 30
    assert [p["path"] for p in project.pending()] == [b["path"] for b in first]
    oracle(project, first, truth)
    assert project.pending() == []
    found = sum(truth[b["path"]] for b in first)
    for _ in range(3):
        batch = project.next(20, seed=2)
        labelled = set(project.labels())
        assert not {b["path"] for b in batch} & labelled, "a labelled photo served again"
        oracle(project, batch, truth)
        found += sum(truth[b["path"]] for b in batch)
    pool_pos = sum(truth[p] for p, s in zip(project.image_ids(), project.splits()) if s == "pool")
    assert found >= 0.8 * pool_pos  # 90 of 180 pool photos labelled: random would find half
    assert project.db.execute("SELECT COUNT(*) FROM rounds").fetchone()[0] == 4
    # every label carries its round and strategy
    rows = project.db.execute("SELECT round_id, strategy FROM labels WHERE round_id IS NULL").fetchall()
    assert rows == []


def test_scores_rank_positives_first_and_replay_with_a_seed(tmp_path):
    project, truth = vectors_project(tmp_path)
    assert np.allclose(project.scores(), 0.5)  # nothing known yet
    batch = project.next(80, strategy="random", seed=3)
    oracle(project, batch, truth)
    s = project.scores()
    assert s.shape == (300,) and np.isfinite(s).all() and ((s >= 0) & (s <= 1)).all()
    y = np.array(list(truth.values()))
    assert y[np.argsort(-s)[:20]].mean() > 0.7
    a = project.next(10, seed=7)
    b = project.next(10, seed=7)
    assert [x["path"] for x in a] == [x["path"] for x in b]


def test_scores_from_the_cached_features_equal_featurised_blocks(tmp_path, monkeypatch):
    from raresift.learn import features, loop

    project, truth = vectors_project(tmp_path)
    ids, splits = project.image_ids(), project.splits()
    pool_pos = [p for p, s in zip(ids, splits) if s == "pool" and truth[p]]
    oracle(project, project.next(60, strategy="random", seed=3), truth)
    project.next(5, examples=pool_pos[:2], seed=0)  # a prior that still counts
    with project.store.tx() as db:  # two photos not embedded
        db.execute("UPDATE images SET status = 'error' WHERE id IN (3, 250)")
    model = loop.current_model(project.store)
    scorer = model.session.scorer
    assert scorer.fitted and model.session.prior is not None and scorer.prior_weight > 0
    assert np.isneginf(model.logits[[2, 249]]).all() and np.isfinite(np.delete(model.logits, [2, 249])).all()
    vectors = project.vectors()
    coef, b = scorer.head.coef_, scorer.head.intercept_
    fast = features.VectorFeatures(vectors, cache=project.store.vector_cache).linear(coef, b)
    assert len(list((tmp_path / "proj" / "embeddings").glob("sqrtfeat-*.npy"))) == 1  # the fast path ran
    plain = features.VectorFeatures(vectors).linear(coef, b)  # every block featurised
    np.testing.assert_allclose(fast, plain, rtol=1e-4, atol=1e-4)
    # Where the features cannot be written (a read-only project), the blocks are featurised instead.
    def refuse(*a, **k):
        raise PermissionError("read-only")

    monkeypatch.setattr(features, "sqrt_features", refuse)
    np.testing.assert_array_equal(features.VectorFeatures(vectors, cache=project.store.vector_cache).linear(coef, b),
                                  plain)


def test_the_head_fits_on_one_blas_thread(tmp_path, monkeypatch):
    from threadpoolctl import threadpool_info, threadpool_limits

    from raresift.learn import loop
    from raresift.learn.head import RareHead

    project, truth = vectors_project(tmp_path)
    oracle(project, project.next(60, strategy="random", seed=3), truth)
    seen = []
    real_fit = RareHead.fit

    def fit(self, *a, **k):
        seen.append([i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"])
        return real_fit(self, *a, **k)

    monkeypatch.setattr(RareHead, "fit", fit)
    with threadpool_limits(limits=2, user_api="blas"):  # two threads outside, as on a 2-core machine
        assert loop.current_model(project.store).session.scorer.fitted
        assert {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"} <= {1, 2}
    assert len(seen) == 1 and seen[0] and set(seen[0]) == {1}


def test_a_module_is_imported_in_the_background(tmp_path, monkeypatch):
    import sys

    from raresift.learn.loop import _import_in_background

    (tmp_path / "rs_background_probe.py").write_text("import time\ntime.sleep(0.2)\nVALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "rs_background_probe", raising=False)
    thread = _import_in_background("rs_background_probe")
    assert thread is not None
    import rs_background_probe  # waits for the background import, does not import twice

    assert rs_background_probe.VALUE == 42
    thread.join(5)
    assert not thread.is_alive() and _import_in_background("rs_background_probe") is None
    missing = _import_in_background("rs_no_such_module_here")
    missing.join(5)
    assert not missing.is_alive()  # the error is left to the caller's own import
    monkeypatch.delitem(sys.modules, "rs_background_probe")


def test_test_labels_never_train_the_model(tmp_path):
    project, truth = vectors_project(tmp_path)
    test_ids = [p for p, s in zip(project.image_ids(), project.splits()) if s == "test"]
    project.label([(p, truth[p]) for p in test_ids], who="x")
    assert np.allclose(project.scores(), 0.5)  # only test labels: still no model


def test_evaluate_serves_test_photos(tmp_path):
    project, truth = vectors_project(tmp_path)
    oracle(project, project.next(80, strategy="random", seed=3), truth)
    top = project.next(20, evaluate=True, seed=0)
    assert len(top) == 20 and {b["split"] for b in top} == {"test"}
    s = project.scores()
    test_rows = np.flatnonzero(project.splits() == "test")
    best = set(test_rows[np.argsort(-s[test_rows])[:20]] + 1)
    assert {b["image_id"] for b in top} == best
    project.label([(top[0]["path"], 1)], who="x")
    again = project.next(20, evaluate=True, seed=0)
    assert len(again) == 19  # the labelled one is not served again
    rnd = project.next(15, evaluate=True, strategy="random", seed=0)
    # Drawn from all test photos (an unbiased sample); the one labelled already is not served.
    queued = project.db.execute("SELECT COUNT(*) FROM queue WHERE round_id = ?", (rnd[0]["round"],)).fetchone()[0]
    assert queued == 15 and 14 <= len(rnd) <= 15 and {b["strategy"] for b in rnd} == {"random"}
    more = project.next(200, evaluate=True, strategy="random", seed=1)
    assert not {b["image_id"] for b in more} & {b["image_id"] for b in rnd}, "a test photo drawn twice"
    assert {p["purpose"] for p in project.pending(purpose="evaluate")} == {"evaluate"}
    assert project.pending(purpose="label") == []


def test_bad_requests_raise_clear_errors(tmp_path):
    project, _ = vectors_project(tmp_path)
    with pytest.raises(InputError, match="valid: random"):
        project.next(5, strategy="best")
    with pytest.raises(InputError):
        project.next(0)
    with pytest.raises(NotReadyError, match="logits"):
        project.next(5, query="insect")  # external vectors have no ImageNet logits
    with pytest.raises(InputError, match="no ImageNet concept"):
        project.next(5, query="qwzx blorp")
    with pytest.raises(InputError):
        project.next(5, examples=["no/such.jpg"])
    with pytest.raises(InputError):
        project.pending(purpose="fun")


def test_examples_start_with_their_neighbours(tmp_path):
    project, truth = vectors_project(tmp_path)
    ids, splits = project.image_ids(), project.splits()
    test_pos = [p for p, s in zip(ids, splits) if s == "test" and truth[p]]
    # Examples from the test split are not labelled (they would bias the test): similarity alone ranks.
    batch = project.next(10, examples=test_pos[:2], seed=0)
    assert {b["strategy"] for b in batch} == {"coldstart-examples"}
    assert sum(truth[b["path"]] for b in batch) >= 6
    assert project.labels() == {}
    # Examples from the pool are positives the person gave: labelled, and the model learns from them
    # (against unlabelled photos as weak negatives).
    pool_pos = [p for p, s in zip(ids, splits) if s == "pool" and truth[p]]
    batch = project.next(10, examples=pool_pos[:2], seed=0)
    assert project.labels() == {pool_pos[0]: 1, pool_pos[1]: 1}
    assert "top" in {b["strategy"] for b in batch}
    assert sum(truth[b["path"]] for b in batch) >= 6


def test_query_cold_start_on_a_real_embedded_project(embedded_project, capsys):
    project_dir, _, truth = embedded_project
    assert main(["next", str(project_dir), "--n", "5", "--query", "insect or spider", "--seed", "0", "--json"]) == 0
    batch = json.loads(capsys.readouterr().out)
    assert len(batch) == 5 and all(KEYS <= set(b) for b in batch)
    assert {b["strategy"] for b in batch} == {"coldstart-text"}
    scores_ = [b["score"] for b in batch]
    assert scores_ == sorted(scores_, reverse=True)
    with Project.open(project_dir) as project:
        assert project.meta("learn.query") == "insect or spider"
        project.label([(p, v) for p, v in truth.items() if v or p.endswith(("1.jpg", "2.jpg"))], who="t")
    assert main(["next", str(project_dir), "--n", "3", "--strategy", "top"]) == 0
    out = capsys.readouterr()
    assert len(out.out.strip().splitlines()) == 3 and "round" in out.err
    assert main(["next", str(project_dir), "--strategy", "nope"]) == 2
    assert "valid:" in capsys.readouterr().err


def test_knn_pool_scores_only_the_neighbours_and_a_sample(tmp_path, monkeypatch):
    """next --pool knn: once there is a head, a round scores the labelled photos' neighbours plus a random
    sample (recorded in the round), still finds the cluster, and the simulate path takes the same option."""
    import json

    from raresift.learn import session as session_module
    from raresift.simulate import SimulationData, replay

    monkeypatch.setattr(session_module, "KNN_RANDOM", 20)
    project, truth = vectors_project(tmp_path, n=600, n_pos=30)
    first = project.next(40, seed=1, pool="knn")  # no head yet: explores, knn does not apply
    assert {b["strategy"] for b in first} == {"coldstart-explore"}
    oracle(project, first, truth)
    if not any(truth[b["path"]] for b in first):
        pos = next(p for p, v in truth.items() if v)
        project.label([(pos, 1)])
    batch = project.next(20, strategy="top", seed=2, pool="knn")
    params = json.loads(project.db.execute("SELECT params FROM rounds ORDER BY id DESC LIMIT 1").fetchone()[0])
    assert params["pool"]["kind"] == "knn" and 20 < params["pool"]["rows"] < 600 - 40
    assert sum(truth[b["path"]] for b in batch) >= 10  # the neighbours of the positives hold the cluster
    full = project.next(5, seed=3, pool="full")
    params = json.loads(project.db.execute("SELECT params FROM rounds ORDER BY id DESC LIMIT 1").fetchone()[0])
    assert params["pool"] == "full" and len(full) == 5
    with pytest.raises(InputError, match="--pool"):
        project.next(5, pool="nearest")
    X = np.asarray(project.vectors()[:, 0, :], dtype=np.float32)
    y = np.array([truth[p] for p in project.image_ids()])
    out = replay(SimulationData(X / np.linalg.norm(X, axis=1, keepdims=True), y), rng=np.random.default_rng(0),
                 budget=100, pool="knn")
    assert out["points"][-1]["found"] >= 12
    project.close()


def test_similar_strategy_queues_photos_like_the_examples(tmp_path):
    """Strategy similar ("more like these"): the photos most like the examples (less like the counter-examples),
    their similarity as score, the examples labelled positive, a recorded round; it needs examples."""
    project, truth = vectors_project(tmp_path, n=400, n_pos=30)
    pos = [p for p, v in truth.items() if v][:3]
    neg = [p for p, v in truth.items() if not v][:5]
    with pytest.raises(InputError, match="similar needs example"):
        project.next(10, strategy="similar")
    batch = project.next(12, strategy="similar", examples=pos, counter_examples=[project.image_id(p) for p in neg],
                         seed=0)
    assert len(batch) == 12 and {b["strategy"] for b in batch} == {"similar"}
    assert sum(truth[b["path"]] for b in batch) >= 10
    scores = [b["score"] for b in batch]
    assert all(-1 <= s <= 1 for s in scores) and max(scores) > 0.3
    assert not {b["path"] for b in batch} & set(pos)  # the examples are not asked again
    splits = project.splits()
    assert all(project.labels()[p] == 1 for p in pos if splits[project.image_id(p) - 1] == "pool")
    assert project.db.execute("SELECT strategy FROM rounds ORDER BY id DESC LIMIT 1").fetchone()[0] == "similar"
    project.close()
