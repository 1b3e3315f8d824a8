"""Round trip of `raresift export --format label-studio` through a real Label Studio server.

What it checks, on a fresh Label Studio (its own temporary data folder, SQLite, nothing else touched):

1. the export: raresift's own code (``Project.export(fmt="label-studio")``) writes the tasks file;
2. Label Studio starts (local-file serving on, telemetry, Sentry, version check and browser off, a user
   made on the command line with a legacy API token) and answers HTTP;
3. through its REST API: a project made with ``raresift.export.LABEL_STUDIO_CONFIG``; a "Local files"
   import storage on the raresift project's images folder (not synced); the tasks file imported, with
   Label Studio's strict prediction validation switched on (the feature flag
   ``fflag_feat_utc_210_prediction_validation_15082025``, so a prediction that does not fit the config
   fails the import instead of being logged and kept);
4. what Label Studio holds afterwards equals the export: as many tasks, the task data unchanged, one
   prediction per task whose result holds the choice and, where the export had one, the rectangle,
   with the same values (fields Label Studio drops or changes are listed), score and model version;
   the project's model version is the export's (Label Studio shows only predictions of that version);
5. every exported photo is fetched from the server through the URL of the task's ``data.image`` (as a
   browser would request it: spaces and non-ASCII percent-encoded, anything after ``#`` dropped), with
   the token; the bytes must be the file's bytes (same length) and decode with Pillow to the file's
   width and height.

It prints a short report (counts, the first photo fetched, seconds per step) and exits 0 only when
every check passes. The server is stopped at the end, also on an error or Ctrl-C.

Without ``--project`` it makes a small project in a temporary folder: 42 generated photos (Pillow; a
yellow striped "beetle" in a corner of every third one), some in a subfolder and some with a space, a
``+``, an ``&``, a ``#``, a ``%`` or a non-ASCII letter in the name (these are labelled positive, so they
are always exported); embedded with EfficientNet-Lite0 (tiles, so photos get a region), 24 photos labelled.
``--plain-names`` leaves the awkward names out.

Label Studio is not a raresift dependency; install it in a virtualenv of its own, then run::

    python3 -m venv /work/devdata/lsvenv
    /work/devdata/lsvenv/bin/pip install "label-studio==1.23.*"
    PYTHONPATH=src python benchmarks/label_studio_roundtrip.py --label-studio /work/devdata/lsvenv/bin/label-studio \
        [--project PROJECT] [--top 20] [--port PORT] [--keep] [--plain-names]

(``--label-studio`` defaults to ``label-studio`` on PATH.) Everything runs offline on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from raresift import Project
from raresift.export import LABEL_STUDIO_CONFIG

USER = "raresift@localhost"
VALIDATION_FLAG = "fflag_feat_utc_210_prediction_validation_15082025"
# Names a photo collection can hold that need care in a URL's query string (labelled positive, so exported).
AWKWARD_NAMES = ["with space.jpg", "a+b.jpg", "x&y=1.jpg", "hash#1.jpg", "100% sure.jpg", "café.jpg"]


class CheckFailed(Exception):
    pass


# ---------------------------------------------------------------------------------------------- raresift side
def _photo(rng: np.random.Generator, beetle: bool, size=(320, 240)) -> Image.Image:
    """The tests' beetle photo (tests/conftest.py), its beetle in a random quadrant."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import beetle_photo

    return beetle_photo(rng, "random" if beetle else None, size)


