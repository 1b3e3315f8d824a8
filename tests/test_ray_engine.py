"""`raresift embed --engine ray` on a local Ray: same vectors, same store, same error records as local."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import make_collection

from raresift import Project
from raresift.cli import main
from raresift.embed.ray_engine import plan_actors

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(
        num_cpus=2,
        object_store_memory=80 * 1024 * 1024,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    yield
    ray.shutdown()


def test_plan_actors_cpu_and_gpu():
    assert plan_actors({"CPU": 2.0}, [2.0], None) == {"actors": 1, "num_gpus": 0, "num_cpus": 2, "threads": 2}
    # Four 16-core nodes: actors of 4 threads, 16 of them.
    cpu = plan_actors({"CPU": 64.0}, [16.0] * 4, None)
    assert (cpu["actors"], cpu["num_cpus"]) == (16, 4)
    assert plan_actors({"CPU": 64.0}, [16.0] * 4, 8)["actors"] == 8
    # Two nodes with 4 GPUs and 32 CPUs each: one actor per GPU, 8 decode CPUs each.
    gpu = plan_actors({"CPU": 64.0, "GPU": 8.0}, [32.0, 32.0], None)
    assert gpu == {"actors": 8, "num_gpus": 1, "num_cpus": 8, "threads": 8}


@pytest.mark.ray
def test_ray_engine_equals_local_engine(tmp_path, local_ray):
    images = tmp_path / "images"
    make_collection(images, n=200, n_rare=10, seed=3)
    (images / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (images / "b" / "empty.png").write_bytes(b"")
    with Project.create(tmp_path / "local", images=images) as p:
        p.add_images()
    shutil.copytree(tmp_path / "local", tmp_path / "ray")

    with Project.open(tmp_path / "local") as p:
        report = p.embed(batch_size=32, tiles=0)
        assert (report.embedded, report.errors) == (200, 2)
        local = np.asarray(p.vectors(), dtype=np.float32)
        local_logits = np.asarray(p.logits(), dtype=np.float32)
        local_status = p.status()

    argv = ["embed", str(tmp_path / "ray"), "--engine", "ray", "--tiles", "0", "--batch-size", "32", "--no-progress"]
    assert main(argv) == 0
    with Project.open(tmp_path / "ray") as p:
        assert p.embedding_info()["model"] == "efficientnet-lite2"  # the default model
        remote = np.asarray(p.vectors(), dtype=np.float32)
        remote_logits = np.asarray(p.logits(), dtype=np.float32)
        status = p.status()
    assert {k: status[k] for k in ("embedded", "pending", "errors")} == {
        k: local_status[k] for k in ("embedded", "pending", "errors")
    }
    assert (status["embedded"], status["errors"]) == (200, 2)
    assert remote.shape == local.shape
    ok = np.abs(local[:, 0]).sum(axis=1) > 0
    assert ok.sum() == 200
    a, b = local[ok, 0], remote[ok, 0]
    cos = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() >= 0.99999, cos.min()  # the same graph and the same model-call chunks: the same vectors
    np.testing.assert_allclose(remote_logits[ok], local_logits[ok], atol=0.05)


@pytest.mark.ray
def test_ray_engine_with_tiles_records_decode_errors_and_resumes(tmp_path, local_ray):
    images = tmp_path / "images"
    make_collection(images, n=12, n_rare=2, seed=4)
    with Project.create(tmp_path / "p", images=images) as p:
        p.add_images()
    shutil.copytree(tmp_path / "p", tmp_path / "local")
    # Damaged after registration (registration hashes, it does not decode).
    (images / "a" / "img_0001.jpg").write_bytes(b"\xff\xd8\xff\xe0 garbage")
    with Project.open(tmp_path / "p") as p:
        first = p.embed(engine="ray", tiles=2, limit=5, batch_size=4)
        assert first.embedded + first.errors == 5 and first.remaining == 7
        second = p.embed(engine="ray", tiles=2, batch_size=4)
        assert first.embedded + second.embedded == 11
        assert first.errors + second.errors == 1
        errors = p.errors()
        remote = np.asarray(p.vectors(), dtype=np.float32)
    assert [e["path"] for e in errors if e["stage"] == "embed"] == ["a/img_0001.jpg"]
    with Project.open(tmp_path / "local") as p:
        p.embed(tiles=2, batch_size=4)
        local = np.asarray(p.vectors(), dtype=np.float32)
    assert remote.shape == local.shape == (12, 3, 1280)  # 2 x 2 tiles kept compact: whole, tile mean, tile max
    ok = np.abs(local).sum(axis=(1, 2)) > 0
    a, b = local[ok].reshape(-1, 1280), remote[ok].reshape(-1, 1280)
    cos = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert ok.sum() == 11 and cos.min() >= 0.999
