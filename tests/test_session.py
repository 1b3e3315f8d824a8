"""One learner for every surface: simulate picks what successive `raresift next` calls pick; rounds of
one project from several processes at once wait for each other instead of failing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import write_truth

from raresift import Project
from raresift.simulate import simulate


def _raresift(*args: str) -> subprocess.Popen:
    exe = Path(sys.executable).parent / "raresift"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "raresift"]
    return subprocess.Popen([*cmd, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("query", [None, "bee"])
def test_simulate_picks_what_successive_next_calls_pick(embedded_project, tmp_path, query):
    project_dir, _images, truth = embedded_project
    key = write_truth(tmp_path / "truth.csv", truth)
    twin = tmp_path / "twin"
    shutil.copytree(project_dir, twin)  # the same photos, vectors and split, no labels
    result = simulate(project=project_dir, truth=key, protocol="default", split="project", budget=15, batch=5,
                      repeats=1, seed=3, k=None, query=query, trace=True)
    rounds = result["sessions"][0]
    assert [len(r["image_ids"]) for r in rounds] == [5, 5, 5]
    with Project(twin) as project:
        for r in rounds:
            batch = project.next(5, seed=r["seed"], query=query)
            assert [b["image_id"] for b in batch] == r["image_ids"]
            assert [b["strategy"] for b in batch] == r["strategies"]
            project.label([(b["path"], truth[b["path"]]) for b in batch], who="oracle",
                          round_id=batch[0]["round"])
        # the picks of the last round came from a fitted head (not only the cold start)
        assert any(s in ("top", "uncertainty", "random") for s in rounds[-1]["strategies"]) or query is None


def test_two_first_rounds_at_once_both_succeed(embedded_project):
    project_dir = embedded_project[0]
    for cache in ("learn",):  # nothing built yet: both processes need the clusters
        shutil.rmtree(project_dir / cache, ignore_errors=True)
    procs = [_raresift("next", str(project_dir), "--n", "4", "--json", "--seed", str(s)) for s in (1, 2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    batches = [json.loads(out) for out, _ in outs]
    assert all(len(b) == 4 for b in batches)
    assert {b[0]["round"] for b in batches} == {1, 2}  # two recorded rounds
    with Project(project_dir) as project:
        assert project.db.execute("SELECT COUNT(*) FROM rounds").fetchone()[0] == 2
        assert len(list((project_dir / "learn").glob("clusters-*.npz"))) == 1  # built once, kept
        assert not [f for f in os.listdir(project_dir / "learn") if ".tmp" in f]


def test_evaluate_scores_the_ranking_next_evaluate_queued(embedded_project):
    project_dir, _images, truth = embedded_project
    with Project(project_dir) as project:
        pool = [p for p, s in zip(project.image_ids(), project.splits()) if s == "pool"]
        project.label([(p, truth[p]) for p in pool])
        queued = project.next(8, evaluate=True, seed=5)
        project.label([(b["path"], truth[b["path"]]) for b in queued])
        report = project.evaluate(k=8)
        assert report["top_k_missing"] == 0 and report["top_k_labelled"] == 8
        s = project.scores()
        test = np.flatnonzero(project.splits() == "test")
        top = test[np.lexsort((test, -s[test]))][:8]
        assert sorted(int(r) + 1 for r in top) == sorted(b["image_id"] for b in queued)
