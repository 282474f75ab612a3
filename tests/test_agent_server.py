"""The agent as a server: handshake, auth, malformed and oversized frames, its socket, its CLI."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import socket
import stat
import subprocess
from typing import Any

import grpc
import grpc.aio
import pytest
from agent_helpers import (
    TOKEN,
    LoopbackServer,
    agent,
    agent_and_client,
    agent_command,
    end_process,
    local_pair,
    run,
    upper_echo,
    wait_for_line,
)
from ktrace_agent.wire import codec, rpc

from ktrace.tunnel.client import AgentClient
from ktrace.tunnel.types import AgentUnavailable, Endpoint


def test_handshake_content(tmp_path: pathlib.Path) -> None:
    (tmp_path / "resolv.conf").write_text("search default.svc.cluster.local\nnameserver 10.96.0.10\n")
    (tmp_path / "hosts").write_text("10.1.2.3 pod-name\n")

    async def scenario() -> None:
        async with agent_and_client(
            f"unix:{tmp_path}/a.sock",
            resolv_conf_path=str(tmp_path / "resolv.conf"),
            hosts_path=str(tmp_path / "hosts"),
        ) as (_, client):
            info = client.info
            assert info.version
            assert info.hostname == socket.gethostname()
            assert info.resolv_conf.startswith("search default.svc.cluster.local")
            assert info.hosts == "10.1.2.3 pod-name\n"
            assert info.max_message_bytes == 4 * 1024 * 1024
            assert all(not ip.is_loopback for ip in info.addresses)

    run(scenario())


def test_unix_socket_is_0600(tmp_path: pathlib.Path) -> None:
    async def scenario() -> None:
        old = os.umask(0o000)  # even with a permissive umask
        try:
            async with agent(f"unix:{tmp_path}/a.sock"):
                assert stat.S_IMODE(os.stat(tmp_path / "a.sock").st_mode) == 0o600
        finally:
            os.umask(old)

    run(scenario())


@pytest.mark.parametrize("presented", [None, "wrong-token"])
def test_bad_token_is_rejected_and_nothing_is_dialled(tmp_path: pathlib.Path, presented: str | None) -> None:
    async def scenario() -> None:
        async with LoopbackServer(upper_echo) as target, agent(f"unix:{tmp_path}/a.sock", token=TOKEN) as server:
            with pytest.raises(AgentUnavailable, match="rejected the session token"):
                await AgentClient.connect(server.address, presented, timeout=10)
            # Bypass the handshake: a Connect with a bad token must not dial either.
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = rpc.Stub(channel)
                silent = stub.connect(metadata=rpc.bearer_metadata(presented))
                assert await silent.code() == grpc.StatusCode.UNAUTHENTICATED
                # The agent answers before reading anything, so a write races with its answer;
                # when the write loses, grpcio puts its own INTERNAL ("Internal error from
                # Core") in place of the agent's status: the status is asserted on the call
                # above, which writes nothing, and here only when the write went out.
                call = stub.connect(metadata=rpc.bearer_metadata(presented))
                dest = codec.encode_address(Endpoint.parse(f"127.0.0.1:{target.port}"))
                wrote = True
                try:
                    await call.write(rpc.TcpClientFrame(open=rpc.TcpOpen(destination=dest)))
                except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    wrote = False
                code = await call.code()
                assert code == grpc.StatusCode.UNAUTHENTICATED or not wrote, code
            assert target.accepted == 0

    run(scenario())


async def _raw_call(address: str, **options: Any) -> tuple[grpc.aio.Channel, rpc.TcpCall]:
    opts = [("grpc.max_send_message_length", -1)] if options.get("unlimited") else []
    channel = grpc.aio.insecure_channel(address, options=opts)
    return channel, rpc.Stub(channel).connect(metadata=rpc.bearer_metadata(TOKEN))


@pytest.mark.parametrize(
    ("frames", "status"),
    [
        ([rpc.TcpClientFrame(data=b"x")], grpc.StatusCode.INVALID_ARGUMENT),
        ([rpc.TcpClientFrame(shutdown_write=True)], grpc.StatusCode.INVALID_ARGUMENT),
        ([rpc.TcpClientFrame()], grpc.StatusCode.INVALID_ARGUMENT),  # no kind set: unknown
        (
            [rpc.TcpClientFrame(open=rpc.TcpOpen(destination=rpc.Address(ip=b"123", port=1)))],
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
    ],
)
def test_malformed_first_frame(
    tmp_path: pathlib.Path, frames: list[rpc.TcpClientFrame], status: grpc.StatusCode
) -> None:
    async def scenario() -> None:
        async with agent(f"unix:{tmp_path}/a.sock", token=TOKEN) as server:
            channel, call = await _raw_call(server.address)
            with contextlib.suppress(grpc.aio.AioRpcError):  # may already be rejected
                for frame in frames:
                    await call.write(frame)
            assert await call.code() == status
            await channel.close()

    run(scenario())


def test_second_open_and_oversized_end_only_their_stream(tmp_path: pathlib.Path) -> None:
    async def scenario() -> None:
        async with (
            LoopbackServer(upper_echo) as target,
            agent_and_client(f"unix:{tmp_path}/a.sock") as (
                server,
                client,
            ),
        ):
            dest = Endpoint.parse(f"127.0.0.1:{target.port}")
            healthy = await client.open_tcp(dest)
            splice_reader_writer = await _splice_pair(healthy)

            channel, call = await _raw_call(server.address, unlimited=True)
            open_frame = rpc.TcpClientFrame(open=rpc.TcpOpen(destination=codec.encode_address(dest)))
            await call.write(open_frame)
            assert _kind(await call.read()) == "opened"
            with contextlib.suppress(grpc.aio.AioRpcError):
                await call.write(rpc.TcpClientFrame(data=b"x" * (5 * 1024 * 1024)))
            assert await call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

            channel2, call2 = await _raw_call(server.address)
            await call2.write(open_frame)
            assert _kind(await call2.read()) == "opened"
            with contextlib.suppress(grpc.aio.AioRpcError):
                await call2.write(open_frame)
            assert await call2.code() == grpc.StatusCode.INVALID_ARGUMENT
            await channel.close()
            await channel2.close()

            # The other stream, on the shared channel, still works.
            p_reader, p_writer, splice = splice_reader_writer
            p_writer.write(b"still alive")
            assert await p_reader.readexactly(11) == b"STILL ALIVE"
            p_writer.write_eof()
            assert (await splice).outcome == "closed"
            p_writer.close()

    run(scenario())


def _kind(frame: object) -> str | None:
    assert isinstance(frame, rpc.TcpServerFrame)
    kind: str | None = frame.WhichOneof("kind")
    return kind


async def _splice_pair(stream: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, asyncio.Task[Any]]:
    (p_reader, p_writer), k_sock = await local_pair()
    return p_reader, p_writer, asyncio.create_task(stream.splice(k_sock))


def test_agent_unreachable_is_one_line(tmp_path: pathlib.Path) -> None:
    async def scenario() -> None:
        with pytest.raises(AgentUnavailable) as info:
            await AgentClient.connect(f"unix:{tmp_path}/nobody.sock", None, timeout=0.5)
        assert "\n" not in str(info.value)
        assert "hint" in str(info.value)

    run(scenario())


# --- the command line ---


def test_cli_refuses_non_loopback_without_token() -> None:
    proc = subprocess.run(
        agent_command("--listen", "0.0.0.0:0"), check=False, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 125
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "without a token" in lines[0]


def test_cli_empty_token_file(tmp_path: pathlib.Path) -> None:
    (tmp_path / "token").write_text("\n")
    proc = subprocess.run(
        agent_command("--listen", f"unix:{tmp_path}/a.sock", "--token-file", str(tmp_path / "token")),
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 125
    assert proc.stderr.strip().splitlines() == [
        f"ktrace-agent: error: token file {tmp_path}/token is empty (the token is its first line)"
    ]


def test_cli_idle_exit(tmp_path: pathlib.Path) -> None:
    (tmp_path / "token").write_text(TOKEN + "\n")
    proc = subprocess.Popen(
        agent_command("--listen", "127.0.0.1:0", "--token-file", str(tmp_path / "token"), "--idle-exit", "1"),
        stderr=subprocess.PIPE,
    )
    try:
        line = wait_for_line(proc, "listening on", deadline=30)
        address = line.rsplit(" ", 1)[1]

        async def use_it() -> None:
            client = await AgentClient.connect(address, TOKEN, timeout=10)
            await client.close()

        run(use_it())
        assert proc.wait(timeout=30) == 0
    finally:
        end_process(proc)


def test_cli_sigterm_is_clean(tmp_path: pathlib.Path) -> None:
    proc = subprocess.Popen(agent_command("--listen", f"unix:{tmp_path}/a.sock"), stderr=subprocess.PIPE)
    try:
        wait_for_line(proc, "listening on", deadline=30)
        proc.terminate()
        assert proc.wait(timeout=30) == 0
    finally:
        end_process(proc)


@pytest.mark.parametrize(
    "first",
    [
        rpc.UdpClientFrame(datagram=rpc.Datagram(peer=rpc.Address(ip=bytes(4), port=1), payload=b"x")),
        rpc.UdpClientFrame(open=rpc.UdpOpen(family="FAMILY_UNSPECIFIED"), session=1),
        rpc.UdpClientFrame(session=1),
    ],
    ids=["no-session", "no-family", "empty"],
)
def test_malformed_first_frame_of_a_udp_stream(tmp_path: pathlib.Path, first: rpc.UdpClientFrame) -> None:
    async def scenario() -> None:
        async with (
            agent(f"unix:{tmp_path}/a.sock", token=TOKEN) as server,
            grpc.aio.insecure_channel(server.address) as channel,
        ):
            call = rpc.Stub(channel).datagram_sessions(metadata=rpc.bearer_metadata(TOKEN))
            with contextlib.suppress(grpc.aio.AioRpcError):
                await call.write(first)
            assert await call.code() == grpc.StatusCode.INVALID_ARGUMENT

    run(scenario())
