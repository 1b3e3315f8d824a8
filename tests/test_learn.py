"""Learning core: strategies (one contract for all), head, features, cold start concepts."""

from __future__ import annotations

import numpy as np
import pytest

from raresift.errors import InputError, NotReadyError
from raresift.learn import STRATEGIES, RareHead, get_strategy
from raresift.learn.coldstart import concepts_for, text_scores_from_logits
from raresift.learn.features import PART_WEIGHTS, feature_dim, featurize, gather
from raresift.learn.features import MatrixFeatures
from raresift.learn.session import Session, fit_scorer
from raresift.learn.strategies import NEAR_DUPLICATE, entropy


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_meets_the_contract(name):
    rng = np.random.default_rng(0)
    proba = rng.random(300)
    feats = rng.normal(size=(300, 8)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    idx, sources = get_strategy(name)(proba, 20, rng=np.random.default_rng(1), features=feats)
    assert len(idx) == 20 and len(sources) == 20
    assert len(set(idx.tolist())) == 20, "a photo picked twice"
    assert idx.min() >= 0 and idx.max() < 300
    assert all(isinstance(s, str) and s for s in sources)
    again, _ = get_strategy(name)(proba, 20, rng=np.random.default_rng(1), features=feats)
    assert np.array_equal(idx, again), "same seed must replay the same picks"
    # Asking for more than there is returns everything once.
    small, _ = get_strategy(name)(proba[:5], 20, rng=np.random.default_rng(1), features=feats[:5])
    assert sorted(small.tolist()) == [0, 1, 2, 3, 4]


def test_unknown_strategy_lists_valid_names():
    with pytest.raises(InputError) as err:
        get_strategy("smartest")
    for name in ("random", "uncertainty", "uncertainty-sampling", "top", "diverse", "default"):
        assert name in str(err.value)


def test_top_and_uncertainty_pick_what_they_promise():
    proba = np.array([0.1, 0.95, 0.5, 0.49, 0.99, 0.02])
    rng = np.random.default_rng(0)
    top, _ = STRATEGIES["top"](proba, 2, rng=rng)
    assert top.tolist() == [4, 1]
    unc, _ = STRATEGIES["uncertainty"](proba, 2, rng=rng)
    assert sorted(unc.tolist()) == [2, 3]
    assert entropy(np.array([0.5]))[0] > entropy(np.array([0.9]))[0]


def test_uncertainty_sampling_prefers_uncertain_photos():
    proba = np.r_[np.full(100, 0.5), np.full(100, 0.001)]
    hits = 0
    for seed in range(20):
        idx, _ = STRATEGIES["uncertainty-sampling"](proba, 10, rng=np.random.default_rng(seed))
        hits += int((idx < 100).sum())
    assert hits > 150  # ~99% expected; random would give ~100


def test_diverse_skips_near_duplicates():
    base = np.eye(4, dtype=np.float32)
    feats = np.concatenate([np.repeat(base[:1], 5, axis=0), base[1:]])  # 5 copies of one photo, then 3 others
    proba = np.array([0.99, 0.98, 0.97, 0.96, 0.95, 0.5, 0.4, 0.3])
    idx, _ = STRATEGIES["diverse"](proba, 3, rng=np.random.default_rng(0), features=feats)
    assert idx.tolist() == [0, 5, 6]
    top, _ = STRATEGIES["top"](proba, 3, rng=np.random.default_rng(0))
    assert top.tolist() == [0, 1, 2]
    assert NEAR_DUPLICATE < 1


def test_mixed_default_records_each_pick_source():
    rng = np.random.default_rng(0)
    proba = rng.random(1000)
    idx, sources = STRATEGIES["default"](proba, 20, rng=rng)
    assert set(sources) == {"top", "uncertainty", "random"}
    assert sources.count("top") >= sources.count("random")
    top_rows = idx[[s == "top" for s in sources]]
    assert proba[top_rows].min() > np.quantile(proba, 0.95)


def _clusters(n=400, d=16, n_pos=40, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)).astype(np.float32)
    y = np.zeros(n, dtype=np.int64)
    y[:n_pos] = 1
    X[:n_pos] += 2.5
    return X, y


