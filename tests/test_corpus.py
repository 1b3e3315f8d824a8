"""Issue 2, point 2: 40 photos plus the odd-but-valid and broken corpus through the real `raresift` command.

`init` and `embed` exit 0, every valid file ends up embedded, every broken file ends up as a
recorded error with a reason, and the peak memory of the embedding process stays under 4 GB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import make_collection
from corpus import NON_UTF8_ID, make_corpus, write_png_bomb

PEAK_RSS_LIMIT = 4 * 1024**3


def run_cli(*args: str, timeout: float = 300) -> tuple[int, str, str, int]:
    """Run `python -m raresift ARGS` and return (exit code, stdout, stderr, peak RSS in bytes).

    The peak comes from wait4()'s rusage of that one child, so other processes do not count.
    """
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "raresift", *args], stdout=out_w, stderr=err_w)
    os.close(out_w)
    os.close(err_w)
    import threading

    chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}

    def drain(fd: int) -> None:
        while data := os.read(fd, 65536):
            chunks[fd].append(data)
        os.close(fd)

    threads = [threading.Thread(target=drain, args=(fd,)) for fd in (out_r, err_r)]
    for t in threads:
        t.start()
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    for t in threads:
        t.join()
    peak = usage.ru_maxrss * 1024  # kilobytes on Linux
    return (proc.returncode, b"".join(chunks[out_r]).decode(), b"".join(chunks[err_r]).decode(), peak)


def test_png_bomb_is_a_real_png(tmp_path):
    """The generator writes a valid PNG: a small one decodes to the stated size, all black."""
    p = tmp_path / "small_bomb.png"
    write_png_bomb(p, side=300)
    with Image.open(p) as im:
        im.load()
        assert im.size == (300, 300)
        assert im.getextrema() == (0, 0)


@pytest.mark.timeout(600)
def test_corpus_init_embed_status(tmp_path):
    images = tmp_path / "images"
    photos = {f"photos/{k}": v for k, v in make_collection(images / "photos", n=40, n_rare=6, seed=3).items()}
    corpus = make_corpus(images)
    assert os.path.getsize(images / "broken" / "bomb.png") < 1_000_000  # small on disk
    project = tmp_path / "project"

    rc, _, err, _ = run_cli("init", str(project), "--images", str(images))
    assert rc == 0, err
    assert "Traceback" not in err

    rc, _, err, peak = run_cli("embed", str(project), "--no-progress")  # the defaults, as a user runs it
    assert rc == 0, err
    assert "Traceback" not in err
    assert peak < PEAK_RSS_LIMIT, f"peak RSS of `raresift embed` was {peak / 1e9:.2f} GB"
    print(f"\nRELIABILITY corpus: {len(corpus.valid)} odd-but-valid + {len(corpus.broken)} broken files + "
          f"{len(photos)} photos; peak RSS of embed {peak / 1e6:.0f} MB")

    rc, out, err, _ = run_cli("status", str(project), "--json")
    assert rc == 0, err
    status = json.loads(out)
    n_valid = len(photos) + len(corpus.valid)
    assert status["images"] == n_valid + len(corpus.broken)
    assert status["embedded"] == n_valid
    assert status["errors"] == len(corpus.broken)
    assert status["pending"] == 0
    assert status["duplicates"] >= 1  # duplicate_a / duplicate_b share their bytes

    rc, out, err, _ = run_cli("errors", str(project), "--json")
    assert rc == 0, err
    errors = {e["path"]: e for e in json.loads(out)}
    assert set(errors) == set(corpus.broken), "every broken file, and only those, is an error"
    for path, e in errors.items():
        assert e["reason"].strip(), f"{path} has no reason"
        assert "\n" not in e["reason"]
    assert "megapixels" in errors["broken/bomb.png"]["reason"]
    assert "symbolic link" in errors["broken/dangling_link.jpg"]["reason"]
    assert "0 bytes" in errors["broken/empty.jpg"]["reason"]
    assert "HTML" in errors["broken/page.png"]["reason"]

    # The valid files are embedded with real, distinct vectors (not zero rows), the non-UTF-8 name included.
    from raresift import Project

    with Project.open(project) as p:
        ids, matrix = p.embeddings()
        assert set(ids) == set(photos) | set(corpus.valid)
        assert f"odd/{NON_UTF8_ID}" in ids
        m = np.asarray(matrix, dtype=np.float32)
        assert np.isfinite(m).all()
        assert (np.abs(m).sum(axis=1) > 0).all(), "an embedded row is all zeros"
        row = {k: i for i, k in enumerate(ids)}
        a, b = m[row["odd/duplicate_a.jpg"]], m[row["odd/duplicate_b.jpg"]]
        assert np.allclose(a, b), "same bytes, same vector"
        assert not np.allclose(m[row["odd/cmyk.jpg"]], m[row["odd/grey.jpg"]])

    # Re-running embed is a no-op that still exits 0 (errors are not retried forever, nothing re-done).
    rc, _, err, _ = run_cli("embed", str(project), "--no-progress")
    assert rc == 0, err
    assert "embedded 0 photos" in err
