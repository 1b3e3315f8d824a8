"""simulate(): whole labelling sessions replayed against an answer key; JSON, plot, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import write_truth
from test_learn_loop import vectors_project

from raresift.cli import main
from raresift.errors import InputError
from raresift.simulate import SimulationData, curve_points, load_truth, replay, simulate


def test_curve_points():
    assert curve_points(200) == [25, 50, 100, 200]
    assert curve_points(450) == [25, 50, 100, 200, 300, 400, 450]
    assert curve_points(10) == [10]


def test_seed_and_default_protocols_on_a_vectors_project(tmp_path):
    project, truth = vectors_project(tmp_path, n=1000, n_pos=60, d=24)
    project.close()
    key = write_truth(tmp_path / "truth.csv", truth)
    seed = simulate(project=tmp_path / "proj", truth=key, protocol="seed", repeats=2, seed=5)
    assert [p["labels"] for p in seed["curve"]] == [300, 400]
    assert seed["k"] == 50 and 0.03 < seed["random_precision_at_k_mean"] < 0.09
    for p in seed["curve"]:
        assert {"labels", "precision_at_k_mean", "precision_at_k_sd", "positives_found_mean"} <= set(p)
        assert p["precision_at_k_mean"] > 2 * seed["random_precision_at_k_mean"]
    again = simulate(project=tmp_path / "proj", truth=key, protocol="seed", repeats=2, seed=5)
    assert again["curve"] == seed["curve"], "same seed, same result"
    default = simulate(project=tmp_path / "proj", truth=key, protocol="default", budget=100, repeats=2,
                       json_path=tmp_path / "out" / "d.json")
    assert [p["labels"] for p in default["curve"]] == [25, 50, 100]
    found = [p["positives_found_mean"] for p in default["curve"]]
    assert found == sorted(found) and found[-1] > 2 * 100 * 0.06  # finds more than random labelling
    assert json.loads((tmp_path / "out" / "d.json").read_text())["curve"] == default["curve"]
    png = (tmp_path / "out" / "d.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(InputError, match="valid: seed"):
        simulate(project=tmp_path / "proj", truth=key, protocol="write-up")
    with pytest.raises(InputError, match="valid:"):
        simulate(project=tmp_path / "proj", truth=key, strategy="clever")


def test_replay_beats_random_with_a_good_prior():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(800, 16)).astype(np.float32)
    y = np.zeros(800, dtype=np.int64)
    y[:40] = 1
    X[:40] += 1.0
    prior = y + rng.normal(0, 0.5, size=800)  # a noisy text score
    with_prior = replay(SimulationData(X, y, prior), rng=np.random.default_rng(1), budget=50)
    without = replay(SimulationData(X, y, None), rng=np.random.default_rng(1), budget=50)
    assert with_prior["points"][0]["found"] > without["points"][0]["found"]
    assert with_prior["points"][0]["labels"] == 25


def test_load_truth_by_csv_or_folder(tmp_path):
    ids = ["a/x.jpg", "b/y.jpg", "b/c/z.jpg"]
    y, info = load_truth(ids, truth_folder="b")
    assert y.tolist() == [0, 1, 1]
    y, _ = load_truth(ids, truth_folder="c")
    assert y.tolist() == [0, 0, 1]
    key = write_truth(tmp_path / "t.csv", {"a/x.jpg": 1, "other.jpg": 0})
    y, info = load_truth(ids, truth=key)
    assert y.tolist() == [1, -1, -1] and info["unmatched"] == 1
    with pytest.raises(InputError):
        load_truth(ids, truth_folder="nothere")
    with pytest.raises(InputError):
        load_truth(ids)
    (tmp_path / "bad.csv").write_text("path,label\na/x.jpg,yes\n")
    with pytest.raises(InputError, match="line 2"):
        load_truth(ids, truth=tmp_path / "bad.csv")


def test_cli_simulate_reuses_an_embedded_project(embedded_project, tmp_path, capsys):
    project_dir, images, truth = embedded_project
    key = write_truth(tmp_path / "truth.csv", truth)
    args = ["simulate", "--images", str(images), "--truth", str(key), "--project", str(project_dir),
            "--budget", "10", "--batch", "5", "--repeats", "2", "--k", "5", "--query", "insect or spider",
            "--json", str(tmp_path / "sim.json"), "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "precision@5" in out
    result = json.loads((tmp_path / "sim.json").read_text())
    assert result["k"] == 5 and result["repeats"] == 2 and result["photos"] == 40
    assert result["curve"][-1]["labels"] == 10
    assert (tmp_path / "sim.png").is_file()
    assert main(["simulate", "--truth", str(key), "--project", str(project_dir), "--protocol", "seed",
                 "--no-progress"]) == 2  # 40 photos cannot hold 400 labels
    assert "seed protocol" in capsys.readouterr().err
    assert main(["simulate", "--truth", str(key), "--no-progress"]) == 2


def test_cli_simulate_embeds_a_folder_with_a_truth_folder(tmp_path, capsys):
    from conftest import make_collection

    make_collection(tmp_path / "photos", n=16, n_rare=3)  # subfolders a/ and b/
    args = ["simulate", "--images", str(tmp_path / "photos"), "--truth-folder", "a", "--budget", "6",
            "--batch", "3", "--repeats", "1", "--k", "3", "--json", str(tmp_path / "r.json"), "--no-progress"]
    assert main(args) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["photos"] == 16 and result["positives"] == 8  # half the photos lie under a/
    assert result["project"] is None  # embedded into a temporary folder, removed after
    assert result["curve"][-1]["labels"] == 6
