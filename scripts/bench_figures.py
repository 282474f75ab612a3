"""scripts/bench: how each figure is measured. Every run measures the baseline, ktrace and the
peer (if any) one after the other, so slow drifts of the machine's load hit all of them alike.

Programs time themselves where they can (csysloop's loop, cnetbench's connect → first byte,
transfers, lookups), so ktrace's start-up is not smeared into the other figures; start-up is
its own figure.
"""

from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from bench_env import BENCH_ADDR, BENCH_PORT, BenchEnv, BenchError, load, reset_peak, status_kib
from bench_report import Figure, median
from e2e_helpers import TERMINAL_JOB, Deadline, blocked_in, descendants, read_line, wait_until

from ktrace.tracer import syscalls

MB = 1_000_000
FLOOR = pathlib.Path(__file__).resolve().parent / "seccomp_floor.py"
DNS_NAME = "hello.default.svc.cluster.local."  # absolute: no search-list expansion


@dataclass(frozen=True)
class Sizes:
    runs: int
    getppid_calls: int
    dd_bytes: int
    open_calls: int
    connects: int  # per run
    bulk_bytes: int
    concurrent: int
    concurrent_bytes: int
    concurrent_heavy_bytes: int  # the busier variant: enough per connection to outrun the send budget
    concurrent_runs: int
    lookups: int  # per run
    startup_runs: int


QUICK = Sizes(
    runs=3,
    getppid_calls=300_000,
    dd_bytes=200_000,
    open_calls=2_000,
    connects=20,
    bulk_bytes=64 * MB,
    concurrent=1000,
    concurrent_bytes=4096,
    concurrent_heavy_bytes=64 * 1024,
    concurrent_runs=1,
    lookups=20,
    startup_runs=3,
)
FULL = Sizes(
    runs=7,
    getppid_calls=3_000_000,
    dd_bytes=2_000_000,
    open_calls=20_000,
    connects=200,
    bulk_bytes=500 * MB,
    concurrent=1000,
    concurrent_bytes=64 * 1024,
    concurrent_heavy_bytes=256 * 1024,
    concurrent_runs=3,
    lookups=200,
    startup_runs=10,
)


def _field(out: str, name: str) -> float:
    m = re.search(rf"\b{name} (\d+(?:\.\d+)?)", out)
    if m is None:
        raise BenchError(f"no {name!r} in {out.strip()[-200:]!r}")
    return float(m.group(1))


def _samples(out: str) -> list[float]:
    for line in out.splitlines():
        if line.startswith("lat_ns "):
            return [int(x) / 1000 for x in line.split()[1:]]  # microseconds
    raise BenchError(f"no samples in {out.strip()[-200:]!r}")


def _runs(fig: Figure, runs: int, one: Callable[[], None]) -> Figure:
    for _ in range(runs):
        fig.loads.append(load())
        try:
            one()
        except (BenchError, subprocess.TimeoutExpired, Deadline) as exc:
            fig.errors.append(str(exc))
            break
    return fig


# -- no network ---------------------------------------------------------------------------


def syscall_getppid(env: BenchEnv, s: Sizes) -> Figure:
    fig = Figure("syscall_getppid", f"getppid loop ({s.getppid_calls:,} calls)", "ms", "ratio", 1.10, "no ktrace")
    prog = env.programs["csysloop"]
    argv = [prog, "getppid", str(s.getppid_calls)]

    def one() -> None:
        fig.baseline_samples.append(_field(env.run("laptop", argv), "elapsed_ns") / 1e6)
        fig.samples.append(_field(env.run("laptop", env.ktrace_argv(*argv)), "elapsed_ns") / 1e6)
        fig.floor_samples.append(_field(env.run("laptop", _floor_argv(argv)), "elapsed_ns") / 1e6)

    fig.notes.append("the program's own loop time (ktrace's start-up is its own figure)")
    return _with_floor_note(_runs(fig, s.runs, one))


def _floor_argv(argv: list[str]) -> list[str]:
    return [sys.executable, str(FLOOR), *argv]


def _with_floor_note(fig: Figure) -> Figure:
    if fig.floor_ratio is not None:
        fig.notes.append(
            f"floor: the same program under a 1-instruction allow-all seccomp filter and no tracer runs "
            f"{fig.floor_ratio:.2f}x its native time (the kernel's syscall-entry cost for any seccomp'd task)"
        )
    return fig


