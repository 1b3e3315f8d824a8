"""The label page's API at scale: `/api/status` and label POSTs with several people labelling at once.

Makes a project of ``--photos`` imported vectors (``raresift init --embeddings``, synthetic 64-d float16:
the API's cost follows the number of photos, not the vector width), starts ``raresift serve`` on it
(a real uvicorn server in its own process), queues one random round of ``clients x labels`` photos,
then runs ``--clients`` labelling clients, each in its own process with its own keep-alive
connection, each doing what the page does per photo: ``POST /api/labels`` (one label) and then
``GET /api/status``. Prints the latency of each request kind over all clients: median, p95, p99, max
(milliseconds, measured at the client, so they include HTTP and JSON), and ``GET /api/status`` with
nobody labelling.

Usage:
    python benchmarks/web_scale.py --work /tmp/webscale --photos 1000000 --clients 3 --labels 300
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def raresift(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "raresift", *args], check=True)


def make_project(work: Path, photos: int) -> Path:
    project = work / f"p-{photos}"
    if (project / "raresift.sqlite").is_file():
        return project
    rng = np.random.default_rng(0)
    out = np.lib.format.open_memmap(work / "v.npy", mode="w+", dtype=np.float16, shape=(photos, 64))
    for start in range(0, photos, 262144):
        out[start : start + 262144] = np.abs(rng.normal(size=(min(photos, start + 262144) - start, 64)))
    out.flush()
    del out
    with open(work / "ids.txt", "w") as fh:
        fh.writelines(f"img/{i:08d}.jpg\n" for i in range(photos))
    raresift("init", str(project), "--embeddings", str(work / "v.npy"), "--ids", str(work / "ids.txt"))
    return project


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(conn: http.client.HTTPConnection, method: str, path: str, body: dict | None = None) -> tuple[float, dict]:
    data = None if body is None else json.dumps(body)
    t0 = time.perf_counter()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
    resp = conn.getresponse()
    payload = resp.read()
    ms = (time.perf_counter() - t0) * 1000
    if resp.status != 200:
        raise RuntimeError(f"{method} {path}: {resp.status} {payload[:200]!r}")
    return ms, json.loads(payload)


def client(port: int, ids: list[int], who: str, out: mp.Queue) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    times: dict[str, list[float]] = {"label": [], "status": []}
    for k, image_id in enumerate(ids):
        ms, _ = request(conn, "POST", "/api/labels", {"items": [{"image_id": image_id, "value": int(k % 10 == 0)}],
                                                       "who": who})
        times["label"].append(ms)
        ms, _ = request(conn, "GET", "/api/status")
        times["status"].append(ms)
    out.put(times)


def summary(values: list[float]) -> str:
    v = np.asarray(values)
    return (f"median {np.median(v):6.1f} ms | p95 {np.percentile(v, 95):6.1f} ms | p99 {np.percentile(v, 99):6.1f} ms"
            f" | max {v.max():6.1f} ms | n {len(v)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--photos", type=int, default=1_000_000)
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--labels", type=int, default=300, help="labels per client")
    ap.add_argument("--keep", action="store_true", help="keep the project (the next run then labels other photos)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    project = make_project(args.work, args.photos)
    print(f"project of {args.photos:,} photos ready in {time.perf_counter() - t0:.1f} s")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "raresift", "serve", str(project), "--port", str(port),
                               "--no-browser"], stderr=subprocess.PIPE, text=True)
    try:
        line = server.stderr.readline()  # "raresift: labelling ... at URL": the socket is listening
        if "labelling" not in line:
            raise RuntimeError(f"serve did not start: {line}{server.stderr.read()}")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        while True:  # the line comes once the socket is bound; uvicorn listens a moment later
            try:
                request(conn, "GET", "/api/status")  # first request: the app opens the project
                break
            except ConnectionRefusedError:
                if server.poll() is not None:
                    raise RuntimeError(f"serve exited: {server.stderr.read()}") from None
                conn.close()
                time.sleep(0.1)
        idle = [request(conn, "GET", "/api/status")[0] for _ in range(30)]
        n = args.clients * args.labels
        ms, batch = request(conn, "POST", "/api/rounds", {"n": n, "strategy": "random", "seed": 1})
        ids = [item["image_id"] for item in batch["items"]]
        print(f"queued {len(ids)} photos in {ms / 1000:.1f} s")
        queue: mp.Queue = mp.Queue()
        procs = [mp.Process(target=client, args=(port, ids[c::args.clients], f"person{c}", queue))
                 for c in range(args.clients)]
        t1 = time.perf_counter()
        for p in procs:
            p.start()
        results = [queue.get() for _ in procs]
        for p in procs:
            p.join()
        wall = time.perf_counter() - t1
        label = [t for r in results for t in r["label"]]
        status = [t for r in results for t in r["status"]]
        print(f"{args.photos:,} photos, {args.clients} clients x {args.labels} labels in {wall:.1f} s "
              f"({len(label) / wall:.1f} labels/s), load average {os.getloadavg()[0]:.1f}")
        print(f"GET /api/status, nobody labelling : {summary(idle)}")
        print(f"POST /api/labels, {args.clients} labelling     : {summary(label)}")
        print(f"GET /api/status, {args.clients} labelling      : {summary(status)}")
    finally:
        server.terminate()
        server.wait(timeout=30)
        if not args.keep:
            shutil.rmtree(project, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
