"""Smoke tests of the Kubernetes test cluster itself: what ktrace's cluster tests rely on."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import secrets
import subprocess
import urllib.request
from collections.abc import Iterator

import grpc
import grpc.aio
import pytest
from e2e_helpers import wait_until
from kubecluster import TEST_NS, KubeCluster

from ktrace import __version__
from ktrace.tunnel.client import AgentClient, AgentInfo
from ktrace.tunnel.types import AgentUnavailable

pytestmark = [pytest.mark.kube, pytest.mark.timeout(900)]  # the first test also pays for `cluster up`

API = "10.250.0.1"

# Runs inside a pod: resolve the Service by its short name, fetch over HTTP, echo over UDP, and report
# the pod's routes (there must be no default route: nothing can leave the machine).
CLIENT = r"""
import json, socket, urllib.request
addr = socket.getaddrinfo("hello", 8080, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
body = urllib.request.urlopen("http://hello:8080/", timeout=10).read().decode()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(10)
u.sendto(b"ping", ("hello", 7))
echo = u.recv(100).decode()
routes = [line.split()[1] for line in open("/proc/net/route").read().splitlines()[1:]]
print(json.dumps({"addr": addr, "body": body, "echo": echo, "routes": routes}))
"""


def restricted_pod(name: str, argv: list[str]) -> dict[str, object]:
    """A pod that Pod Security "restricted" admits."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": TEST_NS},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": 65534,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [
                {
                    "name": "main",
                    "image": "ktrace.local/base:1",
                    "imagePullPolicy": "Never",
                    "command": argv,
                    "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
                }
            ],
        },
    }


@pytest.fixture
def pod_name(kube_cluster: KubeCluster) -> Iterator[str]:
    name = f"smoke-{secrets.token_hex(3)}"
    yield name
    kube_cluster.kubectl("-n", TEST_NS, "delete", "pod", name, "--ignore-not-found", "--wait=false")


def test_node_ready(kube_cluster: KubeCluster) -> None:
    node = json.loads(kube_cluster.kubectl("get", "node", "localhost", "-o", "json").stdout)
    ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
    assert ready and ready[0]["status"] == "True", node["status"]["conditions"]
    assert re.fullmatch(r"v1\.\d+\.\d+", node["status"]["nodeInfo"]["kubeletVersion"])


def test_pod_resolves_and_fetches_service(kube_cluster: KubeCluster, pod_name: str) -> None:
    pod = restricted_pod(pod_name, ["python3", "-c", CLIENT])
    # Created as the restricted user: its Role must be enough to run a pod.
    kube_cluster.kubectl("create", "-f", "-", user="ktrace", stdin=json.dumps(pod))
    phase = ""

    def finished() -> bool:
        nonlocal phase
        phase = kube_cluster.kubectl("-n", TEST_NS, "get", "pod", pod_name, "-o", "jsonpath={.status.phase}").stdout
        return phase in ("Succeeded", "Failed")

    wait_until(finished, 90, f"pod {pod_name} to finish")
    logs = kube_cluster.kubectl("-n", TEST_NS, "logs", pod_name).stdout
    assert phase == "Succeeded", logs
    report = json.loads(logs)
    service_ip = kube_cluster.kubectl(
        "-n",
        TEST_NS,
        "get",
        "service",
        "hello",
        "-o",
        "jsonpath={.spec.clusterIP}",
    ).stdout
    assert report["addr"] == service_ip
    assert report["body"].startswith("hello from hello-")
    assert report["echo"] == "ping"
    assert "00000000" not in report["routes"], "a pod must have no default route"


def hello_pod(kube_cluster: KubeCluster) -> str:
    pods = json.loads(
        kube_cluster.kubectl(
            "-n",
            TEST_NS,
            "get",
            "pods",
            "-l",
            "app=hello",
            "--field-selector=status.phase=Running",
            "-o",
            "json",
            user="ktrace",
        ).stdout
    )["items"]
    assert pods, "the hello Deployment has no running pod"
    return str(pods[0]["metadata"]["name"])


@contextlib.contextmanager
def port_forward(kube_cluster: KubeCluster, pod: str, *, netns: str | None = None, port: int = 8080) -> Iterator[int]:
    """``kubectl port-forward`` (restricted user) to the pod's ``port`` on 127.0.0.1; yields the local port."""
    argv = kube_cluster.kubectl_argv(
        "-n",
        TEST_NS,
        "port-forward",
        "--address",
        "127.0.0.1",
        f"pod/{pod}",
        f":{port}",
        user="ktrace",
    )
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = proc.stdout.readline()  # "Forwarding from 127.0.0.1:PORT -> 8080"; the pipe closes on exit
        match = re.search(r"127\.0\.0\.1:(\d+)", line)
        assert match, f"port-forward did not start: {line!r} {'' if proc.poll() is None else proc.stderr.read()}"
        yield int(match.group(1))
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_port_forward_from_root_namespace(kube_cluster: KubeCluster) -> None:
    with (
        port_forward(kube_cluster, hello_pod(kube_cluster)) as port,
        urllib.request.urlopen(
            f"http://127.0.0.1:{port}/bytes/1000000",
            timeout=30,
        ) as response,
    ):
        assert len(response.read()) == 1_000_000


