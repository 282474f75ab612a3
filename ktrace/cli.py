"""Command line: `ktrace run ...`, `ktrace agent ...`.

Every failure of ktrace itself is one line on stderr with a hint and exit
status 125 (2 for usage errors); `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from ktrace import __version__
from ktrace.errors import KtraceError


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ktrace",
        description="Run a local program whose DNS queries and connections happen inside a cluster.",
    )
    parser.add_argument("--version", action="version", version=f"ktrace {__version__}")
    parser.add_argument("--debug", action="store_true", help="show debug logs and tracebacks")
    sub = parser.add_subparsers(dest="command_name", metavar="COMMAND")

    run = sub.add_parser(
        "run", help="run a program with the cluster's network view", usage="ktrace run [options] -- CMD [ARG...]"
    )
    run.add_argument(
        "--agent",
        metavar="ADDR",
        help="the agent: unix:/path/to.sock, HOST:PORT, or 'local' (an agent inside ktrace dialling from this machine)",
    )
    run.add_argument("--token-file", metavar="PATH", help="file whose first line is the agent's session token")
    run.add_argument(
        "--connect-timeout",
        metavar="SECONDS",
        type=_positive_float,
        help="how long the agent tries to connect before the program's connect() fails with ETIMEDOUT",
    )
    run.add_argument(
        "--hosts",
        choices=("local", "cluster"),
        default="local",
        help="whose /etc/hosts the program reads: this machine's (default: localhost keeps working) "
        "or the agent's, as a pod sees it",
    )
    run.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    agent = sub.add_parser("agent", help="run the agent (same as ktrace-agent)", add_help=False)
    agent.add_argument("agent_args", nargs=argparse.REMAINDER)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "run" in args_in and "--" in args_in:
        split = args_in.index("--")
        if args_in.index("run") < split:
            args_in, command = args_in[:split], args_in[split + 1 :]
    parser = build_parser()
    if args_in[:1] == ["agent"]:
        from ktrace_agent.main import main as agent_main

        return int(agent_main(args_in[1:]))
    args = parser.parse_args(args_in)
    debug = bool(getattr(args, "debug", False))
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="ktrace: %(levelname)s %(name)s: %(message)s",
    )
    if args.command_name is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        if args.command_name == "run":
            from ktrace.run import RunOptions, run

            return run(
                RunOptions(
                    command=command,
                    agent=args.agent,
                    token_file=args.token_file,
                    connect_timeout=args.connect_timeout,
                    hosts=args.hosts,
                )
            )
    except KtraceError as exc:
        if debug:
            raise
        print(exc.render(), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if debug:
            raise
        print(
            f"ktrace: internal error: {type(exc).__name__}: {exc} (hint: rerun with --debug and report it)",
            file=sys.stderr,
        )
        return 125
    parser.print_help(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
