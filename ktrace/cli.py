"""Command line: `ktrace run ...`, `ktrace cleanup ...`, `ktrace agent ...`.

Every failure of ktrace itself is one line on stderr with a hint and exit
status 125 (2 for usage errors); `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ktrace import __version__
from ktrace.errors import KtraceError

if TYPE_CHECKING:
    from ktrace.kube.options import ClusterChoice, KubeOptions


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
        default="kube",
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
        default="local",
        help="whose /etc/hosts the program reads: this machine's (default: localhost keeps working) "
        "or the agent's, as a pod sees it",
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
        "--agent-pull-secret", metavar="NAME", action="append", default=[], help="imagePullSecrets entry (repeatable)"
    )
    agent_pod.add_argument(
        "--agent-node-selector", metavar="KEY=VALUE", action="append", default=[], help="nodeSelector (repeatable)"
    )
    agent_pod.add_argument(
        "--agent-toleration",
        metavar="KEY[=VALUE][:EFFECT]",
        action="append",
        default=[],
        help="tolerate this taint, kubectl taint syntax; '*' tolerates all (repeatable)",
    )
    agent_pod.add_argument(
        "--agent-label", metavar="KEY=VALUE", action="append", default=[], help="pod label (repeatable)"
    )
    agent_pod.add_argument(
        "--agent-annotation", metavar="KEY=VALUE", action="append", default=[], help="pod annotation (repeatable)"
    )
    agent_pod.add_argument(
        "--agent-timeout",
        metavar="SECONDS",
        type=_positive_float,
        default=60.0,
        help="how long the agent may take to start (default %(default)g)",
    )
    agent_pod.add_argument(
        "--agent-idle-exit",
        metavar="SECONDS",
        type=_positive_float,
        default=60.0,
        help="the agent exits after this long without ktrace, e.g. if ktrace was killed (default %(default)g)",
    )
    run.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    cleanup = sub.add_parser(
        "cleanup",
        help="delete agent pods left behind (by a killed ktrace)",
        description="Delete ktrace's agent pods whose agent is not running (a killed ktrace's pod ends by itself "
        "after --agent-idle-exit). Ephemeral containers cannot be removed from a pod; their agents exit by themselves.",
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
    return parser


def _add_cluster_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("cluster (as kubectl; also KUBECONFIG)")
    group.add_argument(
        "--kubeconfig", metavar="PATH", help="the kubeconfig file (default: $KUBECONFIG, ~/.kube/config)"
    )
    group.add_argument("--context", metavar="NAME", help="the kubeconfig context (default: its current-context)")
    group.add_argument("-n", "--namespace", metavar="NS", help="the namespace (default: the context's)")


def _cluster_choice(args: argparse.Namespace) -> ClusterChoice:
    from ktrace.kube.options import ClusterChoice

    return ClusterChoice(args.kubeconfig, args.context, args.namespace)


def _kube_options(args: argparse.Namespace) -> KubeOptions | None:
    """The --agent kube options, checked: a bad one is a usage error (exit 2)."""
    if args.agent != "kube":
        if args.target:
            raise KtraceError("--target needs --agent kube", exit_code=2)
        return None
    from ktrace.kube import spec
    from ktrace.kube.options import KubeOptions
    from ktrace.kube.target import TargetError, parse_target

    try:
        agent = spec.AgentOptions(
            image=args.agent_image or os.environ.get("KTRACE_AGENT_IMAGE") or spec.DEFAULT_IMAGE,
            pull_policy=args.agent_pull_policy,
            pull_secrets=tuple(args.agent_pull_secret),
            node_selector=dict(spec.parse_key_value(t, "--agent-node-selector") for t in args.agent_node_selector),
            tolerations=tuple(spec.parse_toleration(t) for t in args.agent_toleration),
            labels=dict(spec.parse_key_value(t, "--agent-label") for t in args.agent_label),
            annotations=dict(
                spec.parse_key_value(t, "--agent-annotation", label_value=False) for t in args.agent_annotation
            ),
            idle_exit=args.agent_idle_exit,
        )
        target = parse_target(args.target) if args.target else None
    except (spec.SpecError, TargetError) as exc:
        raise KtraceError(str(exc), exit_code=2) from None
    if target is not None and agent.pod_only_options():
        print(
            f"ktrace: warning: {', '.join(agent.pod_only_options())} do not apply to an ephemeral container "
            "(--target): ignored",
            file=sys.stderr,
        )
    return KubeOptions(cluster=_cluster_choice(args), target=target, agent=agent, timeout=args.agent_timeout)


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
                    kube=_kube_options(args),
                )
            )
        if args.command_name == "cleanup":
            from ktrace.kube.cleanup import cleanup

            return cleanup(
                _cluster_choice(args), all_namespaces=args.all_namespaces, include_running=args.include_running
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
