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
import sys
from collections.abc import AsyncIterator, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TextIO

from ktrace_agent.wire import tuning

from ktrace import __version__, debuggers, private_dirs, reporting
from ktrace.errors import KtraceError
from ktrace.report.recorder import Recorder
from ktrace.report.render import Verbosity
from ktrace.rules import RuleSet
from ktrace.tracer import backends, launcher, seccomp, syscalls
from ktrace.tracer.decide import AgentSources, RoutingPolicy, nameservers_of
from ktrace.tracer.dispatch import SessionHandler
from ktrace.tracer.files import FileViews
from ktrace.tracer.launcher import LaunchError
from ktrace.tracer.network import NetworkHandler
from ktrace.tracer.notify.loop import Supervisor
from ktrace.tracer.options_follow import OptionsFollower
from ktrace.tracer.ports import PathLookup
from ktrace.tracer.ptrace.loop import FORWARDED_SIGNALS, Tracer, TraceResult
from ktrace.tracer.sockets import SocketTable
from ktrace.tracer.tcp import TcpConnects
from ktrace.tracer.threads import ThreadGroups
from ktrace.tracer.udp import UdpRedirector
from ktrace.tunnel.adapter import AgentTunnel
from ktrace.tunnel.client import AgentClient, AgentInfo
from ktrace.tunnel.dns_cache import DnsCache
from ktrace.tunnel.dns_map import DnsMap
from ktrace.tunnel.parking import ParkingLot
from ktrace.tunnel.socket_table import live_udp_inodes
from ktrace.tunnel.types import AgentUnavailable, Connection, Endpoint, TcpStats
from ktrace.tunnel.udp_relay import UdpRelays

if TYPE_CHECKING:
    from ktrace.kube.options import KubeOptions
    from ktrace.kube.podview import TargetView
    from ktrace.kube.session import KubeAgent
    from ktrace.remotefs.session import RemoteFiles

log = logging.getLogger("ktrace.run")

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
    rules: RuleSet = field(default_factory=RuleSet)  # --local / --remote
    log_json: str | None = None
    verbosity: Verbosity = Verbosity.FAILURES
    hint_namespaces: tuple[str, ...] = ()
    dns_cache: bool = True  # answer DNS questions asked again within their TTL here
    kube: KubeOptions | None = None  # --agent kube: the cluster, the target, the agent pod's options
    backend: str = "auto"  # tracer/backends.py


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
        raise KtraceError("no command given", "usage: ktrace run [options] -- CMD [ARG...]")
    token = read_token(options.token_file) if options.token_file else None
    # The program's environment is the user's: without what ktrace set for its own gRPC.
    env = {k: v for k, v in os.environ.items() if k not in tuning.ADDED}
    # --target: the pod is read before the fork, so the program starts with its environment.
    view = _target_view(options)
    if view is not None and view.env is not None and options.kube is not None:
        from ktrace.kube.envlayer import overlay

        env = overlay(view.env.values, options.kube.env).apply(env)
    try:
        path = launcher.resolve(options.command[0], env)
    except LaunchError as exc:
        raise KtraceError(str(exc), exit_code=exc.exit_code) from None
    notify_missing = backends.notify_missing()
    try:
        requested = debuggers.requested_backend(
            options.backend, options.command, notify_missing, ktrace_traced=_tracer_of(os.getpid()) is not None
        )
        backend = backends.choose(requested)
    except ValueError as exc:
        hint = "use --backend ptrace (or auto); `ktrace doctor` says what this machine has"
        raise KtraceError(str(exc), hint) from None
    warning = debuggers.ptrace_warning(options.command, backend, notify_missing)
    if warning is not None:
        print(f"ktrace: {warning}", file=sys.stderr, flush=True)
    notify = backend == "notify"
    log_json = reporting.open_log(options.log_json)
    stop = seccomp.RET_USER_NOTIF if notify else seccomp.RET_TRACE
    # The target's files: every path-taking call then stops (only then: each stat() costs a stop).
    # ptrace: clone(CLONE_UNTRACED) is stopped, so that no child escapes EXITKILL (syscalls.TABLE).
    serving = view is not None and view.files is not None and bool(view.files.served)
    features = frozenset({"files"} if serving else set()) | frozenset(set() if notify else {"ptrace"})
    filter_program = seccomp.build(syscalls.filter_rules(features), stop=stop)
    child = launcher.fork_child(path, options.command, env, filter_program, notify=notify)
    tuning.raise_fd_limit()  # for ktrace only: the program, forked already, keeps the user's limit
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD, *FORWARDED_SIGNALS})
    tuning.tune_gc()
    try:
        return asyncio.run(_session(options, child, token, log_json, view))
    finally:
        launcher.reap(child)
        if log_json is not None:
            log_json.close()


