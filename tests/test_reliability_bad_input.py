"""Bad input through the `raresift` command: each case gets a clear one-line error and a non-zero exit
(or, where the input is odd but usable, it works), never a traceback, and nothing already stored is lost.

Most cases call ``raresift.cli.main`` in-process (an exception escaping it would be a traceback);
a few run the real command in a subprocess.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from conftest import make_collection

EXIT_ERROR = 2


def run(*argv) -> tuple[int, str, str]:
    """Run the CLI in-process; return (exit code, stdout, stderr)."""
    from raresift.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([os.fsdecode(a) if isinstance(a, bytes) else str(a) for a in argv])
        except SystemExit as exc:  # argparse usage errors
            rc = exc.code
    return rc, out.getvalue(), err.getvalue()


def assert_refused(result: tuple[int, str, str], *needles: str) -> str:
    """Exit 2, exactly one line on stderr that names the command, no traceback; returns the line."""
    rc, _, err = result
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == EXIT_ERROR, f"exit {rc}, stderr: {err}"
    assert "Traceback" not in err
    assert len(lines) == 1, f"expected one line, got: {err}"
    assert lines[0].startswith("raresift ") and ": error: " in lines[0], lines[0]
    for needle in needles:
        assert needle.lower() in lines[0].lower(), f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def tree_digest(folder: Path) -> dict[str, str]:
    """Content hash of every file under ``folder`` (to show that a refusal changed nothing)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.name.endswith(("-wal", "-shm")):
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def registered_template(tmp_path_factory):
    """A project of 12 registered photos (one with a non-UTF-8 name), not embedded."""
    from raresift import Project

    root = tmp_path_factory.mktemp("badinput")
    images = root / "images"
    truth = make_collection(images, n=12, n_rare=2, seed=4)
    src = images / next(iter(truth))
    with open(os.path.join(os.fsencode(images), b"caf\xe9.jpg"), "wb") as fh:
        fh.write(src.read_bytes())
    with Project.create(root / "project", images=images) as p:
        p.add_images()
        ids = p.image_ids()
    assert len(ids) == 13
    return root / "project", images, ids


@pytest.fixture
def project(registered_template, tmp_path):
    src, images, ids = registered_template
    dst = tmp_path / "project"
    shutil.copytree(src, dst)
    return dst, ids


def n_labels(project: Path) -> int:
    conn = sqlite3.connect(project / "raresift.sqlite")
    try:
        return conn.execute("SELECT COUNT(*) FROM labels").fetchone()[0]
    finally:
        conn.close()


# ------------------------------------------------------------------ folders
def test_images_folder_missing(tmp_path):
    assert_refused(run("init", tmp_path / "p", "--images", tmp_path / "nope"), "does not exist")
    assert not (tmp_path / "p").exists(), "a refused init must not leave a project folder"


def test_images_folder_is_a_file(tmp_path):
    f = tmp_path / "photo.jpg"
    f.write_bytes(b"x")
    assert_refused(run("init", tmp_path / "p", "--images", f), "not a folder")


def test_images_folder_empty(tmp_path):
    (tmp_path / "empty").mkdir()
    rc, _, err = run("init", tmp_path / "p", "--images", tmp_path / "empty")
    assert rc == 0 and "Traceback" not in err
    assert "no image files" in err
    assert_refused(run("embed", tmp_path / "p", "--no-progress"), "no images")


def _run_as_nobody(argv: list[str]) -> tuple[int, str]:
    """Run the CLI as the user `nobody` (so file permissions apply to it), in a fresh interpreter that
    imports every command module while it is still root (nobody cannot read root's files), then drops
    its privileges. A fresh process, not a fork of this one: a fork of a process with threads (ONNX
    Runtime's pools, tqdm's monitor) can inherit a lock held by another thread and hang."""
    code = (
        "import os, sys, traceback\n"
        "import tqdm, tqdm.auto  # imported by the commands on first use\n"
        "from raresift.cli import build_parser, main\n"
        "from raresift import project, labelling  # noqa: F401\n"
        "build_parser()\n"
        "os.setgid(65534)\n"
        "os.setuid(65534)\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, *[str(a) for a in argv]], capture_output=True, text=True,
                          timeout=300)
    return done.returncode, done.stderr


