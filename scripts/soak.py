"""scripts/soak: do ktrace's and the agent's memory stay bounded over a long, mixed run?

    scripts/soak [--minutes M] [--idle S] [--bursts N] [--burst-size N] [--quick] [--out DIR]
                 [--ktrace PATH]

Sets up the tests' namespace cluster (tests/nscluster.py: the agent on a Unix socket in the
cluster namespace), then:

1. soak: ``ktrace run`` of scripts/soak_workload.py on the laptop side for --minutes (lookups,
   HTTP, TCP and UDP echo, NXDOMAIN, refused connects, raw DNS queries, child processes), then
   --idle seconds in which the program makes no call ktrace sees. The resident set size (VmRSS)
   of ktrace and of the agent is sampled every --interval seconds.
2. rejected calls: --bursts bursts of --burst-size calls at once with a wrong token (half
   Handshakes, half Connect streams), from a client on the laptop side; the agent's RSS is taken
   before the first burst, right after each (once its calls were all answered) and --settle
   seconds later (the agent gives freed memory back after 5 quiet seconds).

Prints a markdown table and writes DIR/soak.md and DIR/soak.json. The figures: RSS at the end of
the warm-up (the first WARMUP_SHARE of the load, at least 30 s when there is time), at the end of
the load, its maximum after the warm-up, and after the idle time. ``--quick`` (a short run, small
bursts) only shows the script works (tests/test_soak.py); memory is never a pass/fail test: the
exit status is 0 when every phase ran and was measured, 1 otherwise. Needs root (namespaces).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))

from bench_env import agent_of, load_text, machine_info
from e2e_helpers import Deadline, read_line
from nscluster import ClusterError, NamespaceCluster, _tool, unavailable_reason

HERE = pathlib.Path(__file__).resolve().parent
WORKLOAD = HERE / "soak_workload.py"
WARMUP_SHARE = 0.2
MIN_WARMUP = 30.0

# The rejected-calls client, run on the laptop side. It reads a line on stdin before each burst
# (so the agent's RSS can be taken between bursts) and prints one line after it.
BURST_CLIENT = r"""
import asyncio, sys
import grpc, grpc.aio
from ktrace_agent.wire import PROTOCOL_VERSION, rpc

async def burst(address, size):
    async with grpc.aio.insecure_channel(rpc.grpc_target(address), options=rpc.CHANNEL_OPTIONS) as channel:
        stub = rpc.Stub(channel)
        bad = rpc.bearer_metadata("not-the-token")
        async def handshake():
            try:
                request = rpc.HandshakeRequest(protocol_version=PROTOCOL_VERSION)
                await stub.handshake(request, metadata=bad, timeout=60)
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK
        async def stream():
            call = stub.connect(metadata=bad)
            return await call.code()
        codes = await asyncio.gather(*(handshake() if i % 2 else stream() for i in range(size)))
    return sum(code == grpc.StatusCode.UNAUTHENTICATED for code in codes)

async def main():
    address, size = sys.argv[1], int(sys.argv[2])
    for line in sys.stdin:
        if line.strip() != "go":
            break
        rejected = await burst(address, size)
        print(f"burst {rejected}", flush=True)

