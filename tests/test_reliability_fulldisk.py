"""A full disk during `raresift embed`: a clean stop (one line, non-zero exit, no crash), then a resumable run.

The project lives on a small tmpfs mounted for the test (needs root; skipped where mounting is not
permitted); a filler file leaves a chosen amount of free space.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import make_collection

N_PHOTOS = 60
FS_SIZE = 2 * 1024 * 1024


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raresift", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small file system needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={FS_SIZE}", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    images = tmp_path_factory.mktemp("fulldisk") / "images"
    make_collection(images, n=N_PHOTOS, n_rare=3, seed=21)
    return images


def fill(mnt: Path, leave: int) -> Path:
    """Write a filler file so that about ``leave`` bytes stay free."""
    st = os.statvfs(mnt)
    free = st.f_bavail * st.f_frsize
    filler = mnt / "filler"
    with open(filler, "wb") as fh:
        fh.write(b"\0" * max(0, free - leave))
    return filler


def assert_consistent(project: Path) -> dict[str, int]:
    conn = sqlite3.connect(project / "raresift.sqlite", timeout=30)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        counts = dict(conn.execute("SELECT status, COUNT(*) FROM images GROUP BY status").fetchall())
        ids = [r[0] - 1 for r in conn.execute("SELECT id FROM images WHERE status = 'embedded'")]
    finally:
        conn.close()
    assert counts.get("error", 0) == 0, "a full disk must not be blamed on the photos"
    if ids:
        vec = np.load(project / "embeddings" / "vectors.npy", mmap_mode="r")
        assert (np.abs(np.asarray(vec[ids, 0, :], dtype=np.float32)).sum(axis=1) > 0).all()
    return counts


# Free space left for the run: too little for the vector file; enough for the vector files, then the
# database fills after 1 or 3 saved batches.
@pytest.mark.parametrize("leave_kb", [40, 340, 360])
@pytest.mark.timeout(300)
def test_embed_on_full_disk_stops_cleanly_and_resumes(small_fs, photos, leave_kb):
    project = small_fs / "project"
    r = cli("init", str(project), "--images", str(photos))
    assert r.returncode == 0, r.stderr
    filler = fill(small_fs, leave_kb * 1024)

    r = cli("embed", str(project), "--tiles", "0", "--batch-size", "8", "--no-progress")
    assert r.returncode in (0, 2), f"exit {r.returncode} (a crash, e.g. SIGBUS = -7 / 135): {r.stderr}"
    assert "Traceback" not in r.stderr
    full = r.returncode != 0
    if full:
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, r.stderr
        assert "No space left on device" in lines[0] or "disk is full" in lines[0], lines[0]
        assert "run the command again" in lines[0]
    before = assert_consistent(project)
    print(f"\nRELIABILITY full disk, {leave_kb} KB free: exit {r.returncode}, "
          f"{before.get('embedded', 0)} embedded before the stop; {r.stderr.strip().splitlines()[-1]}")

    filler.unlink()
    r = cli("embed", str(project), "--tiles", "0", "--batch-size", "8", "--no-progress")
    assert r.returncode == 0, r.stderr
    counts = assert_consistent(project)
    assert counts == {"embedded": N_PHOTOS}
    if leave_kb == 40:
        assert full, "40 KB free cannot hold the vector file: the first run must have stopped"


def test_status_on_full_disk_still_reads(small_fs, photos):
    """Reading a project on a full disk works (or fails in one line): nothing is damaged."""
    project = small_fs / "project"
    assert cli("init", str(project), "--images", str(photos)).returncode == 0
    fill(small_fs, 0)
    r = cli("status", str(project), "--json")
    assert "Traceback" not in r.stderr
    assert r.returncode in (0, 2)
    if r.returncode:
        assert len(r.stderr.strip().splitlines()) == 1
    (small_fs / "filler").unlink()
    r = cli("status", str(project), "--json")
    assert r.returncode == 0, r.stderr
    assert f'"images": {N_PHOTOS}' in r.stdout


@pytest.mark.timeout(300)
def test_labels_on_full_disk_are_refused_never_falsely_acknowledged(small_fs, tmp_path):
    """`serve` on a full disk: a label that cannot be stored gets an error reply (never a 200), the server
    stays up, and once space is freed labels are stored again. Every acknowledged label is in the store."""
    import json

    from raresift import Project
    from test_reliability_web import Server, label_body, stored_events

    np.save(tmp_path / "emb.npy", np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32))
    (tmp_path / "ids.txt").write_text("".join(f"id{i}\n" for i in range(50)))
    project = small_fs / "project"
    with Project.create(project) as p:
        p.import_embeddings(tmp_path / "emb.npy", tmp_path / "ids.txt")
    server = Server(project)
    try:
        acked, refused = [], []
        c = server.conn()
        for i in range(1, 11):
            status, body = server.request("POST", "/api/labels", label_body(i, i % 2, "dana"), conn=c)
            assert status == 200, body
            acked += json.loads(body)["events"]
        # A reader holds a snapshot meanwhile (as a round computing beside the page would), so SQLite cannot
        # rewind its write-ahead log into space it already has: every commit must grow the file. Without
        # it, whether a commit finds reusable log space depends on when the server closed its previous
        # connection (the check below then saw no refusal when replies came fast).
        reader = sqlite3.connect(project / "raresift.sqlite", timeout=30)
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM labels").fetchone()
        filler = fill(small_fs, 0)
        for i in range(11, 31):
            status, body = server.request("POST", "/api/labels", label_body(i, i % 2, "dana"), conn=c)
            if status == 200:
                acked += json.loads(body)["events"]
            else:
                refused.append(status)
                err = json.loads(body)["error"]
                assert status == 503 and err["code"] == "disk_full", (status, err)  # not "database busy"
                assert "disk holding the project is full" in err["message"], err
        reader.rollback()
        reader.close()
        assert refused, "a full disk must refuse some labels"
        filler.unlink()
        for i in range(31, 41):
            status, body = server.request("POST", "/api/labels", label_body(i, i % 2, "dana"), conn=c)
            assert status == 200, body
            acked += json.loads(body)["events"]
        c.close()
    finally:
        server.stop()
    stored = stored_events(project)
    for ev in acked:
        assert stored[ev["id"]] == (ev["image_id"], ev["value"], "dana")
    print(f"\nRELIABILITY full disk while labelling: {len(acked)} acknowledged and stored, "
          f"{len(refused)} refused with {sorted(set(refused))}")