def syscall_dd(env: BenchEnv, s: Sizes) -> Figure:
    fig = Figure("syscall_dd", f"dd bs=1 ({s.dd_bytes:,} bytes)", "ms", "ratio", 1.10, "no ktrace")
    argv = ["dd", "if=/dev/zero", "of=/dev/null", "bs=1", f"count={s.dd_bytes}"]

    def seconds(where_argv: list[str]) -> float:
        proc = env.cluster.run_in(env.cluster.laptop, where_argv, timeout=300)
        m = re.search(r"copied, ([0-9.e-]+) s", proc.stderr)
        if proc.returncode != 0 or m is None:
            raise BenchError(f"dd: {proc.stderr.strip()[-200:]}")
        return float(m.group(1)) * 1000

    def one() -> None:
        fig.baseline_samples.append(seconds(argv))
        fig.samples.append(seconds(env.ktrace_argv(*argv)))
        fig.floor_samples.append(seconds(_floor_argv(argv)))

    fig.notes.append("dd's own copy time")
    return _with_floor_note(_runs(fig, s.runs, one))


# tests/programs/stopfloor.c: the same open loop with its opens handed to a supervisor in C
# that only lets each one go on, as a ptrace tracer or a seccomp user-notification listener,
# sleeping between stops or spinning: what a stop costs here whatever the tracer's language.
STOP_FLOORS = ("trace", "trace-spin", "notif", "notif-spin")


def open_loop(env: BenchEnv, s: Sizes) -> Figure:
    fig = Figure("open_loop", f"open+close loop ({s.open_calls:,} opens)", "ms", "none", None, "no ktrace")
    argv = [env.programs["csysloop"], "open", str(s.open_calls), "/etc/hostname"]
    floors: dict[str, list[float]] = {mode: [] for mode in STOP_FLOORS}

    def one() -> None:
        fig.baseline_samples.append(_field(env.run("laptop", argv), "elapsed_ns") / 1e6)
        fig.samples.append(_field(env.run("laptop", env.ktrace_argv(*argv)), "elapsed_ns") / 1e6)
        for mode, samples in floors.items():
            samples.append(_field(env.run("laptop", [env.programs["stopfloor"], mode, *argv]), "elapsed_ns") / 1e6)

    _runs(fig, s.runs, one)
    baseline = fig.baseline
    if fig.value is not None and baseline is not None:
        per_open = (fig.value - baseline) * 1000 / s.open_calls
        fig.extra["added_us_per_open"] = per_open
        fig.notes.append(f"open/openat stop for the resolv.conf view: +{per_open:.1f} µs per open")
        added = {}
        for mode, samples in floors.items():
            value = median(samples)
            if value is not None:
                added[mode] = fig.extra[f"floor_{mode}_us_per_open"] = (value - baseline) * 1000 / s.open_calls
        if len(added) == len(STOP_FLOORS):
            fig.notes.append(
                "floor of a stop here, C supervisors that only let each open go on: ptrace "
                f"+{added['trace']:.1f} µs per open (sleeping between stops), +{added['trace-spin']:.1f} µs "
                f"(spinning); seccomp user notification +{added['notif']:.1f} / +{added['notif-spin']:.1f} µs"
            )
    return fig


# -- TCP ----------------------------------------------------------------------------------


def connect_latency(env: BenchEnv, s: Sizes) -> Figure:
    fig = Figure("connect_latency", "connect → first byte (median)", "µs", "delta", 250, "direct, in the cluster")
    argv = [env.programs["cnetbench"], "latency", BENCH_ADDR, str(BENCH_PORT), str(s.connects)]
    fig.peers = {name: [] for name in env.peers}

    def one() -> None:
        fig.baseline_samples += _samples(env.run("cluster", argv))
        fig.samples += _samples(env.run("laptop", env.ktrace_argv(*argv)))
        for name in env.peers:
            fig.peers[name] += _samples(env.run("laptop", env.peer_argv(name, *argv)))

    _runs(fig, s.runs, one)
    _peer_note(env, fig)
    return fig


