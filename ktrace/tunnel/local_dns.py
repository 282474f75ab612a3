"""Answering some of the program's DNS questions on this machine instead of in the cluster.

The program sends every question to the cluster's nameserver (it reads the
agent's resolv.conf). A question whose name a ``--local`` name rule matches is
sent instead to this machine's own nameserver (the first ``nameserver`` of
ktrace's /etc/resolv.conf), and the answer goes back to the program through the
same relay, so it comes from the address the program asked.

If this machine has no usable nameserver, or it refuses (ICMP port unreachable),
the program gets SERVFAIL at once rather than waiting for its timeout; a
nameserver that does not answer is not answered for either (the program times
out, as it would). Each question uses its own socket: a fresh source port, as a
resolver does.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Callable

from .dns_answers import parse_question, servfail_for

log = logging.getLogger("ktrace.tunnel")

QUESTION_TIMEOUT = 10.0
MAX_IN_FLIGHT = 256
MAX_ANSWER = 65535


def first_nameserver(resolv_conf: str) -> tuple[str, int] | None:
    for line in resolv_conf.splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) >= 2 and words[0] == "nameserver":
            address = words[1].split("%", 1)[0]
            try:
                ipaddress.ip_address(address)
            except ValueError:
                continue
            return address, 53
    return None


def system_nameserver(path: str = "/etc/resolv.conf") -> tuple[str, int] | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return first_nameserver(f.read())
    except OSError:
        return None


class LocalResolver:
    def __init__(self, wants_name: Callable[[str], bool], nameserver: tuple[str, int] | None) -> None:
        self._wants_name = wants_name
        self._nameserver = nameserver
        self._in_flight: dict[socket.socket, asyncio.TimerHandle] = {}

    def wants(self, query: bytes) -> bool:
        question = parse_question(query)
        return question is not None and self._wants_name(question.name)

    def forward(self, query: bytes, reply: Callable[[bytes], None]) -> None:
        """Ask this machine's nameserver; ``reply`` gets the answer (or a SERVFAIL)."""
        if self._nameserver is None or len(self._in_flight) >= MAX_IN_FLIGHT:
            self._fail(query, reply)
            return
        host = self._nameserver[0]
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.connect(self._nameserver)
            sock.send(query)
        except OSError as exc:
            log.debug("local DNS: cannot ask %s: %s", self._nameserver, exc)
            sock.close()
            self._fail(query, reply)
            return
        loop = asyncio.get_running_loop()
        self._in_flight[sock] = loop.call_later(QUESTION_TIMEOUT, self._done, sock)
        loop.add_reader(sock.fileno(), self._readable, sock, query, reply)

    def _readable(self, sock: socket.socket, query: bytes, reply: Callable[[bytes], None]) -> None:
        try:
            answer = sock.recv(MAX_ANSWER)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # ECONNREFUSED: nothing listens there
            log.debug("local DNS: %s: %s", self._nameserver, exc)
            self._done(sock)
            self._fail(query, reply)
            return
        self._done(sock)
        reply(answer)

    @staticmethod
    def _fail(query: bytes, reply: Callable[[bytes], None]) -> None:
        answer = servfail_for(query)
        if answer is not None:
            reply(answer)

    def _done(self, sock: socket.socket) -> None:
        timer = self._in_flight.pop(sock, None)
        if timer is None:
            return
        timer.cancel()
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(sock.fileno())
        sock.close()

    def close(self) -> None:
        for sock in list(self._in_flight):
            self._done(sock)