def test_port_forward_from_the_laptop(kube_cluster: KubeCluster) -> None:
    """What ktrace does on a developer's machine: only the API server is reachable, port-forward works."""
    fetch = "import sys, urllib.request\nprint(urllib.request.urlopen(sys.argv[1], timeout=30).read().decode())\n"
    with port_forward(kube_cluster, hello_pod(kube_cluster), netns=kube_cluster.laptop_ns) as port:
        out = kube_cluster.in_laptop(["python3", "-c", fetch, f"http://127.0.0.1:{port}/"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("hello from hello-")


def test_ephemeral_container_as_restricted_user(kube_cluster: KubeCluster) -> None:
    """ktrace's other way in: an ephemeral container in the target pod, admitted under "restricted"."""
    pod = hello_pod(kube_cluster)
    name = f"dbg{secrets.token_hex(3)}"
    kube_cluster.kubectl(
        "-n",
        TEST_NS,
        "debug",
        f"pod/{pod}",
        "--profile=restricted",
        f"--container={name}",
        "--image=ktrace.local/base:1",
        "--image-pull-policy=Never",
        "--",
        "python3",
        "-c",
        "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:8080/').read())",
        user="ktrace",
    )
    # (Each run leaves its finished ephemeral container in the hello pod: they cannot be removed.)
    exit_code = '{.status.ephemeralContainerStatuses[?(@.name=="' + name + '")].state.terminated.exitCode}'
    kube_cluster.kubectl(
        "-n", TEST_NS, "wait", f"pod/{pod}", f"--for=jsonpath={exit_code}=0", "--timeout=60s", timeout=70
    )
    logs = kube_cluster.kubectl("-n", TEST_NS, "logs", pod, "-c", name).stdout
    assert "hello from" in logs


def test_laptop_reaches_only_the_api_server(kube_cluster: KubeCluster) -> None:
    service_ip = kube_cluster.kubectl(
        "-n",
        TEST_NS,
        "get",
        "service",
        "hello",
        "-o",
        "jsonpath={.spec.clusterIP}",
    ).stdout
    probe = (
        "import errno, socket, sys\n"
        "def connect(host, port):\n"
        "    try:\n"
        "        socket.create_connection((host, port), timeout=5).close()\n"
        "        return 'ok'\n"
        "    except OSError as e:\n"
        "        return errno.errorcode.get(e.errno, str(e))\n"
        "print(connect(sys.argv[1], 6443), connect(sys.argv[2], 8080))\n"
    )
    out = kube_cluster.in_laptop(["python3", "-c", probe, API, service_ip])
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ok", "ENETUNREACH"]
    # And the restricted kubeconfig works from there, as from a developer's laptop.
    listing = kube_cluster.in_laptop(kube_cluster.kubectl_argv("-n", TEST_NS, "get", "pods", user="ktrace"))
    assert listing.returncode == 0, listing.stderr


def test_cluster_networks_stay_on_this_machine(kube_cluster: KubeCluster) -> None:
    for address in ("10.96.0.1", "10.96.255.254", "10.244.0.2", "10.244.200.1"):
        route = subprocess.run(
            ["ip", "-o", "route", "get", address], capture_output=True, text=True, timeout=10, check=True
        ).stdout
        assert " dev ktcni0 " in route, route
    # The root netns forwards only bridge -> bridge (the CNI bridge plugin turns ip_forward on).
    forward = subprocess.run(
        ["iptables", "-t", "mangle", "-S", "FORWARD"], capture_output=True, text=True, timeout=10, check=True
    ).stdout.splitlines()
    assert forward[1] == "-A FORWARD -j KTRACE-FORWARD", forward
    chain = subprocess.run(
        ["iptables", "-t", "mangle", "-S", "KTRACE-FORWARD"], capture_output=True, text=True, timeout=10, check=True
    ).stdout.splitlines()
    assert chain[1] == "-A KTRACE-FORWARD -i ktcni0 -o ktcni0 -j RETURN", chain
    assert chain[-1].endswith("-j DROP"), chain


def test_agent_image_handshake(kube_cluster: KubeCluster, pod_name: str) -> None:
    """The image from the project's Dockerfile starts under "restricted" and answers the handshake, with the token
    (given to it only as a hash) and not without."""
    image = kube_cluster.build_agent_image()
    token = secrets.token_urlsafe(16)
    port = 47001
    pod = restricted_pod(pod_name, [])
    container = pod["spec"]["containers"][0]  # type: ignore[index]
    del container["command"]
    container.update(
        image=image,
        args=[
            "--listen",
            f"127.0.0.1:{port}",
            "--token-sha256",
            hashlib.sha256(token.encode()).hexdigest(),
            "--idle-exit",
            "60",
        ],
    )
    container["securityContext"]["readOnlyRootFilesystem"] = True
    kube_cluster.kubectl("create", "-f", "-", user="ktrace", stdin=json.dumps(pod))
    kube_cluster.kubectl(
        "-n",
        TEST_NS,
        "wait",
        f"pod/{pod_name}",
        "--for=condition=Ready",
        "--timeout=90s",
        timeout=100,
    )
    # kubectl port-forward gives up on its first refused connection: wait until the agent listens (its log says).
    wait_until(
        lambda: "listening on" in kube_cluster.kubectl("-n", TEST_NS, "logs", pod_name, check=False).stdout,
        30,
        "the agent to listen",
    )
    pod_ip = kube_cluster.kubectl("-n", TEST_NS, "get", "pod", pod_name, "-o", "jsonpath={.status.podIP}").stdout

    async def handshakes(address: str) -> tuple[AgentInfo, grpc.StatusCode]:
        client = await AgentClient.connect(address, token, timeout=30)
        try:
            info = client.info
        finally:
            await client.close()
        try:
            await AgentClient.connect(address, "not-the-token", timeout=30)
        except AgentUnavailable as exc:
            assert isinstance(exc.__cause__, grpc.aio.AioRpcError)
            return info, exc.__cause__.code()
        return info, grpc.StatusCode.OK

    with port_forward(kube_cluster, pod_name, port=port) as local:
        info, wrong = asyncio.run(handshakes(f"127.0.0.1:{local}"))
    assert info.version == __version__
    assert info.hostname == pod_name
    assert [str(ip) for ip in info.addresses] == [pod_ip]
    assert "nameserver 10.96.0.10" in info.resolv_conf
    assert wrong == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    ("verb", "resource", "namespace", "allowed"),
    [
        ("create", "pods", TEST_NS, True),
        ("delete", "pods", TEST_NS, True),
        ("list", "pods", TEST_NS, True),
        ("create", "pods/portforward", TEST_NS, True),
        ("get", "pods/portforward", TEST_NS, True),
        ("watch", "pods", TEST_NS, True),
        ("get", "pods/log", TEST_NS, False),
        ("update", "pods", TEST_NS, False),
        ("patch", "pods/ephemeralcontainers", TEST_NS, True),
        ("get", "deployments.apps", TEST_NS, True),
        ("create", "pods/exec", TEST_NS, False),
        # --target reads the ConfigMaps and Secrets the target's env names, and its Services: get and list only.
        ("get", "secrets", TEST_NS, True),
        ("list", "secrets", TEST_NS, False),
        ("get", "configmaps", TEST_NS, True),
        ("list", "configmaps", TEST_NS, False),
        ("list", "services", TEST_NS, True),
        ("get", "services", "default", False),  # only the kubernetes Service there (resourceNames)
        ("create", "pods", "default", False),
        ("list", "nodes", "", False),
    ],
)
def test_restricted_user_has_exactly_the_documented_rights(
    kube_cluster: KubeCluster,
    verb: str,
    resource: str,
    namespace: str,
    allowed: bool,
) -> None:
    scope = ["-n", namespace] if namespace else []
    kind, _, sub = resource.partition("/")  # `can-i VERB pods/x` would mean the pod named x
    subresource = [f"--subresource={sub}"] if sub else []
    answer = kube_cluster.kubectl("auth", "can-i", verb, kind, *subresource, *scope, user="ktrace", check=False)
    assert answer.stdout.strip() == ("yes" if allowed else "no"), answer.stderr


def test_an_image_pull_by_mistake_never_leaves_the_machine(kube_cluster: KubeCluster, pod_name: str) -> None:
    """No test pulls an image, but if one did (a wrong name, pull policy Always) containerd must not
    look up or reach a public registry from this machine: its registry hosts point at a closed local port."""
    pod = restricted_pod(pod_name, ["true"])
    container = pod["spec"]["containers"][0]  # type: ignore[index]
    container["image"] = "docker.io/ktrace/no-such-image:1"
    container["imagePullPolicy"] = "Always"
    kube_cluster.kubectl("create", "-f", "-", user="ktrace", stdin=json.dumps(pod))
    message = ""

    def pull_failed() -> bool:
        nonlocal message
        message = kube_cluster.kubectl(
            "-n",
            TEST_NS,
            "get",
            "pod",
            pod_name,
            "-o",
            "jsonpath={.status.containerStatuses[0].state.waiting.message}",
        ).stdout
        return "failed" in message

    wait_until(pull_failed, 90, f"the image pull of pod {pod_name} to fail")
    assert "127.0.0.1:9" in message and "connection refused" in message, message
