"""The agent process's life: how it stops, and what it does on a Unix socket path that is taken."""

from __future__ import annotations

import asyncio
import pathlib
import subprocess

from agent_helpers import TOKEN, LoopbackServer, agent_command, end_process, run, upper_echo, wait_for_line

from ktrace.tunnel.client import AgentClient
from ktrace.tunnel.types import Endpoint


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
