"""Showing events and the summary on stderr: rich on a terminal, plain lines otherwise.

Nothing here writes to stdout: the program's stdout is the program's. The plain
form is one line per item, each starting with ``ktrace:`` so it can be grepped out
of the program's own stderr.
"""

from __future__ import annotations

import enum
from collections import Counter
from typing import TextIO

from ktrace.report.events import AGENT_UNREACHABLE, Closed, Connect, DnsQuery, Event, UdpFlow
from ktrace.report.summary import AskedName, Row, Summary

PREFIX = "ktrace: "


class Verbosity(enum.IntEnum):
    QUIET = 0  # -q: nothing
    FAILURES = 1  # default: failures as they happen; the summary if anything failed
    ALL = 2  # -v: every event, and the summary

    @classmethod
    def parse(cls, text: str) -> Verbosity:
        names = {"quiet": cls.QUIET, "failures": cls.FAILURES, "all": cls.ALL}
        try:
            return names[text.strip().lower()]
        except KeyError:
            raise ValueError(f"unknown output level {text!r}: use quiet, failures or all") from None


def human_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 1:
        return f" {seconds * 1000:.1f}ms"
    return f" {seconds:.2f}s"


def _route(route: str, rule: str | None) -> str:
    return f"[{route}, {rule}]" if rule else f"[{route}]"


def _cause(cause: str | None) -> str:
    return f" ({cause}: the cluster never saw it)" if cause == AGENT_UNREACHABLE else (f" ({cause})" if cause else "")


def _named(dest: str, name: str | None) -> str:
    return f"{dest} ({name})" if name else dest


def describe(event: Event) -> str | None:
    """One line for an event, without the prefix; None for events not shown live."""
    if isinstance(event, DnsQuery):
        result = ", ".join(event.addresses) if event.addresses else event.outcome
        if event.detail:
            result += f" ({event.detail})"
        return (
            f"dns {event.qtype} {event.name} -> {result}{_cause(event.cause)} "
            f"{_route(event.route, event.rule)}{_duration(event.duration)}"
        )
    if isinstance(event, Connect):
        return (
            f"connect {_named(event.dest, event.name)} -> {event.outcome}{_cause(event.cause)} "
            f"{_route(event.route, event.rule)} pid {event.pid}{_duration(event.duration)}"
        )
    if isinstance(event, UdpFlow):
        pid = f" pid {event.pid}" if event.pid else ""
        return f"udp {_named(event.dest, event.name)} first {event.how} {_route(event.route, event.rule)}{pid}"
    if isinstance(event, Closed):
        counts = ""
        if event.datagrams_up is not None:
            counts = f" ({event.datagrams_up} up, {event.datagrams_down} down)"
        return (
            f"close {event.proto} {_named(event.dest, event.name)} up {human_bytes(event.bytes_up)} "
            f"down {human_bytes(event.bytes_down)}{counts} {event.outcome}{_duration(event.duration)}"
        )
    return None


COLUMNS = ("NAME", "ADDRESS", "PROTO", "ROUTE", "ATTEMPTS", "OK", "FAILED", "UP", "DOWN")


def row_cells(row: Row) -> tuple[str, ...]:
    has_bytes = row.proto == "tcp" or (row.proto == "udp" and bool(row.bytes_up or row.bytes_down))
    route = f"{row.route} ({row.rule})" if row.rule else row.route
    return (
        row.name or "-",
        row.dest or "-",
        row.proto,
        route,
        str(row.attempts),
        str(row.ok),
        row.failures_text() or "-",
        human_bytes(row.bytes_up) if has_bytes else "-",
        human_bytes(row.bytes_down) if has_bytes else "-",
    )


def plain_table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]


class Renderer:
    def __init__(self, stream: TextIO, verbosity: Verbosity, *, terminal: bool | None = None) -> None:
        self.stream = stream
        self.verbosity = verbosity
        isatty = getattr(stream, "isatty", None)
        self.terminal = terminal if terminal is not None else bool(isatty and isatty())
        self._console = None
        if self.terminal:
            from rich.console import Console

            self._console = Console(file=stream, highlight=False, soft_wrap=True)

    def _line(self, text: str, style: str = "") -> None:
        if self._console is not None:
            self._console.print(f"[bold]ktrace:[/] {_escape(text)}", style=style or None)
        else:
            self.stream.write(PREFIX + text + "\n")
            self.stream.flush()

    def live(self, event: Event, failed: bool) -> None:
        """Show an event as it happens (the caller decides which failures are worth it)."""
        if self.verbosity is Verbosity.QUIET or (self.verbosity is Verbosity.FAILURES and not failed):
            return
        text = describe(event)
        if text is not None:
            self._line(text, "red" if failed else "dim")

    def lookup_failed(self, name: str, asked: list[AskedName]) -> None:
        """A name the program looked up was found nowhere its search list tried."""
        if self.verbosity is Verbosity.QUIET:
            return
        outcomes: Counter[str] = Counter()
        for entry in asked:
            outcomes.update(entry.failures)
        reasons = ", ".join(f"{o} x{n}" if n > 1 else o for o, n in outcomes.items())
        names = ", ".join(entry.name for entry in asked)
        self._line(
            f"dns lookup of {name} failed: {reasons} (asked {names}) {_route(asked[-1].route, asked[-1].rule)}", "red"
        )

    def summary(self, summary: Summary) -> None:
        if self.verbosity is Verbosity.QUIET or not summary.rows:
            return
        if self.verbosity is Verbosity.FAILURES and not summary.failed:
            return
        rows = sorted(summary.rows, key=lambda r: (not r.failed, r.proto == "dns", r.name or "", r.dest or ""))
        if self._console is not None:
            self._rich_summary(rows, summary.hints)
        else:
            self._plain_summary(rows, summary.hints)
        if summary.untracked:
            self._line(f"{summary.untracked} more event(s) to other destinations and names are counted in no row")

    def _plain_summary(self, rows: list[Row], hints: list[str]) -> None:
        self._line(f"summary: {len(rows)} destination(s), {sum(r.failed for r in rows)} with failures")
        for line in plain_table([COLUMNS, *(row_cells(r) for r in rows)]):
            self._line("  " + line)
        for hint in hints:
            self._line("hint: " + hint)

    def _rich_summary(self, rows: list[Row], hints: list[str]) -> None:
        from rich.table import Table

        assert self._console is not None
        table = Table(title="ktrace: network summary", title_justify="left", header_style="bold")
        for column in COLUMNS:
            table.add_column(column, justify="right" if column in ("ATTEMPTS", "OK", "UP", "DOWN") else "left")
        for row in rows:
            table.add_row(*(_escape(cell) for cell in row_cells(row)), style="red" if row.failed else None)
        self._console.print(table)
        for hint in hints:
            self._console.print(f"[bold yellow]hint:[/] {_escape(hint)}")

    def message(self, text: str) -> None:
        """A note from ktrace itself, shown unless quiet."""
        if self.verbosity is not Verbosity.QUIET:
            self._line(text, "yellow")


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)
