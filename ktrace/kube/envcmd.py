"""``ktrace env``: the variables ``ktrace run --target`` sets for the program, on stdout."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from ktrace.errors import KtraceError

from .envlayer import overlay, render
from .options import kube_options


def print_env(flags: Mapping[str, Any]) -> int:
    from ktrace.options import load_settings

    from .podview import read_target

    settings = load_settings({k: v for k, v in flags.items() if k != "format"})
    options = kube_options(settings)
    if options is None or options.target is None:
        raise KtraceError("ktrace env needs --target", "e.g. ktrace env --target deploy/NAME")
    view = read_target(options, files=False)
    for line in view.warnings:
        print(f"ktrace: warning: {line}", file=sys.stderr)
    values = view.env.values if view.env is not None else {}
    sys.stdout.write(render(overlay(values, options.env), str(flags.get("format") or "dotenv")))
    return 0