def _target_view(options: RunOptions) -> TargetView | None:
    if (options.agent or "kube") != "kube" or options.kube is None or options.kube.target is None:
        return None
    from ktrace.kube.podview import read_target
    from ktrace.kube.session import report

    view = read_target(options.kube)
    for line in view.warnings:
        report(f"warning: {line}")
    return view


@dataclass(frozen=True)
class _AgentAccess:
    address: str
    token: str | None
    where: str  # how the report names the agent: its address, "local", or the pod
    kube: KubeAgent | None = None  # the agent in the cluster, which can be lost mid-run


@contextlib.asynccontextmanager
async def _agent_access(
    options: RunOptions, token: str | None, view: TargetView | None = None
) -> AsyncIterator[_AgentAccess]:
    agent = options.agent or "kube"
    if agent == "kube":
        from ktrace.kube.options import KubeOptions
        from ktrace.kube.session import kube_agent

        async with kube_agent(options.kube or KubeOptions(), view) as kube:
            yield _AgentAccess(kube.address, kube.token, kube.where, kube)
        return
    if agent != "local":
        yield _AgentAccess(agent, token, agent)
        return
    # An agent inside this process that dials from this machine: the same
    # gRPC path as a remote one, on a private unix socket.
    from ktrace_agent.server import DEFAULT_CONNECT_TIMEOUT, AgentServer

    with private_dirs.private_dir("ktrace-agent-") as tmp:
        local_token = secrets.token_urlsafe(24)
        timeout = DEFAULT_CONNECT_TIMEOUT if options.connect_timeout is None else options.connect_timeout
        server = AgentServer(f"unix:{tmp}/agent.sock", token=local_token, connect_timeout=timeout)
        await server.start()
        try:
            yield _AgentAccess(f"unix:{tmp}/agent.sock", local_token, "local")
        finally:
            await server.stop()


async def _until_finished(tracer: Tracer | Supervisor, endpoint: ParkingLot, kube: KubeAgent | None) -> TraceResult:
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


