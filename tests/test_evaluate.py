"""evaluate(): precision@K on the test split, random baseline, lift, positives and recall estimates."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_learn_loop import oracle, vectors_project

from raresift.cli import main
from raresift.errors import InputError
from raresift.evaluate import wilson


def test_wilson_interval():
    lo, hi = wilson(29, 50)
    assert lo < 0.58 < hi and 0.43 < lo < 0.46 and 0.70 < hi < 0.72
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0
    assert wilson(0, 0) is None


def test_evaluate_reports_precision_baseline_lift_and_recall(tmp_path, capsys):
    project, truth = vectors_project(tmp_path, n=600, n_pos=60)
    oracle(project, project.next(100, strategy="random", seed=0), truth)
    report = project.evaluate(k=20)
    assert report["top_k_labelled"] == 0 and report["precision_at_k"] is None
    assert any("--evaluate" in h for h in report["hints"])

    oracle(project, project.next(20, evaluate=True, seed=0), truth)
    oracle(project, project.next(120, evaluate=True, strategy="random", seed=1), truth)
    report = project.evaluate(k=20)
    s = project.scores()
    test = np.flatnonzero(project.splits() == "test")
    top = test[np.argsort(-s[test], kind="stable")[:20]]
    y = np.array(list(truth.values()))
    assert report["top_k_missing"] == 0 and report["top_k_labelled"] == 20
    assert report["precision_at_k"] == pytest.approx(y[top].mean())
    lo, hi = report["precision_at_k_ci"]
    assert lo <= report["precision_at_k"] <= hi
    rnd = [b for b in project.db.execute(
        "SELECT q.image_id FROM queue q JOIN rounds r ON r.id = q.round_id WHERE r.purpose='evaluate' "
        "AND q.strategy='random'")]
    assert report["random_labels"] == len(rnd) == 120
    prevalence = report["random_precision"]
    assert prevalence == pytest.approx(report["random_positives"] / 120, abs=5e-5)  # rounded to 4 places
    assert report["lift"] == pytest.approx(report["precision_at_k"] / prevalence, abs=0.01)
    assert report["precision_at_k"] > 3 * prevalence  # the clusters are easy
    lo, hi = report["estimated_positives_ci"]
    assert lo <= report["estimated_positives"] <= hi
    assert abs(report["estimated_positives"] - 60) < 40
    assert 0 <= report["top_n_recall"] <= 1 and report["top_n"] == round(20 * 600 / len(test))
    small = project.evaluate(k=20, top=1)
    big = project.evaluate(k=20, top=600)
    assert small["top_n_recall"] <= report["top_n_recall"] <= big["top_n_recall"] == 1.0

    project.close()
    assert main(["evaluate", str(tmp_path / "proj"), "--k", "20", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["precision_at_k"] == report["precision_at_k"]
    assert main(["evaluate", str(tmp_path / "proj"), "--k", "20"]) == 0
    out = capsys.readouterr().out
    assert "precision@20" in out and "lift" in out and "random baseline" in out


def test_evaluate_rejects_bad_k(tmp_path):
    project, _ = vectors_project(tmp_path)
    with pytest.raises(InputError):
        project.evaluate(k=0)
