"""What ktrace saw the program do on the network: plain, immutable events (pure).

Each event renders to one JSON object for ``--log-json`` (``to_json``), with the
fields documented in docs/log-schema.md and checked by docs/log-schema.json.
``SCHEMA_VERSION`` changes when a field changes meaning or disappears; adding a
field or an event type keeps it (readers must ignore what they do not know).
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 1

# connect() outcomes that are not failures.
CONNECT_OK = frozenset({"ok", "EINPROGRESS"})
# DNS outcomes: "answer" (records), "NODATA" (the name exists, no record of that
# type), "truncated" (retried over TCP), "unanswered" (the program exited first),
# an rcode name (NXDOMAIN, SERVFAIL, REFUSED, ...), "malformed" (the answer did not
# parse: ``detail`` says why), or "timeout".
DNS_OK = frozenset({"answer", "NODATA", "truncated", "unanswered"})


# ``cause``: why a failure happened when its outcome alone would mislead.
AGENT_UNREACHABLE = "agent unreachable"  # ktrace could not reach the agent: the cluster never saw it


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _optional(**fields: str | None) -> dict[str, str]:
    """Fields written only when they say something (older readers never saw them)."""
    return {key: value for key, value in fields.items() if value is not None}


@dataclass(frozen=True)
class Start:
    """ktrace started the program."""

    time: float
    command: Sequence[str]
    agent: str
    version: str
    kind = "start"

    def fields(self) -> dict[str, Any]:
        return {"command": list(self.command), "agent": self.agent, "ktrace_version": self.version}


@dataclass(frozen=True)
class DnsQuery:
    """One DNS question the program asked, and how it ended."""

    time: float  # when the question was sent
    name: str  # as asked on the wire (the resolver already applied the search list)
    qtype: str  # "A", "AAAA", "SRV", ...
    outcome: str
    route: str  # "remote": asked through the cluster; "local": this machine's resolver
    server: str  # the nameserver the program sent it to, "ip:port"
    addresses: tuple[str, ...] = ()
    duration: float | None = None  # seconds; None for a timeout
    rule: str | None = None  # the rule that made it local
    pid: int | None = None  # None when the socket is shared or unknown
    detail: str | None = None  # what was wrong with a malformed answer
    cause: str | None = None  # AGENT_UNREACHABLE: the tunnel to the agent was down
    kind = "dns"

    @property
    def failed(self) -> bool:
        return self.outcome not in DNS_OK

    def fields(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "name": self.name,
            "type": self.qtype,
            "outcome": self.outcome,
            "addresses": list(self.addresses),
            "route": self.route,
            "rule": self.rule,
            "server": self.server,
            "duration_ms": _ms(self.duration),
            **_optional(detail=self.detail, cause=self.cause),
        }


@dataclass(frozen=True)
class Connect:
    """One connect() to an IP destination, local or through the cluster."""

    time: float
    pid: int
    dest: str  # "ip:port" as the program wrote it ("[v6]:port")
    outcome: str  # "ok", "EINPROGRESS" (non-blocking, not finished yet) or an errno name
    route: str
    name: str | None = None  # the name the program resolved to this address (DNS map)
    rule: str | None = None  # the rule that decided the route, if the user's
    duration: float | None = None
    local: str | None = None  # the cluster-side socket's address
    proto: str = "tcp"
    cause: str | None = None  # AGENT_UNREACHABLE: the tunnel to the agent was down
    kind = "connect"

    @property
    def failed(self) -> bool:
        return self.outcome not in CONNECT_OK

    def fields(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "proto": self.proto,
            "dest": self.dest,
            "name": self.name,
            "route": self.route,
            "rule": self.rule,
            "outcome": self.outcome,
            "duration_ms": _ms(self.duration),
            "local": self.local,
            **_optional(cause=self.cause),
        }


@dataclass(frozen=True)
class UdpFlow:
    """The first datagram (or UDP connect) of a process to a destination."""

    time: float
    pid: int | None
    dest: str
    route: str
    how: str  # "connect" or "send"
    name: str | None = None
    rule: str | None = None
    kind = "udp"

    failed = False

    def fields(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "dest": self.dest,
            "name": self.name,
            "route": self.route,
            "rule": self.rule,
            "first": self.how,
        }


@dataclass(frozen=True)
class Closed:
    """A connection (or a UDP flow) through the cluster ended: bytes each way."""

    time: float
    dest: str
    bytes_up: int  # program -> destination
    bytes_down: int
    outcome: str  # "closed", "reset: ENAME", "aborted", "error: ..."
    name: str | None = None
    duration: float | None = None  # since the connect completed
    proto: str = "tcp"
    datagrams_up: int | None = None  # UDP only
    datagrams_down: int | None = None
    kind = "close"

    @property
    def failed(self) -> bool:
        return self.outcome.startswith(("reset", "error"))

    def fields(self) -> dict[str, Any]:
        return {
            "proto": self.proto,
            "dest": self.dest,
            "name": self.name,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "datagrams_up": self.datagrams_up,
            "datagrams_down": self.datagrams_down,
            "outcome": self.outcome,
            "duration_ms": _ms(self.duration),
        }


@dataclass(frozen=True)
class Exit:
    """The program (every process of it) ended."""

    time: float
    status: int  # the exit status ktrace returns (128+N for signal N)
    events: int = 0  # how many events were recorded before this one
    kind = "exit"

    def fields(self) -> dict[str, Any]:
        return {"status": self.status, "events": self.events}


Event = Start | DnsQuery | Connect | UdpFlow | Closed | Exit


def to_json(event: Event) -> dict[str, Any]:
    return {"v": SCHEMA_VERSION, "event": event.kind, "time": round(event.time, 6), **event.fields()}


def errno_name(number: int) -> str:
    return errno.errorcode.get(number, f"E{number}")


@dataclass
class EventLog:
    """Every event of a run, in order (the summary is built from it)."""

    events: list[Event] = field(default_factory=list)

    def add(self, event: Event) -> None:
        self.events.append(event)
