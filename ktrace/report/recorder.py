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
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TextIO, TypeVar

from ktrace import __version__
from ktrace.report.dns_tracker import DnsTracker
from ktrace.report.events import AGENT_UNREACHABLE, Closed, Connect, DnsQuery, Event, Exit, Start, UdpFlow, to_json
from ktrace.report.render import Renderer
from ktrace.report.searchlist import SearchList
from ktrace.report.summary import Summary, Tally
from ktrace.rules import RouteDecision
from ktrace.tracer.tcp import ConnectEvent
from ktrace.tracer.udp import UdpEvent
from ktrace.tunnel.dns_map import DnsMap
from ktrace.tunnel.health import TunnelHealth
from ktrace.tunnel.types import Connection, Endpoint, TcpStats
from ktrace.tunnel.udp_relay import RelayTotals

log = logging.getLogger("ktrace.report")

EXPIRY_INTERVAL = 1.0
# DNS failures shown as they happen; the others once the whole lookup failed.
TIMEOUTS = frozenset({"timeout", "SERVFAIL", "malformed"})
# UDP sockets whose process and first use are remembered, the most recently used kept: a
# lookup's socket is used within milliseconds, and glibc opens one (and two RFC 6724 probes)
# per getaddrinfo, so keeping every socket ever seen grew ktrace by ~13 MB per 65,536 of them.
MAX_SOCKETS = 4096


K = TypeVar("K")
V = TypeVar("V")


def _remember(recent: OrderedDict[K, V], key: K, value: V) -> None:
    recent[key] = value
    recent.move_to_end(key)
    if len(recent) > MAX_SOCKETS:
        recent.popitem(last=False)


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
        hosts: frozenset[str] = frozenset(),
        health: TunnelHealth | None = None,
    ) -> None:
        """``hosts``: the names of the hosts file the program reads. ``health``: the tunnel's, to
        name the agent as the cause of what fails while it cannot be reached."""
        self.renderer = renderer
        self.search = search
        self.dns_map = dns_map
        self.tally = Tally(hosts)
        self.dns = DnsTracker(route_of_name)
        self.health = health
        self.agent = "the agent"
        self._deferred: set[str] = set()  # failed lookups shown once their last questions end
        self._expiring = False
        self._log_file = log_file
        self.nameservers = nameservers
        self._shown: set[tuple[str, str]] = set()
        self._pids: OrderedDict[int, int] = OrderedDict()  # program socket inode -> pid
        self._how: OrderedDict[tuple[int, Endpoint], str] = OrderedDict()  # how a UDP flow started
        self._expiry: asyncio.TimerHandle | None = None

    # -- the record ------------------------------------------------------------------------

    def record(self, event: Event) -> None:
        event = self._with_cause(event)
        self.tally.add(event)
        if self._log_file is not None:
            try:
                self._log_file.write(json.dumps(to_json(event), separators=(",", ":")) + "\n")
                self._log_file.flush()
            except (OSError, ValueError) as exc:
                self.renderer.message(f"cannot write the JSON log any more: {exc}; it stops here")
                self._log_file = None
        if isinstance(event, DnsQuery):
            shown = event.cause is not None or event.outcome in TIMEOUTS
            reason = f"{event.outcome} {event.cause}"
            self.renderer.live(event, event.failed and shown and self._first(event.name.lower(), reason))
            self._show_failed_lookup(event)
        elif isinstance(event, Connect | Closed):
            reason = f"{event.outcome} {event.cause}" if isinstance(event, Connect) else event.outcome
            self.renderer.live(event, event.failed and self._first(event.dest, reason))
        else:
            self.renderer.live(event, False)

    def _with_cause(self, event: Event) -> Event:
        """A connect that timed out, or a DNS question never answered, while the tunnel to the
        agent was down failed because of that (the program saw ETIMEDOUT or its resolver's
        timeout): say so, not what such a failure means when the agent works."""
        if self.health is None or not self.health.down:
            return event
        if isinstance(event, Connect) and event.outcome == "ETIMEDOUT" and event.route == "remote":
            return dataclasses.replace(event, cause=AGENT_UNREACHABLE)
        if isinstance(event, DnsQuery) and event.outcome == "timeout" and event.route == "remote":
            return dataclasses.replace(event, cause=AGENT_UNREACHABLE)
        return event

    def _show_failed_lookup(self, query: DnsQuery) -> None:
        """Once the program's resolver asked a name as it was written (after the search
        domains) and nothing was found, the lookup failed: say so once, when none of its
        questions is still waiting for an answer (glibc asks A and AAAA at once: the line must
        count both, as the summary will)."""
        stem = self.search.looked_up(query.name)
        if stem in self._deferred:
            self._show_lookup(stem)
            return
        if not query.failed or query.name.lower() != stem:
            return  # a search-list candidate: the next one may still find it
        if (stem, "lookup") not in self._shown:
            self._show_lookup(stem)

    def _show_lookup(self, stem: str) -> None:
        if self._expiring:
            self._deferred.add(stem)  # its other expired questions are not counted yet
            return
        self._deferred.discard(stem)
        group = self.tally.failed_lookups(self.search).get(stem)
        if group is None:
            return
        if self.dns.pending(self.search.candidates(stem)):
            self._deferred.add(stem)
            return
        if self._first(stem, "lookup"):
            self.renderer.lookup_failed(stem, group)

    def on_agent_health(self, up: bool, reason: str) -> None:
        """``TunnelHealth`` listener: say when the agent stops answering, and when it is back."""
        if up:
            self.renderer.message(f"{self.agent} answers again")
            if self.tally.agent_outage is not None:
                self.tally.agent_outage += f", until {time.strftime('%H:%M:%S')}"
            return
        since = time.strftime("%H:%M:%S")
        self.renderer.message(
            f"lost {self.agent}: {reason}; new connections wait for it (up to the connect timeout) and then "
            "fail with ETIMEDOUT, DNS questions go unanswered"
        )
        self.tally.agent_outage = f"{self.agent} stopped answering at {since} ({reason})"

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
        self.agent = f"the agent ({agent})"
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
        _remember(self._pids, event.sock, event.pid)
        _remember(self._how, (event.sock, event.dest), event.kind)

    def on_stream_closed(self, stream: Connection, stats: TcpStats) -> None:
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
        self._record_expired(self.dns.expire(time.monotonic()))
        if len(self.dns):
            self._arm_expiry()

    def _record_expired(self, events: list[DnsQuery]) -> None:
        """Questions that expired together are all counted before a lookup of theirs is shown."""
        self._expiring = True
        try:
            for event in events:
                self.record(event)
        finally:
            self._expiring = False
        for stem in list(self._deferred):
            self._show_lookup(stem)

    # -- the end ---------------------------------------------------------------------------

    def finish_dns(self) -> None:
        """Report the questions still unanswered when the program ended."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        self._record_expired(self.dns.expire(time.monotonic(), everything=True))

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
