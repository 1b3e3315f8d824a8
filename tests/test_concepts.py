"""Several concepts in one project, "unsure" answers, and the migration that brings both to old projects."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_learn_loop import vectors_project

from raresift import Project
from raresift.cli import main
from raresift.errors import InputError


def cli_json(*args: str) -> object:
    out = subprocess.run([sys.executable, "-m", "raresift", *args], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture
def two_concepts(tmp_path):
    """One project of external vectors; concept 'default' has the cluster as positives, 'other' a random set."""
    project, truth = vectors_project(tmp_path)
    project.close()
    paths = sorted(truth)
    csv = tmp_path / "labels.csv"
    rows = ["path,label,concept"]
    rows += [f"{p},{truth[p]}," for p in paths[:60]]  # empty concept: --concept (default)
    rows += [f"{p},{int(i % 7 == 0)},other" for i, p in enumerate(paths[:40])]
    rows += [f"{paths[60]},unsure,", f"{paths[61]},unsure,other"]
    csv.write_text("\n".join(rows) + "\n")
    assert main(["import-labels", str(tmp_path / "proj"), str(csv)]) == 0
    return tmp_path / "proj", truth, paths


def test_labels_rounds_status_and_evaluation_stay_apart(two_concepts):
    proj, truth, paths = two_concepts
    concepts = {c["concept"]: c for c in cli_json("concepts", str(proj), "--json")}
    assert set(concepts) == {"default", "other"}
    assert concepts["default"]["labels"] == 60 and concepts["default"]["unsure"] == 1
    assert concepts["default"]["positives"] == sum(truth[p] for p in paths[:60])
    assert concepts["other"]["labels"] == 40 and concepts["other"]["positives"] == 6 and concepts["other"]["unsure"] == 1
    s_default = cli_json("status", str(proj), "--json")
    s_other = cli_json("status", str(proj), "--json", "--concept", "other")
    assert (s_default["concept"], s_default["labels"], s_default["rounds"]) == ("default", 60, 0)
    assert (s_other["concept"], s_other["labels"], s_other["positives"]) == ("other", 40, 6)
    batch = cli_json("next", str(proj), "--concept", "other", "--n", "10", "--seed", "1", "--json")
    assert len(batch) == 10 and not {b["path"] for b in batch} & set(paths[:40])  # other's labelled photos are not asked
    assert paths[61] not in {b["path"] for b in batch}  # nor its unsure one
    assert cli_json("status", str(proj), "--json", "--concept", "other")["rounds"] == 1
    assert cli_json("status", str(proj), "--json")["rounds"] == 0  # default has no round
    with Project(proj, concept="other") as p:
        assert len(p.pending()) == 10
        assert p.labels()[paths[0]] == int(0 % 7 == 0)
    with Project(proj) as p:
        assert p.pending() == []  # the other concept's queue is not this one's
        assert p.labels()[paths[0]] == truth[paths[0]]
        default_scores = p.scores()
    with Project(proj, concept="other") as p:
        assert not (p.scores() == default_scores).all()  # its own model
    e_default = cli_json("evaluate", str(proj), "--json")
    e_other = cli_json("evaluate", str(proj), "--json", "--concept", "other")
    assert e_default["concept"] == "default" and e_other["concept"] == "other"
    assert e_default["labels"] == 60 and e_other["labels"] == 40


def test_unsure_is_kept_listed_never_trained_and_never_asked_again(two_concepts):
    proj, truth, paths = two_concepts
    review = cli_json("next", str(proj), "--review", "--json")
    assert [r["path"] for r in review] == [paths[60]]
    assert [r["path"] for r in cli_json("next", str(proj), "--review", "--json", "--concept", "other")] == [paths[61]]
    with Project(proj) as p:
        assert p.label_array()[p.image_id(paths[60]) - 1] == -2
        seen = set()
        for seed in range(3):
            seen |= {b["path"] for b in p.next(40, seed=seed)}
        assert paths[60] not in seen
        from raresift.learn.loop import load_session

        session, _, _ = load_session(p.store)
        assert (session.labels >= 0).sum() == 60 and (session.labels == -2).sum() == 1  # training sees the 60 sure
        p.label([(paths[60], 1)])  # a later sure answer replaces the unsure one
        assert p.review() == []
    with pytest.raises(InputError, match="concept"):
        Project(proj, concept="bad name!")


def test_unsure_through_the_api(two_concepts):
    from fastapi.testclient import TestClient

    from raresift.web import create_app

    proj, truth, paths = two_concepts
    with Project(proj) as p:
        image_id = p.image_id(paths[100])
    client = TestClient(create_app(proj, warm=False))
    r = client.post("/api/labels", json={"items": [{"image_id": image_id, "value": "unsure"}], "who": "ann"})
    assert r.status_code == 200, r.text
    assert r.json()["events"][0]["value"] == "unsure" and r.json()["status"]["unsure"] == 2
    assert client.get(f"/api/images/{image_id}").json()["label"] == "unsure"
    r = client.post("/api/labels?concept=other", json={"items": [{"image_id": image_id, "value": 1}]})
    assert r.status_code == 200 and r.json()["status"]["positives"] == 7
    assert client.get(f"/api/images/{image_id}").json()["label"] == "unsure"  # default's label is unchanged
    assert client.get(f"/api/images/{image_id}?concept=other").json()["label"] == 1
    names = {c["concept"] for c in client.get("/api/concepts").json()["concepts"]}
    assert names == {"default", "other"}
    assert client.get("/api/status?concept=bad name").status_code == 400


def test_simulate_starts_from_a_concepts_stored_query(embedded_project, tmp_path):
    """simulate --concept NAME replays sessions that start from the query `next --concept NAME` remembered."""
    from conftest import write_truth

    from raresift.simulate import simulate

    project, _, truth = embedded_project
    with Project(project, concept="beetles") as p:
        p.next(5, query="beetle", seed=0)
    key = write_truth(tmp_path / "truth.csv", truth)
    res = simulate(project=project, truth=key, concept="beetles", budget=10, repeats=1, batch=5, k=3)
    plain = simulate(project=project, truth=key, budget=10, repeats=1, batch=5, k=3)
    assert res["concepts"] and "beetle" in " ".join(res["concepts"]).lower()
    assert plain["concepts"] is None
    with pytest.raises(InputError, match="needs --project"):
        simulate(images=tmp_path, truth=key, concept="beetles")
