"""``ktrace run --agent kube`` on the real test cluster (issue 5).

Everything runs as on a developer's laptop: ``ktrace`` and the programs in the laptop netns (only the API
server is reachable from there), as the restricted user (docs/rbac.yaml), with the agent image built from
this checkout's Dockerfile. After every test no agent pod may remain.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pathlib
import re
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import grpc
import grpc.aio
import pytest
from e2e_helpers import Deadline, read_line, wait_exited, wait_until, you_are
from fixture_programs import Programs
from ktrace_agent.wire import rpc
from kubecluster import AGENT_SELECTOR, TEST_NS, KubeCluster

from ktrace import __version__
from ktrace.kube.api import KubeApi
from ktrace.kube.doctor import check_kube
from ktrace.kube.errors import ApiCall, KubeApiError, explain
from ktrace.kube.options import ClusterChoice

pytestmark = [pytest.mark.kube, pytest.mark.timeout(300)]

HELLO = "http://hello:8080/"
DRIVER = pathlib.Path(__file__).with_name("conn_driver.py")
TARGET = "ktrace-target"


def ktrace_bin() -> str:
    override = os.environ.get("KTRACE_BIN")
    if override:
        return override
    beside = pathlib.Path(sys.executable).parent / "ktrace"
    return str(beside) if beside.exists() else "ktrace"


def ktrace(
    cluster: KubeCluster, *run_args: str, cmd: list[str], idle_exit: float = 30, env: dict[str, str] | None = None
) -> list[str]:
    return [
        *cluster.laptop_env(**(env or {})),
        ktrace_bin(),
        "run",
        "--agent-pull-policy",
        "Never",
        "--agent-idle-exit",
        f"{idle_exit:g}",
        *run_args,
        "--",
        *cmd,
    ]


def popen(argv: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@contextlib.contextmanager
def explained(proc: subprocess.Popen[str]) -> Iterator[None]:
    """A failure while talking to ktrace's program shows what ktrace said on stderr."""
    try:
        yield
    except (Deadline, AssertionError) as exc:
        if proc.poll() is None:
            proc.terminate()
        try:
            _out, err = proc.communicate(timeout=30)
        except (subprocess.TimeoutExpired, ValueError):
            proc.kill()
            err = "(no stderr)"
        raise AssertionError(f"{exc}\n--- ktrace exit {proc.returncode}, stderr:\n{err}") from exc


def send(proc: subprocess.Popen[str], line: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(line + "\n")
    proc.stdin.flush()


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str, str]:
    """An empty line and the end of the program's stdin (its cue to end, also for `read`); the rest of
    ktrace's output and its status."""
    out, err = proc.communicate("\n", timeout=timeout)
    return proc.returncode, out, err


def agent_pods(cluster: KubeCluster) -> list[dict[str, Any]]:
    listing = cluster.kubectl("get", "pods", "-A", "-l", AGENT_SELECTOR, "-o", "json", timeout=30)
    items: list[dict[str, Any]] = json.loads(listing.stdout)["items"]
    return items


def the_agent_pod(cluster: KubeCluster) -> dict[str, Any]:
    pods = agent_pods(cluster)
    assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
    return pods[0]


def agent_listen_port(pod_spec: dict[str, Any], container: str) -> int:
    args = next(c for c in pod_spec["containers"] + pod_spec.get("ephemeralContainers", []) if c["name"] == container)[
        "args"
    ]
    return int(args[args.index("--listen") + 1].rpartition(":")[2])


@pytest.fixture(scope="module")
def cluster(kube_cluster: KubeCluster) -> KubeCluster:
    kube_cluster.build_agent_image()
    return kube_cluster