async def _session(
    options: RunOptions,
    child: launcher.PendingChild,
    token: str | None,
    log_json: TextIO | None,
    view: TargetView | None = None,
) -> int:
    """Everything a traced run needs, made in dependency order and undone in reverse: the
    agent and the tunnel to it, the report, the handlers, then the program, released last."""
    released = False
    try:
        async with contextlib.AsyncExitStack() as stack:
            access = await stack.enter_async_context(_agent_access(options, token, view))
            views_dir = await stack.enter_async_context(_private_dir())
            client = await _connect(access)
            stack.push_async_callback(client.close)
            # The target's files, on disk before the program starts; removed when the session ends.
            # remote.path_map is what the tracer's file interception asks (ktrace/remotefs/pathmap.py).
            remote = await _remote_files(view, client, access.kube)
            if remote is not None:
                stack.push_async_callback(remote.close)
            parts = _Parts.build(options, client, views_dir, log_json, notify=child.guardian is not None, remote=remote)
            stack.push_async_callback(parts.close)
            await parts.start()
            if child.guardian is None:
                launcher_seize(child)
            released = True
            try:
                launcher.release(child, options.command[0])
            except LaunchError as exc:
                raise KtraceError(str(exc), exit_code=exc.exit_code) from None
            parts.recorder.start(options.command, access.where)
            loop = asyncio.get_running_loop()
            tracer: Tracer | Supervisor
            if child.guardian is None:
                tracer = Tracer(parts.session, child.pid, loop, threads_of=parts.threads)
            else:
                tracer = Supervisor(parts.session, child, loop, threads_of=parts.threads)
            tracer.start()
            try:
                result = await _until_finished(tracer, parts.lot, access.kube)
            finally:
                tracer.close()
                await parts.close()
            status = 128 + result.signal if result.signal is not None else (result.exit_code or 0)
            parts.network.finish()
            namespaces = access.kube.namespaces if access.kube is not None else None
            await reporting.finish(parts.recorder, client, options, status, namespaces)
            return status
    finally:
        if not released:
            launcher.abort(child)


async def _connect(access: _AgentAccess) -> AgentClient:
    try:
        if access.kube is not None:
            return await access.kube.connect()
        # An agent the user named (or ktrace's own): nothing to wait for.
        return await AgentClient.connect(
            access.address,
            access.token,
            wait_for_ready=False,
            unreachable_hint="is an agent listening there? `ktrace agent --listen ADDR` starts one",
            handover=True,
        )
    except AgentUnavailable as exc:
        raise KtraceError(str(exc)) from None


def _lookup(remote: RemoteFiles) -> PathLookup:
    """The remotefs path map as the tracer asks it."""
    from ktrace.remotefs.pathmap import Redirect, Refuse

    def lookup(path: bytes, write: bool, follow: bool) -> bytes | int | None:
        found = remote.path_map.lookup(path, write=write, follow=follow)
        if isinstance(found, Redirect):
            return found.path
        if isinstance(found, Refuse):
            return found.errno
        return None

    return lookup


async def _remote_files(view: TargetView | None, client: AgentClient, kube: KubeAgent | None) -> RemoteFiles | None:
    """The target's volumes (and --remote-path paths) mirrored from the agent; None when none are."""
    if view is None or view.files is None or not view.files.served:
        return None
    from ktrace.kube.session import report
    from ktrace.remotefs.mirror import Mirror, MirrorError
    from ktrace.remotefs.session import FilesUnavailable, RemoteFiles

    try:
        mirror = Mirror.create()
    except (MirrorError, OSError) as exc:
        raise KtraceError(f"cannot make a private directory for the target's files: {exc}") from None
    roots = [os.fsencode(s.path) for s in view.files.served]
    remote = RemoteFiles(roots, view.files.path_rules(), mirror, report)
    try:
        await _unless_lost(remote.start(client), kube)
    except FilesUnavailable as exc:
        await remote.close()
        if exc.older_agent:  # the network view still works: say what is missing and go on
            report(
                f"warning: {exc}: the program sees this machine's files at the target's paths "
                f"(hint: --agent-image with tag {__version__})"
            )
            return None
        raise KtraceError(f"the target's files: {exc}", "rerun with --debug") from None
    except BaseException:
        await remote.close()
        raise
    return remote


async def _unless_lost(work: Coroutine[object, object, None], kube: KubeAgent | None) -> None:
    """``work``, unless the agent is lost first (then its reason, e.g. killed for memory, is the error)."""
    task = asyncio.ensure_future(work)
    if kube is None:
        await task
        return
    waiting: set[asyncio.Future[object]] = {task, kube.lost}  # type: ignore[arg-type]
    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    if not task.done():
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise kube.lost.result()
    await task


