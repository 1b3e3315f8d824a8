"""Crash and resume on real photos: `raresift embed --tiles 0` on the 1,531 flower photos, SIGKILLed once
part of the work is saved, then run again (issue 6, point 1).

Prints the counts right after the kill (0 < embedded < total expected) and after the re-run (every photo
embedded, 0 errors), checks the database with ``PRAGMA integrity_check`` and checks that the vectors
saved before the kill are unchanged after the re-run (nothing finished was redone or lost).
Exit status 0 when every check holds.

    python benchmarks/kill_flowers.py                      # ../shared/datasets/flowers-daisy-dandelion
    python benchmarks/kill_flowers.py --images DIR --kill-after 400 --workdir /tmp/kf
"""

from __future__ import annotations

import argparse
import json
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FLOWERS = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "flowers-daisy-dandelion"


def raresift(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "raresift", *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        sys.exit(f"raresift {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def status(project: Path) -> dict:
    return json.loads(raresift("status", str(project), "--json").stdout)


def embedded_now(project: Path) -> int:
    conn = sqlite3.connect(f"file:{project / 'raresift.sqlite'}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute("SELECT COUNT(*) FROM images WHERE status = 'embedded'").fetchone()[0]
    finally:
        conn.close()


def integrity(project: Path) -> str:
    conn = sqlite3.connect(project / "raresift.sqlite", timeout=30)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


def embedded_rows(project: Path) -> np.ndarray:
    conn = sqlite3.connect(project / "raresift.sqlite", timeout=30)
    try:
        return np.array([r[0] - 1 for r in conn.execute("SELECT id FROM images WHERE status = 'embedded'")],
                        dtype=np.int64)
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=Path, default=FLOWERS, help="photo folder (default: the shared flowers)")
    ap.add_argument("--workdir", type=Path, default=None, help="where the project goes (default: a temp folder)")
    ap.add_argument("--kill-after", type=int, default=None, metavar="N",
                    help="SIGKILL once at least N photos are saved (default: a third of the photos)")
    args = ap.parse_args(argv)
    if not args.images.is_dir():
        print(f"skipped: {args.images} is not here", file=sys.stderr)
        return 0
    work = args.workdir or Path(tempfile.mkdtemp(prefix="raresift-kill-"))
    work.mkdir(parents=True, exist_ok=True)
    project = work / "project"
    if project.exists():
        sys.exit(f"{project} exists; pick an empty --workdir")

    t0 = time.perf_counter()
    raresift("init", str(project), "--images", str(args.images))
    total = status(project)["images"]
    kill_after = args.kill_after or max(1, total // 3)
    print(f"registered {total} photos in {time.perf_counter() - t0:.1f} s; will SIGKILL after >= {kill_after} saved")

    t1 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "raresift", "embed", str(project), "--tiles", "0", "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while proc.poll() is None and embedded_now(project) < kill_after:
        time.sleep(0.05)
    if proc.poll() is not None:
        sys.exit(f"embed finished before the kill ({proc.returncode}); use a smaller --kill-after")
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    killed_at = time.perf_counter() - t1
    after_kill = status(project)
    ok_db = integrity(project)
    saved = embedded_rows(project)
    vec = np.load(project / "embeddings" / "vectors.npy", mmap_mode="r")
    before_vectors = np.array(vec[saved, 0, :], dtype=np.float32)
    del vec
    print(f"after SIGKILL at {killed_at:.1f} s: exit {proc.returncode}, embedded {after_kill['embedded']} of "
          f"{total}, errors {after_kill['errors']}, pending {after_kill['pending']}, integrity_check {ok_db}")

    t2 = time.perf_counter()
    rerun = raresift("embed", str(project), "--tiles", "0", "--no-progress")
    final = status(project)
    vec = np.load(project / "embeddings" / "vectors.npy", mmap_mode="r")
    unchanged = bool(np.array_equal(np.array(vec[saved, 0, :], dtype=np.float32), before_vectors))
    all_rows = np.asarray(vec[:, 0, :], dtype=np.float32)
    nonzero = int((np.abs(all_rows).sum(axis=1) > 0).sum())
    print(f"after re-run ({time.perf_counter() - t2:.1f} s): embedded {final['embedded']} of {final['images']}, "
          f"errors {final['errors']}, pending {final['pending']}, integrity_check {integrity(project)}")
    print(f"  {rerun.stderr.strip().splitlines()[-1] if rerun.stderr.strip() else ''}")
    print(f"  vectors saved before the kill unchanged: {unchanged}; non-empty vector rows: {nonzero}")

    checks = {
        "0 < embedded after kill < total": 0 < after_kill["embedded"] < total,
        "all embedded after re-run": final["embedded"] == total,
        "0 errors": final["errors"] == 0,
        "integrity ok": ok_db == "ok" and integrity(project) == "ok",
        "saved vectors kept": unchanged,
        "every row has a vector": nonzero == total,
    }
    for name, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")
    print(f"project left in {project}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