@pytest.fixture
def shared_tmp():
    d = Path(tempfile.mkdtemp(prefix="raresift-perm-", dir="/tmp"))
    os.chmod(d, 0o777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_images_folder_not_readable(shared_tmp):
    images = shared_tmp / "images"
    make_collection(images, n=3, n_rare=1, seed=1)
    os.chmod(images, 0)
    if os.geteuid() == 0:
        rc, err = _run_as_nobody(["init", str(shared_tmp / "p"), "--images", str(images)])
    else:
        rc, _, err = run("init", shared_tmp / "p", "--images", images)
    assert_refused((rc, "", err), "not readable")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to switch users")
def test_unreadable_file_is_recorded_and_skipped(shared_tmp):
    images = shared_tmp / "images"
    make_collection(images, n=4, n_rare=1, seed=1)
    for d in images.rglob("*"):
        os.chmod(d, 0o755 if d.is_dir() else 0o644)
    os.chmod(images, 0o755)
    locked = images / "a" / "img_0001.jpg"
    os.chmod(locked, 0)
    rc, err = _run_as_nobody(["init", str(shared_tmp / "p"), "--images", str(images)])
    assert rc == 0 and "Traceback" not in err, err
    from raresift import Project

    with Project.open(shared_tmp / "p") as p:
        errors = p.errors()
        assert [e["path"] for e in errors] == ["a/img_0001.jpg"]
        assert "Permission denied" in errors[0]["reason"]
        assert p.status()["images"] == 4


@pytest.mark.parametrize("command", ["status", "errors", "embed", "add"])
def test_folder_that_is_not_a_project(tmp_path, command):
    folder = tmp_path / "notaproject"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    before = tree_digest(folder)
    assert_refused(run(command, folder), "not a raresift project")
    assert tree_digest(folder) == before
    assert not (folder / "raresift.sqlite").exists()


def test_project_path_that_does_not_exist(tmp_path):
    assert_refused(run("status", tmp_path / "nope"), "not a raresift project")
    assert not (tmp_path / "nope").exists()


def test_project_path_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    assert_refused(run("status", f), "not a raresift project")
    assert f.read_text() == "x"


def test_garbage_database_file(tmp_path):
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "raresift.sqlite").write_bytes(np.random.default_rng(0).bytes(8192))
    before = tree_digest(folder)
    assert_refused(run("status", folder), "not a readable raresift database")
    assert tree_digest(folder) == before


def test_init_into_a_folder_with_other_files(tmp_path, registered_template):
    _, images, _ = registered_template
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("precious")
    assert_refused(run("init", folder, "--images", images), "not empty")
    assert sorted(os.listdir(folder)) == ["thesis.tex"]


def test_init_existing_project_with_other_images(project, tmp_path):
    proj, _ = project
    other = tmp_path / "other"
    make_collection(other, n=2, n_rare=1)
    before = tree_digest(proj)
    assert_refused(run("init", proj, "--images", other), "already holds a project")
    assert tree_digest(proj) == before


# ------------------------------------------------------------------ schema from a newer raresift
@pytest.mark.parametrize("command", [["status"], ["embed", "--no-progress"], ["add"], ["errors"],
                                     ["import-labels", "LABELS"]])
def test_schema_from_newer_version_refused_untouched(project, tmp_path, command):
    proj, ids = project
    conn = sqlite3.connect(proj / "raresift.sqlite")
    conn.execute("INSERT INTO schema_migrations (version, description, applied_at) VALUES (99, 'future', 0)")
    conn.commit()
    conn.close()
    labels = tmp_path / "labels.csv"
    labels.write_text(f"path,label\n{ids[0]},1\n")
    before = tree_digest(proj)
    argv = [labels if a == "LABELS" else a for a in command]
    line = assert_refused(run(argv[0], proj, *argv[1:]), "schema version 99", "upgrade raresift")
    assert "not changed" in line
    assert tree_digest(proj) == before


