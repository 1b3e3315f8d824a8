"""One table of settings: the command line's defaults and help texts, the library's and the README's agree."""

from __future__ import annotations

from pathlib import Path

from raresift.cli import build_parser
from raresift.settings import SETTINGS, default

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _defaults(command: str) -> dict:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return {a.dest: (a.default, a.help or "") for a in sub._actions}


def test_cli_defaults_come_from_the_settings():
    assert _defaults("init")["test_fraction"][0] == default("test_fraction")
    assert _defaults("init")["seed"][0] == default("seed")
    assert _defaults("evaluate")["k"][0] == default("k")
    sim = _defaults("simulate")
    assert (sim["budget"][0], sim["repeats"][0], sim["batch"][0], sim["k"][0]) == \
        (default("budget"), default("repeats"), default("batch"), default("k"))
    assert f"default {default('batch')}" in _defaults("next")["n"][1]
    assert _defaults("serve")["port"][0] == default("port")


def test_the_library_uses_the_same_defaults():
    import inspect

    from raresift.learn.head import RareHead
    from raresift.learn.loop import next_batch
    from raresift.notebook import Labeler
    from raresift.simulate import simulate

    head = RareHead()
    assert (head.C, head.unlabeled_weight, head.max_unlabeled) == \
        (default("head_c"), default("unlabeled_weight"), default("max_unlabeled"))
    assert inspect.signature(simulate).parameters["batch"].default == default("batch")
    assert inspect.signature(Labeler).parameters["batch"].default == default("batch")
    assert inspect.signature(next_batch).parameters["strategy"].default == default("strategy")


def test_the_readme_states_the_defaults():
    assert f"batches of {default('batch')}" in README
    assert f"`--test-fraction` (default {default('test_fraction')}" in README
    assert f"`--tiles {default('tiles')} --resize {default('resize')}`" in README
    assert f"`{default('model')}` (default)" in README
    assert all(s.help for s in SETTINGS.values())
