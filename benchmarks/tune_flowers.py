"""`raresift tune` through the commands a person runs: does tuning raise precision@50 on the insect key?

On a copy of an embedded flower project this drives the real CLI, as the issue-10 measurements from
outside do: `next --query "insect or spider" --json` in rounds of 25, each round answered from the key with
`import-labels`, until --at labels; at each count in --at a copy of the project is scored with
`next --evaluate --n 50 --json` (precision@50 on the project's test split, which is never labelled), then
`raresift tune` runs on that copy (training on its labels, then every photo embedded again with the tuned
model) and `next --evaluate` scores it again. Paired: the same labels, the same test photos.

One split (the project's own test split); `finetune_flowers.py --workflow` gives the 10-split figure of
the same training (`raresift.learn.tune.train_tail`) without the re-embedding.

    python benchmarks/tune_flowers.py --project /work/devdata/flowers --at 50,200 --work /tmp/tune-bench
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_TRUTH = Path(__file__).resolve().parent / "data" / "flowers_insects.csv"


def raresift(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "raresift", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"raresift {' '.join(args)} failed: {out.stderr.strip()}")
    return out.stdout


def precision(project: Path, key: dict[str, int], n: int = 50) -> tuple[float, list[str]]:
    picks = json.loads(raresift("next", str(project), "--evaluate", "--n", str(n), "--json", "--seed", "0"))
    paths = [p["path"] for p in picks]
    return sum(key.get(p, 0) for p in paths) / n, paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", type=Path, required=True, help="the flower project, embedded with the defaults")
    ap.add_argument("--truth", type=Path, default=DEFAULT_TRUTH)
    ap.add_argument("--query", default="insect or spider")
    ap.add_argument("--at", default="200", help="label counts at which to tune, comma-separated (default 200)")
    ap.add_argument("--batch", type=int, default=25, help="photos per round (default 25, as `next`)")
    ap.add_argument("--work", type=Path, required=True, help="folder for the copies (emptied first)")
    ap.add_argument("--tune-args", default="", help="more options for `raresift tune`, e.g. '--epochs 8'")
    args = ap.parse_args(argv)
    counts = sorted(int(a) for a in args.at.split(","))
    with open(args.truth, newline="") as fh:
        key = {row["path"]: int(row["label"]) for row in csv.DictReader(fh)}
    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)
    live = args.work / "session"
    shutil.copytree(args.project, live, ignore=shutil.ignore_patterns("embed.lock"))
    t0 = time.time()
    labelled, rnd, rows = 0, 0, []
    for target in counts:
        while labelled < target:
            extra = ["--query", args.query] if rnd == 0 else []
            picks = json.loads(raresift("next", str(live), "--n", str(min(args.batch, target - labelled)), "--json",
                                        "--seed", str(1000 + rnd), *extra))
            if not picks:
                raise SystemExit(f"`next` had nothing left to ask after {labelled} labels")
            answers = args.work / "answers.csv"
            with open(answers, "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(["path", "label"])
                for p in picks:
                    w.writerow([p["path"], key.get(p["path"], 0)])
            raresift("import-labels", str(live), str(answers))
            labelled += len(picks)
            rnd += 1
        status = json.loads(raresift("status", str(live), "--json"))
        copy = args.work / f"at-{target}"
        shutil.copytree(live, copy, ignore=shutil.ignore_patterns("embed.lock"))
        frozen, _ = precision(copy, key)
        ts = time.time()
        report = json.loads(raresift("tune", str(copy), "--json", "--no-progress", *args.tune_args.split()))
        seconds = time.time() - ts
        tuned, _ = precision(copy, key)
        rows.append((target, status["positives"], frozen, tuned, report, seconds))
        print(f"{target} labels ({status['positives']} positive): precision@50 frozen {frozen:.2f}, tuned {tuned:.2f}; "
              f"tune {seconds:.0f} s (maps {report['seconds_maps']:.0f} s, training {report['seconds_training']:.0f} s, "
              f"loss {report['loss_first']:.3f} -> {report['loss_last']:.3f}, then embedding {report['embedded']} photos)",
              flush=True)
    print("\n| labels | positives labelled | frozen p@50 | tuned p@50 | tune seconds (maps / training / all with the embed) |")
    print("|---:|---:|---:|---:|---|")
    for target, pos, frozen, tuned, report, seconds in rows:
        print(f"| {target} | {pos} | {frozen:.2f} | {tuned:.2f} | {report['seconds_maps']:.0f} / "
              f"{report['seconds_training']:.0f} / {seconds:.0f} |")
    print(f"\n_{time.time() - t0:.0f} s_")
    return 0


if __name__ == "__main__":
    sys.exit(main())