def test_head_follows_the_estimator_contract_and_learns():
    X, y = _clusters()
    head = RareHead(C=1.0, random_state=0)
    assert head.get_params()["C"] == 1.0
    with pytest.raises(NotReadyError):
        head.decision_function(X)
    assert head.fit(X[::2], y[::2], X_unlabeled=X[1::2]) is head
    assert head.coef_.shape == (16,) and isinstance(head.intercept_, float)
    proba = head.predict_proba(X[1::2])
    assert proba.shape == (200, 2) and np.allclose(proba.sum(axis=1), 1)
    top = np.argsort(-proba[:, 1])[:20]
    assert y[1::2][top].mean() > 0.9
    with pytest.raises(InputError):
        head.set_params(gamma=1)


def test_head_needs_both_classes():
    X, _y = _clusters()
    with pytest.raises(NotReadyError):
        RareHead().fit(X[:10], np.ones(10))
    with pytest.raises(InputError):
        RareHead().fit(X[:10], np.full(10, 2))


def test_head_follows_the_scikit_learn_contract():
    from sklearn.base import clone

    head = RareHead()
    assert head.get_params()["C"] == 10.0 and head.get_params()["unlabeled_weight"] == 0.05  # the workflow's
    with pytest.raises(ValueError) as err:  # scikit-learn's NotFittedError is a ValueError and an AttributeError
        head.decision_function(np.zeros((2, 3)))
    assert isinstance(err.value, AttributeError)
    with pytest.raises(NotReadyError):  # the same error is raresift's too
        head.predict(np.zeros((2, 3)))
    X, y = _clusters()
    fitted = RareHead(C=3.0, random_state=0).fit(X, y)
    copy = clone(fitted)
    assert copy.get_params() == fitted.get_params() and not hasattr(copy, "coef_")
    assert fitted.coef_.shape == (X.shape[1],) and fitted.n_features_in_ == X.shape[1]
    assert (fitted.predict(X) == y).mean() > 0.9
    # warm start from saved coefficients lands where a cold fit does
    warm = RareHead.from_coefficients(fitted.coef_, fitted.intercept_, C=3.0).set_params(warm_start=True).fit(X, y)
    np.testing.assert_allclose(warm.decision_function(X), fitted.decision_function(X), atol=0.05)


def test_fit_scorer_falls_back_without_both_classes():
    X, y = _clusters()
    s = fit_scorer(X, np.arange(5), np.zeros(5), has_prior=True)
    assert not s.fitted and s.kind == "prior"
    prior = np.linspace(0, 1, len(X))
    labels = np.full(len(X), -1)
    labels[:5] = 0
    session = Session(MatrixFeatures(X), labels, np.ones(len(X), bool), prior=prior, prior_kind="text")
    assert not session.fit(np.random.default_rng(0)).fitted
    assert np.argmax(session.logits()) == len(X) - 1  # the prior orders the photos
    s = fit_scorer(X, np.arange(0, 400, 4), y[::4], unlabeled=np.arange(1, 400, 4), rng=np.random.default_rng(0))
    assert s.fitted and s.kind == "model"
    z = s.head.decision_function(X)
    assert z[y == 1].mean() > z[y == 0].mean()


def test_features_pool_tiles_and_are_unit_length():
    rng = np.random.default_rng(0)
    block = rng.random((6, 10, 32)).astype(np.float16)
    f = featurize(block)
    assert f.shape == (6, feature_dim(10, 32)) == (6, 96)
    assert np.allclose(np.linalg.norm(f, axis=1), 1, atol=1e-3)
    # Each part weighs as PART_WEIGHTS says (the same, by default).
    w = np.array([PART_WEIGHTS[k] for k in ("whole", "mean", "max")])
    w /= np.linalg.norm(w)
    for i in range(3):
        assert np.allclose(np.linalg.norm(f[:, 32 * i : 32 * (i + 1)], axis=1), w[i], atol=1e-3)
    assert PART_WEIGHTS == {"whole": 1.0, "mean": 1.0, "max": 1.0}
    assert np.allclose(np.linalg.norm(featurize(block, "whole+max"), axis=1), 1, atol=1e-3)
    assert featurize(block, "whole").shape == (6, 32)
    assert featurize(block[:, :1]).shape == (6, 32)
    rows = np.array([4, 0, 2])
    assert np.allclose(gather(block, rows), f[rows], atol=1e-6)


