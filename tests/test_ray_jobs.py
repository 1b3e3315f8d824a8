"""Ray Data jobs over a project's vectors (`next --engine ray`, `index --engine ray`) on a local Ray cluster of
three nodes: the same scores, picks and index as the local engine."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from raresift import Project
from raresift.cli import main
from raresift.index import build_index
from raresift.learn.features import VectorFeatures

ray = pytest.importorskip("ray")
pytest.importorskip("faiss")

pytestmark = pytest.mark.ray
STORE = 80 * 1024 * 1024


@pytest.fixture(scope="module")
def cluster():
    """A head and two worker nodes, one CPU each: every job's shards spread over separate raylets."""
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": STORE})
    for _ in range(2):
        nodes.add_node(num_cpus=1, object_store_memory=STORE)
    nodes.wait_for_nodes()
    ray.init(address=nodes.address, log_to_driver=False, configure_logging=False)
    yield nodes
    ray.shutdown()
    nodes.shutdown()


@pytest.fixture
def small_shards(monkeypatch):
    import raresift.ray_jobs as jobs

    monkeypatch.setattr(jobs, "SHARD_ROWS", 700)  # several shards per job


def _imported(tmp_path, n=3000, dim=32, seed=0):
    """A project of ``n`` imported vectors with a planted rare class, and its labels (200 of them)."""
    rng = np.random.default_rng(seed)
    x = np.abs(rng.normal(size=(n, dim))).astype(np.float32)
    rare = rng.choice(n, size=60, replace=False)
    x[rare] += 2.5 * np.abs(rng.normal(size=dim)).astype(np.float32)
    np.save(tmp_path / "v.npy", x.astype(np.float16))
    (tmp_path / "ids.txt").write_text("".join(f"img/{i:05d}.jpg\n" for i in range(n)))
    with Project.create(tmp_path / "local") as p:
        p.import_embeddings(tmp_path / "v.npy", tmp_path / "ids.txt")
        labelled = rng.choice(n, size=200, replace=False)
        p.label([(f"img/{i:05d}.jpg", int(i in set(rare.tolist()))) for i in labelled] +
                [(f"img/{i:05d}.jpg", 1) for i in rare[:5]])
    shutil.copytree(tmp_path / "local", tmp_path / "ray")
    return tmp_path / "local", tmp_path / "ray"


def test_cluster_has_three_nodes(cluster):
    assert sum(1 for node in ray.nodes() if node["Alive"]) == 3


def test_scores_on_ray_equal_local_scores(tmp_path, cluster, small_shards):
    from raresift.ray_jobs import score_on_ray

    rng = np.random.default_rng(1)
    tiled = rng.normal(size=(2500, 10, 24)).astype(np.float16)  # whole photo + 3 x 3 tiles
    np.save(tmp_path / "tiled.npy", tiled)
    coef = rng.normal(size=3 * 24).astype(np.float32)
    local = VectorFeatures(np.load(tmp_path / "tiled.npy", mmap_mode="r")).linear(coef, 0.25)
    remote = score_on_ray(tmp_path / "tiled.npy", coef, 0.25, pooling="whole+mean+max", rows=2500)
    np.testing.assert_allclose(remote, local, rtol=0, atol=1e-5)
    assert np.array_equal(np.argsort(-remote, kind="stable")[:100], np.argsort(-local, kind="stable")[:100])


def test_next_on_ray_picks_what_local_next_picks(tmp_path, cluster, small_shards, capsys):
    local, remote = _imported(tmp_path)
    for project, extra in ((local, []), (remote, ["--engine", "ray"])):
        assert main(["next", str(project), "--n", "40", "--pool", "full", "--seed", "5", "--json", *extra]) == 0
        picks = json.loads(capsys.readouterr().out)
        if project == local:
            want = picks
    assert [p["image_id"] for p in picks] == [p["image_id"] for p in want]
    assert [p["strategy"] for p in picks] == [p["strategy"] for p in want]
    np.testing.assert_allclose([p["score"] for p in picks], [p["score"] for p in want], atol=1e-5)
    # The evaluation round ranks the whole test split: a full scan too.
    for project, extra in ((local, []), (remote, ["--engine", "ray"])):
        assert main(["next", str(project), "--evaluate", "--n", "30", "--seed", "6", "--json", *extra]) == 0
        picks = json.loads(capsys.readouterr().out)
        if project == local:
            want = picks
    assert [p["image_id"] for p in picks] == [p["image_id"] for p in want]


def test_next_on_ray_with_a_relative_project_path(tmp_path, cluster, small_shards, capsys, monkeypatch):
    """Workers start in their own folders: the driver hands them the vector file's absolute path."""
    local, remote = _imported(tmp_path)
    monkeypatch.chdir(tmp_path)
    for project, extra in (("local", []), ("ray", ["--engine", "ray"])):
        assert main(["next", project, "--n", "10", "--pool", "full", "--seed", "2", "--json", *extra]) == 0
        picks = [p["image_id"] for p in json.loads(capsys.readouterr().out)]
        if project == "local":
            want = picks
    assert picks == want