@pytest.fixture(autouse=True)
def no_agent_pod_left(cluster: KubeCluster) -> Iterator[None]:
    yield
    left: list[str] = []

    def none_left() -> bool:
        left[:] = [p["metadata"]["name"] for p in agent_pods(cluster)]
        return not left

    try:
        wait_until(none_left, 30, "the agent pods to be deleted")
    except Deadline:
        cluster.kubectl("delete", "pods", "-A", "-l", AGENT_SELECTOR, "--wait=false", check=False)
        pytest.fail(f"agent pods left behind: {left}")


@pytest.fixture(scope="module")
def target(cluster: KubeCluster) -> Iterator[dict[str, Any]]:
    """A Deployment of its own for --target (two containers, a DNS search domain of its own); yields its pod."""
    restricted = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    sleeper = ["python3", "-c", "import signal; signal.pause()"]
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": TARGET, "namespace": TEST_NS},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": TARGET}},
            "template": {
                "metadata": {"labels": {"app": TARGET}},
                "spec": {
                    "automountServiceAccountToken": False,
                    "terminationGracePeriodSeconds": 1,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": 65534,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "dnsConfig": {"searches": ["target.ktrace.test"]},
                    "containers": [
                        {
                            "name": name,
                            "image": "ktrace.local/base:1",
                            "imagePullPolicy": "Never",
                            "command": sleeper,
                            "securityContext": restricted,
                        }
                        for name in ("main", "side")
                    ],
                },
            },
        },
    }
    cluster.kubectl("apply", "-f", "-", stdin=json.dumps(deployment))
    try:
        cluster.kubectl("-n", TEST_NS, "rollout", "status", f"deploy/{TARGET}", "--timeout=120s", timeout=130)
        pods = json.loads(cluster.kubectl("-n", TEST_NS, "get", "pods", "-l", f"app={TARGET}", "-o", "json").stdout)[
            "items"
        ]
        running = [
            p for p in pods if p["status"].get("phase") == "Running" and "deletionTimestamp" not in p["metadata"]
        ]
        assert len(running) == 1, [p["metadata"]["name"] for p in pods]
        yield running[0]
    finally:
        cluster.kubectl("-n", TEST_NS, "delete", "deploy", TARGET, "--wait=false", check=False)


def test_static_go_and_curl_reach_the_service_by_short_name(cluster: KubeCluster, programs: Programs) -> None:
    script = f"{programs['goclient']} {HELLO} && curl -sS {HELLO} && read _"
    proc = popen(ktrace(cluster, cmd=["sh", "-c", script]))
    with explained(proc):
        go = read_line(proc, 90)
        curl = read_line(proc, 30)
        pod = the_agent_pod(cluster)  # while the program runs
        code, _out, err = finish(proc)
    assert code == 0, err
    assert err == ""
    assert go.startswith("ok 1/1 hello from hello-"), go
    assert curl.startswith("hello from hello-"), curl
    # The server sees the agent pod's address as the source, for both programs.
    assert you_are(go).rpartition(":")[0] == pod["status"]["podIP"]
    assert you_are(curl).rpartition(":")[0] == pod["status"]["podIP"]
    assert pod["metadata"]["labels"]["app.kubernetes.io/version"] == __version__


@pytest.mark.parametrize("form", ["pod/{pod}", "pod/{pod}/container/side", "deploy/" + TARGET])
def test_target_pod_identity_and_dns(cluster: KubeCluster, target: dict[str, Any], form: str) -> None:
    spelled = form.format(pod=target["metadata"]["name"])
    before = {c["name"] for c in ephemeral_agents(cluster, target)}
    argv = ktrace(
        cluster, "--target", spelled, cmd=["sh", "-c", f"curl -sS {HELLO} && cat /etc/resolv.conf"], idle_exit=5
    )
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert you_are(lines[0]).rpartition(":")[0] == target["status"]["podIP"], lines[0]
    # The program reads the target pod's resolver configuration, with its own search domain.
    assert any(line.startswith("search ") and "target.ktrace.test" in line for line in lines[1:]), lines
    (agent,) = [c for c in ephemeral_agents(cluster, target) if c["name"] not in before]
    assert agent.get("targetContainerName") == ("side" if "container/side" in spelled else None)