def test_text_query_maps_to_imagenet_concepts():
    names = {c[1] for c in concepts_for("insect or spider")}
    for expected in ("bee", "ant", "fly", "ladybug", "monarch butterfly", "tarantula", "wolf spider"):
        assert expected in names
    assert "spider monkey" not in names and "hummingbird" not in names
    spider = {c[1] for c in concepts_for("spiders")}
    assert "barn spider" in spider and "spider web" not in spider
    assert concepts_for("qwzx blorp") == []
    with pytest.raises(InputError):
        concepts_for("  ")


def test_text_scores_follow_the_concept_logits_and_take_the_best_view():
    bee = [c for c in concepts_for("bee") if c[1] == "bee"]
    logits = np.zeros((3, 2, 1000), dtype=np.float32)
    logits[1, 1, bee[0][0]] = 8.0  # a bee in one tile of photo 1
    logits[2, :, 0] = 8.0  # photo 2 is a fish in every view
    s = text_scores_from_logits(logits, bee)
    assert s[1] > s[0] > s[2]


def test_look_alike_concepts_from_the_labelling_guidelines():
    okapi = concepts_for("okapi")  # no ImageNet class; zebra's guidelines name it as a look-alike
    assert [c[1] for c in okapi] == ["zebra"] and okapi[0][2] < 1


def test_explore_picks_take_groups_in_priority_order_and_skip_labelled_ones():
    from raresift.learn.coldstart import explore_picks

    rng = np.random.default_rng(0)
    first = (np.repeat(np.arange(3), 100), np.repeat([2.0, 0.0, 1.0], 100) + 0.4 * rng.random(300))
    first[0][200:] = -1  # group 2 is noise: in no group
    second = (np.repeat(np.arange(6), 50), rng.random(300))
    cand = np.arange(300)
    picks = explore_picks([first, second], cand, np.array([], dtype=np.int64), 5, np.random.default_rng(1))
    assert len(set(picks.tolist())) == 5
    assert first[0][picks[:2]].tolist() == [1, 0]  # lower priority first, one photo per group
    assert picks[0] == 100 + np.argmin(first[1][100:200])  # the group's best photo
    assert len(set(second[0][picks[2:]])) == 3 and not set(second[0][picks[2:]]) & set(second[0][picks[:2]])
    labelled = np.arange(5) * 50  # one photo of each of the second level's groups 0..4
    rest = np.setdiff1d(cand, labelled)
    nxt = explore_picks([second], rest, labelled, 2, np.random.default_rng(2))
    assert second[0][rest[nxt[0]]] == 5  # the one group nobody labelled, then a random photo
    assert len(set(nxt.tolist())) == 2


def test_explore_levels_find_a_small_tight_group_first():
    from raresift.learn.coldstart import explore_levels, explore_picks

    rng = np.random.default_rng(0)
    big = [c + rng.normal(size=(300, 16)) for c in rng.normal(size=(4, 16)) * 4]
    rare = rng.normal(size=(1, 16)) * 4 + 0.3 * rng.normal(size=(12, 16))  # 12 similar photos among 1,212
    X = np.concatenate(big + [rare]).astype(np.float32)
    levels = explore_levels(X, seed=0)
    assert len(levels) == 2 and all(len(ids) == len(X) and len(p) == len(X) for ids, p in levels)
    assert len(np.unique(levels[1][0])) == len(X) // 20
    picks = explore_picks(levels, np.arange(len(X)), np.array([], dtype=np.int64), 5, np.random.default_rng(0))
    assert (picks >= 1200).any()  # a photo of the rare group within the first 5
    assert explore_levels(X[:1]) == []


def test_positives_and_unlabelled_photos_are_enough_to_train():
    X, y = _clusters()
    pos = np.flatnonzero(y)[:5]
    s = fit_scorer(X, pos, np.ones(5), unlabeled=np.setdiff1d(np.arange(400), pos), rng=np.random.default_rng(0))
    assert s.fitted
    z = s.head.decision_function(X)
    assert y[np.argsort(-z)[:30]].mean() > 0.8
    assert not fit_scorer(X, pos, np.ones(5)).fitted  # nothing to contrast the positives with
