"""The foundation commands as a user runs them: init, add, embed, status, errors, import-labels, demo."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from raresift.cli import main

from conftest import make_collection, write_truth


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_init_embed_status_as_a_subprocess(tmp_path):
    images = tmp_path / "images"
    make_collection(images, n=8, n_rare=2)
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    cmd = [sys.executable, "-m", "raresift"]
    done = subprocess.run([*cmd, "init", tmp_path / "p", "--images", images], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "9 new images registered" in done.stderr
    done = subprocess.run([*cmd, "embed", tmp_path / "p", "--no-progress"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([*cmd, "status", tmp_path / "p", "--json"], capture_output=True, text=True)
    status = json.loads(done.stdout)
    for key in ("images", "embedded", "errors", "labels", "positives", "test"):
        assert isinstance(status[key], int), key
    assert (status["images"], status["embedded"], status["errors"]) == (9, 8, 1)
    done = subprocess.run([*cmd, "errors", tmp_path / "p", "--json"], capture_output=True, text=True)
    (err,) = json.loads(done.stdout)
    assert err["path"] == "broken.jpg" and err["reason"]


def test_add_registers_only_new_photos(tmp_path, capsys):
    images = tmp_path / "images"
    make_collection(images, n=4, n_rare=1)
    assert run(capsys, "init", tmp_path / "p", "--images", images)[0] == 0
    make_collection(images / "more", n=3, n_rare=1, seed=5)
    code, _out, err = run(capsys, "add", tmp_path / "p")
    assert code == 0 and "3 new images registered" in err and "7 in total" in err
    code, _out, err = run(capsys, "init", tmp_path / "p", "--images", images)
    assert code == 0 and "0 new images registered" in err


def test_import_labels_all_or_nothing(embedded_project, tmp_path, capsys):
    project, _images, truth = embedded_project
    paths = sorted(truth)
    good = write_truth(tmp_path / "good.csv", {p: truth[p] for p in paths[:10]})
    code, _out, err = run(capsys, "import-labels", project, good)
    assert code == 0, err
    status = json.loads(run(capsys, "status", project, "--json")[1])
    assert status["labels"] == 10 and status["positives"] == sum(truth[p] for p in paths[:10])

    bad_lines = {
        "missing column": "path,lab\nx,1\n",
        "unknown id": f"path,label\n{paths[11]},1\nno/such.jpg,0\n",
        "not 0/1": f"path,label\n{paths[11]},yes\n",
        "contradiction": f"path,label\n{paths[11]},1\n{paths[12]},0\n{paths[11]},0\n",
    }
    expected = {"missing column": "line 1", "unknown id": "line 3", "not 0/1": "line 2", "contradiction": "line 4"}
    for name, text in bad_lines.items():
        f = tmp_path / "bad.csv"
        f.write_text(text)
        code, out, err = run(capsys, "import-labels", project, f)
        assert code == 2, name
        assert err.count("\n") == 1 and expected[name] in err and "Traceback" not in err, (name, err)
    status = json.loads(run(capsys, "status", project, "--json")[1])
    assert status["labels"] == 10  # nothing half-imported


def test_import_labels_accepts_bom_crlf_and_repeated_rows(embedded_project, tmp_path, capsys):
    project, _images, truth = embedded_project
    a, b = sorted(truth)[:2]
    f = tmp_path / "windows.csv"
    f.write_bytes(f"\ufeffpath,label\r\n{a},1\r\n{b},0\r\n{a},1\r\n".encode("utf-8"))
    code, _out, err = run(capsys, "import-labels", project, f)
    assert code == 0, err
    status = json.loads(run(capsys, "status", project, "--json")[1])
    assert (status["labels"], status["positives"]) == (2, 1)


def test_init_from_your_own_vectors(tmp_path, capsys):
    np.save(tmp_path / "emb.npy", np.random.default_rng(0).normal(size=(10, 8)).astype(np.float32))
    (tmp_path / "ids.txt").write_text("\n".join(f"https://example.org/{i}.jpg" for i in range(10)))
    code, out, err = run(capsys, "init", tmp_path / "p", "--embeddings", tmp_path / "emb.npy",
                         "--ids", tmp_path / "ids.txt", "--json")
    assert code == 0, err
    assert json.loads(out)["embedded"] == 10
    (tmp_path / "ids.txt").write_text("a\nb\n")
    code, _out, err = run(capsys, "init", tmp_path / "q", "--embeddings", tmp_path / "emb.npy", "--ids", tmp_path / "ids.txt")
    assert code == 2 and "10 rows but" in err
    assert not (tmp_path / "q").exists()  # a failed init leaves nothing behind


@pytest.mark.parametrize("argv, message", [
    (["status", "{tmp}/nothing"], "not a raresift project"),
    (["init", "{tmp}/p", "--images", "{tmp}/missing"], "does not exist"),
    (["embed", "{tmp}"], "not a raresift project"),
    (["init", "{tmp}/p", "--images", "{tmp}", "--test-fraction", "1.5"], "--test-fraction"),
])
def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys, argv, message):
    code, _out, err = run(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert code == 2
    assert message in err and err.count("\n") == 1


def test_demo_runs_offline_on_shipped_photos(tmp_path, capsys):
    code, out, err = run(capsys, "demo", "--dir", tmp_path / "demo", "--images", 40, "--no-progress")
    assert code == 0, err
    assert (tmp_path / "demo" / "truth.csv").is_file()
    assert "embedded" in out
