"""scripts/netns-cluster: the tests' namespace cluster from the shell.

    netns-cluster up       create the cluster and laptop namespaces, services and agent
    netns-cluster status   show what is up
    netns-cluster down     kill everything in both namespaces and delete them
    netns-cluster demo     up, a static Go client on the laptop side without and with
                           `ktrace run` (by address, then by the service's short name), down

State lives in $KTRACE_NETNS_STATE (default /run/ktrace-netns-cluster.json).
"""

from __future__ import annotations

import os
import pathlib
import shlex
import subprocess
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))

from fixture_programs import Programs
from nscluster import ClusterError, NamespaceCluster

STATE = os.environ.get("KTRACE_NETNS_STATE", "/run/ktrace-netns-cluster.json")


def _show(c: NamespaceCluster) -> None:
    print(
        f"cluster namespace: {c.cluster}  (services {c.hello_url} {c.hello_url_v6}, "
        f"echo {c.echo_v4}:{c.echo_port}, bulk :{c.bulk_port}, refused {c.refused_v4}, "
        f"blackhole {c.blackhole_v4})"
    )
    print(f"cluster DNS:       {c.dns_error or c.dns_v4 + ' (dnsmasq, authoritative for cluster.local)'}")
    print(f"laptop namespace:  {c.laptop}  (loopback only, no routes)")
    if c.agent_error:
        print(f"agent:             NOT RUNNING: {c.agent_error}")
    else:
        print(f"agent:             {c.agent_addr}  token file {c.token_file}")
    print("run a program on the laptop side through the cluster:")
    print("  " + shlex.join([*c.netns_argv(c.laptop), *c.ktrace_argv("CMD", "ARG...")]))


def up() -> int:
    if os.path.exists(STATE):
        print(f"already up (state in {STATE}); run `netns-cluster down` first", file=sys.stderr)
        return 1
    try:
        c = NamespaceCluster.up()
    except ClusterError as exc:
        print(f"netns-cluster: {exc}", file=sys.stderr)
        return 1
    c.save(STATE)
    _show(c)
    return 0


def down() -> int:
    if not os.path.exists(STATE):
        print("nothing is up")
        return 0
    NamespaceCluster.load(STATE).teardown()
    os.unlink(STATE)
    print("down")
    return 0


def status() -> int:
    if not os.path.exists(STATE):
        print("down")
        return 1
    c = NamespaceCluster.load(STATE)
    _show(c)
    for ns in (c.cluster, c.laptop):
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=False)
        state = f"processes {pids.stdout.split()}" if pids.returncode == 0 else "MISSING"
        print(f"{ns}: {state}")
    return 0


def _step(c: NamespaceCluster, title: str, argv: list[str]) -> int:
    print(f"\n== {title}\n$ ip netns exec {c.laptop} {shlex.join(argv)}", flush=True)
    r = c.run_laptop(argv, timeout=120)
    sys.stdout.write(r.stdout + r.stderr)
    print(f"(exit status {r.returncode})", flush=True)
    return r.returncode


def demo() -> int:
    print("building the static Go client (CGO_ENABLED=0)...", flush=True)
    goclient = Programs()["goclient"]
    print(subprocess.run(["file", goclient], capture_output=True, text=True, check=False).stdout.strip())
    try:
        c = NamespaceCluster.up()
    except ClusterError as exc:
        print(f"netns-cluster: {exc}", file=sys.stderr)
        return 1
    try:
        _show(c)
        by_ip = [goclient, "-n", "20", "-c", "20", c.hello_url]
        # A short name, as a pod in namespace "default" would write it: the cluster's DNS and search list.
        by_name = [goclient, "-n", "20", "-c", "20", f"http://hello:{c.hello_port}/"]
        results = [
            _step(c, "without ktrace: the laptop has no route to the cluster", by_ip) != 0,
            _step(c, "without ktrace: the laptop cannot resolve the cluster's names", by_name) != 0,
            _step(c, "through ktrace: connections leave from the cluster", c.ktrace_argv(*by_ip)) == 0,
            _step(c, "through ktrace: the cluster's DNS, by short name", c.ktrace_argv(*by_name)) == 0,
        ]
    finally:
        c.teardown()
    ok = all(results)
    print("\ndemo " + ("succeeded" if ok else "FAILED"))
    return 0 if ok else 1


def main() -> int:
    commands = {"up": up, "down": down, "status": status, "demo": demo}
    if len(sys.argv) != 2 or sys.argv[1] not in commands:
        print(__doc__, file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("netns-cluster: needs root (network namespaces)", file=sys.stderr)
        return 1
    return commands[sys.argv[1]]()


if __name__ == "__main__":
    sys.exit(main())
