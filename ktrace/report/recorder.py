"""The record of one ``ktrace run``: turns what the tracer and the tunnel see into events,
writes them to ``--log-json``, shows them live, and builds the summary at exit.

Called from the tracer's and the tunnel's callbacks on the event loop; never
raises into them (a failing log write is reported once and logging stops).

Live output, by default, shows each *new* failure once: the first time a
destination fails with a given reason, and a lookup once it failed for every name
the search list tried. ``-v`` shows every event; the summary has the counts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import TextIO

from ktrace.report.dns_tracker import DnsTracker
from ktrace.report.events import Closed, Connect, DnsQuery, Event, Exit, Start, UdpFlow, to_json
from ktrace.report.render import Renderer
from ktrace.report.searchlist import SearchList
from ktrace.report.summary import FOUND, Summary, failed_lookups, summarize
from ktrace.rules import RouteDecision
from ktrace.tunnel.dns_map import DnsMap
from ktrace.tunnel.types import Endpoint, TcpStats

log = logging.getLogger("ktrace.report")

EXPIRY_INTERVAL = 1.0


def rule_text(decision: RouteDecision | None) -> str | None:
    if decision is None or not decision.by_user_rule or decision.rule is None:
        return None
    return decision.rule.describe()


class Recorder:
    def __init__(
        self,
        renderer: Renderer,
        search: SearchList,
        dns_map: DnsMap,
        route_of_name: Callable[[str], RouteDecision],
        log_file: TextIO | None = None,
        nameservers: frozenset[Endpoint] = frozenset(),
    ) -> None:
        self.renderer = renderer
        self.search = search
        self.dns_map = dns_map
        self.events: list[Event] = []
        self.dns = DnsTracker(route_of_name)
        self._log_file = log_file
        self._nameservers = nameservers
        self._shown: set[tuple[str, str]] = set()
        self._found: set[str] = set()
        self._queries: list[DnsQuery] = []
        self._expiry: asyncio.TimerHandle | None = None

    # -- the record ------------------------------------------------------------------------

    def record(self, event: Event) -> None:
        self.events.append(event)
        if self._log_file is not None:
            try:
                self._log_file.write(json.dumps(to_json(event), separators=(",", ":")) + "\n")
                self._log_file.flush()
            except (OSError, ValueError) as exc:
                self.renderer.message(f"cannot write the JSON log any more: {exc}; it stops here")
                self._log_file = None
        if isinstance(event, DnsQuery):
            self._queries.append(event)
            if event.outcome in FOUND:
                self._found.add(event.name.lower())
        self.renderer.live(event, self._worth_showing(event))

    def _worth_showing(self, event: Event) -> bool:
        """Whether a failure is new enough to show by default."""
        if isinstance(event, Connect):
            return event.failed and self._first(event.dest, event.outcome)
        if isinstance(event, Closed):
            return event.failed and self._first(event.dest, event.outcome)
        if isinstance(event, DnsQuery) and event.failed:
            if event.outcome in ("timeout", "SERVFAIL"):
                return self._first(event.name.lower(), event.outcome)
            stem = self.search.looked_up(event.name)
            if event.name.lower() != stem:
                return False  # a search-list candidate: the next one may still find it
            group = failed_lookups(self._queries, self.search).get(stem)
            return group is not None and self._first(stem, "lookup")
        return False

    def _first(self, subject: str, reason: str) -> bool:
        if (subject, reason) in self._shown:
            return False
        self._shown.add((subject, reason))
        return True

    # -- callbacks -------------------------------------------------------------------------

    def start(self, command: Sequence[str], agent: str, version: str) -> None:
        self.record(Start(time.time(), command, agent, version))

    def connect(
        self,
        pid: int,
        dest: Endpoint,
        outcome: str,
        decision: RouteDecision | None,
        duration: float | None = None,
        local: Endpoint | None = None,
    ) -> None:
        route = decision.route.value if decision is not None else "remote"
        self.record(
            Connect(
                time.time() - (duration or 0.0),
                pid,
                str(dest),
                outcome,
                route,
                self.dns_map.name_of(dest.ip),
                rule_text(decision),
                duration,
                str(local) if local is not None else None,
            )
        )

    def udp(self, pid: int | None, dest: Endpoint, how: str, decision: RouteDecision | None = None) -> None:
        if dest in self._nameservers:
            return  # the DNS events say more
        route = decision.route.value if decision is not None else "remote"
        self.record(
            UdpFlow(time.time(), pid, str(dest), route, how, self.dns_map.name_of(dest.ip), rule_text(decision))
        )

    def closed(self, dest: Endpoint, stats: TcpStats, opened: float | None) -> None:
        duration = time.monotonic() - opened if opened is not None else None
        self.record(
            Closed(
                time.time(),
                str(dest),
                stats.bytes_up,
                stats.bytes_down,
                stats.outcome,
                self.dns_map.name_of(dest.ip),
                duration,
            )
        )

    def dns_sent(self, sock: int, server: Endpoint, payload: bytes) -> None:
        self.dns.sent(sock, server, payload, time.time(), time.monotonic())
        self._arm_expiry()

    def dns_received(self, sock: int, server: Endpoint, payload: bytes) -> None:
        event = self.dns.received(sock, server, payload, time.time(), time.monotonic())
        if event is not None:
            self.record(event)

    def _arm_expiry(self) -> None:
        if self._expiry is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._expiry = loop.call_later(EXPIRY_INTERVAL, self._expire)

    def _expire(self) -> None:
        self._expiry = None
        for event in self.dns.expire(time.monotonic()):
            self.record(event)
        if len(self.dns):
            self._arm_expiry()

    # -- the end ---------------------------------------------------------------------------

    def finish_dns(self) -> None:
        """Report the questions still unanswered when the program ended."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        for event in self.dns.expire(time.monotonic(), everything=True):
            self.record(event)

    def summary(self, elsewhere: dict[str, list[str]] | None = None) -> Summary:
        return summarize(self.events, self.search, elsewhere)

    def finish(self, status: int, elsewhere: dict[str, list[str]] | None = None) -> Summary:
        summary = self.summary(elsewhere)
        self.renderer.summary(summary)
        self.record(Exit(time.time(), status, len(self.events)))
        if self._log_file is not None:
            try:
                self._log_file.close()
            except OSError as exc:
                self.renderer.message(f"closing the JSON log failed: {exc}")
            self._log_file = None
        return summary