def split_writes(env: BenchEnv, s: Sizes) -> Figure:
    """A request and its answer each in two writes, as an HTTP client sends a head then a body: the
    relay must not hold the second write back (Nagle on its own sockets)."""
    fig = Figure(
        "split_writes", "request and answer in two writes each (median)", "µs", "delta", None, "direct, in the cluster"
    )
    argv = [env.programs["cnetbench"], "split", BENCH_ADDR, str(BENCH_PORT), str(s.connects)]

    def one() -> None:
        fig.baseline_samples += _samples(env.run("cluster", argv))
        fig.samples += _samples(env.run("laptop", env.ktrace_argv(*argv)))

    fig.notes.append(
        "one connection, TCP_NODELAY on both programs' sockets (as Go's and curl's are): each time the "
        "client's second 1-byte write, 1 ms after its first, to the server's 2-byte answer, which it also "
        "writes 1 ms apart (so the figure includes 1 ms of the server's own); a relay leg with Nagle's "
        "algorithm on holds a second write until the first is acknowledged, ~40 ms with delayed ACKs"
    )
    return _runs(fig, s.runs, one)


def tunnel_round_trip(env: BenchEnv, s: Sizes) -> Figure:
    """The floor under connect → first byte: the tunnel's own round trip, no tracer, no stops."""
    fig = Figure("tunnel_round_trip", "tunnel round trip, 1 byte echoed on an open stream", "µs", "none", None, "")
    return _tunnel_floor(
        env,
        s,
        fig,
        "echo",
        "ktrace's tunnel code in the laptop namespace without a program or tracer (scripts/bench_tunnel_rtt.py): "
        "a byte through a socketpair, the splice, a Connect stream, the agent, the echo server and back. A "
        "connection's first byte needs two such round trips (open/opened, then the data): the floor of "
        "connect → first byte in this design",
    )


def tunnel_connect(env: BenchEnv, s: Sizes) -> Figure:
    """The floor under connect → first byte on a same-host agent: the connection as ktrace makes it,
    without a program, its stops or the parking."""
    fig = Figure("tunnel_connect", "tunnel connection, dial → first byte echoed", "µs", "none", None, "")
    return _tunnel_floor(
        env,
        s,
        fig,
        "connect",
        "ktrace's tunnel code in the laptop namespace without a program or tracer "
        "(scripts/bench_tunnel_rtt.py connect): the agent dials (on its desk line when it offers one), "
        "ktrace's end of a loopback TCP pair is handed over, a byte goes out and back. What "
        "connect → first byte adds beyond it is the program's stops and the parking",
    )


def _tunnel_floor(env: BenchEnv, s: Sizes, fig: Figure, mode: str, note: str) -> Figure:
    script = str(pathlib.Path(__file__).resolve().parent / "bench_tunnel_rtt.py")
    c = env.cluster
    argv = [sys.executable, script, c.agent_addr, c.token_file, BENCH_ADDR, str(BENCH_PORT), str(s.connects), mode]

    def one() -> None:
        fig.samples += _samples(env.run("laptop", argv))

    _runs(fig, s.runs, one)
    fig.notes.append(note)
    return fig


def _throughput(env: BenchEnv, s: Sizes, direction: str) -> Figure:
    title = "bulk TCP, program → cluster" if direction == "up" else "bulk TCP, cluster → program"
    fig = Figure(f"throughput_{direction}", title, "MB/s", "at_least", 400, "direct, in the cluster")
    argv = [env.programs["cnetbench"], direction, BENCH_ADDR, str(BENCH_PORT), str(s.bulk_bytes)]
    fig.peers = {name: [] for name in env.peers}

    def rate(out: str) -> float:
        return _field(out, "bytes") / (_field(out, "elapsed_ns") / 1e9) / MB

    def one() -> None:
        fig.baseline_samples.append(rate(env.run("cluster", argv)))
        fig.samples.append(rate(env.run("laptop", env.ktrace_argv(*argv))))
        for name in env.peers:
            fig.peers[name].append(rate(env.run("laptop", env.peer_argv(name, *argv))))

    _runs(fig, s.runs, one)
    fig.notes.append(f"{s.bulk_bytes // MB} MB per transfer, timed from the connect() call to the last byte")
    _peer_note(env, fig)
    return fig


def throughput_up(env: BenchEnv, s: Sizes) -> Figure:
    return _throughput(env, s, "up")


