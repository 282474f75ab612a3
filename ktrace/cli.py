"""Command line: `ktrace run ...`, `ktrace cleanup ...`, `ktrace agent ...`, `ktrace image ...`.

Every failure of ktrace itself, usage and configuration errors included, is one line on stderr with a
hint and exit status 125, which a script can tell from the program's own status (as `docker run`,
`timeout`, `env` do); `--help` and `--version` exit 0. `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

from ktrace import __version__
from ktrace.errors import EXIT_KTRACE_FAILURE, KtraceError


def _usage_error(message: str, prog: str) -> str:
    return KtraceError(message, f"see '{prog} --help'").render() + "\n"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is ktrace's one line and 125 instead of a usage block and 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_KTRACE_FAILURE, _usage_error(message, self.prog))


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def build_parser(prog: str = "ktrace") -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog,
        description="Run a local program whose DNS queries and connections happen inside a cluster.",
    )
    parser.add_argument("--version", action="version", version=f"ktrace {__version__}")
    parser.add_argument("--debug", action="store_true", help="show debug logs and tracebacks")
    sub = parser.add_subparsers(dest="command_name", metavar="COMMAND")

    # Run options default to SUPPRESS: absent ones stay absent, so ktrace.toml and
    # KTRACE_* can supply them (ktrace/config.py has the precedence).
    run = sub.add_parser(
        "run",
        help="run a program with the cluster's network view",
        usage=f"{prog} run [options] -- CMD [ARG...]",
        argument_default=argparse.SUPPRESS,
        epilog="Every option can also be set in ktrace.toml or a KTRACE_* variable (flags > environment > file). "
        "Network events and the summary go to stderr.",
    )
    run.add_argument("-f", "--config", metavar="FILE", help="settings file (default: ./ktrace.toml if it exists)")
    run.add_argument(
        "--agent",
        metavar="ADDR",
        help="the agent: 'kube' (default: a pod in the cluster of the kubeconfig's context), 'local' (inside "
        "ktrace, dialling from this machine), or the address of a running one: unix:/path/to.sock, HOST:PORT",
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
        help="whose /etc/hosts the program reads: this machine's (default: localhost keeps working) "
        "or the agent's, as a pod sees it",
    )
    run.add_argument(
        "--local",
        metavar="RULE",
        action="append",
        help="keep matching destinations on this machine (repeatable); RULE: [tcp://|udp://]CIDR|IP|NAME|*.DOMAIN[:PORT]",
    )
    run.add_argument(
        "--remote",
        metavar="RULE",
        action="append",
        help="send matching destinations through the cluster (repeatable); the most specific rule wins",
    )
    run.add_argument("--log-json", metavar="FILE", help="write one JSON object per network event to FILE")
    run.add_argument(
        "--backend",
        choices=("auto", "notify", "ptrace"),
        help="how ktrace intercepts the program's syscalls: 'notify' (seccomp user notification; a "
        "debugger such as gdb, dlv or strace can run under ktrace), 'ptrace', or 'auto' (default: "
        "see ktrace doctor)",
    )
    shown = run.add_mutually_exclusive_group()
    shown.add_argument(
        "-v", "--verbose", dest="output", action="store_const", const="all", help="show every network event"
    )
    shown.add_argument(
        "-q", "--quiet", dest="output", action="store_const", const="quiet", help="show no network events or summary"
    )
    run.add_argument(
        "--hint-namespace",
        dest="hint_namespaces",
        metavar="NS",
        action="append",
        help="a namespace to look in for a same-named service when a short name is not found (repeatable)",
    )
    run.add_argument(
        "--dns-cache",
        action=argparse.BooleanOptionalAction,
        help="answer a DNS question the program asks again within its TTL without a round trip to the agent "
        "(default: on; --no-dns-cache asks the cluster every time)",
    )
    _add_cluster_flags(run)
    agent_pod = run.add_argument_group("the agent in the cluster (--agent kube)")
    agent_pod.add_argument(
        "--target",
        metavar="KIND/NAME",
        help="run the agent as an ephemeral container in this pod, so connections leave with its IP and DNS: "
        "pod/NAME, pod/NAME/container/C, deploy/NAME (default: a pod of ktrace's own)",
    )
    agent_pod.add_argument(
        "--agent-image",
        metavar="IMAGE",
        help="the agent image (default: $KTRACE_AGENT_IMAGE, else ktrace/agent:VERSION; build it from the Dockerfile)",
    )
    agent_pod.add_argument("--agent-pull-policy", choices=("Always", "IfNotPresent", "Never"), help="imagePullPolicy")
    agent_pod.add_argument(
        "--agent-pull-secret", metavar="NAME", action="append", help="imagePullSecrets entry (repeatable)"
    )
    agent_pod.add_argument(
        "--agent-node-selector", metavar="KEY=VALUE", action="append", help="nodeSelector (repeatable)"
    )
    agent_pod.add_argument(
        "--agent-toleration",
        metavar="KEY[=VALUE][:EFFECT]",
        action="append",
        help="tolerate this taint, kubectl taint syntax; '*' tolerates all (repeatable)",
    )
    agent_pod.add_argument("--agent-label", metavar="KEY=VALUE", action="append", help="pod label (repeatable)")
    agent_pod.add_argument(
        "--agent-annotation", metavar="KEY=VALUE", action="append", help="pod annotation (repeatable)"
    )
    agent_pod.add_argument(
        "--agent-timeout",
        metavar="SECONDS",
        type=_positive_float,
        help="how long the agent may take to start (default 60)",
    )
    agent_pod.add_argument(
        "--agent-idle-exit",
        metavar="SECONDS",
        type=_positive_float,
        help="the agent exits after this long without ktrace, e.g. if ktrace was killed (default 60)",
    )
    agent_pod.add_argument(
        "--port-forward",
        choices=("auto", "spdy", "websocket"),
        help="the tunnel's port-forward protocol: SPDY as kubectl's, or a WebSocket (default auto: SPDY, and the "
        "WebSocket if the API server refuses SPDY)",
    )
    _add_target_flags(run)
    run.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    env = sub.add_parser(
        "env",
        help="print the environment ktrace run --target gives the program (for IDE run configurations)",
        argument_default=argparse.SUPPRESS,
        description="Print the variables `ktrace run --target` sets for the program: the target container's "
        "environment as the kubelet makes it, less those that describe this machine. Secret values included.",
    )
    env.add_argument("-f", "--config", metavar="FILE", help="settings file (default: ./ktrace.toml if it exists)")
    _add_cluster_flags(env)
    env.add_argument("--target", metavar="KIND/NAME", help="pod/NAME, pod/NAME/container/C or deploy/NAME")
    env.add_argument(
        "--format", choices=("dotenv", "json"), default="dotenv", help="NAME=value lines, or one JSON object"
    )
    _add_env_flags(env)
    env.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    doctor = sub.add_parser("doctor", help="check that ktrace can work here, with a fix for each problem")
    doctor.add_argument("-f", "--config", metavar="FILE", help="settings file (default: ./ktrace.toml)")

    completion = sub.add_parser("completion", help="print a shell completion script")
    completion.add_argument("shell", choices=("bash", "zsh", "tcsh", "fish"))

    cleanup = sub.add_parser(
        "cleanup",
        help="delete agent pods and temporary directories left behind (by a killed ktrace)",
        description="Delete ktrace's agent pods whose agent is not running (a killed ktrace's pod ends by itself "
        "after --agent-idle-exit). Ephemeral containers cannot be removed from a pod; their agents exit by themselves. "
        "First removes this user's temporary directories of ktrace runs that were killed.",
    )
    _add_cluster_flags(cleanup)
    cleanup.add_argument(
        "-A", "--all-namespaces", action="store_true", help="in every namespace (needs list on pods cluster-wide)"
    )
    cleanup.add_argument(
        "--include-running",
        action="store_true",
        help="also delete agent pods that still run (this ends other ktrace sessions using them)",
    )
    cleanup.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    agent = sub.add_parser("agent", help="run the agent (same as ktrace-agent)", add_help=False)
    agent.add_argument("agent_args", nargs=argparse.REMAINDER)
    _add_image_parser(sub)
    return parser


def _add_image_parser(sub: argparse._SubParsersAction[_Parser]) -> None:
    """`ktrace image build` (ktrace/image.py, imported only when it runs: its choices are repeated here)."""
    image = sub.add_parser("image", help="build the agent image (docker, podman or buildah)")
    actions = image.add_subparsers(dest="image_command", metavar="ACTION", required=True)
    build = actions.add_parser(
        "build",
        help="build the agent image from the Dockerfile, then push or load it",
        description="Build the agent image from the Dockerfile of a ktrace source tree with docker, podman or "
        "buildah (the first of these installed), with no network access in the build, push or load it, and "
        "print the line that makes ktrace use it. See docs/kubernetes.md.",
    )
    build.add_argument("--tag", metavar="REF", help="the image reference (default: ktrace's, ktrace/agent:VERSION)")
    build.add_argument("--push", action="store_true", help="push it to its registry")
    build.add_argument(
        "--load", choices=("kind", "minikube", "containerd", "docker"), help="load it into a local cluster or engine"
    )
    build.add_argument("--oci-archive", metavar="PATH", help="also write it to an OCI archive (ctr images import)")
    build.add_argument("--builder", choices=("docker", "podman", "buildah"), help="the builder (default: detected)")
    build.add_argument("--base", metavar="IMAGE", help="the base image (default: the Dockerfile's, python:3.11-slim)")
    build.add_argument("--python-version", metavar="X.Y", help="the base image's Python (default: from python:X.Y)")
    build.add_argument(
        "--pull", choices=("always", "missing", "never"), help="when to pull the base image (default: the builder's)"
    )
    build.add_argument(
        "--platform", metavar="linux/ARCH[,...]", help="several make a multi-platform image, which needs --push"
    )
    build.add_argument("--source", metavar="DIR", help="the ktrace source tree (default: this directory, or ktrace's)")
    build.add_argument("-q", "--quiet", action="store_true", help="less output from the builder")


def _add_env_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument(
        "--env-include",
        metavar="PATTERN",
        action="append",
        help="take these variables (globs) from the pod even if they describe this machine, e.g. 'LANG' (repeatable)",
    )
    parser.add_argument(
        "--env-exclude",
        metavar="PATTERN",
        action="append",
        help="keep the local value of these variables (globs) (repeatable)",
    )
    parser.add_argument(
        "--no-env",
        action="store_const",
        const=True,
        help="the program gets the local environment only, not the pod's",
    )


def _add_target_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("running as the target pod (--target)")
    _add_env_flags(group)
    group.add_argument(
        "--remote-path",
        metavar="PATH",
        action="append",
        help="the program sees this path of the target container too, read-only (repeatable); its volume "
        "mounts (ConfigMap, Secret, projected, downward API) it sees anyway",
    )
    group.add_argument(
        "--local-path",
        metavar="PATH",
        action="append",
        help="this path stays local, even inside a volume of the target (repeatable)",
    )


def _add_cluster_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("cluster (as kubectl; also KUBECONFIG)")
    group.add_argument(
        "--kubeconfig", metavar="PATH", help="the kubeconfig file (default: $KUBECONFIG, ~/.kube/config)"
    )
    group.add_argument("--context", metavar="NAME", help="the kubeconfig context (default: its current-context)")
    group.add_argument("-n", "--namespace", metavar="NS", help="the namespace (default: the context's)")


def kubectl_main() -> int:
    """``kubectl ktrace ...``: kubectl runs the ``kubectl-ktrace`` executable on PATH."""
    return main(prog="kubectl ktrace")


def main(argv: Sequence[str] | None = None, prog: str = "ktrace") -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "run" in args_in and "--" in args_in:
        split = args_in.index("--")
        if args_in.index("run") < split:
            args_in, command = args_in[:split], args_in[split + 1 :]
    parser = build_parser(prog)
    if args_in[:1] == ["agent"]:
        from ktrace_agent.main import main as agent_main

        return int(agent_main(args_in[1:], prog=f"{prog} agent"))
    args, unknown = parser.parse_known_args(args_in)
    if unknown:  # argparse reports a subcommand's unknown options from the top: name the subcommand's --help
        words = [prog, *(w for w in (args.command_name, getattr(args, "image_command", None)) if w)]
        parser.exit(EXIT_KTRACE_FAILURE, _usage_error(f"unrecognized arguments: {' '.join(unknown)}", " ".join(words)))
    debug = bool(getattr(args, "debug", False))
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="ktrace: %(levelname)s %(name)s: %(message)s",
    )
    if args.command_name is None:
        parser.error("no command given (one of run, doctor, cleanup, image, completion, agent)")
    try:
        if args.command_name == "run":
            from ktrace.options import run_options
            from ktrace.run import run

            return run(run_options(vars(args), command))
        if args.command_name == "doctor":
            from ktrace.doctor import run_doctor

            return run_doctor(getattr(args, "config", None))
        if args.command_name == "completion":
            from ktrace.completion import script

            sys.stdout.write(script(parser, args.shell))
            return 0
        if args.command_name == "image":
            from ktrace import image

            return image.build(image.request_of(args))
        if args.command_name == "agent":  # reached only after an option such as --debug
            from ktrace_agent.main import main as agent_main

            return int(agent_main(args.agent_args, prog=f"{prog} agent"))
        if args.command_name == "env":
            from ktrace.kube.envcmd import print_env

            return print_env(vars(args))
        if args.command_name == "cleanup":
            from ktrace.private_dirs import sweep

            for path in sweep():
                print(f"removed {path} (left by a ktrace that was killed)")
            from ktrace.kube.cleanup import cleanup
            from ktrace.kube.options import cluster_choice
            from ktrace.options import load_settings

            flags = {k: v for k, v in vars(args).items() if k in ("kubeconfig", "context", "namespace")}
            return cleanup(
                cluster_choice(load_settings(flags)),
                all_namespaces=args.all_namespaces,
                include_running=args.include_running,
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
        return EXIT_KTRACE_FAILURE
    parser.error(f"unknown command {args.command_name!r}")


if __name__ == "__main__":
    sys.exit(main())
