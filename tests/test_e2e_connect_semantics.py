"""A connect() under ktrace behaves as the same program's connect() in the pod: event loops keep
running while one connect waits (Node, asyncio, Go), outcomes reach poll/select/epoll and
SO_ERROR as the kernel reports them, signals interrupt a waiting connect at once, Ctrl-C ends
ktrace at once, and a thread that changes the address under the call cannot slip past ktrace.

Each scenario runs in the cluster namespace without ktrace (the pod) and on the laptop under
ktrace, and the two outputs are compared; timings are never asserted, only their order.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
from e2e_helpers import TERMINAL_JOB, blocked_in, descendants, wait_until
from fixture_programs import Programs
from nscluster import NamespaceCluster

from ktrace.tracer import syscalls

pytestmark = [pytest.mark.netns, pytest.mark.timeout(180)]

NODE_STALL = r"""
const order = [];
let ticks = 0;
const iv = setInterval(() => { ticks++; }, 10);
const stall = fetch(`http://${process.argv[2]}/`, { signal: AbortSignal.timeout(3000) })
  .then(() => order.push("stall connected"), (e) => order.push("stall " + e.name));
const hello = new Promise((r) => setTimeout(r, 100))
  .then(() => fetch(process.argv[3]))
  .then((r) => r.text())
  .then(() => order.push("hello ok"), (e) => order.push("hello " + e.name));
Promise.all([stall, hello]).then(() => {
  clearInterval(iv);
  for (const line of order) console.log(line);
  console.log(ticks >= 100 ? "ticking" : `stuck ${ticks}`);
});
"""

ASYNCIO_STALL = r"""
import asyncio, sys

async def main() -> None:
    order, ticks, running = [], 0, True

    async def ticker() -> None:
        nonlocal ticks
        while running:
            await asyncio.sleep(0.01)
            ticks += 1

    async def stall() -> None:
        host, port = sys.argv[1].rsplit(":", 1)
        try:
            await asyncio.wait_for(asyncio.open_connection(host, int(port)), 3)
            order.append("stall connected")
        except TimeoutError:
            order.append("stall TimeoutError")
        except OSError as exc:
            order.append(f"stall {type(exc).__name__}")

    async def hello() -> None:
        await asyncio.sleep(0.1)
        host, port = sys.argv[2].rsplit(":", 1)
        try:
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"GET / HTTP/1.0\r\n\r\n")
            await reader.read()
            writer.close()
            order.append("hello ok")
        except OSError as exc:
            order.append(f"hello {type(exc).__name__}")

    tick = asyncio.create_task(ticker())
    await asyncio.gather(stall(), hello())
    running = False
    await tick
    for line in order:
        print(line)
    print("ticking" if ticks >= 100 else f"stuck {ticks}")

asyncio.run(main())
"""

# Non-blocking connect, then wait for it with MODE, then SO_ERROR and a second connect().
OUTCOME = r"""
import errno, os, select, socket, sys
mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket()
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_SYNCNT, 1)  # a black hole gives up after ~3 s in the pod
s.setblocking(False)
name = lambda e: errno.errorcode.get(e, "OK") if e else "OK"
print("connect", name(s.connect_ex((host, port))))
fd = s.fileno()
if mode == "select":
    r, w, x = select.select([fd], [fd], [fd], 30)
    print("ready", "r" if r else "-", "w" if w else "-", "x" if x else "-")
elif mode == "poll":
    p = select.poll()
    p.register(fd, select.POLLIN | select.POLLOUT | select.POLLRDHUP)
    (_, ev), = p.poll(30000)
    names = ("POLLIN", "POLLOUT", "POLLERR", "POLLHUP", "POLLRDHUP")
    print("ready", sorted(n for n in names if ev & getattr(select, n)))
else:
    ep = select.epoll()
    edge = select.EPOLLET if mode == "epoll-et" else 0
    ep.register(fd, select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | edge)
    (_, ev), = ep.poll(30)
    names = ("EPOLLIN", "EPOLLOUT", "EPOLLERR", "EPOLLHUP", "EPOLLRDHUP")
    print("ready", sorted(n for n in names if ev & getattr(select, n)))
    if mode == "epoll-et":
        print("again-edge", ep.poll(0.2))  # edge-triggered: reported once