@dataclass
class _Parts:
    """The laptop half of a session: report, parking lot, UDP relays and the syscall handlers."""

    recorder: Recorder
    threads: ThreadGroups
    lot: ParkingLot
    relays: UdpRelays
    network: NetworkHandler
    session: SessionHandler
    _closed: bool = False

    @classmethod
    def build(
        cls,
        options: RunOptions,
        client: AgentClient,
        views_dir: str,
        log_json: TextIO | None,
        *,
        notify: bool,
        remote: RemoteFiles | None = None,
    ) -> _Parts:
        dns_map = DnsMap()
        dns_map.listeners.append(lambda name, found: log.debug("dns answer %s -> %s", name, found))
        policy = RoutingPolicy(options.rules, dns_map, nameservers_of(client.info.resolv_conf))
        recorder = reporting.recorder(options, client, policy, dns_map, log_json)
        threads = ThreadGroups(cache=not notify)

        # The tunnel reports back to the handlers made after it (a stream's end, a socket gone):
        # through these, once they exist.
        def closed(stream: Connection, stats: TcpStats) -> None:
            tcp.stream_closed(stream)
            recorder.on_stream_closed(stream, stats)

        def socket_gone(inode: int) -> None:
            udp.forget(inode)

        def peer_error(inode: int, peer: Endpoint, errno_name: str) -> None:
            udp.peer_error(inode, peer, errno_name)

        lot = ParkingLot(on_closed=closed)
        relays = UdpRelays(
            client,
            on_dns_answer=dns_map.record,
            live_sockets=live_udp_inodes,
            on_socket_gone=socket_gone,
            on_peer_error=peer_error,
            observer=recorder,
            local_dns=reporting.local_resolver(options.rules),
            dns_cache=DnsCache() if options.dns_cache else None,
        )
        table = SocketTable()  # one record per program socket, shared by the TCP and UDP handlers
        tcp = TcpConnects(
            AgentTunnel(client, lot, dns_map),
            policy,
            connect_timeout=options.connect_timeout,
            on_event=recorder.on_connect,
            threads=threads,
            table=table,
            options=OptionsFollower(threads) if client.info.tcp_options else None,
        )
        udp = UdpRedirector(
            relays,
            policy,
            on_event=recorder.on_udp,
            threads=threads,
            sources=AgentSources.from_routes(client.info.source_routes, client.info.addresses),
            table=table,
        )
        network = NetworkHandler(tcp, udp, threads)
        files = FileViews(
            served=_serve_resolver_files(views_dir, client.info, options.hosts),
            target=_lookup(remote) if remote is not None else None,
        )
        return cls(recorder, threads, lot, relays, network, SessionHandler(network, files, threads))

    async def start(self) -> None:
        await self.lot.start()

    async def close(self) -> None:
        """Dials still going have no one to serve; spliced connections get SHUTDOWN_GRACE to
        deliver what the program wrote last. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.network.tcp.cancel_dials()
        await self.lot.close(grace=SHUTDOWN_GRACE)
        await self.relays.close()


@contextlib.asynccontextmanager
async def _private_dir() -> AsyncIterator[str]:
    with private_dirs.private_dir("ktrace-view-") as path:
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
    from ktrace.tracer.ptrace import kernel

    try:
        kernel.seize(child.pid)
    except OSError as exc:
        raise KtraceError(
            f"cannot trace the program: ptrace failed: {os.strerror(exc.errno) if exc.errno else exc}",
            debuggers.seize_failure_hint(_tracer_of(child.pid), backends.notify_missing()),
        ) from None


def _tracer_of(pid: int) -> str | None:
    """``NAME (pid N)`` of the process tracing ``pid`` (/proc/PID/status TracerPid), if any."""
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as f:
            tracer = next((int(line.split()[1]) for line in f if line.startswith("TracerPid:")), 0)
        if tracer == 0:
            return None
        with open(f"/proc/{tracer}/comm", encoding="utf-8") as f:
            return f"{f.read().strip()} (pid {tracer})"
    except (OSError, ValueError, IndexError):
        return None