def make_project(root: Path, *, plain_names: bool) -> Path:
    """A small embedded project with a model: generated photos, 24 labelled (see the module docstring)."""
    rng = np.random.default_rng(7)
    images = root / "images"
    (images / "sub folder").mkdir(parents=True)
    truth: dict[str, int] = {}
    for i in range(36):
        rel = f"p{i:02d}.jpg" if i % 4 else f"sub folder/p{i:02d}.jpg"
        beetle = i % 3 == 0
        _photo(rng, beetle).save(images / rel, quality=90)
        truth[rel] = int(beetle)
    awkward = [] if plain_names else AWKWARD_NAMES
    for name in awkward:
        _photo(rng, True).save(images / name, quality=90)
        truth[name] = 1
    if not plain_names:  # one PNG as well
        _photo(rng, True, size=(200, 300)).save(images / "sub folder" / "tall.png")
        truth["sub folder/tall.png"] = 1
    with Project.create(root / "project", images=images) as p:
        p.add_images()
        p.embed(model="efficientnet-lite0", batch_size=16)
        plain = [k for k in truth if k not in awkward and not k.endswith(".png")]
        chosen = plain[:24 - len(awkward)] + awkward + ([] if plain_names else ["sub folder/tall.png"])
        p.label([(k, truth[k]) for k in chosen])
    return root / "project"


def export_tasks(project_dir: Path, top: int, out: Path) -> tuple[list[dict[str, Any]], Path, dict[str, Path]]:
    """Export with raresift's own code; returns the tasks, the images folder, and raresift path -> file."""
    with Project(project_dir) as p:
        root = p.images_root
        if root is None:
            raise CheckFailed(f"{project_dir} has no images folder (a project of external vectors); "
                              "Label Studio has no photos to show")
        p.export(top=top, fmt="label-studio", out=out)
        tasks = json.loads(out.read_text(encoding="utf-8"))
        files = {}
        for t in tasks:
            f = p.file_path(p.image_id(t["data"]["raresift_path"]))
            if f is None:
                raise CheckFailed(f"exported photo {t['data']['raresift_path']!r} has no file on disk")
            files[t["data"]["raresift_path"]] = f
    return tasks, Path(root).resolve(), files


