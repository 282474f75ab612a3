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
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import TextIO

from ktrace import __version__
from ktrace.report.dns_tracker import DnsTracker
from ktrace.report.events import Closed, Connect, DnsQuery, Event, Exit, Start, UdpFlow, to_json
from ktrace.report.render import Renderer
from ktrace.report.searchlist import SearchList
from ktrace.report.summary import Summary, Tally
from ktrace.rules import RouteDecision
from ktrace.tracer.tcp import ConnectEvent
from ktrace.tracer.udp import UdpEvent
from ktrace.tunnel.dns_map import DnsMap
from ktrace.tunnel.tcp_stream import TcpStream
from ktrace.tunnel.types import Endpoint, TcpStats
from ktrace.tunnel.udp_relay import RelayTotals

log = logging.getLogger("ktrace.report")

EXPIRY_INTERVAL = 1.0
# DNS failures shown as they happen; the others once the whole lookup failed.
TIMEOUTS = frozenset({"timeout", "SERVFAIL"})
MAX_SOCKETS = 65536


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
        self.tally = Tally()
        self.dns = DnsTracker(route_of_name)
        self._log_file = log_file
        self.nameservers = nameservers
        self._shown: set[tuple[str, str]] = set()
        self._pids: dict[int, int] = {}  # program socket inode -> pid
        self._how: dict[tuple[int, Endpoint], str] = {}  # how a UDP flow started
        self._expiry: asyncio.TimerHandle | None = None

    # -- the record ------------------------------------------------------------------------

    def record(self, event: Event) -> None:
        self.tally.add(event)
        if self._log_file is not None:
            try:
                self._log_file.write(json.dumps(to_json(event), separators=(",", ":")) + "\n")
                self._log_file.flush()
            except (OSError, ValueError) as exc:
                self.renderer.message(f"cannot write the JSON log any more: {exc}; it stops here")
                self._log_file = None
        if isinstance(event, DnsQuery):
            self.renderer.live(event, event.failed and self._first(event.name.lower(), event.outcome, only=TIMEOUTS))
            self._show_failed_lookup(event)
        elif isinstance(event, Connect | Closed):
            self.renderer.live(event, event.failed and self._first(event.dest, event.outcome))
        else:
            self.renderer.live(event, False)

    def _show_failed_lookup(self, query: DnsQuery) -> None:
        """Once the program's resolver asked a name as it was written (after the search
        domains) and nothing was found, the lookup failed: say so once."""
        if not query.failed:
            return
        stem = self.search.looked_up(query.name)
        if query.name.lower() != stem:
            return  # a search-list candidate: the next one may still find it
        if (stem, "lookup") in self._shown:
            return
        group = self.tally.failed_lookups(self.search).get(stem)
        if group is not None and self._first(stem, "lookup"):
            self.renderer.lookup_failed(stem, group)

    def _first(self, subject: str, reason: str, only: frozenset[str] | None = None) -> bool:
        """True the first time ``subject`` fails for ``reason`` (and ``reason`` is in ``only``)."""
        if only is not None and reason not in only:
            return False
        if (subject, reason) in self._shown:
            return False
        self._shown.add((subject, reason))
        return True

    # -- callbacks -------------------------------------------------------------------------

    def start(self, command: Sequence[str], agent: str, version: str = __version__) -> None:
        self.record(Start(time.time(), command, agent, version))

    def connect(
        self,
        pid: int,
        dest: Endpoint,
        outcome: str,
        decision: RouteDecision | None,
        duration: float | None = None,
        local: Endpoint | None = None,
        wall: float | None = None,
    ) -> None:
        """``wall``: when the outcome was known (default: now); the event's time is the start."""
        route = decision.route.value if decision is not None else "remote"
        self.record(
            Connect(
                (time.time() if wall is None else wall) - (duration or 0.0),
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
        if dest in self.nameservers:
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

    def on_connect(self, event: ConnectEvent) -> None:
        """``NetworkHandler.on_event``."""
        self.connect(event.pid, event.dest, event.outcome, event.decision, event.duration, event.local, event.wall)

    def on_udp(self, event: UdpEvent) -> None:
        """``UdpRedirector.on_event``: which process uses a socket (the flow starts with its first datagram)."""
        if len(self._pids) >= MAX_SOCKETS:
            self._pids.clear()
            self._how.clear()
        self._pids[event.sock] = event.pid
        self._how[(event.sock, event.dest)] = event.kind

    def on_stream_closed(self, stream: TcpStream, stats: TcpStats) -> None:
        """``LoopbackEndpoint(on_closed=...)``."""
        self.closed(stream.peer, stats, stream.opened_at)

    # UdpObserver (UdpRelays)

    def sent(self, sock_key: int, server: Endpoint, payload: bytes) -> None:
        self.dns.sent(sock_key, server, payload, time.time(), time.monotonic())
        self._arm_expiry()

    def received(self, sock_key: int, server: Endpoint, payload: bytes) -> None:
        event = self.dns.received(sock_key, server, payload, time.time(), time.monotonic())
        if event is not None:
            self.record(dataclasses.replace(event, pid=self._pids.get(sock_key)))

    def flow_started(self, sock_key: int, peer: Endpoint) -> None:
        self.udp(self._pids.get(sock_key), peer, self._how.get((sock_key, peer), "send"))

    def flow_ended(self, sock_key: int, peer: Endpoint, totals: RelayTotals) -> None:
        if peer in self.nameservers:
            return
        self.record(
            Closed(
                time.time(),
                str(peer),
                totals.bytes_up,
                totals.bytes_down,
                "closed",
                self.dns_map.name_of(peer.ip),
                proto="udp",
                datagrams_up=totals.datagrams_up,
                datagrams_down=totals.datagrams_down,
            )
        )

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
        return self.tally.summary(self.search, elsewhere)

    def finish(self, status: int, elsewhere: dict[str, list[str]] | None = None) -> Summary:
        summary = self.summary(elsewhere)
        self.renderer.summary(summary)
        self.record(Exit(time.time(), status, self.tally.events))
        if self._log_file is not None:
            try:
                self._log_file.close()
            except OSError as exc:
                self.renderer.message(f"closing the JSON log failed: {exc}")
            self._log_file = None
        return summary