print("so_error", name(s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)))
print("so_error-twice", name(s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)))
print("connect-again", name(s.connect_ex((host, port))))
print("connect-third", name(s.connect_ex((host, port))))
"""


def _pod_and_traced(
    c: NamespaceCluster, argv: list[str], *, connect_timeout: float | None = None, timeout: float = 90
) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    in_pod = c.run_cluster(argv, timeout=timeout)
    traced = c.run_laptop(c.ktrace_argv(*argv, connect_timeout=connect_timeout), timeout=timeout)
    return in_pod, traced


@pytest.mark.parametrize("runtime", ["node", "asyncio", "go"])
def test_an_event_loop_keeps_running_while_one_connect_waits(
    runtime: str, ktrace_cluster: NamespaceCluster, programs: Programs
) -> None:
    """A connect to a black hole (abandoned after 3 s) while a ticker runs and, 100 ms in, a
    request to hello by its short name: the request answers first, the ticker never stops, the
    stalled connect ends by the program's own deadline, as in the pod."""
    c = ktrace_cluster
    blackhole, hello = f"{c.blackhole_v4}:80", f"hello:{c.hello_port}"
    if runtime == "node":
        if shutil.which("node") is None:
            pytest.skip("node is not installed")
        argv = ["node", "-e", NODE_STALL, "x", blackhole, f"http://{hello}/"]
        expected = "hello ok\nstall TimeoutError\nticking\n"
    elif runtime == "asyncio":
        argv = [sys.executable, "-c", ASYNCIO_STALL, blackhole, hello]
        expected = "hello ok\nstall TimeoutError\nticking\n"
    else:
        argv = [programs["goclient"], "-stall", blackhole, f"http://{hello}/"]
        expected = "hello ok\nstall TIMEOUT\n"
    in_pod, traced = _pod_and_traced(c, argv, connect_timeout=30)
    assert in_pod.returncode == 0, in_pod
    assert traced.returncode == 0, traced
    if runtime == "go":
        assert traced.stdout.startswith(expected), traced
        assert in_pod.stdout.startswith(expected), in_pod
        ticks = int(traced.stdout.split("ticks ")[1].split()[0])
        assert ticks >= 100, traced  # Go's ticker ran all along
    else:
        assert traced.stdout == in_pod.stdout == expected, (traced, in_pod)


@pytest.mark.parametrize("mode", ["select", "poll", "epoll-lt", "epoll-et"])
@pytest.mark.parametrize("where", ["hello", "refused", "blackhole"])
def test_a_non_blocking_connect_reports_its_outcome_as_in_the_pod(
    mode: str, where: str, ktrace_cluster: NamespaceCluster
) -> None:
    c = ktrace_cluster
    host, port = {
        "hello": (c.hello_v4, c.hello_port),
        "refused": (c.refused_v4, 80),
        "blackhole": (c.blackhole_v4, 80),
    }[where]
    # In the pod, TCP_SYNCNT=1 makes the black hole give up after ~3 s with ETIMEDOUT; the agent,
    # which does not see the program's socket options, is told the same by --connect-timeout.
    in_pod, traced = _pod_and_traced(c, [sys.executable, "-c", OUTCOME, mode, host, str(port)], connect_timeout=3)
    assert in_pod.returncode == 0, in_pod
    assert traced.returncode == 0, traced
    pod = in_pod.stdout
    if where != "hello" and mode in ("poll", "epoll-lt", "epoll-et"):
        # The one difference, by name: a failed connect in the pod is also readable (its
        # receive side is shut); under ktrace it reports POLLOUT|POLLERR|POLLHUP only (tcp.py).
        prefix = "E" if mode.startswith("epoll") else ""
        for extra in (f"'{prefix}POLLIN', ", f", '{prefix}POLLRDHUP'"):
            assert extra in pod, in_pod
            pod = pod.replace(extra, "")
    traced_out = traced.stdout
    if where != "hello" and mode == "epoll-et":
        # A failed connect wakes its waiters twice in the kernel (tcp_write_err: the error report,
        # then tcp_done's state change), so edge-triggered epoll reports it once or twice, as the
        # first epoll_wait ran after both wake-ups or between them: either is what a pod shows.
        once_or_twice = re.compile(r"^again-edge (\[\]|\[\(\d+, \d+\)\])$", re.MULTILINE)
        assert once_or_twice.search(pod), in_pod
        assert once_or_twice.search(traced_out), traced
        pod = once_or_twice.sub("again-edge <once or twice>", pod)
        traced_out = once_or_twice.sub("again-edge <once or twice>", traced_out)
    assert traced_out == pod, (traced, in_pod)
    assert traced.stdout.startswith("connect EINPROGRESS\n"), traced
    outcome = {"hello": "OK", "refused": "ECONNREFUSED", "blackhole": "ETIMEDOUT"}[where]
    assert f"so_error {outcome}\n" in traced.stdout, traced


