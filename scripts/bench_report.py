"""scripts/bench: figures, their statistics and the markdown/JSON report. Pure: no processes here.

A ``Figure`` holds the raw samples of ktrace, of its baseline (the same program without ktrace,
or the same server reached directly) and optionally of a peer (proxychains-ng), all taken in the
same run, interleaved. What is reported is always a median, with the ratio or the difference to
the baseline's median; the target is checked against that, never against a single time.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

# How a figure compares to its target:
#   ratio     value / baseline <= target          (e.g. 1.10x the native time)
#   delta     value - baseline <= target          (e.g. +250 us of connect latency)
#   at_least  value >= target                     (e.g. 400 MB/s)
#   at_most   value <= target                     (e.g. 400 ms, 250 MB)
#   none      informational
Check = Literal["ratio", "delta", "at_least", "at_most", "none"]

FIGURE_IDS = (
    "syscall_getppid",
    "syscall_dd",
    "open_loop",
    "connect_latency",
    "tunnel_round_trip",
    "tunnel_connect",
    "throughput_up",
    "throughput_down",
    "concurrent_1000",
    "concurrent_1000_heavy",
    "dns_lookup",
    "dns_lookup_uncached",
    "startup_true",
    "ctrl_c",
)


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


@dataclass
class Figure:
    id: str
    title: str
    unit: str
    check: Check
    target: float | None
    baseline_label: str
    samples: list[float] = field(default_factory=list)
    baseline_samples: list[float] = field(default_factory=list)
    # Other tools doing the same job (proxychains-ng with microsocks, with dante), by name.
    peers: dict[str, list[float]] = field(default_factory=dict)
    loads: list[float] = field(default_factory=list)  # 1-minute load average at each run
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    extra: dict[str, float] = field(default_factory=dict)
    # For "at_least"/"at_most" figures that also have a condition (all connections complete).
    condition_ok: bool | None = None
    # The program under a seccomp filter alone (no tracer): the floor of any seccomp-based tool.
    floor_samples: list[float] = field(default_factory=list)

    @property
    def value(self) -> float | None:
        return median(self.samples)

    @property
    def baseline(self) -> float | None:
        return median(self.baseline_samples)

    @property
    def peer_values(self) -> dict[str, float | None]:
        return {name: median(samples) for name, samples in self.peers.items()}

    @property
    def ratio(self) -> float | None:
        v, b = self.value, self.baseline
        return v / b if v is not None and b else None

    @property
    def floor_ratio(self) -> float | None:
        f, b = median(self.floor_samples), self.baseline
        return f / b if f is not None and b else None

    @property
    def delta(self) -> float | None:
        v, b = self.value, self.baseline
        return v - b if v is not None and b is not None else None

    def peer_ratio(self, name: str) -> float | None:
        """ktrace against a peer: > 1 means ktrace is better (faster, or more throughput). For a
        latency figure ("delta"), the latency each adds to the baseline is compared."""
        v, p = self.value, self.peer_values.get(name)
        if v is None or p is None:
            return None
        if self.check == "delta":
            b = self.baseline
            if b is None:
                return None
            v, p = v - b, p - b
        if v <= 0 or p <= 0:
            return None
        higher_is_better = self.check == "at_least"
        return v / p if higher_is_better else p / v

    @property
    def peer_ratios(self) -> dict[str, float | None]:
        return {name: self.peer_ratio(name) for name in self.peers}

    @property
    def met(self) -> bool | None:
        if self.errors or self.value is None:
            return False if self.check != "none" else None
        if self.condition_ok is False:
            return False
        if self.target is None or self.check == "none":
            return None
        if self.check == "ratio":
            return self.ratio is not None and self.ratio <= self.target
        if self.check == "delta":
            return self.delta is not None and self.delta <= self.target
        if self.check == "at_least":
            return self.value >= self.target
        return self.value <= self.target

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for name in ("value", "baseline", "peer_values", "ratio", "delta", "peer_ratios", "floor_ratio", "met"):
            data[name] = getattr(self, name)
        return data


def _num(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return f"{text} {unit}".strip()


def _target_text(fig: Figure) -> str:
    if fig.target is None or fig.check == "none":
        return "—"
    if fig.check == "ratio":
        return f"≤ {fig.target:.2f}x"
    if fig.check == "delta":
        return f"≤ +{_num(fig.target, fig.unit)}"
    if fig.check == "at_least":
        return f"≥ {_num(fig.target, fig.unit)}"
    return f"≤ {_num(fig.target, fig.unit)}"


def _comparison(fig: Figure) -> str:
    if fig.check == "ratio" or (fig.check == "none" and fig.ratio is not None):
        return "—" if fig.ratio is None else f"{fig.ratio:.2f}x"
    if fig.check == "delta":
        return "—" if fig.delta is None else f"+{_num(fig.delta, fig.unit)}"
    return "—" if fig.ratio is None else f"{fig.ratio:.2f}x baseline"


def _verdict(fig: Figure) -> str:
    met = fig.met
    if fig.errors:
        return "FAILED: " + "; ".join(fig.errors)[:200]
    return {True: "met", False: "missed", None: "info"}[met]


def _peer_text(fig: Figure) -> str:
    if not fig.peers:
        return "—"
    texts = []
    for name, value in fig.peer_values.items():
        if value is None:
            texts.append(f"{name}: —")
            continue
        ratio = fig.peer_ratio(name)
        if ratio is None:
            ahead = ""
        elif ratio >= 1:
            ahead = f" — ktrace ahead {ratio:.2f}x"
        else:
            ahead = f" — ktrace behind {1 / ratio:.2f}x"
        added = fig.check == "delta" and fig.baseline is not None
        shown = f"+{_num(value - (fig.baseline or 0), fig.unit)}" if added else _num(value, fig.unit)
        texts.append(f"{name}: {shown}{ahead}")
    return "; ".join(texts)


def markdown(figures: list[Figure], machine: dict[str, Any], mode: str) -> str:
    lines = [
        f"# ktrace benchmark ({mode})",
        "",
        f"Machine: {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, kernel "
        f"{machine.get('kernel', '?')}, Python {machine.get('python', '?')}, grpcio {machine.get('grpcio', '?')}. "
        f"Load (1/5/15 min) before: {machine.get('load_before', '?')}, after: {machine.get('load_after', '?')}.",
        "",
        "Medians of all runs; baseline and peers measured in the same run, interleaved with ktrace. A peer's",
        "latency is shown as what it adds to the baseline, like ktrace's.",
        "",
        "| figure | ktrace | baseline | vs baseline | target | verdict | peer | runs | load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for fig in figures:
        load = f"{min(fig.loads):.1f}-{max(fig.loads):.1f}" if fig.loads else "—"
        baseline = f"{_num(fig.baseline, fig.unit)} ({fig.baseline_label})" if fig.baseline_label else "—"
        lines.append(
            f"| {fig.title} | {_num(fig.value, fig.unit)} | {baseline} | {_comparison(fig)} | {_target_text(fig)} "
            f"| {_verdict(fig)} | {_peer_text(fig)} | {len(fig.loads)} | {load} |"
        )
    notes = [(fig.title, note) for fig in figures for note in fig.notes]
    if notes:
        lines += ["", "Notes:", ""]
        lines += [f"- {title}: {note}" for title, note in notes]
    return "\n".join(lines) + "\n"


def report_json(figures: list[Figure], machine: dict[str, Any], mode: str) -> dict[str, Any]:
    return {"mode": mode, "machine": machine, "figures": [fig.to_json() for fig in figures]}
