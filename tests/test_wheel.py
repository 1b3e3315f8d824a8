"""A built wheel, installed in a fresh virtual environment, runs `raresift demo` and `raresift serve`
(its templates and static files are inside the wheel)."""

from __future__ import annotations

import os
import re
import site
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_built_wheel_runs_demo_and_serve(tmp_path):
    dist = tmp_path / "dist"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(dist), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr
    (wheel,) = dist.glob("raresift-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    # The dependencies come from this environment (a path line in a .pth file: no download), raresift
    # itself only from the wheel.
    (target,) = venv.glob("lib/python*/site-packages")
    (target / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # --ignore-installed: the raresift of this environment (seen through deps.pth) is not the one to keep
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps",
                          "--ignore-installed", str(wheel)], capture_output=True, text=True, timeout=600, env=env)
    assert pip.returncode == 0, pip.stderr
    exe = venv / "bin" / "raresift"
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import raresift; print(raresift.__file__)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
    assert str(target) in where.stdout, where.stdout + where.stderr  # the wheel's copy, not the checkout
    demo = subprocess.run([str(exe), "demo", "--dir", str(tmp_path / "demo"), "--images", "40", "--no-progress"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "simulated labelling" in demo.stdout
    server = subprocess.Popen([str(exe), "serve", str(tmp_path / "demo" / "project"), "--no-browser", "--port", "0"],
                              stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        url = None
        for line in server.stderr:  # waits for the line that says where it listens
            found = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
            if found:
                url = found.group(1)
                break
        assert url, "serve printed no address"
        page = _get(url)
        assert "raresift" in page and "/static/app.js" in page
        assert "function" in _get(url + "static/app.js")
    finally:
        server.terminate()
        server.wait(timeout=60)


def _get(url: str) -> str:
    """GET with a bounded wait for the server to accept connections (it prints its address just before)."""
    import time

    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                return r.read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
