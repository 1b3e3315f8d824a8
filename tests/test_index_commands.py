"""`similar` and `duplicates`: the index's commands, run through their argparse handlers."""

from __future__ import annotations

import argparse
import json

import pytest

from raresift import Project
from raresift.errors import InputError
from raresift.commands import index as commands


def run(argv: list[str], capsys) -> object:
    parser = argparse.ArgumentParser(prog="raresift")
    commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    assert args.handler(args) == 0
    return json.loads(capsys.readouterr().out)


def test_similar_lists_the_nearest_photos_best_first(embedded_project, capsys):
    project, _, truth = embedded_project
    rare = sorted(p for p, v in truth.items() if v)
    items = run(["similar", str(project), rare[0], "--n", "5", "--json"], capsys)
    assert len(items) == 5 and rare[0] not in [i["path"] for i in items]
    sims = [i["similarity"] for i in items]
    assert sims == sorted(sims, reverse=True) and all(-1 <= s <= 1 for s in sims)
    with Project.open(project) as p:
        p.label([(items[0]["path"], 1)])
    again = run(["similar", str(project), rare[0], "--n", "5", "--unlabelled", "--json"], capsys)
    assert items[0]["path"] not in [i["path"] for i in again]
    assert [i["path"] for i in again][:4] == [i["path"] for i in items][1:5]


def test_duplicates_groups_and_refuses_bad_options(embedded_project, capsys):
    project, _, _ = embedded_project
    groups = run(["duplicates", str(project), "--threshold", "0.5", "--json"], capsys)
    assert groups and all(len(g) >= 2 for g in groups)  # at 0.5 the generated photos link up
    assert run(["duplicates", str(project), "--threshold", "1.0", "--json"], capsys) == []
    parser = argparse.ArgumentParser(prog="raresift")
    commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["duplicates", str(project), "--threshold", "1.5"])
    with pytest.raises(InputError, match="threshold"):
        args.handler(args)
