"""Embedding on Ray: Ray Data feeds photo paths to a pool of model actors; vectors come back to the project.

``raresift embed PROJECT --engine ray [--ray-address ADDR]`` (or ``Project.embed(engine="ray")``)
runs the same decode and model code as the local engine, inside Ray actors:

* the driver (this process) lists the photos still to embed and builds a Ray Dataset of
  ``(id, path)`` rows, so only paths travel to the workers and only vectors travel back;
* ``map_batches`` sends batches to a pool of :class:`_EmbedActor` actors; each loads the model
  once (ONNX Runtime; on a GPU node its CUDA provider), decodes its batch with a thread pool and
  runs the model;
* the driver writes each returned batch into the project's memory-mapped vector files and marks
  the images in SQLite, exactly as the local engine does (same crash safety, same resume).

Photos must be readable at the same path on every node (a shared file system). Without an
address a local Ray is started for the run and shut down after it; a Ray that this process has
already started (``ray.init(...)``) is used as it is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar

import numpy as np

from ..errors import EmbeddingError
from .batches import decode_item, model_chunk, run_model
from .decode import Views

log = logging.getLogger(__name__)

MAX_THREADS_PER_ACTOR = 4  # ONNX Runtime scales poorly past ~4 threads on one batch; more actors do better

StoreFn = Callable[[list[int], "np.ndarray | None", "np.ndarray | None", list[tuple[int, str]]], None]


class _EmbedActor:
    """One model per actor: decodes a batch of paths (threads) and returns vectors, logits and errors."""

    config: ClassVar[dict] = {}  # set on a subclass by _bound(): Ray Data then starts actors without arguments

    def __init__(self):
        self._setup(**self.config)

    def _setup(self, *, root: bytes, model: str, backend: str, threads: int, size: int, tiles: int,
               resize: str, max_pixels: int, decode_workers: int, chunk: int) -> None:
        from .models import load_model

        self.root = root
        self.model = load_model(model, backend=backend, threads=threads)
        if self.model.size != size:
            raise EmbeddingError(f"model {model} takes {self.model.size} px on this worker, {size} px on the driver")
        self.views = Views(size=size, tiles=tiles, resize=resize)
        self.max_pixels = max_pixels
        self.chunk = chunk  # inputs per model call: the local engine's, so both compute the same vectors
        self.pool = ThreadPoolExecutor(max_workers=decode_workers, thread_name_prefix="raresift-decode")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = np.asarray(batch["id"], dtype=np.int64)
        raws = [bytes(r) for r in batch["path"]]
        decoded = list(self.pool.map(lambda raw: decode_item(self.root, raw, self.views, self.max_pixels), raws))
        ok = np.array([err is None for _, err in decoded], dtype=bool)
        errors = np.array(["" if err is None else err for _, err in decoded], dtype=object)
        count, dim = self.views.count, self.model.dim
        vec = np.zeros((len(ids), count, dim), dtype=np.float16)
        has_logits = bool(self.model.has_logits)
        logits = np.zeros((len(ids), count, 1000 if has_logits else 1), dtype=np.float16)
        if ok.any():
            stack = np.concatenate([a for a, err in decoded if err is None])
            feats, lg = run_model(self.model, stack, self.chunk)
            vec[ok] = feats.reshape(int(ok.sum()), count, -1).astype(np.float16)
            if has_logits and lg is not None:
                logits[ok] = lg.reshape(int(ok.sum()), count, -1).astype(np.float16)
        return {"id": ids, "ok": ok, "error": errors, "vec": vec, "logits": logits}


def _bound(config: dict) -> type:
    """A subclass of :class:`_EmbedActor` that carries its settings.

    Constructor arguments of Ray Data actors go through the object store, and Ray then warns
    that restarted actors may lose them; settings on the class travel with the class itself.
    """
    return type("_EmbedActorBound", (_EmbedActor,), {"config": dict(config)})


def embed_on_ray(
    todo: list[tuple[int, bytes]],
    *,
    root: bytes,
    views: Views,
    model: str,
    backend: str,
    threads: int | None,
    workers: int | None,
    batch_size: int,
    max_pixels: int,
    address: str | None,
    store: StoreFn,
) -> None:
    """Embed ``todo`` (image id, path under ``root``) on Ray; ``store`` receives each batch on the driver.

    Called by :func:`raresift.embed.run.embed_project` with ``engine="ray"``, which has validated
    the options and prepared the vector files.
    """
    if not todo:
        return
    from ..ray_jobs import ray_cluster

    with ray_cluster(address) as ray:
        _run(ray, todo, root=root, views=views, model=model, backend=backend, threads=threads, workers=workers,
             batch_size=batch_size, max_pixels=max_pixels, store=store)


def plan_actors(cluster: dict[str, float], node_cpus: list[float], threads: int | None) -> dict[str, float | int]:
    """How many model actors to start and what each reserves, from the cluster's resources.

    GPUs present: one actor per GPU, each with a GPU and an even share of the CPUs for decoding.
    CPUs only: actors of ``threads`` (default up to 4) CPUs each, as many as the cluster holds.
    """
    gpus = int(cluster.get("GPU", 0))
    cpus = max(1, int(cluster.get("CPU", 1)))
    biggest = max(1, int(max(node_cpus, default=cpus)))
    if gpus:
        per = max(1, min(biggest, cpus // gpus))
        return {"actors": gpus, "num_gpus": 1, "num_cpus": per, "threads": per}
    per = max(1, min(threads or MAX_THREADS_PER_ACTOR, biggest))
    return {"actors": max(1, cpus // per), "num_gpus": 0, "num_cpus": per, "threads": per}


def _run(ray, todo, *, root, views, model, backend, threads, workers, batch_size, max_pixels, store) -> None:
    import ray.data

    node_cpus = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    plan = plan_actors(ray.cluster_resources(), node_cpus, threads)
    log.info("Ray: %s model actors, %s CPUs and %s GPUs each", plan["actors"], plan["num_cpus"], plan["num_gpus"])

    items = [{"id": i, "path": raw} for i, raw in todo]
    # Several blocks per actor keep every actor busy and bound what is in flight.
    blocks = max(1, min(len(items) // batch_size + 1, int(plan["actors"]) * 8))
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    actor = _bound({
        "root": root, "model": model, "backend": backend, "threads": int(plan["threads"]),
        "size": views.size, "tiles": views.tiles, "resize": views.resize, "max_pixels": max_pixels,
        "decode_workers": int(workers or plan["num_cpus"]),
        "chunk": model_chunk(batch_size),
    })
    out = ds.map_batches(
        actor,
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=int(plan["actors"])),
        num_cpus=plan["num_cpus"],
        num_gpus=plan["num_gpus"],
    )
    for batch in out.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
        ids, ok = batch["id"].astype(np.int64), batch["ok"].astype(bool)
        good = [int(i) for i in ids[ok]]
        bad = [(int(i), str(e)) for i, e in zip(ids[~ok], batch["error"][~ok])]
        feats = logits = None
        if good:
            vec = np.asarray(batch["vec"])[ok]
            feats = vec.reshape(-1, vec.shape[-1])
            lg = np.asarray(batch["logits"])[ok]
            logits = lg.reshape(-1, lg.shape[-1]) if lg.shape[-1] > 1 else None
        store(good, feats, logits, bad)