@pytest.mark.parametrize("restart", [False, True], ids=["plain", "sa-restart"])
def test_a_signal_interrupts_a_blocking_connect_as_in_the_pod(
    restart: bool, ktrace_cluster: NamespaceCluster, programs: Programs
) -> None:
    """The handler runs at the alarm (300 ms), not when the connect ends; without SA_RESTART
    connect() fails with EINTR while the connection goes on (EALREADY, then its outcome);
    with it, the kernel restarts the call and it ends with the connection's outcome."""
    c = ktrace_cluster
    argv = [programs["csignal"], *(["--restart"] if restart else []), c.blackhole_v4, "80"]
    in_pod, traced = _pod_and_traced(c, argv, connect_timeout=3)
    assert in_pod.returncode == 0, in_pod
    assert traced.returncode == 0, traced
    assert traced.stdout == in_pod.stdout, (traced, in_pod)
    if restart:
        assert traced.stdout == "connect ETIMEDOUT\nhandler ran\n", traced
    else:
        assert traced.stdout == "connect EINTR\nhandler ran\nagain EALREADY\noutcome ETIMEDOUT\n", traced


def test_ctrl_c_ends_ktrace_while_the_program_waits_in_connect(ktrace_cluster: NamespaceCluster) -> None:
    """Ctrl-C reaches a program waiting in connect() (60 s of agent dial time left) at once: the
    program dies of SIGINT and ktrace exits with 128+2 well before the dial could have ended."""
    c = ktrace_cluster
    program = "import socket; socket.create_connection((__import__('sys').argv[1], 80))"
    traced = c.ktrace_argv(sys.executable, "-c", program, c.blackhole_v4, connect_timeout=60)
    argv = [*TERMINAL_JOB, *c.netns_argv(c.laptop), *traced]
    # A process group of its own, as a shell's foreground job has (killpg must not reach pytest).
    proc = subprocess.Popen(
        argv,
        env=c.laptop_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        connect = syscalls.number("connect")

        def program_in_connect() -> bool:
            return any(blocked_in(pid) == connect for pid in descendants(proc.pid))

        wait_until(program_in_connect, 30, "the program waiting in connect()")
        os.killpg(os.getpgid(proc.pid), signal.SIGINT)  # what the terminal does: the whole group
        assert proc.wait(timeout=10) == 128 + signal.SIGINT
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


@pytest.mark.parametrize("mode", ["connect", "sendto", "sendmsg", "sendmmsg"])
def test_a_racing_thread_cannot_slip_a_call_past_ktrace(
    mode: str, ktrace_cluster: NamespaceCluster, programs: Programs
) -> None:
    """A thread flips the sockaddr between loopback and a cluster address while another uses it
    3,000 times. The laptop has no route to the cluster: a call the kernel made with the cluster
    address ktrace did not see fails with ENETUNREACH. Without ktrace the flip is seen (it can
    fail); under ktrace, never."""
    c = ktrace_cluster
    remote = (c.hello_v4, str(c.hello_port)) if mode == "connect" else (c.echo_v4, str(c.echo_port))
    argv = [programs["crace"], mode, "3000", "127.0.0.1", "9", *remote]
    without = c.run_laptop(argv, timeout=120)
    assert without.returncode == 0, without
    assert "ENETUNREACH" in without.stdout, f"the flip did not show without ktrace: {without.stdout}"
    traced = c.run_laptop(c.ktrace_argv(*argv), timeout=150)
    assert traced.returncode == 0, traced
    assert "ENETUNREACH" not in traced.stdout, traced.stdout
    assert sum(int(line.split()[1]) for line in traced.stdout.splitlines()) == 3000, traced.stdout
