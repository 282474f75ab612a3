"""From parsed flags, the environment and ktrace.toml to ``RunOptions`` (one error line for bad settings)."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from ktrace import config
from ktrace.errors import KtraceError
from ktrace.kube.options import ignored_for_target, ignored_without_target, kube_options
from ktrace.report.render import Verbosity
from ktrace.rules import Route, Rule, RuleError, RuleSet, parse_rule
from ktrace.run import RunOptions


def load_settings(
    flags: Mapping[str, Any], env: Mapping[str, str] | None = None, cwd: str | None = None
) -> config.Settings:
    """``flags``: argparse's namespace as a dict (only the flags given, by dest)."""
    by_dest = {key.dest: key.name for key in config.KEYS.values()}
    given = {by_dest[dest]: value for dest, value in flags.items() if dest in by_dest}
    try:
        return config.load(
            given,
            os.environ if env is None else env,
            os.getcwd() if cwd is None else cwd,
            flags.get("config"),
        )
    except config.ConfigError as exc:
        raise KtraceError(str(exc), "see docs/configuration.md") from None


def rules_of(settings: config.Settings) -> RuleSet:
    rules: list[Rule] = []
    for key, route in (("local", Route.LOCAL), ("remote", Route.REMOTE)):
        source = settings.source(key) or ""
        for text in settings.get(key, []):
            try:
                rules.append(parse_rule(text, route, source))
            except RuleError as exc:
                where = source if source.startswith("-") else f"{key} in {source}"
                raise KtraceError(f"bad rule for {where}: {exc}", "see docs/filters.md") from None
    try:
        return RuleSet(tuple(rules))
    except RuleError as exc:
        raise KtraceError(str(exc), "see docs/filters.md") from None


def run_options(
    flags: Mapping[str, Any], command: Sequence[str], env: Mapping[str, str] | None = None, cwd: str | None = None
) -> RunOptions:
    settings = load_settings(flags, env, cwd)
    kube = kube_options(settings)
    ignored = ignored_for_target(kube) if kube is not None else []
    if ignored:
        print(
            f"ktrace: warning: {', '.join(ignored)} do not apply with --target: ignored",
            file=sys.stderr,
        )
    unused = ignored_without_target(kube) if kube is not None else []
    if unused:
        print(f"ktrace: warning: {', '.join(unused)} apply only with --target: ignored", file=sys.stderr)
    return RunOptions(
        command=command,
        agent=settings.get("agent"),
        token_file=settings.get("token-file"),
        connect_timeout=settings.get("connect-timeout"),
        hosts=settings.get("hosts", "local"),
        rules=rules_of(settings),
        log_json=settings.get("log-json"),
        verbosity=Verbosity.parse(settings.get("output", "failures")),
        hint_namespaces=tuple(settings.get("hint-namespaces", ())),
        dns_cache=settings.get("dns-cache", True),
        kube=kube,
        backend=settings.get("backend", "auto"),
    )