asyncio.run(main())
"""


def rss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _mb(kb: int | None) -> float | None:
    return None if kb is None else round(kb / 1024, 1)


@dataclass
class Series:
    """RSS samples of one process: (seconds since the soak started, kB)."""

    name: str
    pid: int
    samples: list[tuple[float, int]] = field(default_factory=list)

    def sample(self, t: float) -> None:
        kb = rss_kb(self.pid)
        if kb is not None:
            self.samples.append((round(t, 1), kb))

    def at(self, t: float) -> int | None:
        """The last sample taken at or before ``t``."""
        before = [kb for when, kb in self.samples if when <= t]
        return before[-1] if before else None

    def at_or_after(self, t: float) -> int | None:
        """The first sample taken at or after ``t`` (the first one may predate the exec)."""
        after = [kb for when, kb in self.samples if when >= t]
        return after[0] if after else None

    def max_between(self, start: float, end: float) -> int | None:
        inside = [kb for when, kb in self.samples if start <= when <= end]
        return max(inside) if inside else None

    def figures(self, warm: float, load_end: float, idle_end: float) -> dict[str, float | None]:
        warm_kb, end_kb = self.at(warm), self.at(load_end)
        return {
            "start_mb": _mb(self.at_or_after(1.0)),
            "warm_mb": _mb(warm_kb),
            "load_end_mb": _mb(end_kb),
            "max_after_warm_mb": _mb(self.max_between(warm, load_end)),
            "growth_after_warm_mb": _mb(end_kb - warm_kb) if warm_kb is not None and end_kb is not None else None,
            "idle_end_mb": _mb(self.at(idle_end)),
        }


def _agent_pid(c: NamespaceCluster) -> int:
    for pid in c.pids:
        try:
            cmdline = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"ktrace-agent" in cmdline or b"ktrace_agent" in cmdline:
            return pid
    raise ClusterError("the agent process was not found")


def soak(c: NamespaceCluster, ktrace: str, minutes: float, idle: float, interval: float) -> dict[str, Any]:
    seconds = minutes * 60
    argv = [
        ktrace,
        "run",
        "-q",
        "--agent",
        c.agent_addr,
        "--token-file",
        c.token_file,
        "--",
        sys.executable,
        str(WORKLOAD),
        "--seconds",
        str(seconds),
        "--idle",
        str(idle),
    ]
    agent = Series("agent", _agent_pid(c))
    proc = c.popen_laptop(argv)
    tracer = Series("ktrace", proc.pid)  # `ip netns exec` execs ktrace: the same pid
    started = time.monotonic()
    load_end = idle_end = None
    done_line = ""
    try:
        assert proc.stdout is not None
        while idle_end is None:
            now = time.monotonic() - started
            tracer.sample(now)
            agent.sample(now)
            if now > seconds + idle + 120:
                raise Deadline("the workload did not finish in time")
            try:
                line = read_line(proc, interval)
            except Deadline:
                if proc.poll() is not None:
                    raise
                continue
            if line.startswith("load-done"):
                load_end = time.monotonic() - started
                done_line = line
                tracer.sample(load_end)
                agent.sample(load_end)
            elif line == "idle-done":
                idle_end = time.monotonic() - started
                tracer.sample(idle_end)
                agent.sample(idle_end)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert load_end is not None
    warm = min(max(MIN_WARMUP, load_end * WARMUP_SHARE), load_end * 0.5)
    _, cycles, errors = done_line.split()
    return {
        "seconds": round(load_end, 1),
        "idle_seconds": round(idle_end - load_end, 1),
        "warmup_seconds": round(warm, 1),
        "cycles": int(cycles),
        "workload_errors": int(errors),
        "exit_status": proc.returncode,
        "stderr_tail": err[-2000:],
        "ktrace": tracer.figures(warm, load_end, idle_end),
        "agent": agent.figures(warm, load_end, idle_end),
        "samples": {"ktrace": tracer.samples, "agent": agent.samples},
    }


def bursts(c: NamespaceCluster, count: int, size: int, settle: float) -> dict[str, Any]:
    """``count`` bursts; the agent's RSS right after each one and once it was quiet ``settle`` s."""
    agent_pid = _agent_pid(c)
    proc = c.popen_laptop([sys.executable, "-c", BURST_CLIENT, c.agent_addr, str(size)], stdin=subprocess.PIPE)
    before = rss_kb(agent_pid)
    after: list[int | None] = []
    settled: list[int | None] = []
    rejected: list[int] = []
    try:
        assert proc.stdin is not None
        for _ in range(count):
            proc.stdin.write("go\n")
            proc.stdin.flush()
            line = read_line(proc, 300)
            rejected.append(int(line.split()[1]))
            after.append(rss_kb(agent_pid))
            time.sleep(settle)  # the quiet time after which the agent gives freed memory back
            settled.append(rss_kb(agent_pid))
        proc.stdin.close()
        proc.wait(timeout=60)
        assert proc.stderr is not None
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    last = settled[-1] if settled else None
    return {
        "bursts": count,
        "size": size,
        "settle_seconds": settle,
        "rejected": rejected,
        "agent_before_mb": _mb(before),
        "agent_after_mb": [_mb(kb) for kb in after],
        "agent_settled_mb": [_mb(kb) for kb in settled],
        "growth_mb": _mb(last - before) if last is not None and before is not None else None,
        "client_status": proc.returncode,
        "client_stderr_tail": err[-2000:],
    }


