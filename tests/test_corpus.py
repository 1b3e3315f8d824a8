"""Issue 2, point 2: 40 photos plus the odd-but-valid and broken corpus through the real `raresift` command.

`init` and `embed` exit 0, every valid file ends up embedded, every broken file ends up as a
recorded error with a reason, and the peak memory of the embedding process stays under 4 GB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import make_collection
from corpus import NON_UTF8_ID, make_corpus, write_png_bomb

PEAK_RSS_LIMIT = 4 * 1024**3


def _hwm(pid: int) -> int:
    """Peak resident memory (VmHWM) of a running process, in bytes; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_measured(argv: list[str], timeout: float = 300) -> tuple[int, str, str, int]:
    """Run ``argv`` and return (exit code, stdout, stderr, peak RSS in bytes).

    The peak is the child's own high-water mark (VmHWM, reset by exec), read every 20 ms while it runs.
    Not rusage's maxrss: Linux carries the parent's size at fork into the child's maxrss, so a big test
    process would be counted in.
    """
    import threading

    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out: dict[str, bytes] = {}
    readers = [threading.Thread(target=lambda k=k, f=f: out.__setitem__(k, f.read()))
               for k, f in (("out", proc.stdout), ("err", proc.stderr))]
    for t in readers:
        t.start()
    peak, end = 0, time.monotonic() + timeout
    while proc.poll() is None:
        peak = max(peak, _hwm(proc.pid))
        if time.monotonic() > end:
            proc.kill()
        time.sleep(0.02)
    for t in readers:
        t.join()
    return proc.returncode, out["out"].decode(), out["err"].decode(), peak


def run_cli(*args: str, timeout: float = 300) -> tuple[int, str, str, int]:
    """Run `python -m raresift ARGS`; see :func:`run_measured`."""
    return run_measured([sys.executable, "-m", "raresift", *args], timeout)


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


@pytest.mark.timeout(300)
def test_near_limit_png_decodes_in_bounded_memory(tmp_path):
    """A valid RGBA PNG just under the pixel limit (120 megapixels, 2 MB on disk) is not refused as a bomb;
    decoding it must not cost gigabytes per decoding thread (it peaked near 3 GB before it was reduced first)."""
    big = tmp_path / "big.png"
    Image.new("RGBA", (10950, 10950), (10, 20, 30, 128)).save(big, compress_level=1)
    code = (
        "import sys, resource\n"
        "from raresift.embed.decode import load_views, Views\n"
        "a = load_views(sys.argv[1], Views(size=224, tiles=3, resize='crop'))\n"
        "assert a.shape == (10, 224, 224, 3)\n"
    )
    rc, _, err, peak = run_measured([sys.executable, "-c", code, str(big)])
    assert rc == 0, err
    assert peak > 100e6, "the measurement saw the child"
    assert peak < 1.5e9, f"decoding a 120-megapixel PNG peaked at {peak / 1e9:.2f} GB"
    print(f"\nRELIABILITY 120-megapixel RGBA PNG: decoded with a peak of {peak / 1e6:.0f} MB")