def throughput_down(env: BenchEnv, s: Sizes) -> Figure:
    return _throughput(env, s, "down")


def concurrent_1000(env: BenchEnv, s: Sizes) -> Figure:
    return _concurrent(env, s, "concurrent_1000", s.concurrent_bytes)


def concurrent_1000_heavy(env: BenchEnv, s: Sizes) -> Figure:
    return _concurrent(env, s, "concurrent_1000_heavy", s.concurrent_heavy_bytes)


def _concurrent(env: BenchEnv, s: Sizes, fid: str, size: int) -> Figure:
    fig = Figure(
        fid,
        f"{s.concurrent:,} concurrent connections, {size // 1024:,} KiB each, ktrace peak RSS",
        "MB",
        "at_most",
        250,
        "",
    )
    argv = [env.programs["cnetbench"], "concurrent", BENCH_ADDR, str(BENCH_PORT), str(s.concurrent), str(size)]
    completed: list[bool] = []
    times: list[float] = []
    agent_peaks: list[float] = []

    def one() -> None:
        agent = env.agent_pid()
        if agent is not None:
            reset_peak(agent)  # the agent outlives runs and figures: its peak from this run only
        proc = env.cluster.popen_laptop(env.ktrace_argv(*argv, "--hold"), stdin=subprocess.PIPE)
        try:
            line = read_line(proc, 300)
            # `ip netns exec` execs ktrace: proc.pid is ktrace's. The program holds its
            # connections' results until stdin closes, so ktrace is alive to be measured.
            hwm = status_kib(proc.pid, "VmHWM")
            agent_hwm = status_kib(agent, "VmHWM") if agent is not None else None
        finally:
            try:
                _, err = proc.communicate(input="", timeout=60)  # EOF on stdin: the program exits
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
        m = re.match(r"ok (\d+) of (\d+) elapsed_ns (\d+)", line)
        if m is None or hwm is None:
            raise BenchError(f"concurrent: {line!r} {err.strip()[-300:]}")
        completed.append(m.group(1) == m.group(2) and proc.returncode == 0)
        fig.samples.append(hwm / 1024)
        times.append(int(m.group(3)) / 1e9)
        if agent_hwm is not None:
            agent_peaks.append(agent_hwm / 1024)
        if not completed[-1]:
            fig.notes.append(f"run {len(completed)}: only {m.group(1)} of {m.group(2)} completed")

    _runs(fig, s.concurrent_runs, one)
    fig.condition_ok = bool(completed) and all(completed)
    agent_peak = median(agent_peaks)
    if agent_peak is not None:
        fig.extra["agent_peak_rss_mb"] = agent_peak
    if times:
        fig.extra["elapsed_s"] = median(times) or 0.0
        fig.notes.append(
            f"{size:,} bytes echoed on each (so as many each way); all complete: {fig.condition_ok}; "
            f"median run {fig.extra['elapsed_s']:.2f} s; agent peak RSS (median) "
            f"{agent_peak if agent_peak is not None else 0:.0f} MB"
        )
    return fig


def _peer_note(env: BenchEnv, fig: Figure) -> None:
    for name, error in env.peer_errors.items():
        fig.notes.append(f"peer {name} not measured: {error}")


# -- DNS and start-up -----------------------------------------------------------------------


def dns_lookup(env: BenchEnv, s: Sizes) -> Figure:
    fig = Figure("dns_lookup", "getaddrinfo, repeated (median)", "µs", "delta", 1000, "same server, in the cluster")
    return _dns(env, s, fig, ())


def dns_lookup_uncached(env: BenchEnv, s: Sizes) -> Figure:
    fig = Figure(
        "dns_lookup_uncached",
        "getaddrinfo through the agent, --no-dns-cache (median)",
        "µs",
        "delta",
        1000,
        "same server, in the cluster",
    )
    fig.notes.append("every lookup crosses the tunnel, as a first lookup of a name does")
    return _dns(env, s, fig, ("--no-dns-cache",))


