"""The agent's gRPC server: auth, handshake, idle exit, and the stream handlers.

``AgentServer`` is also the in-process API ktrace uses for ``--agent local``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
import grpc.aio

from . import __version__, files, host_info
from .handover import HandoverDesk
from .listen import ConfigError, TokenCheck, check_policy, claim_unix_path, parse_listen
from .tcp_relay import TcpRelay
from .udp_mux import SessionCount, UdpSessions
from .wire import MAX_MESSAGE_BYTES, PROTOCOL_VERSION, codec, rpc, tuning
from .wire.budget import SendBudget

log = logging.getLogger("ktrace_agent")

DEFAULT_CONNECT_TIMEOUT = 10.0
# How long stop() waits, after gRPC's own stop, for the tasks that ran the handlers to end.
HANDLERS_END_WAIT = 2.0
# Data streams (Connect, DatagramSessions) one client may have open at once: a client
# is a connection (``context.peer()``; every client of a Unix socket is ``unix:``, so there it
# is the whole agent's). A tunnelled TCP connection is a stream: a program with more
# connections open through one agent than this gets ENOBUFS for the next ones.
DEFAULT_MAX_CLIENT_STREAMS = 4096
# gRPC's own bound per HTTP/2 connection (SETTINGS_MAX_CONCURRENT_STREAMS): above the cap, so a
# client hears the cap's error rather than waiting; it bounds the calls in flight (and the
# memory they take), authenticated or not, whatever a client sends.
MAX_CONCURRENT_STREAMS = DEFAULT_MAX_CLIENT_STREAMS + 256
# Quiet seconds after which freed memory goes back to the kernel (tuning.Trimmer).
TRIM_AFTER_QUIET = 5.0
# At most one log line per this many seconds about rejected calls (a flood is one line).
REJECTED_LOG_INTERVAL = 10.0


class AgentServer:
    """A running agent. ``start()``, then ``address``; ``stop()`` when done.

    ``listen``: ``unix:/path`` (created mode 0600) or ``HOST:PORT`` (port 0 picks one).
    ``token``: when set, every RPC must carry ``authorization: Bearer <token>``.
    ``token_sha256``: the same check, knowing only the token's SHA-256 (``--token-sha256``).
    ``idle_exit``: ``wait_idle()`` returns after that many seconds without any RPC.
    """

    def __init__(
        self,
        listen: str,
        *,
        token: str | None = None,
        token_sha256: bytes | None = None,
        idle_exit: float | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        resolv_conf_path: str | None = None,
        hosts_path: str | None = None,
        tcp_stream_reuse: bool = True,
        tcp_handover: bool = True,
        tcp_desk: bool = True,
        tcp_options: bool = True,
        max_client_streams: int = DEFAULT_MAX_CLIENT_STREAMS,
        served_files: Sequence[files.ServedRoot] = (),
        files_interval: float = files.POLL_INTERVAL,
    ) -> None:
        self._listen = parse_listen(listen)
        check_policy(self._listen, token, None if token_sha256 is None else token_sha256.hex())
        self._auth = TokenCheck(token, token_sha256)
        self._idle_exit = idle_exit
        self._connect_timeout = connect_timeout
        self._resolv_conf_path = resolv_conf_path
        self._hosts_path = hosts_path
        # False behaves as an agent from before reuse (tests of old agents).
        self._tcp_stream_reuse = tcp_stream_reuse
        # Offered when listening on a Unix socket (handover.py); False: as an agent from before it.
        self._tcp_handover = tcp_handover
        # False: the desk takes ticketed sockets only, as before it dialled (tests of old agents).
        self._tcp_desk = tcp_desk
        # False: the handshake does not offer to apply the program's socket options (tests of old agents).
        self._tcp_options = tcp_options
        self._desk: HandoverDesk | None = None
        # The only files WatchFiles ever reads (fixed at start: a client cannot name others).
        self._served = {root.path: root for root in served_files}
        self._files_interval = files_interval
        self.udp_sessions = SessionCount()
        self._server: grpc.aio.Server | None = None
        self.send_budget = SendBudget()  # bounds the agent's memory with many busy connections
        self._active = 0
        self._activity = asyncio.Event()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._max_client_streams = max_client_streams
        self._streams_of: dict[str, int] = {}  # peer -> its data streams open now
        self._trimmer = tuning.Trimmer(TRIM_AFTER_QUIET)
        self._rejected = 0
        self._rejected_logged = -REJECTED_LOG_INTERVAL
        self.address = ""

    async def start(self) -> None:
        if self._listen.unix_path is not None:
            claim_unix_path(self._listen.unix_path)
        server = grpc.aio.server(options=rpc.server_options(MAX_CONCURRENT_STREAMS))
        rpc.register(self, server)
        target = self._listen.grpc_target()
        path = self._listen.unix_path
        if path is not None:
            # The socket file must never exist with looser permissions, not even
            # briefly: create it under a umask that leaves only the owner's bits.
            old_umask = os.umask(0o177)
            try:
                port = server.add_insecure_port(target)
                await server.start()
            finally:
                os.umask(old_umask)
            os.chmod(path, 0o600)  # belt and braces, in case the library changes how it binds
            if stat.S_IMODE(os.stat(path).st_mode) != 0o600:
                await server.stop(None)
                raise ConfigError(f"unix socket {path} is not mode 0600")
            self.address = f"unix:{path}"
            if self._tcp_handover:
                desk = HandoverDesk(
                    path,
                    connect_timeout=self._connect_timeout,
                    max_connections=self._max_client_streams,
                    activity=self._desk_activity,
                )
                if desk.start():
                    self._desk = desk
        else:
            try:
                port = server.add_insecure_port(target)
            except RuntimeError:
                raise ConfigError(f"cannot listen on {target}") from None
            await server.start()
            host = f"[{self._listen.host}]" if ":" in self._listen.host else self._listen.host
            self.address = f"{host}:{port}"
        if port == 0:
            await server.stop(None)
            raise ConfigError(f"cannot listen on {target}")
        self._server = server

    async def stop(self, grace: float | None = 1.0) -> None:
        self._trimmer.close()
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        if self._desk is not None:
            self._desk.close()
            self._desk = None
        # grpc.aio's stop() returns once gRPC core has ended the calls, while the asyncio tasks
        # that ran their handlers may still have steps to run (a cancelled call's handler
        # unwinding). A process that ends its loop then (asyncio.run cancels what is left:
        # `ktrace run --agent local` right after the program) makes grpc print "Exception not
        # handled by _handle_exceptions ... CancelledError" with a traceback per such task.
        # Once a handler task is done, grpc's task around it is woken before this one is.
        if self._handlers:
            await asyncio.wait(set(self._handlers), timeout=HANDLERS_END_WAIT)

    async def wait_idle(self) -> None:
        """Return once no RPC has been in progress or started for ``idle_exit`` seconds."""
        if self._idle_exit is None:
            await asyncio.Event().wait()  # never
            return
        while True:
            if self._active:
                self._activity.clear()
                await self._activity.wait()
                continue
            self._activity.clear()
            try:
                await asyncio.wait_for(self._activity.wait(), self._idle_exit)
            except TimeoutError:
                if not self._active:
                    return

    @contextlib.asynccontextmanager
    async def _call(self, context: grpc.aio.ServicerContext[Any, Any], what: str) -> AsyncIterator[None]:
        """Authenticate the call and count it as activity while it runs."""
        handler = asyncio.current_task()
        if handler is not None and handler not in self._handlers:
            self._handlers.add(handler)
            handler.add_done_callback(self._handlers.discard)
        self._trimmer.poke()
        if not self._auth.accepts(context.invocation_metadata()):
            self._log_rejected(what, context.peer())
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token")
        self._active += 1
        self._activity.set()
        try:
            yield
        finally:
            self._active -= 1
            self._activity.set()
            self._trimmer.poke()

    def _desk_activity(self, delta: int) -> None:
        """A connection on a keyed desk line started (+1) or ended (-1): activity as a call is."""
        self._active += delta
        self._activity.set()
        self._trimmer.poke()

    def _log_rejected(self, what: str, peer: str) -> None:
        self._rejected += 1
        now = asyncio.get_running_loop().time()
        if now - self._rejected_logged < REJECTED_LOG_INTERVAL:
            return
        more = f" ({self._rejected - 1} more since the last such line)" if self._rejected > 1 else ""
        log.warning("rejected %s from %s: missing or wrong token%s", what, peer, more)
        self._rejected = 0
        self._rejected_logged = now

    @contextlib.asynccontextmanager
    async def _counted_stream(self, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[None]:
        """Count the stream against its client's cap; refuse it (RESOURCE_EXHAUSTED) above."""
        peer = context.peer()
        count = self._streams_of.get(peer, 0)
        if count >= self._max_client_streams:
            log.warning("refused a stream from %s: %d open, the limit per client", peer, count)
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many streams from this client: {count} open, the agent allows {self._max_client_streams} "
                "(ktrace-agent --max-client-streams)",
            )
        self._streams_of[peer] = count + 1
        try:
            yield
        finally:
            left = self._streams_of[peer] - 1
            if left:
                self._streams_of[peer] = left
            else:
                del self._streams_of[peer]

    # --- rpc.AgentService ---

    async def Handshake(self, request: rpc.HandshakeRequest, context: rpc.HandshakeContext) -> rpc.HandshakeReply:
        async with self._call(context, "Handshake"):
            info = host_info.gather(self._resolv_conf_path, self._hosts_path)
            log.debug("handshake from %s (client %s)", context.peer(), request.client_version)
            return rpc.HandshakeReply(
                agent_version=__version__,
                protocol_version=PROTOCOL_VERSION,
                hostname=info.hostname,
                addresses=[codec.encode_ip(ip) for ip in info.addresses],
                resolv_conf=info.resolv_conf,
                hosts=info.hosts,
                max_message_bytes=MAX_MESSAGE_BYTES,
                tcp_stream_reuse=self._tcp_stream_reuse,
                tcp_handover_path=self._desk.path if self._desk is not None else "",
                tcp_handover_id=self._desk.id if self._desk is not None else b"",
                tcp_desk_key=self._desk.key if self._desk is not None and self._tcp_desk else b"",
                tcp_options=self._tcp_options,
                udp_multiplex=True,
                file_roots=list(self._served),
                source_routes=[
                    rpc.SourceRoute(
                        family=codec.wire_family(route.family),
                        ip=codec.encode_ip(route.source) if route.source is not None else b"",
                        errno_name=route.errno_name,
                    )
                    for route in info.source_routes
                ],
            )

    async def _stream(
        self, context: grpc.aio.ServicerContext[Any, Any], what: str, run: Callable[[], Awaitable[None]]
    ) -> None:
        """A data stream: authenticated and counted (``_call``) before ``run`` makes anything,
        headers sent at once, and a failure logged with the stream's kind before it ends the
        stream (only this one)."""
        async with self._call(context, what), self._counted_stream(context):
            await _headers_now(context)
            try:
                await run()
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as exc:
                log.warning("%s stream from %s failed: %s", what, context.peer(), exc)
                raise

    async def Connect(self, request_iterator: object, context: rpc.TcpContext) -> None:
        def relay() -> Awaitable[None]:
            return TcpRelay(
                context, self._connect_timeout, self.send_budget, reuse=self._tcp_stream_reuse, desk=self._desk
            ).run()

        await self._stream(context, "Connect", relay)

    async def DatagramSessions(self, request_iterator: object, context: rpc.UdpContext) -> None:
        await self._stream(context, "DatagramSessions", lambda: UdpSessions(context, self.udp_sessions).run())

    async def WatchFiles(self, request: rpc.WatchFilesRequest, context: rpc.FilesContext) -> None:
        async with self._call(context, "WatchFiles"):
            unknown = [path for path in request.roots if path not in self._served]
            if unknown:
                # Names only what was asked for: whoever has the token chose those paths.
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"not served: {os.fsdecode(unknown[0])}")
            roots = [self._served[path] for path in dict.fromkeys(request.roots)]
            await _headers_now(context)
            async for tree in files.watch(roots, self._files_interval):
                await context.write(tree)


async def _headers_now(context: grpc.aio.ServicerContext[Any, Any]) -> None:
    """Send the response headers when the stream starts, not with the first answer: ktrace
    starts streams ahead of need, so the answer to ``open`` is then a bare message, which
    reaches the client sooner (about half the time: docs/performance.md, "What the profiles
    showed")."""
    await context.send_initial_metadata(())