def ephemeral_agents(cluster: KubeCluster, target: dict[str, Any]) -> list[dict[str, Any]]:
    pod = json.loads(cluster.kubectl("-n", TEST_NS, "get", "pod", target["metadata"]["name"], "-o", "json").stdout)
    return [c for c in pod["spec"].get("ephemeralContainers", []) if c["name"].startswith("ktrace-agent-")]


@pytest.mark.parametrize("component", ["kube-apiserver", "kubelet"])
def test_port_forward_cut_mid_run(cluster: KubeCluster, component: str) -> None:
    proc = popen(ktrace(cluster, cmd=["python3", str(DRIVER)], idle_exit=60))
    with explained(proc):
        send(proc, f"get {HELLO}")
        assert read_line(proc, 90).startswith("got hello from hello-")
        send(proc, "hold hello 8080")
        assert read_line(proc, 30) == "held"
        cluster.restart(component)
        # The connection open through the cut tunnel is reset ...
        assert read_line(proc, 60) == "reset"
        # ... and new connections work again once the path is back.
        attempts = []
        for _ in range(120):
            send(proc, f"get {HELLO}")
            attempts.append(read_line(proc, 30))
            if attempts[-1].startswith("got hello from hello-"):
                break
        assert attempts[-1].startswith("got hello from hello-"), attempts
        code, _out, err = finish(proc)
    assert code == 0, err
    assert "ktrace: lost the tunnel to the agent" in err, err
    assert re.search(r"ktrace: tunnel to the agent restored after \d+\.\d s", err), err


def test_agent_pod_deleted_mid_run(cluster: KubeCluster) -> None:
    proc = popen(ktrace(cluster, cmd=["python3", str(DRIVER)]))
    with explained(proc):
        send(proc, "hold hello 8080")
        assert read_line(proc, 90) == "held"
        name = the_agent_pod(cluster)["metadata"]["name"]
        cluster.kubectl("-n", TEST_NS, "delete", "pod", name, "--wait=false")
        seen = [read_line(proc, 30)]
        while "reset" not in seen:
            seen.append(read_line(proc, 30))
        code, _out, err = finish(proc)
    assert code == 125, err
    # One line, saying what happened: the session cannot go on without its agent.
    assert len(err.splitlines()) == 1, err
    assert re.fullmatch(rf"ktrace: the agent.* ({TEST_NS}/)?{name}.* (was|is being) deleted.*\(hint: .*\)\n", err), err


def test_kill_9_leaves_nothing_running(cluster: KubeCluster) -> None:
    proc = popen(ktrace(cluster, cmd=["sh", "-c", "echo $$; read _"], idle_exit=3))
    program_pid = int(read_line(proc, 90))
    pod = the_agent_pod(cluster)
    name = pod["metadata"]["name"]
    proc.kill()
    proc.wait(timeout=30)
    wait_exited(program_pid, 10)  # the traced program does not outlive ktrace

    def agent_exited() -> bool:
        state = cluster.kubectl("-n", TEST_NS, "get", "pod", name, "-o", "jsonpath={.status.phase}").stdout
        return state in ("Succeeded", "Failed")

    # Nothing keeps running in the cluster beyond the agent's idle time (3 s; the kubelet reports within ~1-2 s).
    wait_until(agent_exited, 30, f"the agent in {name} to exit after its idle time")
    cleanup = subprocess.run(
        [*cluster.laptop_env(), ktrace_bin(), "cleanup"], capture_output=True, text=True, timeout=60, check=False
    )
    assert cleanup.returncode == 0, cleanup.stderr
    assert f"deleted pod {TEST_NS}/{name} (Succeeded)" in cleanup.stdout, cleanup.stdout


