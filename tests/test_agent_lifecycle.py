"""The agent process's life: how it stops, and what it does on a Unix socket path that is taken."""

from __future__ import annotations

import asyncio
import pathlib
import subprocess

import pytest
from agent_helpers import TOKEN, LoopbackServer, agent_command, end_process, run, upper_echo, wait_for_line
from ktrace_agent.wire import tuning

from ktrace.tunnel.client import AgentClient
from ktrace.tunnel.types import Connection, Endpoint, TunnelError


def test_sigterm_with_streams_open_ends_without_tracebacks(tmp_path: pathlib.Path) -> None:
    """Stopping cancels the streams still open after the grace period; the tasks that ran their
    handlers must have ended before the loop does, or grpc prints a CancelledError traceback for
    each (what `ktrace run --agent local` showed at exit)."""
    (tmp_path / "token").write_text(TOKEN + "\n")
    sock = tmp_path / "a.sock"
    proc = subprocess.Popen(
        agent_command("--listen", f"unix:{sock}", "--token-file", str(tmp_path / "token")), stderr=subprocess.PIPE
    )
    try:
        wait_for_line(proc, "listening on", deadline=30)

        async def scenario() -> None:
            async with LoopbackServer(upper_echo) as target:
                client = await AgentClient.connect(f"unix:{sock}", TOKEN, timeout=10)
                try:
                    streams = [await client.open_tcp(Endpoint.parse(f"127.0.0.1:{target.port}")) for _ in range(16)]
                    proc.terminate()
                    # The agent cancels the open streams after its grace period (1 s) and exits.
                    await asyncio.get_running_loop().run_in_executor(None, proc.wait, 30)
                    for stream in streams:
                        await stream.abort()
                finally:
                    await client.close()

        run(scenario())
        assert proc.wait(timeout=30) == 0
        assert proc.stderr is not None
        err = proc.stderr.read().decode(errors="replace")
        assert "Traceback" not in err, err
        assert "Exception not handled" not in err, err
    finally:
        end_process(proc)


# --- a Unix socket path that is taken ---


def _start_agent(sock: pathlib.Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(agent_command("--listen", f"unix:{sock}", *extra), stderr=subprocess.PIPE)


def _handshake(sock: pathlib.Path, token: str | None) -> str:
    async def scenario() -> str:
        client = await AgentClient.connect(f"unix:{sock}", token, timeout=10, wait_for_ready=False)
        await client.close()
        return client.info.version

    return run(scenario())


def test_second_agent_on_a_live_socket_refuses_to_start(tmp_path: pathlib.Path) -> None:
    (tmp_path / "token").write_text(TOKEN + "\n")
    sock = tmp_path / "a.sock"
    first = _start_agent(sock, "--token-file", str(tmp_path / "token"))
    try:
        wait_for_line(first, "listening on", deadline=30)
        second = subprocess.run(
            agent_command("--listen", f"unix:{sock}"), check=False, capture_output=True, text=True, timeout=60
        )
        assert second.returncode != 0
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, second.stderr
        assert lines[0].startswith("ktrace-agent: error: ")
        assert "another process listens on this socket" in lines[0]
        # The first agent still serves its socket, with its token.
        assert _handshake(sock, TOKEN)
        assert first.poll() is None
    finally:
        end_process(first)


def test_stale_socket_of_a_killed_agent_is_replaced(tmp_path: pathlib.Path) -> None:
    sock = tmp_path / "a.sock"
    killed = _start_agent(sock)
    try:
        wait_for_line(killed, "listening on", deadline=30)
    finally:
        end_process(killed)  # SIGKILL: the socket file stays behind
    assert sock.is_socket()
    (tmp_path / "token").write_text(TOKEN + "\n")
    second = _start_agent(sock, "--token-file", str(tmp_path / "token"))
    try:
        wait_for_line(second, "listening on", deadline=30)
        assert _handshake(sock, TOKEN)
    finally:
        end_process(second)


def test_a_path_that_is_not_a_socket_is_left_alone(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("mine\n")
    proc = subprocess.run(
        agent_command("--listen", f"unix:{path}"), check=False, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        f"ktrace-agent: error: --listen unix:{path}: the path exists and is not a socket; not replacing it"
    ]
    assert path.read_text() == "mine\n"


# --- bounds ---


def test_streams_per_client_are_capped_with_a_clear_error(tmp_path: pathlib.Path) -> None:
    (tmp_path / "token").write_text(TOKEN + "\n")
    sock = tmp_path / "a.sock"
    proc = _start_agent(sock, "--token-file", str(tmp_path / "token"), "--max-client-streams", "8")
    try:
        wait_for_line(proc, "listening on", deadline=30)

        async def scenario() -> None:
            async with LoopbackServer(upper_echo) as target:
                dest = Endpoint.parse(f"127.0.0.1:{target.port}")
                client = await AgentClient.connect(f"unix:{sock}", TOKEN, timeout=10)
                streams = []
                try:
                    # The client's spare streams count too: the cap is on streams, not connections.
                    with pytest.raises(TunnelError) as refused:
                        for _ in range(9):
                            streams.append(await client.open_tcp(dest, timeout=5))
                    assert refused.value.errno_name == "ENOBUFS"
                    assert "too many streams from this client: 8 open, the agent allows 8" in str(refused.value)
                    assert 0 < len(streams) < 8
                    # A stream that ends frees its place, once the agent has seen it end.
                    await streams.pop().abort()
                    streams.append(await _open_when_allowed(client, dest))
                finally:
                    for stream in streams:
                        await stream.abort()
                    await client.close()

        run(scenario())
        line = wait_for_line(proc, "refused a stream", deadline=10)
        assert "8 open, the limit per client" in line
    finally:
        end_process(proc)


async def _open_when_allowed(client: AgentClient, dest: Endpoint) -> Connection:
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        try:
            return await client.open_tcp(dest, timeout=5)
        except TunnelError as exc:
            if exc.errno_name != "ENOBUFS" or asyncio.get_running_loop().time() > deadline:
                raise
        await asyncio.sleep(0.05)  # the agent has not seen the end yet: no event to wait on


def test_trimmer_trims_once_quiet() -> None:
    async def scenario() -> int:
        trimmer = tuning.Trimmer(0.05)
        trimmer.poke()
        trimmer.poke()  # one trim for both
        deadline = asyncio.get_running_loop().time() + 10
        while trimmer.trims == 0 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        trimmer.close()
        return trimmer.trims

    assert run(scenario()) == 1