def _row(label: str, fig: dict[str, float | None]) -> str:
    cells = [fig[k] for k in ("start_mb", "warm_mb", "load_end_mb", "max_after_warm_mb", "growth_after_warm_mb")]
    return f"| {label} | " + " | ".join("-" if v is None else f"{v}" for v in cells) + f" | {fig['idle_end_mb']} |"


def markdown(result: dict[str, Any]) -> str:
    s, b, m = result["soak"], result["bursts"], result["machine"]
    lines = [
        f"soak ({result['mode']}): {s['seconds']} s of load ({s['cycles']} cycles, {s['workload_errors']} errors), "
        f"warm-up {s['warmup_seconds']} s, then {s['idle_seconds']} s idle; commit {m.get('commit', '?')}, "
        f"load {m.get('load_after', '?')}",
        "",
        "| process | start MB | after warm-up MB | end of load MB | max after warm-up MB | growth after warm-up MB "
        "| after idle MB |",
        "|---|---|---|---|---|---|---|",
        _row("ktrace", s["ktrace"]),
        _row("agent", s["agent"]),
        "",
        f"rejected calls: {b['bursts']} bursts of {b['size']} (rejected {b['rejected']}); agent RSS "
        f"{b['agent_before_mb']} MB before, right after each: {b['agent_after_mb']} MB, {b['settle_seconds']} s "
        f"after each: {b['agent_settled_mb']} MB (growth {b['growth_mb']} MB)",
    ]
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="load time (default %(default)s)")
    p.add_argument("--idle", type=float, default=100.0, help="idle seconds after the load (default %(default)s)")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between RSS samples (default %(default)s)")
    p.add_argument("--bursts", type=int, default=6, help="bursts of rejected calls (default %(default)s)")
    p.add_argument("--burst-size", type=int, default=3000, help="calls per burst (default %(default)s)")
    p.add_argument("--settle", type=float, default=8.0, help="seconds waited after each burst (default %(default)s)")
    p.add_argument("--quick", action="store_true", help="20 s of load, 5 s idle, 2 bursts of 200: checks it works")
    p.add_argument("--out", default="soak-out", metavar="DIR", help="where soak.md and soak.json go")
    p.add_argument(
        "--ktrace", metavar="PATH", help="the ktrace to measure, with the ktrace-agent beside it (default: installed)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.quick:
        args.minutes, args.idle, args.interval, args.bursts, args.burst_size, args.settle = (
            20 / 60,
            5.0,
            1.0,
            2,
            200,
            1.0,
        )
    reason = unavailable_reason()
    if reason:
        print(f"scripts/soak: {reason}", file=sys.stderr)
        return 2
    machine = machine_info()
    git = subprocess.run(
        ["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True
    )
    machine["commit"] = git.stdout.strip() or "?"
    ktrace = args.ktrace or _tool("ktrace")
    machine["agent"] = agent_of(args.ktrace)
    try:
        c = NamespaceCluster.up()
    except ClusterError as exc:
        print(f"scripts/soak: {exc}", file=sys.stderr)
        return 1
    try:
        if c.agent_error:
            print(f"scripts/soak: the agent did not start: {c.agent_error}", file=sys.stderr)
            return 1
        print(f"soak: {args.minutes} min of load, {args.idle} s idle (load {load_text()})", file=sys.stderr)
        soaked = soak(c, ktrace, args.minutes, args.idle, args.interval)
        print(f"bursts: {args.bursts} x {args.burst_size} rejected calls", file=sys.stderr)
        burst = bursts(c, args.bursts, args.burst_size, args.settle)
    except (Deadline, ClusterError, OSError, subprocess.SubprocessError, ValueError) as exc:
        print(f"scripts/soak: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        c.teardown()
    machine["load_after"] = load_text()
    result = {
        "mode": "quick" if args.quick else "full",
        "machine": machine,
        "ktrace": ktrace,
        "soak": soaked,
        "bursts": burst,
    }
    os.makedirs(args.out, exist_ok=True)
    text = markdown(result)
    pathlib.Path(args.out, "soak.md").write_text(text)
    pathlib.Path(args.out, "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    print(text)
    ok = soaked["exit_status"] == 0 and burst["client_status"] == 0 and len(burst["agent_after_mb"]) == args.bursts
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