@pytest.mark.parametrize("layout", ["views", "compact"])
def test_next_on_ray_scores_tiled_photos_as_local_next_does(request, tmp_path, cluster, capsys, monkeypatch, layout):
    """Tiled photos at knn scale: kept as every view, rounds train on the float16 features written once and a
    full scan on Ray scores those same features; kept compact, Ray featurises the parts as the local engine
    does. Either way it picks what a local full scan picks."""
    from raresift import settings
    from raresift.learn.loop import prepare_scoring

    project, _, truth = request.getfixturevalue("embedded_views_project" if layout == "views" else "embedded_project")
    monkeypatch.setitem(settings.SETTINGS, "pool_auto_min", settings.Setting("pool_auto_min", 300, "test"))
    with Project.open(project) as p:
        assert p.store.layout == layout
        prepare_scoring(p.store)
        assert bool(list(p.store.paths.embed_dir.glob("pooled-*.npy"))) == (layout == "views")
        p.label([(path, v) for path, v in sorted(truth.items())[:14]] + [(path, 1) for path, v in truth.items() if v][:2])
    shutil.copytree(project, tmp_path / "copy")
    for folder, extra in ((project, []), (tmp_path / "copy", ["--engine", "ray"])):
        assert main(["next", str(folder), "--n", "8", "--pool", "full", "--seed", "4", "--json", *extra]) == 0
        picks = json.loads(capsys.readouterr().out)
        if folder == project:
            want = picks
    assert [p["image_id"] for p in picks] == [p["image_id"] for p in want]
    np.testing.assert_allclose([p["score"] for p in picks], [p["score"] for p in want], atol=1e-5)


@pytest.mark.parametrize("kind", ["ivf-sq8", "ivf-pq"])
def test_index_built_on_ray_equals_the_local_build(tmp_path, cluster, small_shards, kind):
    local, _ = _imported(tmp_path)
    with Project.open(local) as p:
        vectors = p.vectors()
        rows = np.flatnonzero(p.embedded_mask())
        # Rows that start past 0 and skip a whole shard of 700 ([1400, 2100)): those shards get no task.
        rows = np.concatenate([rows[800:1400], rows[2100:]])
        here = build_index(vectors, rows, kind=kind, nlist=24, nprobe=6)
        there = build_index(vectors, rows, kind=kind, nlist=24, nprobe=6, engine="ray")
    assert (there.kind, there.size) == (here.kind, here.size) == (kind, 1500)
    queries = np.asarray(vectors[::37, 0, :], dtype=np.float32)
    s1, r1 = here.search(queries, 20)
    s2, r2 = there.search(queries, 20)
    assert np.array_equal(r1, r2) and np.array_equal(s1, s2)


def test_ray_built_fast_scan_index_with_whole_blocks_per_shard(tmp_path, cluster, monkeypatch):
    """4-bit codes (128 sub-quantisers) in one cell, shards of 2,048 rows: FAISS's fast-scan merge_from
    corrupted memory at such list lengths, so the parts are merged as plain IVF-PQ and converted after."""
    import faiss

    import raresift.ray_jobs as jobs

    monkeypatch.setattr(jobs, "SHARD_ROWS", 2048)
    local, _ = _imported(tmp_path, n=3 * 2048 + 100, dim=128)
    with Project.open(local) as p:
        vectors = p.vectors()
        here = build_index(vectors, kind="ivf-pq", nlist=1, nprobe=1)
        there = build_index(vectors, kind="ivf-pq", nlist=1, nprobe=1, engine="ray")
    for built in (here, there):
        assert isinstance(faiss.downcast_index(built._faiss()), faiss.IndexIVFPQFastScan)
    assert there.size == here.size == 3 * 2048 + 100
    queries = np.asarray(vectors[::97, 0, :], dtype=np.float32)
    s1, r1 = here.search(queries, 20)
    s2, r2 = there.search(queries, 20)
    assert np.array_equal(r1, r2) and np.array_equal(s1, s2)


def test_index_command_on_a_ray_cluster_by_address(tmp_path, cluster, small_shards):
    _, remote = _imported(tmp_path)
    done = subprocess.run([sys.executable, "-m", "raresift", "index", str(remote), "--engine", "ray",
                           "--ray-address", cluster.address, "--kind", "ivf-sq8", "--json"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["kind"], report["photos"], report["built"]) == ("ivf-sq8", 3000, True)
    assert main(["index", str(remote), "--json"]) == 0  # current: reported, not rebuilt
    with Project.open(remote) as p:
        assert p.store.paths.index.stat().st_size == report["bytes"]


def test_engine_ray_without_ray_installed_is_one_clear_error(tmp_path, monkeypatch, capsys):
    local, _ = _imported(tmp_path)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if `raresift[ray]` were not installed
    assert main(["next", str(local), "--pool", "full", "--engine", "ray"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "raresift[ray]" in err[0]
