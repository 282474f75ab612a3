"""``ktrace-agent``: the command line around ``AgentServer``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import NoReturn

from . import __version__, files
from .listen import ConfigError, parse_token_sha256, read_token_file
from .server import DEFAULT_CONNECT_TIMEOUT, DEFAULT_MAX_CLIENT_STREAMS, AgentServer
from .wire.tuning import one_malloc_arena, raise_fd_limit, tune_gc

log = logging.getLogger("ktrace_agent")

# Every failure of the agent's own, usage errors included, exits with this, as `ktrace` does (the
# same command as `ktrace agent`); a pod's last state shows it.
EXIT_FAILURE = 125


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_FAILURE, f"{self.prog}: error: {message} (hint: see '{self.prog} --help')\n")


def _parser(prog: str) -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="ktrace's in-cluster agent (gRPC).")
    p.add_argument("--listen", required=True, metavar="ADDR", help="unix:/path/to.sock, HOST:PORT or [V6]:PORT")
    p.add_argument("--token-file", metavar="PATH", help="file whose first line is the session token")
    p.add_argument(
        "--token-sha256",
        metavar="HEX",
        help="SHA-256 of the session token (64 hex digits): the token itself never appears in a pod spec",
    )
    p.add_argument("--idle-exit", type=float, metavar="SECONDS", help="exit after this long without any RPC")
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=DEFAULT_CONNECT_TIMEOUT,
        metavar="SECONDS",
        help="default TCP connect timeout (default %(default)s)",
    )
    p.add_argument(
        "--max-client-streams",
        type=int,
        default=DEFAULT_MAX_CLIENT_STREAMS,
        metavar="N",
        help="data streams (tunnelled connections, UDP streams) one client may have open (default %(default)s)",
    )
    p.add_argument("--resolv-conf", metavar="PATH", help="resolv.conf to report (default /etc/resolv.conf)")
    p.add_argument("--hosts", metavar="PATH", help="hosts file to report (default /etc/hosts)")
    p.add_argument(
        "--files",
        metavar="JSON",
        help=f"files of the target container to serve, read-only (default: ${files.FILES_ENV}): "
        '[{"path": PATH_IN_TARGET, "base": DIR_HERE, "sub": PATH_BELOW_DIR, "follow": BOOL}, ...]',
    )
    p.add_argument("--debug", action="store_true", help="verbose logs and tracebacks")
    p.add_argument("--version", action="version", version=f"ktrace-agent {__version__}")
    return p


async def _serve(server: AgentServer) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    # Tests and scripts wait for this line: everything is ready once it is printed.
    log.info("listening on %s", server.address)
    idle = asyncio.create_task(server.wait_idle())
    stopped = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait({idle, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if idle in done:
            log.info("idle, exiting")
        else:
            log.info("signalled, exiting")
    finally:
        idle.cancel()
        stopped.cancel()
        await server.stop(grace=1.0)


def main(argv: list[str] | None = None, prog: str = "ktrace-agent") -> int:
    one_malloc_arena()  # before any thread of gRPC's
    args = _parser(prog).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="ktrace-agent: %(message)s",
        stream=sys.stderr,
    )
    raise_fd_limit()  # a socket per tunnelled connection
    try:
        token = read_token_file(args.token_file) if args.token_file else None
        token_sha256 = parse_token_sha256(args.token_sha256) if args.token_sha256 else None
        server = AgentServer(
            args.listen,
            token=token,
            token_sha256=token_sha256,
            idle_exit=args.idle_exit,
            connect_timeout=args.connect_timeout,
            resolv_conf_path=args.resolv_conf,
            hosts_path=args.hosts,
            max_client_streams=args.max_client_streams,
            served_files=files.parse_served(args.files) if args.files else files.env_served(),
        )
        tune_gc()
        asyncio.run(_serve(server))
    except (ConfigError, files.FilesConfigError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return 0


if __name__ == "__main__":
    sys.exit(main())