def test_cleanup_keeps_running_agents_unless_asked(cluster: KubeCluster) -> None:
    proc = popen(ktrace(cluster, cmd=["sh", "-c", "echo up; read _"]))
    with explained(proc):
        assert read_line(proc, 90) == "up"
        name = the_agent_pod(cluster)["metadata"]["name"]
        kept = subprocess.run(
            [*cluster.laptop_env(), ktrace_bin(), "cleanup"], capture_output=True, text=True, timeout=60, check=False
        )
        assert kept.returncode == 0, kept.stderr
        assert "kept 1 agent pod(s) whose agent still runs" in kept.stdout, kept.stdout
        forced = subprocess.run(
            [*cluster.laptop_env(), ktrace_bin(), "cleanup", "--include-running"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert f"deleted pod {TEST_NS}/{name} (Running)" in forced.stdout, forced.stdout
        code, _out, err = finish(proc)
    assert code == 125 and "deleted" in err, err


def test_wrong_token_over_a_manual_port_forward(cluster: KubeCluster) -> None:
    proc = popen(ktrace(cluster, cmd=["sh", "-c", "echo up; read _"]))
    with explained(proc):
        assert read_line(proc, 90) == "up"
        pod = the_agent_pod(cluster)
        port = agent_listen_port(pod["spec"], "ktrace-agent")
        args = pod["spec"]["containers"][0]["args"]
        token_hash = args[args.index("--token-sha256") + 1]
        forward = subprocess.Popen(
            cluster.kubectl_argv(
                "-n",
                TEST_NS,
                "port-forward",
                "--address",
                "127.0.0.1",
                f"pod/{pod['metadata']['name']}",
                f":{port}",
                user="ktrace",
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            line = read_line(forward, 30)  # "Forwarding from 127.0.0.1:PORT -> PORT"
            match = re.search(r"127\.0\.0\.1:(\d+)", line)
            assert match, line
            codes = asyncio.run(handshake_codes(f"127.0.0.1:{match.group(1)}", [None, "wrong", token_hash]))
        finally:
            forward.terminate()
            forward.wait(timeout=10)
        code, _out, err = finish(proc)
    assert code == 0, err
    # Reachable through a port-forward (which needs RBAC), but useless without the session's token.
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 3


async def handshake_codes(address: str, tokens: list[str | None]) -> list[grpc.StatusCode]:
    codes = []
    async with grpc.aio.insecure_channel(rpc.grpc_target(address)) as channel:
        stub = rpc.Stub(channel)
        for token in tokens:
            try:
                await stub.handshake(
                    rpc.HandshakeRequest(), metadata=rpc.bearer_metadata(token), timeout=20, wait_for_ready=True
                )
                codes.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as exc:
                codes.append(exc.code())
    return codes


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (
            ["-n", "default"],
            {},
            r"ktrace: forbidden: cannot create pods in namespace default as user ktrace \(context [^)]+\) "
            r"\(hint: .*docs/rbac\.yaml.*\)",
        ),
        (
            ["--agent-image", "ktrace.local/no-such-image:1"],
            {},
            r"ktrace: cannot pull the agent image ktrace\.local/no-such-image:1 for pod ktrace-test/ktrace-agent-\w+: "
            r"ErrImageNeverPull.* \(hint: check --agent-image.*\)",
        ),
        (
            ["--agent-node-selector", "ktrace.test/none=1", "--agent-timeout", "3"],
            {},
            r"ktrace: agent pod ktrace-test/ktrace-agent-\w+ did not start within 3 s \(unschedulable: 0/1 nodes are "
            r"available.*\) \(hint: no node takes the agent pod.*\)",
        ),
        (
            ["--agent-image", "ktrace.local/base:1"],
            {},
            r"ktrace: (the agent in|cannot start the agent in) pod ktrace-test/ktrace-agent-\w+.*--listen.*"
            r"\(hint: .*(not an agent image|must be ktrace's agent image).*\)",
        ),
        (
            ["--target", "pod/no-such-pod"],
            {},
            r"ktrace: pod no-such-pod not found in namespace ktrace-test \(hint: check --target.*\)",
        ),
        (
            [],
            {"KUBECONFIG": "/nonexistent/kubeconfig"},
            r"ktrace: no kubeconfig found \(looked at /nonexistent/kubeconfig\) \(hint: .*\)",
        ),
        (
            ["--context", "no-such-context"],
            {},
            r"ktrace: kubeconfig .*: .*no-such-context.* \(hint: check --context.*\)",
        ),
    ],
    ids=["forbidden", "image-pull", "unschedulable", "not-an-agent", "no-target", "no-kubeconfig", "no-context"],
)
def test_failures_are_one_line_with_a_hint(
    cluster: KubeCluster, args: list[str], env: dict[str, str], expected: str
) -> None:
    proc = subprocess.run(
        ktrace(cluster, *args, cmd=["true"], env=env), capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 125, proc.stderr
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert re.fullmatch(expected, proc.stderr.strip()), proc.stderr


def test_pod_security_rejection_is_explained(cluster: KubeCluster) -> None:
    async def attempt() -> str:
        api = await KubeApi.load(str(cluster.ktrace_kubeconfig), None, None)
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"privileged-{secrets.token_hex(3)}"},
            "spec": {
                "containers": [{"name": "c", "image": "ktrace.local/base:1", "securityContext": {"privileged": True}}]
            },
        }
        try:
            await api.request(
                ApiCall("create", "pods", api.namespace), "POST", f"/api/v1/namespaces/{api.namespace}/pods", body=pod
            )
        except KubeApiError as exc:
            return explain(exc, context=api.context).render()
        finally:
            await api.close()
        return "created"

    line = asyncio.run(attempt())
    assert line.startswith("ktrace: Pod Security admission rejected the agent (context ktrace@ktrace): pods "), line
    assert 'violates PodSecurity "restricted:' in line and "privileged" in line


def test_interrupt_while_starting_deletes_the_pod(cluster: KubeCluster) -> None:
    proc = popen(ktrace(cluster, "--agent-node-selector", "ktrace.test/none=1", "--agent-timeout", "120", cmd=["true"]))
    with explained(proc):
        wait_until(lambda: len(agent_pods(cluster)) == 1, 60, "the agent pod to be created")
        proc.send_signal(signal.SIGINT)
        code, _out, err = finish(proc)
    assert code == 130, err
    assert err == "ktrace: interrupted (SIGINT) while starting the agent\n"


def test_sigterm_reaches_the_program_and_the_pod_goes(cluster: KubeCluster) -> None:
    proc = popen(ktrace(cluster, cmd=["sh", "-c", "echo up; exec sleep 600"]))
    with explained(proc):
        assert read_line(proc, 90) == "up"
        assert len(agent_pods(cluster)) == 1
        proc.send_signal(signal.SIGTERM)
        code, _out, err = finish(proc)
    assert code == 128 + signal.SIGTERM, err


def test_doctor_checks(cluster: KubeCluster) -> None:
    checks = check_kube(ClusterChoice(kubeconfig=str(cluster.ktrace_kubeconfig)))
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]
    names = [c.name for c in checks]
    assert names[:2] == ["kube context", "kube API server"]
    assert "kube right: get pods/portforward" in names
    # On 1.34 the `create` right on pods/portforward is only needed from 1.35 on.
    assert "kube right: create pods/portforward (for Kubernetes >= 1.35)" in names
    elsewhere = check_kube(ClusterChoice(kubeconfig=str(cluster.ktrace_kubeconfig), namespace="default"))
    missing = [c for c in elsewhere if not c.ok]
    assert missing and all(c.name.startswith("kube right: ") for c in missing)
    create = next(c for c in missing if c.name == "kube right: create pods")
    assert create.required and "not allowed in namespace default" in create.message
    assert create.fix is not None and "docs/rbac.yaml" in create.fix
