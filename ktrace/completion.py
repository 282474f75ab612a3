"""Shell completion scripts, generated from the argparse parser by shtab (static: no Python
runs at each TAB)."""

from __future__ import annotations

import argparse

import shtab

SHELLS = ("bash", "zsh", "tcsh", "fish")
_FILE_METAVARS = frozenset({"FILE", "PATH"})


def _mark_files(parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:  # argparse has no public walk over its actions
        if action.metavar in _FILE_METAVARS:
            action.complete = shtab.FILE  # type: ignore[attr-defined]
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _mark_files(sub)


def script(parser: argparse.ArgumentParser, shell: str) -> str:
    """The completion script for ``shell`` for the command ``parser.prog``."""
    _mark_files(parser)
    text: str = shtab.complete(parser, shell=shell)
    return text if text.endswith("\n") else text + "\n"
