"""The README's examples run as written, and every command of the CLI is documented there."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from raresift.cli import build_parser

from conftest import make_collection, write_truth

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def blocks(name: str) -> str:
    m = re.search(rf"<!-- readme-test: {re.escape(name)} -->\s*```(\w+)\n(.*?)```", README, re.S)
    assert m, f"README has no block marked readme-test: {name}"
    return m.group(2)


def sh(script: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder as the README assumes it: photos/, labels.csv, then the workflow block run in it."""
    d = tmp_path_factory.mktemp("readme")
    truth = make_collection(d / "photos", n=30, n_rare=5)
    write_truth(d / "labels.csv", dict(list(truth.items())[:12]))
    done = sh(blocks("workflow"), d)
    assert done.returncode == 0, done.stderr[-3000:]
    return d


def test_workflow_block_runs(workdir):
    assert (workdir / "insects" / "raresift.sqlite").is_file()


def test_learn_block_runs(workdir):
    done = sh(blocks("learn"), workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    batch = json.loads((workdir / "batch.json").read_text())
    assert 0 < len(batch) <= 25  # a 30-photo collection has fewer than 25 unlabelled pool photos left
    assert {"path", "image_id", "score", "strategy", "round", "split"} <= set(batch[0])
    assert (workdir / "insects.csv").read_text().startswith("rank,path,score,label,split")
    done = subprocess.run([sys.executable, "-c", blocks("python-learn")], cwd=workdir, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (workdir / "top.jsonl").stat().st_size > 0


def test_concepts_block_runs(workdir):
    paths = sorted(p.relative_to(workdir / "photos").as_posix() for p in (workdir / "photos").rglob("*.jpg"))
    (workdir / "more.csv").write_text("path,label,concept\n" + f"{paths[0]},1,spiders\n{paths[1]},unsure,\n")
    done = sh(blocks("concepts") + "\nraresift concepts insects --json > concepts.json"
              "\nraresift next insects --review --json > review.json", workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    concepts = {c["concept"]: c for c in json.loads((workdir / "concepts.json").read_text())}
    assert set(concepts) == {"default", "spiders"} and concepts["spiders"]["rounds"] >= 1
    assert concepts["spiders"]["positives"] == 1
    assert [r["path"] for r in json.loads((workdir / "review.json").read_text())] == [paths[1]]


def test_python_block_runs(workdir):
    done = subprocess.run([sys.executable, "-c", blocks("python")], cwd=workdir, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "(30, 1280)" in done.stdout


def test_own_vectors_block_runs(tmp_path):
    np.save(tmp_path / "vectors.npy", np.random.default_rng(0).normal(size=(5, 16)).astype(np.float32))
    (tmp_path / "ids.txt").write_text("\n".join(f"s3://bucket/{i}.jpg" for i in range(5)) + "\n")
    done = sh(blocks("own-vectors"), tmp_path)
    assert done.returncode == 0, done.stderr


def test_two_commands_and_ci_agree():
    assert "bash .ci/run" in README
    assert ".venv/bin/raresift demo" in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest" in ci and "python -m pytest" in README


def test_every_command_is_in_the_readme():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    missing = [name for name in sub.choices if f"raresift {name}" not in README]
    assert not missing, f"commands not documented in README.md: {missing}"
