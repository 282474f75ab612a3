"""`ktrace run`: start the program under the tracer with the agent's reach.

Order matters:
1. fork the program first (it waits on a pipe) so that no gRPC thread exists
   at fork time;
2. block the signals the tracer reads from a signalfd, before any thread
   starts, so every thread inherits the mask;
3. connect to the agent (handshake), start the loopback endpoint;
4. seize the child and let it exec under the seccomp filter;
5. trace until every process of the program has exited.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ktrace.errors import KtraceError
from ktrace.tracer import arch, launcher, seccomp
from ktrace.tracer.decide import RoutingPolicy, nameservers_of
from ktrace.tracer.files import FileViews
from ktrace.tracer.launcher import LaunchError
from ktrace.tracer.network import NetworkHandler
from ktrace.tracer.session import SessionHandler
from ktrace.tracer.tracer import FORWARDED_SIGNALS, Tracer, TraceResult
from ktrace.tracer.udp import UdpRedirector
from ktrace.tunnel.client import AgentClient, AgentInfo
from ktrace.tunnel.dns_map import DnsMap
from ktrace.tunnel.endpoint import LoopbackEndpoint
from ktrace.tunnel.socket_table import live_udp_inodes
from ktrace.tunnel.types import AgentUnavailable
from ktrace.tunnel.udp_relay import UdpRelays

if TYPE_CHECKING:
    from ktrace.kube.options import KubeOptions
    from ktrace.kube.session import KubeAgent

log = logging.getLogger("ktrace.run")

ENOSYS = 38
# After the program exits: how long its last bytes get to reach the agent.
SHUTDOWN_GRACE = 2.0
# When the agent is gone mid-run: how long the program has after SIGTERM before SIGKILL.
TERMINATION_GRACE = 5.0


@dataclass(frozen=True)
class RunOptions:
    command: Sequence[str]
    agent: str | None  # None: "kube"
    token_file: str | None = None
    connect_timeout: float | None = None
    # Whose /etc/hosts the program reads: "local" (this machine's, so localhost and
    # names pinned here keep working) or "cluster" (the agent's, as in the pod).
    hosts: str = "local"
    kube: KubeOptions | None = None  # --agent kube: the cluster, the target, the agent pod's options


def filter_rules() -> list[seccomp.Rule]:
    sys = arch.SYSCALLS
    return [
        seccomp.trace(sys.connect),
        seccomp.trace(sys.getpeername),
        seccomp.trace(sys.getsockname),
        # UDP: a send with a destination, and receives whose source ktrace may have to
        # restore. sendto/recvfrom without an address (a connected socket, or a TCP
        # send/recv) never stop; sendmsg/recvmsg carry the address inside struct msghdr,
        # out of the filter's reach, so they always stop.
        seccomp.trace(sys.sendto, unless_arg_zero=4),
        seccomp.trace(sys.recvfrom, unless_arg_zero=4),
        seccomp.trace(sys.sendmsg),
        seccomp.trace(sys.recvmsg),
        seccomp.trace(sys.sendmmsg),
        seccomp.trace(sys.recvmmsg),
        # The resolver view: opening /etc/resolv.conf opens the agent's copy.
        seccomp.trace(sys.open),
        seccomp.trace(sys.openat),
        seccomp.trace(sys.openat2),
        # io_uring can connect and send without any syscall ktrace could see.
        seccomp.fail(sys.io_uring_setup, ENOSYS),
    ]


def read_token(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            token = f.readline().strip()
    except OSError as exc:
        raise KtraceError(f"cannot read token file {path}: {exc.strerror}", "check --token-file") from None
    if not token:
        raise KtraceError(f"token file {path} is empty", "write the agent's token on its first line")
    return token


def run(options: RunOptions) -> int:
    if not options.command:
        raise KtraceError("no command given", "usage: ktrace run [options] -- CMD [ARG...]", exit_code=2)
    token = read_token(options.token_file) if options.token_file else None
    env = dict(os.environ)
    try:
        path = launcher.resolve(options.command[0], env)
    except LaunchError as exc:
        raise KtraceError(str(exc), exit_code=exc.exit_code) from None
    child = launcher.fork_child(path, options.command, env, seccomp.build(filter_rules()))
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD, *FORWARDED_SIGNALS})
    try:
        return asyncio.run(_session(options, child, token))
    finally:
        launcher.reap(child.pid)


@dataclass(frozen=True)
class _AgentAccess:
    address: str
    token: str | None
    kube: KubeAgent | None = None  # the agent in the cluster, which can be lost mid-run


@contextlib.asynccontextmanager
async def _agent_access(options: RunOptions, token: str | None) -> AsyncIterator[_AgentAccess]:
    agent = options.agent or "kube"
    if agent == "kube":
        from ktrace.kube.options import KubeOptions
        from ktrace.kube.session import kube_agent

        async with kube_agent(options.kube or KubeOptions()) as kube:
            yield _AgentAccess(kube.address, kube.token, kube)
        return
    if agent != "local":
        yield _AgentAccess(agent, token)
        return
    # An agent inside this process that dials from this machine: the same
    # gRPC path as a remote one, on a private unix socket.
    from ktrace_agent.server import AgentServer

    with tempfile.TemporaryDirectory(prefix="ktrace-") as tmp:
        local_token = secrets.token_urlsafe(24)
        server = AgentServer(f"unix:{tmp}/agent.sock", token=local_token)
        if options.connect_timeout is not None:
            server = AgentServer(f"unix:{tmp}/agent.sock", token=local_token, connect_timeout=options.connect_timeout)
        await server.start()
        try:
            yield _AgentAccess(f"unix:{tmp}/agent.sock", local_token)
        finally:
            await server.stop()


async def _until_finished(tracer: Tracer, endpoint: LoopbackEndpoint, kube: KubeAgent | None) -> TraceResult:
    """The program's end, or, if the agent in the cluster is lost first, its end forced: its connections
    through the agent are reset (they are dead already), then it gets SIGTERM and, after
    TERMINATION_GRACE, SIGKILL, like a pod's processes when the pod goes away."""
    assert tracer.finished is not None
    if kube is None:
        return await tracer.finished
    waiting: set[asyncio.Future[object]] = {tracer.finished, kube.lost}  # type: ignore[arg-type]
    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    if tracer.finished.done():
        return tracer.finished.result()
    error = kube.lost.result()
    await endpoint.close()
    with contextlib.suppress(ProcessLookupError):
        os.kill(tracer.main_pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(asyncio.shield(tracer.finished), TERMINATION_GRACE)
    except TimeoutError:
        tracer.kill_all()
        await tracer.finished
    raise error


async def _session(options: RunOptions, child: launcher.PendingChild, token: str | None) -> int:
    loop = asyncio.get_running_loop()
    released = False
    try:
        async with (
            _agent_access(options, token) as access,
            _private_dir() as views_dir,
        ):
            try:
                if access.kube is not None:
                    client = await access.kube.connect()
                else:
                    client = await AgentClient.connect(access.address, access.token)
            except AgentUnavailable as exc:
                raise KtraceError(str(exc)) from None
            endpoint: LoopbackEndpoint | None = None
            relays: UdpRelays | None = None
            tracer: Tracer | None = None
            try:
                policy = RoutingPolicy(nameservers=nameservers_of(client.info.resolv_conf))
                dns_map = DnsMap()
                dns_map.listeners.append(lambda name, found: log.debug("dns answer %s -> %s", name, found))
                handler = NetworkHandler(
                    client, LoopbackEndpoint(), policy, connect_timeout=options.connect_timeout, dns_map=dns_map
                )
                endpoint = LoopbackEndpoint(on_closed=lambda stream, _stats: handler.stream_closed(stream))
                handler.endpoint = endpoint
                await endpoint.start()

                def socket_gone(inode: int) -> None:
                    udp.forget(inode)

                relays = UdpRelays(
                    client, on_dns_answer=dns_map.record, live_sockets=live_udp_inodes, on_socket_gone=socket_gone
                )
                udp = UdpRedirector(relays, policy)
                handler.udp = udp
                files = FileViews(served=_serve_resolver_files(views_dir, client.info, options.hosts))
                session = SessionHandler(handler, files)
                launcher_seize(child)
                released = True
                try:
                    launcher.release(child, options.command[0])
                except LaunchError as exc:
                    raise KtraceError(str(exc), exit_code=exc.exit_code) from None
                tracer = Tracer(session, child.pid, loop)
                tracer.start()
                result = await _until_finished(tracer, endpoint, access.kube)
            finally:
                if tracer is not None:
                    tracer.close()
                if endpoint is not None:
                    await endpoint.close(grace=SHUTDOWN_GRACE)
                if relays is not None:
                    await relays.close()
                await client.close()
    finally:
        if not released:
            launcher.abort(child)
    if result.signal is not None:
        return 128 + result.signal
    return result.exit_code if result.exit_code is not None else 0


@contextlib.asynccontextmanager
async def _private_dir() -> AsyncIterator[str]:
    with tempfile.TemporaryDirectory(prefix="ktrace-view-") as path:
        # The program may run as another user after a setuid-less privilege
        # drop; the files it is shown must stay readable.
        os.chmod(path, 0o755)  # noqa: S103 - world-readable on purpose, nothing secret
        yield path


def _serve_resolver_files(directory: str, info: AgentInfo, hosts: str) -> dict[bytes, bytes]:
    """Write the agent's resolver files where the program will be shown them."""
    files = {b"/etc/resolv.conf": info.resolv_conf}
    if hosts == "cluster":
        files[b"/etc/hosts"] = info.hosts
    served: dict[bytes, bytes] = {}
    for target, text in files.items():
        path = os.path.join(directory, os.path.basename(target.decode()))
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(path, 0o644)
        served[target] = path.encode()
    return served


def launcher_seize(child: launcher.PendingChild) -> None:
    from ktrace.tracer import kernel

    try:
        kernel.seize(child.pid)
    except OSError as exc:
        raise KtraceError(
            f"cannot trace the program: ptrace failed: {exc.strerror}",
            "ptrace may be denied here (container seccomp profile, Yama ptrace_scope); run `ktrace doctor`",
        ) from None