# ---------------------------------------------------------------------------------------------- the server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LabelStudio:
    """A Label Studio server in a data folder of its own, stopped by :meth:`stop` (its process group)."""

    def __init__(self, exe: str, data_dir: Path, port: int):
        self.exe, self.data_dir, self.port = exe, data_dir, port
        self.base = f"http://127.0.0.1:{port}"
        self.token = secrets.token_hex(20)
        self.password = "pw" + secrets.token_hex(16)  # never starts with "-" (argparse would take it for an option)
        self.log_path = data_dir / "server.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update({
            "LABEL_STUDIO_BASE_DATA_DIR": str(self.data_dir),
            "LOCAL_FILES_SERVING_ENABLED": "true",
            "LOCAL_FILES_DOCUMENT_ROOT": "/",
            "COLLECT_ANALYTICS": "false",
            "LATEST_VERSION_CHECK": "false",
            "SENTRY_DSN": "",
            "FRONTEND_SENTRY_DSN": "",
            "LABEL_STUDIO_HOST": "",  # relative URLs; and no stray HOST / USERNAME / PASSWORD from the shell
            "LABEL_STUDIO_USERNAME": USER,
            "LABEL_STUDIO_PASSWORD": self.password,
            VALIDATION_FLAG: "true",
            "PYTHONUNBUFFERED": "1",
        })
        cmd = [self.exe, "start", "--no-browser", "--data-dir", str(self.data_dir), "--internal-host", "127.0.0.1",
               "--port", str(self.port), "--username", USER, "--password", self.password,
               "--user-token", self.token, "--enable-legacy-api-token"]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - open while the server runs; closed in stop()
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=self.data_dir, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise CheckFailed(f"label-studio exited with {self.proc.returncode} before answering; "
                                  f"last lines of {self.log_path}:\n{self.log_tail()}")
            try:
                status, _ = self.request("GET", "/api/current-user/whoami")
                if status == 200:
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                raise CheckFailed(f"label-studio did not answer within {timeout:.0f} s; last lines of "
                                  f"{self.log_path}:\n{self.log_tail()}")
            time.sleep(0.5)

    def log_tail(self, n: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGINT, 15), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(self.proc.pid, sig)  # the group this script started (start_new_session)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self._log.close()
        self.proc = None

    def request(self, method: str, path: str, body: Any = None, *, raw: bool = False,
                timeout: float = 60) -> tuple[int, Any]:
        """``method`` ``path`` with the token; returns (status, parsed JSON, or bytes with ``raw``)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Authorization", f"Token {self.token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, payload = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, payload = e.code, e.read()
        if raw:
            return status, payload
        try:
            return status, json.loads(payload) if payload else None
        except ValueError:
            return status, payload.decode(errors="replace")

    def api(self, method: str, path: str, body: Any = None, *, expect: tuple[int, ...] = (200, 201)) -> Any:
        status, out = self.request(method, path, body)
        if status not in expect:
            raise CheckFailed(f"{method} {path} answered {status}: {str(out)[:2000]}")
        return out


def browser_url(url: str) -> str:
    """The request a browser makes for ``<img src=url>``: the fragment dropped, spaces, quotes, angle
    brackets and non-ASCII percent-encoded (UTF-8), everything else (``+ & = % ?``) sent as written."""
    url = url.split("#", 1)[0]
    return urllib.parse.quote(url, safe="!$%&'()*+,-./:;=?@[]_~")


# ---------------------------------------------------------------------------------------------- the checks
def _close(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-9,
                                                                                               abs_tol=1e-9)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    return a == b


def compare_result(sent: dict[str, Any], stored: dict[str, Any]) -> list[str]:
    """Fields of one result item that Label Studio dropped or changed (fields it added are not listed)."""
    notes = []
    for k, v in sent.items():
        if k not in stored:
            notes.append(f"{sent['type']}.{k} dropped")
        elif not _close(v, stored[k]):
            notes.append(f"{sent['type']}.{k} changed: {v!r} -> {stored[k]!r}")
    return notes


def run(args: argparse.Namespace, work: Path, times: dict[str, float], report: dict[str, Any]) -> list[str]:
    """Every step; returns the failed checks (empty: all passed). Raises CheckFailed on a hard stop."""
    failures: list[str] = []
    exe = args.label_studio or shutil.which("label-studio")
    if not exe or not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
        raise CheckFailed(f"no label-studio executable ({args.label_studio or 'not on PATH'}); install it with "
                          'pip install "label-studio==1.23.*" and pass --label-studio PATH')

    t = time.monotonic()
    if args.project:
        project_dir = Path(args.project)
    else:
        project_dir = make_project(work / "raresift", plain_names=args.plain_names)
        times["make project (photos, embed, labels)"] = time.monotonic() - t
    t = time.monotonic()
    tasks, images_root, files = export_tasks(project_dir, args.top, work / "tasks.json")
    times["export"] = time.monotonic() - t
    n_rect = sum(any(r["type"] == "rectanglelabels" for r in task["predictions"][0]["result"]) for task in tasks)
    report["exported"] = (len(tasks), sum(len(task["predictions"]) for task in tasks), n_rect)
    if not tasks:
        raise CheckFailed("the export holds no tasks (no labelled positives and no ranked photos)")

    server = LabelStudio(exe, work / "label-studio-data", args.port or free_port())
    try:
        t = time.monotonic()
        server.start(args.start_timeout)
        times["start Label Studio"] = time.monotonic() - t
        version = server.api("GET", "/api/version")
        report["label studio"] = (version or {}).get("release") or (version or {}).get("label-studio-os-package",
                                                                                      {}).get("version", "?")

        t = time.monotonic()
        proj = server.api("POST", "/api/projects",
                          {"title": "raresift round trip", "label_config": LABEL_STUDIO_CONFIG})
        pid = proj["id"]
        storage = server.api("POST", "/api/storages/localfiles",
                             {"project": pid, "title": "raresift images", "path": str(images_root),
                              "use_blob_urls": False, "regex_filter": ""})
        storages = server.api("GET", f"/api/storages/localfiles?project={pid}")
        if not any(s["id"] == storage["id"] for s in storages):
            failures.append("the local-files storage is not listed after it was made")
        times["create project + storage"] = time.monotonic() - t

        t = time.monotonic()
        status, imp = server.request("POST", f"/api/projects/{pid}/import?return_task_ids=true", tasks, timeout=300)
        times["import tasks"] = time.monotonic() - t
        if status != 201:
            raise CheckFailed(f"import answered {status}: {str(imp)[:3000]}")
        report["import answer"] = {k: imp.get(k) for k in ("task_count", "prediction_count", "annotation_count")}
        if imp.get("task_count") != len(tasks):
            failures.append(f"import reports {imp.get('task_count')} tasks, the export has {len(tasks)}")
        if imp.get("prediction_count") != len(tasks):
            failures.append(f"import reports {imp.get('prediction_count')} predictions, the export has {len(tasks)}")

        # What the server holds now.
        t = time.monotonic()
        listed = server.api("GET", f"/api/tasks?project={pid}&page_size={len(tasks) + 10}")
        ids = [x["id"] for x in (listed["tasks"] if isinstance(listed, dict) else listed)]
        held = {}
        for tid in ids:
            task = server.api("GET", f"/api/tasks/{tid}")  # the task as the labelling page gets it
            held[task["data"].get("raresift_path")] = task
        preds = server.api("GET", f"/api/predictions?project={pid}")
        preds = preds["results"] if isinstance(preds, dict) else preds
        by_task: dict[int, list[dict]] = {}
        for p in preds:
            by_task.setdefault(p["task"], []).append(p)
        project_now = server.api("GET", f"/api/projects/{pid}")
        times["read back"] = time.monotonic() - t

        dropped: set[str] = set()
        n_choice = n_rect_held = n_pred = 0
        for sent in tasks:
            path = sent["data"]["raresift_path"]
            got = held.get(path)
            if got is None:
                failures.append(f"task of {path!r} is missing on the server")
                continue
            if not _close(sent["data"], got["data"]):
                failures.append(f"task data of {path!r} changed: {sent['data']} -> {got['data']}")
            plist = by_task.get(got["id"], [])
            n_pred += len(plist)
            if len(plist) != 1:
                failures.append(f"task of {path!r} has {len(plist)} predictions, expected 1")
                continue
            p = plist[0]
            shown = got.get("predictions")
            if shown is not None and len(shown) != 1:
                failures.append(f"task of {path!r} shows {len(shown)} predictions to the labelling page, expected 1")
            sp = sent["predictions"][0]
            if p.get("model_version") != sp["model_version"]:
                failures.append(f"prediction of {path!r}: model_version {p.get('model_version')!r}")
            if not _close(float(sp["score"]), p.get("score")):
                failures.append(f"prediction of {path!r}: score {sp['score']} -> {p.get('score')}")
            for item in sp["result"]:
                match = [r for r in p["result"]
                         if r.get("type") == item["type"] and r.get("from_name") == item["from_name"]]
                if len(match) != 1:
                    failures.append(f"prediction of {path!r}: {len(match)} {item['type']} items, expected 1")
                    continue
                n_choice += item["type"] == "choices"
                n_rect_held += item["type"] == "rectanglelabels"
                notes = compare_result(item, match[0])
                dropped.update(n.split(":")[0] for n in notes)
                if any("value" in n for n in notes):
                    failures.append(f"prediction of {path!r}: {'; '.join(notes)}")
        report["imported"] = (len(held), n_pred, n_choice, n_rect_held)
        report["fields dropped/changed"] = sorted(dropped) or ["none"]
        report["project model_version"] = project_now.get("model_version")
        if project_now.get("task_number") not in (None, len(tasks)):
            failures.append(f"project task_number {project_now.get('task_number')}, expected {len(tasks)}")
        if len(held) != len(tasks):
            failures.append(f"{len(held)} tasks on the server, {len(tasks)} exported")
        if n_pred != len(tasks) or n_choice != len(tasks):
            failures.append(f"{n_pred} predictions / {n_choice} choices on the server, {len(tasks)} exported")
        if n_rect_held != n_rect:
            failures.append(f"{n_rect_held} rectangles on the server, {n_rect} exported")
        if project_now.get("model_version") != "raresift":
            failures.append(f"project model_version is {project_now.get('model_version')!r}: the labelling page "
                            "shows only predictions of that version")

        # The photos, through the URL Label Studio gives the labelling page.
        t = time.monotonic()
        bad_photos = []
        for i, (path, task) in enumerate(held.items()):
            url = task["data"]["image"]
            status, body = server.request("GET", browser_url(url), raw=True)
            f = files[path]
            problem = None
            size = None
            if status != 200:
                problem = f"HTTP {status}"
            elif len(body) != f.stat().st_size:
                problem = f"{len(body)} bytes, the file has {f.stat().st_size}"
            else:
                try:
                    with Image.open(io.BytesIO(body)) as im:
                        im.load()
                        size = im.size
                    with Image.open(f) as im:
                        want = im.size
                    if size != want:
                        problem = f"decodes to {size}, the file is {want}"
                except Exception as e:  # noqa: BLE001 - any decoding failure is the finding
                    problem = f"does not decode: {e}"
            if i == 0:
                report["photo fetched"] = (path, status, len(body), size)
            if problem:
                bad_photos.append(f"{path!r} ({url}): {problem}")
        times["fetch photos"] = time.monotonic() - t
        report["photos fetched"] = (len(held) - len(bad_photos), len(held))
        failures.extend(f"photo {b}" for b in bad_photos)

        # Anything Label Studio logged about the predictions (validation is strict, so it would have failed).
        log = server.log_path.read_text(errors="replace")
        for line in log.splitlines():
            if "Prediction validation failed" in line or "Can't upload prediction score" in line:
                failures.append(f"server log: {line.strip()[:300]}")
    finally:
        t = time.monotonic()
        server.stop()
        times["stop Label Studio"] = time.monotonic() - t
    return failures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--project", help="an embedded raresift project (default: make a small one in a temp folder)")
    ap.add_argument("--top", type=int, default=20, help="unlabelled photos to export besides the positives (20)")
    ap.add_argument("--label-studio", help="the label-studio executable (default: label-studio on PATH)")
    ap.add_argument("--port", type=int, default=0, help="the server's port (default: a free one)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (project, tasks, server data)")
    ap.add_argument("--plain-names", action="store_true", help="generated project: no awkward file names")
    ap.add_argument("--start-timeout", type=float, default=300, help="seconds to wait for the server (300)")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="raresift-ls-"))
    times: dict[str, float] = {}
    report: dict[str, Any] = {}
    t0 = time.monotonic()
    try:
        failures = run(args, work, times, report)
    except CheckFailed as e:
        failures = [f"stopped: {e}"]
    except KeyboardInterrupt:
        failures = ["interrupted"]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print("Label Studio round trip of `raresift export --format label-studio`")
    if "label studio" in report:
        print(f"  Label Studio version: {report['label studio']}")
    if "exported" in report:
        print("  exported: {} tasks, {} predictions, {} rectangles".format(*report["exported"]))
    if "import answer" in report:
        print(f"  import answered: {report['import answer']}")
    if "imported" in report:
        print("  on the server: {} tasks, {} predictions ({} choices, {} rectangles)".format(*report["imported"]))
        print(f"  result fields dropped or changed by Label Studio: {', '.join(report['fields dropped/changed'])}")
        print(f"  project model_version: {report['project model_version']!r}")
    if "photo fetched" in report:
        path, status, n, size = report["photo fetched"]
        print(f"  photo fetched: {path!r}: HTTP {status}, {n} bytes, {size[0]}x{size[1]}" if size else
              f"  photo fetched: {path!r}: HTTP {status}, {n} bytes, not decoded")
        print("  photos fetched and matching their files: {} of {}".format(*report["photos fetched"]))
    print("  seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()) + f"; total {time.monotonic() - t0:.1f}")
    if args.keep:
        print(f"  kept: {work}")
    if failures:
        print(f"FAILED ({len(failures)}):")
        for f in failures:
            print(f"  - {f}")
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