def _dns(env: BenchEnv, s: Sizes, fig: Figure, options: tuple[str, ...]) -> Figure:
    argv = [env.programs["cnetbench"], "dns", DNS_NAME, str(s.lookups)]

    def one() -> None:
        fig.baseline_samples += _samples(env.run("cluster", argv))
        fig.samples += _samples(env.run("laptop", env.ktrace_argv(*argv, options=options)))

    fig.notes.append(
        f"glibc getaddrinfo({DNS_NAME}), A and AAAA, against the cluster's dnsmasq (TTL 5 s: with the DNS cache, "
        "a lookup within 5 s of the last one that reached the cluster is answered by ktrace)"
    )
    return _runs(fig, s.runs, one)


def startup_true(env: BenchEnv, s: Sizes) -> Figure:
    fig = Figure("startup_true", "`ktrace run --agent local -- /bin/true` wall", "ms", "at_most", 400, "/bin/true")

    def wall(argv: list[str]) -> float:
        t0 = time.perf_counter()
        env.run("laptop", argv, timeout=60)
        return (time.perf_counter() - t0) * 1000

    def one() -> None:
        fig.baseline_samples.append(wall(["/bin/true"]))
        fig.samples.append(wall([env.ktrace, "run", "--agent", "local", "--", "/bin/true"]))

    fig.notes.append("wall time from the benchmark, both through `ip netns exec` into the laptop namespace")
    return _runs(fig, s.startup_runs, one)


# -- signals --------------------------------------------------------------------------------

_WAIT_IN_CONNECT = "import socket, sys; socket.create_connection((sys.argv[1], 80))"


def ctrl_c(env: BenchEnv, s: Sizes) -> Figure:
    """Ctrl-C while the program waits in connect() to an address that drops SYNs: from the
    terminal's SIGINT to the process group until the foreground process has exited. Baseline: the
    same program in the cluster namespace, no ktrace."""
    fig = Figure(
        "ctrl_c",
        "Ctrl-C → exit, program waiting in connect()",
        "ms",
        "at_most",
        100,
        "the program alone, in the cluster",
    )
    c = env.cluster
    program = [sys.executable, "-c", _WAIT_IN_CONNECT, c.blackhole_v4]
    connect = syscalls.number("connect")

    def interrupted(ns: str, argv: list[str], env_vars: dict[str, str] | None) -> float:
        # A process group of its own with SIGINT at its default, as a shell's foreground job.
        proc = subprocess.Popen(
            [*TERMINAL_JOB, *c.netns_argv(ns), *argv],
            env=env_vars,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            wait_until(
                lambda: any(blocked_in(pid) == connect for pid in [proc.pid, *descendants(proc.pid)]),
                30,
                "the program waiting in connect()",
            )
            t0 = time.perf_counter()
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=10)
            elapsed = (time.perf_counter() - t0) * 1000
        finally:
            if proc.poll() is None:
                proc.kill()
            _, err = proc.communicate(timeout=30)
        if proc.returncode not in (128 + signal.SIGINT, -signal.SIGINT):
            raise BenchError(f"exited {proc.returncode} after Ctrl-C: {err.decode(errors='replace')[-300:]}")
        return elapsed

    def one() -> None:
        fig.baseline_samples.append(interrupted(c.cluster, program, None))
        traced = env.ktrace_argv(*program, options=("--connect-timeout", "60"))
        fig.samples.append(interrupted(c.laptop, traced, c.laptop_env()))

    fig.notes.append(
        "the program: Python's socket.create_connection to a black hole (60 s of dial time left under ktrace); "
        "the time includes the program's own exit (Python's KeyboardInterrupt) and ktrace's teardown"
    )
    return _runs(fig, s.startup_runs, one)


FIGURES: dict[str, Callable[[BenchEnv, Sizes], Figure]] = {
    "syscall_getppid": syscall_getppid,
    "syscall_dd": syscall_dd,
    "open_loop": open_loop,
    "connect_latency": connect_latency,
    "split_writes": split_writes,
    "tunnel_round_trip": tunnel_round_trip,
    "tunnel_connect": tunnel_connect,
    "throughput_up": throughput_up,
    "throughput_down": throughput_down,
    "concurrent_1000": concurrent_1000,
    "concurrent_1000_heavy": concurrent_1000_heavy,
    "dns_lookup": dns_lookup,
    "dns_lookup_uncached": dns_lookup_uncached,
    "startup_true": startup_true,
    "ctrl_c": ctrl_c,
}