# ------------------------------------------------------------------ labels CSV
def _csv(tmp_path: Path, text: str | bytes, name: str = "labels.csv") -> Path:
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


BAD_CSVS = {
    "missing label column": ("path\n{0}\n", "header must have columns"),
    "missing path column": ("label\n1\n", "header must have columns"),
    "other column names": ("file,class\n{0},1\n", "header must have columns"),
    "unknown id": ("path,label\n{0},1\nno/such/photo.jpg,0\n", "line 3"),
    "label 2": ("path,label\n{0},2\n", "line 2"),
    "label yes": ("path,label\n{0},yes\n", "label must be 1, 0 or unsure"),
    "label empty": ("path,label\n{0},\n", "label must be 1, 0 or unsure"),
    "label -1": ("path,label\n{0},-1\n", "label must be 1, 0 or unsure"),
    "label 1.0": ("path,label\n{0},1.0\n", "label must be 1, 0 or unsure"),
    "label true": ("path,label\n{0},true\n", "label must be 1, 0 or unsure"),
    "conflicting duplicate rows": ("path,label\n{0},1\n{1},0\n{0},0\n", "line 4"),
    "too few columns": ("path,label\n{0}\n", "line 2"),
    "empty file": ("", "empty"),
    "header only, BOM and CRLF, then a bad line": ("\ufeffpath,label\r\n{0},1\r\n{1},x\r\n", "line 3"),
}


@pytest.mark.parametrize("case", list(BAD_CSVS))
def test_bad_labels_csv_imports_nothing(project, tmp_path, case):
    proj, ids = project
    good = _csv(tmp_path, f"path,label\n{ids[5]},1\n", "good.csv")
    assert run("import-labels", proj, good)[0] == 0
    template, needle = BAD_CSVS[case]
    bad = _csv(tmp_path, template.format(ids[0], ids[1]))
    before = n_labels(proj)
    assert_refused(run("import-labels", proj, bad), needle)
    assert n_labels(proj) == before == 1, "nothing half-imported, the earlier label kept"


def test_labels_csv_not_utf8(project, tmp_path):
    proj, ids = project
    assert_refused(run("import-labels", proj, _csv(tmp_path, b"path,label\ncaf\xe9.jpg,1\n")), "UTF-8")
    assert n_labels(proj) == 0


def test_labels_csv_random_bytes(project, tmp_path):
    proj, _ = project
    data = b"\xff\xfe" + np.random.default_rng(1).bytes(3000)
    assert_refused(run("import-labels", proj, _csv(tmp_path, data)))
    assert n_labels(proj) == 0


def test_labels_csv_missing_file_and_folder(project, tmp_path):
    proj, _ = project
    assert_refused(run("import-labels", proj, tmp_path / "nope.csv"), "does not exist")
    (tmp_path / "dir.csv").mkdir()
    assert_refused(run("import-labels", proj, tmp_path / "dir.csv"))


def test_labels_csv_huge_field(project, tmp_path):
    """A line longer than the csv module's field limit (e.g. a binary file renamed .csv)."""
    proj, ids = project
    assert_refused(run("import-labels", proj, _csv(tmp_path, "path,label\n" + "x" * 300_000 + ",1\n")))
    assert n_labels(proj) == 0


GOOD_CSVS = {
    "BOM": "\ufeffpath,label\n{0},1\n{1},0\n",
    "CRLF": "path,label\r\n{0},1\r\n{1},0\r\n",
    "BOM and CRLF": "\ufeffpath,label\r\n{0},1\r\n{1},0\r\n",
    "duplicate rows, same label": "path,label\n{0},1\n{1},0\n{0},1\n",
    "columns swapped, extra column, upper-case header": "LABEL,Note,PATH\n1,x,{0}\n0,y,{1}\n",
    "blank lines and spaces": "path,label\n\n {0} , 1 \n\n{1},0\n\n",
    "quoted fields": 'path,label\n"{0}","1"\n"{1}","0"\n',
    "no final newline": "path,label\n{0},1\n{1},0",
}


