"""The program's keepalive options for the agent's socket: what is read, what travels, what the
agent sets (ktrace_agent/wire/tcp_options.py, codec.py, agent/remote_options.py), and how ktrace
follows a connection's options (ktrace/tracer/options_follow.py). No ptrace: the sockets read
are this process's own."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest
from fake_agent import FakeDialled
from fakes import endpoint
from handler_helpers import until
from ktrace_agent import remote_options
from ktrace_agent.wire import codec, rpc, tcp_options
from ktrace_agent.wire.tcp_options import NOTHING
from ktrace_agent.wire.values import TcpOptions

from ktrace.tracer.options_follow import OptionsFollower, kernel_defaults, options_of, read_options, time_out
from ktrace.tracer.threads import ThreadGroups
from ktrace.tunnel.tcp_stream import TIMED_OUT, give_timed_out

pytestmark = pytest.mark.timeout(30)

# A namespace's usual defaults: keepalive off, 7200 s idle, 75 s interval, 9 probes, no user timeout.
DEFAULTS = TcpOptions(False, 7200, 75, 9, 0)
# What Go sets on every connection (net.Dialer's default KeepAliveConfig).
GO = TcpOptions(True, 15, 15, 9, 0)


def test_readings_are_taken_in_the_order_read_names_them() -> None:
    assert tcp_options.READ[0] == (socket.SOL_SOCKET, socket.SO_KEEPALIVE)
    assert tcp_options.from_readings([1, 15, 16, 4, 30000]) == TcpOptions(True, 15, 16, 4, 30000)
    assert tcp_options.from_readings([8, 1, 1, 1, 0]).keepalive is True  # any non-zero int is on


def test_a_program_that_sets_nothing_sends_nothing() -> None:
    assert tcp_options.news(DEFAULTS, DEFAULTS) is None
    assert tcp_options.news(DEFAULTS, DEFAULTS, NOTHING) is None


def test_go_sends_keepalive_and_what_differs_from_the_defaults() -> None:
    # The count equals the default: it travels as 0, the agent's (the pod's) default.
    assert tcp_options.news(GO, DEFAULTS) == TcpOptions(True, 15, 15, 0, 0)


def test_nothing_new_is_not_sent_again_and_a_change_is() -> None:
    told = tcp_options.news(GO, DEFAULTS)
    assert told is not None
    assert tcp_options.news(GO, DEFAULTS, told) is None
    # The program turned keepalive off again: the agent must hear it.
    assert tcp_options.news(DEFAULTS, DEFAULTS, told) == NOTHING
    assert tcp_options.news(TcpOptions(True, 1, 1, 2, 0), DEFAULTS, told) == TcpOptions(True, 1, 1, 2, 0)


def test_intervals_without_keepalive_and_a_user_timeout_alone_travel_too() -> None:
    # Intervals set before keepalive is switched on still shape the probes once it is.
    assert tcp_options.news(TcpOptions(False, 30, 75, 9, 0), DEFAULTS) == TcpOptions(False, 30, 0, 0, 0)
    assert tcp_options.news(TcpOptions(False, 7200, 75, 9, 5000), DEFAULTS) == TcpOptions(user_timeout_ms=5000)


def test_the_agent_sets_the_numbers_first_and_keepalive_last() -> None:
    tcp = socket.IPPROTO_TCP
    assert tcp_options.settings(TcpOptions(True, 1, 2, 3, 4000)) == (
        (tcp, socket.TCP_KEEPIDLE, 1),
        (tcp, socket.TCP_KEEPINTVL, 2),
        (tcp, socket.TCP_KEEPCNT, 3),
        (tcp, socket.TCP_USER_TIMEOUT, 4000),
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
    )
    # 0: the agent's default, left alone (setsockopt refuses 0 for these); the user timeout's 0 is "none".
    assert tcp_options.settings(NOTHING) == (
        (tcp, socket.TCP_USER_TIMEOUT, 0),
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0),
    )


def test_codec_round_trip_and_bounds() -> None:
    options = TcpOptions(True, 15, 16, 4, 30000)
    message = codec.encode_tcp_options(options)
    assert codec.decode_tcp_options(rpc.TcpOptions.FromString(message.SerializeToString())) == options
    assert codec.decode_tcp_options(rpc.TcpOptions()) == NOTHING
    # Numbers a C int cannot hold are cut to the largest: setsockopt then refuses or caps them.
    big = rpc.TcpOptions(keepalive_idle_s=0xFFFFFFFF, user_timeout_ms=0x80000000)
    assert codec.decode_tcp_options(big) == TcpOptions(False, 0x7FFFFFFF, 0, 0, 0x7FFFFFFF)
    assert codec.encode_tcp_options(TcpOptions(idle_s=1 << 40)).keepalive_idle_s == 0xFFFFFFFF


def test_the_agent_applies_them_and_skips_what_the_kernel_refuses() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        defaults = options_of(sock)
        remote_options.apply(sock, TcpOptions(True, 1, 2, 3, 4000))
        assert options_of(sock) == TcpOptions(True, 1, 2, 3, 4000)
        # TCP_KEEPCNT above 127 is refused (EINVAL): the others still apply.
        remote_options.apply(sock, TcpOptions(True, 5, 0, 1000, 0))
        assert options_of(sock) == TcpOptions(True, 5, 2, 3, 0)
        remote_options.apply(sock, NOTHING)
        assert options_of(sock).keepalive is False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as fresh:
        assert kernel_defaults() == options_of(fresh) == defaults
    closed = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    closed.close()
    remote_options.apply(closed, TcpOptions(True, 1, 1, 1, 1))  # EBADF: logged, not raised


def _connected_pair() -> tuple[socket.socket, socket.socket, socket.socket]:
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname()[:2])
    server, _ = listener.accept()
    return listener, client, server


def test_read_options_reads_the_socket_at_that_descriptor_only_if_it_is_the_same_socket() -> None:
    listener, client, server = _connected_pair()
    with listener, client, server:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 3)
        inode = os.fstat(client.fileno()).st_ino
        threads = ThreadGroups()
        fds_before = sorted(os.listdir("/proc/self/fd"))
        found = read_options(os.getpid(), client.fileno(), socket.AF_INET, inode, threads.of)
        assert found is not None and (found.keepalive, found.idle_s) == (True, 3)
        assert sorted(os.listdir("/proc/self/fd")) == fds_before  # the duplicate was closed at once
        # The number now holds another socket (closed and reused): not read.
        assert read_options(os.getpid(), server.fileno(), socket.AF_INET, inode, threads.of) is None
        # Nothing at that number.
        assert read_options(os.getpid(), 0x7FFFFFF0, socket.AF_INET, inode, threads.of) is None


def _follower(readings: list[TcpOptions | None]) -> tuple[OptionsFollower, list[tuple[int, int]]]:
    asked: list[tuple[int, int]] = []

    def read(tid: int, fd: int, family: int, inode: int, _group: object) -> TcpOptions | None:
        asked.append((tid, fd))
        return readings.pop(0) if readings else None

    follower = OptionsFollower(ThreadGroups(), read_after=(0.001, 0.002), read=read)
    follower._defaults = DEFAULTS  # a namespace whose sysctls are the usual ones
    return follower, asked


def test_the_follower_tells_the_agent_only_what_is_new() -> None:
    async def scenario() -> None:
        dialled = FakeDialled(endpoint("10.244.0.7:41000"), endpoint("10.96.1.10:80"))
        follower, asked = _follower([GO, GO])
        follower.follow(42, 7, socket.AF_INET, 1234, dialled)
        await until(lambda: len(asked) == 2 and not follower._followed, "both reads")
        assert asked == [(42, 7), (42, 7)]
        assert dialled.options == [TcpOptions(True, 15, 15, 0, 0)]  # once: the second read saw no change

        quiet = FakeDialled(endpoint("10.244.0.7:41001"), endpoint("10.96.1.10:80"))
        follower, asked = _follower([DEFAULTS, DEFAULTS])
        follower.follow(42, 8, socket.AF_INET, 1235, quiet)
        await until(lambda: len(asked) == 2 and not follower._followed, "both reads")
        assert quiet.options == []  # a program that sets nothing: no message at all

        gone = FakeDialled(endpoint("10.244.0.7:41002"), endpoint("10.96.1.10:80"))
        follower, asked = _follower([None])
        follower.follow(42, 9, socket.AF_INET, 1236, gone)
        await until(lambda: not follower._followed, "the socket found gone")
        assert (asked, gone.options) == ([(42, 9)], [])  # not looked for again

    asyncio.run(scenario())


def test_a_connection_that_ended_is_not_read() -> None:
    async def scenario() -> None:
        follower, asked = _follower([GO, GO, GO])
        dialled = FakeDialled(endpoint("10.244.0.7:41000"), endpoint("10.96.1.10:80"))
        other = FakeDialled(endpoint("10.244.0.7:41001"), endpoint("10.96.1.10:80"))
        follower.follow(42, 7, socket.AF_INET, 1234, dialled)
        follower.follow(42, 8, socket.AF_INET, 1235, other)
        follower.forget(dialled)  # its connection ended
        await until(lambda: len(asked) == 2, "the other's two reads")
        assert asked == [(42, 8), (42, 8)] and dialled.options == []
        # The program ended with a connection still followed: its timer goes.
        third = FakeDialled(endpoint("10.244.0.7:41002"), endpoint("10.96.1.10:80"))
        follower.follow(42, 9, socket.AF_INET, 1236, third)
        timer = follower._timer
        follower.close()
        assert timer is not None and timer.cancelled() and not follower._followed
        assert third.options == []

    asyncio.run(scenario())


def test_one_timer_serves_a_burst_of_connections() -> None:
    async def scenario() -> None:
        follower, asked = _follower([GO] * 200)
        dialled = [FakeDialled(endpoint(f"10.244.0.7:{41000 + i}"), endpoint("10.96.1.10:80")) for i in range(100)]
        for i, each in enumerate(dialled):
            follower.follow(42, i, socket.AF_INET, 5000 + i, each)
        scheduled: list[asyncio.TimerHandle] = asyncio.get_running_loop()._scheduled  # type: ignore[attr-defined]
        assert [handle for handle in scheduled if not handle.cancelled()] == [follower._timer]
        await until(lambda: len(asked) == 200, "two reads of each")
        assert all(each.options == [TcpOptions(True, 15, 15, 0, 0)] for each in dialled)
        assert not follower._followed and follower._timer is None

    asyncio.run(scenario())


def test_a_timed_out_agent_connection_times_the_programs_socket_out() -> None:
    """ktrace's end closes its window and the program's socket, holding bytes it cannot send, gets a
    short user timeout: the program's blocked read fails with ETIMEDOUT, as the agent's did (and as
    in a pod)."""

    async def scenario() -> None:
        listener, program, end = _connected_pair()
        listener.close()
        with program:
            program.setblocking(False)
            dialled = FakeDialled(endpoint("10.244.0.7:41000"), endpoint("10.96.1.10:80"))
            follower = OptionsFollower(ThreadGroups(), read_after=())
            follower.follow(os.getpid(), program.fileno(), socket.AF_INET, os.fstat(program.fileno()).st_ino, dialled)
            assert dialled.on_timed_out is not None
            reading = asyncio.ensure_future(asyncio.get_running_loop().sock_recv(program, 10))
            dialled.on_timed_out(end)  # ktrace's end is the follower's now
            assert end in follower._silent and end.fileno() >= 0  # kept open: a close would say FIN or RST
            with pytest.raises(TimeoutError):  # ETIMEDOUT is TimeoutError in Python
                await asyncio.wait_for(reading, 15)
            follower.close()
            assert end.fileno() == -1

    asyncio.run(scenario())


def test_a_program_socket_that_is_gone_is_reset_as_before() -> None:
    listener, program, end = _connected_pair()
    with listener, program:
        inode = os.fstat(program.fileno()).st_ino
        threads = ThreadGroups()
        # Another socket at that number by now: nothing is set on it; the caller resets the end.
        assert not time_out(end, os.getpid(), listener.fileno(), inode, threads.of)
        assert listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 0
        end.close()


def test_only_a_timed_out_connection_is_given_to_the_handler() -> None:
    taken: list[socket.socket] = []
    with socket.socket() as sock:
        assert not give_timed_out(None, sock, TIMED_OUT)
        assert not give_timed_out(taken.append, sock, "reset: ECONNRESET")
        assert not give_timed_out(taken.append, sock, "closed")
        assert taken == []
        assert give_timed_out(taken.append, sock, TIMED_OUT) and taken == [sock]

        def broken(_: socket.socket) -> None:
            raise RuntimeError("bug")

        assert not give_timed_out(broken, sock, TIMED_OUT)  # logged; the caller resets as before
