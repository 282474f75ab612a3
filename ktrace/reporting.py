"""The report's part of ``ktrace run``: the JSON log file, the recorder, local name
resolution, and the summary at exit (kept here so run.py only wires)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, TextIO

from ktrace.errors import KtraceError
from ktrace.report.probe import find_elsewhere
from ktrace.report.recorder import Recorder
from ktrace.report.render import Renderer
from ktrace.report.searchlist import SearchList, hosts_names
from ktrace.rules import Route, RuleSet
from ktrace.tracer.decide import RoutingPolicy
from ktrace.tunnel.client import AgentClient
from ktrace.tunnel.dns_map import DnsMap
from ktrace.tunnel.local_dns import LocalResolver, system_nameserver
from ktrace.tunnel.types import Endpoint

if TYPE_CHECKING:
    from ktrace.run import RunOptions

log = logging.getLogger("ktrace.report")

# Where more namespaces to look in come from (the Kubernetes API, with --agent kube).
NamespaceSource = Callable[[], Awaitable[Sequence[str]]]
MAX_NAMESPACES = 64


def open_log(path: str | None) -> TextIO | None:
    if path is None:
        return None
    try:
        return open(path, "w", encoding="utf-8")
    except OSError as exc:
        raise KtraceError(f"cannot write the JSON log {path}: {exc.strerror}", "check --log-json") from None


def recorder(
    options: RunOptions, client: AgentClient, policy: RoutingPolicy, dns_map: DnsMap, log_json: TextIO | None
) -> Recorder:
    info = client.info
    made = Recorder(
        Renderer(sys.stderr, options.verbosity),
        SearchList.parse(info.resolv_conf),
        dns_map,
        policy.rules.resolve,
        log_json,
        policy.nameservers,
        hosts=hosts_names(info.hosts if options.hosts == "cluster" else _local_hosts()),
        health=client.health,
    )
    client.health.listeners.append(made.on_agent_health)
    return made


def _local_hosts() -> str:
    """This machine's /etc/hosts: what the program reads with ``--hosts local``."""
    try:
        with open("/etc/hosts", encoding="utf-8", errors="replace") as f:
            return f.read(1 << 20)
    except OSError:
        return ""


def local_resolver(rules: RuleSet) -> LocalResolver | None:
    """Only when some name rule can make a name local."""
    if not any(rule.name is not None and rule.route is Route.LOCAL for rule in rules.rules):
        return None
    return LocalResolver(lambda name: rules.resolve(name).route is Route.LOCAL, system_nameserver())


async def _namespaces(recorder: Recorder, options: RunOptions, source: NamespaceSource | None) -> list[str]:
    found = [*options.hint_namespaces, *recorder.tally.namespaces_seen(recorder.search)]
    if source is not None:
        try:
            found += await asyncio.wait_for(source(), 5.0)
        except Exception as exc:  # a hint is not worth failing the run for
            log.debug("no namespace list: %s", exc)
    unique = list(dict.fromkeys(found))
    return unique[:MAX_NAMESPACES]


def _first_nameserver(search: SearchList) -> Endpoint | None:
    for text in search.nameservers:
        try:
            return Endpoint(ipaddress.ip_address(text.split("%", 1)[0]), 53)
        except ValueError:
            continue
    return None


async def finish(
    recorder: Recorder,
    client: AgentClient,
    options: RunOptions,
    status: int,
    namespaces: NamespaceSource | None = None,
) -> None:
    """After the program ended: close the DNS record, look for same-named services, show the summary."""
    try:
        recorder.finish_dns()
        elsewhere: dict[str, list[str]] = {}
        names = recorder.tally.names_to_probe(recorder.search)
        server = _first_nameserver(recorder.search)
        if names and server is not None:
            candidates = await _namespaces(recorder, options, namespaces)
            elsewhere = await find_elsewhere(client, server, recorder.search, names, candidates)
        recorder.finish(status, elsewhere)
    except Exception:
        log.exception("the network report failed")