@pytest.mark.parametrize("case", list(GOOD_CSVS))
def test_odd_but_valid_labels_csv(project, tmp_path, case):
    proj, ids = project
    rc, _, err = run("import-labels", proj, _csv(tmp_path, GOOD_CSVS[case].format(ids[0], ids[1])))
    assert rc == 0, err
    from raresift import Project

    with Project.open(proj) as p:
        assert p.labels() == {ids[0]: 1, ids[1]: 0}


def test_labels_csv_with_non_utf8_image_id(project, tmp_path):
    proj, ids = project
    odd = next(i for i in ids if "\\x" in i)
    rc, _, err = run("import-labels", proj, _csv(tmp_path, f"path,label\n{odd},1\n"))
    assert rc == 0, err
    from raresift import Project

    with Project.open(proj) as p:
        assert p.labels() == {odd: 1}


def test_reimport_keeps_every_label_event(project, tmp_path):
    """Importing a CSV that changes a label adds an event; the old one stays in the history."""
    proj, ids = project
    assert run("import-labels", proj, _csv(tmp_path, f"path,label\n{ids[0]},1\n", "a.csv"))[0] == 0
    assert run("import-labels", proj, _csv(tmp_path, f"path,label\n{ids[0]},0\n", "b.csv"), "--who", "bob")[0] == 0
    conn = sqlite3.connect(proj / "raresift.sqlite")
    values = [r[0] for r in conn.execute("SELECT value FROM labels ORDER BY id")]
    conn.close()
    assert values == [1, 0]


# ------------------------------------------------------------------ bring-your-own vectors
def _vectors(tmp_path: Path, matrix, ids_text: str | bytes) -> tuple[Path, Path]:
    npy, txt = tmp_path / "emb.npy", tmp_path / "ids.txt"
    if isinstance(matrix, bytes):
        npy.write_bytes(matrix)
    else:
        np.save(npy, matrix, allow_pickle=True)
    txt.write_bytes(ids_text if isinstance(ids_text, bytes) else ids_text.encode())
    return npy, txt


_M = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
_IDS = "".join(f"s3://bucket/img{i}.jpg\n" for i in range(5))
_NAN = _M.copy()
_NAN[2, 3] = np.nan

BAD_VECTORS = {
    "more rows than ids": (np.vstack([_M, _M[:1]]), _IDS, "6 rows"),
    "fewer rows than ids": (_M[:4], _IDS, "4 rows"),
    "not a .npy file": (b"id,x\n1,2\n", _IDS, "not a readable .npy"),
    "1-D": (_M[:, 0], _IDS, "2-D float matrix"),
    "3-D": (_M[:, :, None], _IDS, "2-D float matrix"),
    "integers": (np.arange(40).reshape(5, 8), _IDS, "2-D float matrix"),
    "NaN": (_NAN, _IDS, "NaN"),
    "pickled objects": (np.array([[{"a": 1}]] * 5, dtype=object), _IDS, "not a readable .npy"),
    "duplicate ids": (_M, _IDS.replace("img4", "img0"), "repeats line 1"),
    "blank id in the middle": (_M, _IDS.replace("s3://bucket/img2.jpg", ""), "line 3"),
    "ids not UTF-8": (_M, _IDS.encode().replace(b"img3", b"im\xe9g3"), "UTF-8"),
}


@pytest.mark.parametrize("case", list(BAD_VECTORS))
def test_bad_vectors_refused_no_half_project(tmp_path, case):
    matrix, ids_text, needle = BAD_VECTORS[case]
    npy, txt = _vectors(tmp_path, matrix, ids_text)
    assert_refused(run("init", tmp_path / "p", "--embeddings", npy, "--ids", txt), needle)
    assert not (tmp_path / "p" / "raresift.sqlite").exists(), "a refused init must leave no half-made project"


def test_vectors_options_misused(tmp_path):
    npy, txt = _vectors(tmp_path, _M, _IDS)
    assert_refused(run("init", tmp_path / "p", "--embeddings", npy), "needs --ids")
    assert_refused(run("init", tmp_path / "p", "--embeddings", tmp_path / "nope.npy", "--ids", txt), "does not exist")
    rc, _, err = run("init", tmp_path / "p", "--images", tmp_path, "--ids", txt)
    assert_refused((rc, "", err), "--ids goes with --embeddings")


def test_odd_but_valid_vectors(tmp_path):
    """float64, Fortran order, BOM and CRLF in the ids file, no final newline: accepted."""
    npy, txt = _vectors(tmp_path, np.asfortranarray(_M.astype(np.float64)),
                        ("\ufeff" + _IDS.replace("\n", "\r\n")).rstrip("\r\n"))
    rc, _, err = run("init", tmp_path / "p", "--embeddings", npy, "--ids", txt)
    assert rc == 0, err
    from raresift import Project

    with Project.open(tmp_path / "p") as p:
        ids, m = p.embeddings()
        assert ids == [f"s3://bucket/img{i}.jpg" for i in range(5)]
        assert np.allclose(m, _M)


# ------------------------------------------------------------------ options
@pytest.mark.parametrize(
    "args, needle",
    [
        (["--tiles", "9"], "--tiles"),
        (["--tiles", "-1"], "--tiles"),
        (["--batch-size", "0"], "--batch-size"),
        (["--model", "no-such-model"], "no-such-model"),
        (["--model", "/nonexistent/model.onnx"], "model.onnx"),
        (["--model", "GARBAGE_ONNX"], "garbage.onnx"),
    ],
)
def test_bad_embed_options(project, tmp_path, args, needle):
    proj, _ = project
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a model")
    args = [str(garbage) if a == "GARBAGE_ONNX" else a for a in args]
    before = tree_digest(proj)
    assert_refused(run("embed", proj, "--no-progress", *args), needle)
    assert tree_digest(proj) == before or not (proj / "embeddings" / "vectors.npy").exists()


def test_bad_test_fraction(tmp_path, registered_template):
    _, images, _ = registered_template
    assert_refused(run("init", tmp_path / "p", "--images", images, "--test-fraction", "1.5"), "test-fraction")
    assert not (tmp_path / "p").exists()


def test_embed_with_other_settings_needs_reembed(embedded_project):
    proj, _, _ = embedded_project
    before = tree_digest(proj)
    assert_refused(run("embed", proj, "--tiles", "2", "--no-progress"), "--reembed")
    assert tree_digest(proj) == before


# ------------------------------------------------------------------ the real process
def test_real_process_one_line_no_traceback(tmp_path):
    """The installed entry point behaves the same: one line on stderr, exit 2."""
    folder = tmp_path / "notaproject"
    folder.mkdir()
    r = subprocess.run([sys.executable, "-m", "raresift", "embed", str(folder)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == EXIT_ERROR
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "not a raresift project" in r.stderr


# ------------------------------------------------------------------ a damaged vector file
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_vector_file_is_reported_not_padded(embedded_project, damage):
    """numpy opens a cut-short .npy in r+ mode by padding it with zeros: images marked embedded would
    silently get empty vectors. Every command must refuse in one line instead, and --reembed recovers."""
    proj, _, _ = embedded_project
    vec = proj / "embeddings" / "parts.npy"  # tiled photos, kept compact (the default)
    if damage == "truncated":
        with open(vec, "r+b") as fh:
            fh.truncate(vec.stat().st_size // 2)
    else:
        vec.write_bytes(b"\x93NUMPY garbage")
    size = vec.stat().st_size
    assert_refused(run("embed", proj, "--no-progress"), "damaged", "--reembed")
    assert vec.stat().st_size == size, "the damaged file was changed"
    assert_refused(run("next", proj), "damaged")
    rc, _, err = run("embed", proj, "--reembed", "--tiles", "0", "--no-progress")
    assert rc == 0, err
    from raresift import Project

    with Project.open(proj) as p:
        ids, m = p.embeddings()
        assert len(ids) == 40 and (np.abs(np.asarray(m, dtype=np.float32)).sum(axis=1) > 0).all()
