"""End-to-end: debuggers under ktrace (issue 16; every command of docs/debugging.md is run here).

The notify backend leaves the program's ptrace slot free, so gdb, strace and dlv run under
`ktrace run --backend notify` and trace the program, and `gdb -p` attaches to a program ktrace
started, while the program keeps the cluster's reach: goclient fetches ``http://hello:8080/``,
a service's short name that only the cluster's DNS resolves, from the laptop namespace where
nothing routes. Under the ptrace backend a debugger cannot trace at all; ktrace says so.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import threading
from typing import Any

import pytest
from e2e_helpers import TERMINAL_JOB, blocked_in, descendants, read_line, wait_until, you_are
from fixture_programs import Programs
from nscluster import NamespaceCluster

from ktrace.tracer import backends, syscalls

pytestmark = [
    pytest.mark.netns,
    pytest.mark.timeout(60),
    pytest.mark.skipif(backends.notify_missing() is not None, reason=f"no notify backend: {backends.notify_missing()}"),
]

HELLO = "hello from cluster, you are "
URL = "http://hello:8080/"  # the short name: only the cluster's DNS (search default.svc...) knows it
DLV_PORT = 2345  # dlv's customary port; the laptop namespace is this test session's own
SYS_READ = 0  # x86_64, as all of ktrace (tracer/arch.py); syscalls.py names only the calls it stops
GDB_TO_MAIN = ("gdb", "-batch", "-ex", "break main.main", "-ex", "run", "-ex", "continue", "--args")


@pytest.fixture
def cluster(ns_cluster: NamespaceCluster) -> NamespaceCluster:
    if ns_cluster.agent_error:
        pytest.fail(f"the agent is not running in the namespace cluster: {ns_cluster.agent_error}")
    return ns_cluster


def ktrace_run(c: NamespaceCluster, backend: str | None, *cmd: str, connect_timeout: float | None = None) -> list[str]:
    """``ktrace run [--backend B] ... -- CMD`` against the cluster's agent (None: no --backend)."""
    argv = c.ktrace_argv(*cmd, connect_timeout=connect_timeout)
    at = argv.index("run") + 1
    return [*argv[:at], *(["--backend", backend] if backend else []), *argv[at:]]


def without_backend_setting() -> dict[str, str]:
    """This environment without KTRACE_BACKEND: what `ktrace run` picks by itself (auto)."""
    return {k: v for k, v in os.environ.items() if k != "KTRACE_BACKEND"}


def ktrace_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("ktrace: warning:")]


# --- gdb and strace run under ktrace -------------------------------------------------------


def test_gdb_stops_at_a_breakpoint_and_the_request_succeeds(cluster: NamespaceCluster, programs: Programs) -> None:
    """docs/debugging.md "gdb": `ktrace run --backend notify -- gdb ... --args PROG URL`."""
    c = cluster
    r = c.run_laptop(ktrace_run(c, "notify", *GDB_TO_MAIN, programs["goclient"], URL), timeout=50)
    assert r.returncode == 0, r
    assert re.search(r"hit Breakpoint 1, main\.main \(\)", r.stdout), r.stdout
    assert f"ok 1/1 {HELLO}" in r.stdout, r
    assert re.search(r"\[Inferior 1 \(process \d+\) exited normally\]", r.stdout), r.stdout
    assert not ktrace_lines(r.stderr), r.stderr


def test_strace_shows_the_programs_connect(
    cluster: NamespaceCluster, programs: Programs, tmp_path: pathlib.Path
) -> None:
    """docs/debugging.md "strace": `ktrace run --backend notify -- strace -f -o FILE PROG URL`."""
    c = cluster
    trace = tmp_path / "goclient.strace"
    r = c.run_laptop(ktrace_run(c, "notify", "strace", "-f", "-o", str(trace), programs["goclient"], URL), timeout=50)
    assert r.returncode == 0, r
    assert r.stdout.startswith(f"ok 1/1 {HELLO}"), r
    text = trace.read_text()
    # strace shows the calls as the program made them: it read /etc/resolv.conf (ktrace showed
    # it the cluster's), asked the cluster's DNS, and connected to the service's cluster address.
    assert re.search(r'openat\(AT_FDCWD, "/etc/resolv\.conf"', text), text[-3000:]
    for address, port in ((c.dns_v4, 53), (c.hello_v4, c.hello_port)):
        sockaddr = f'{{sa_family=AF_INET, sin_port=htons({port}), sin_addr=inet_addr("{address}")}}'
        assert re.search(rf"connect\(\d+, {re.escape(sockaddr)}", text), (sockaddr, text[-3000:])


# --- dlv, headless, driven over its JSON-RPC API as an IDE would ----------------------------


class DlvError(Exception):
    pass


class Dlv:
    """A client of dlv's JSON-RPC API (--api-version 2): one JSON object per line each way, the
    call's arguments as the single element of ``params``. GoLand's "Go Remote" speaks this API."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._file = sock.makefile("rwb")
        self._id = 0

    def call(self, method: str, **params: Any) -> Any:
        self._id += 1
        request = {"jsonrpc": "2.0", "id": self._id, "method": f"RPCServer.{method}", "params": [params]}
        self._file.write(json.dumps(request).encode() + b"\n")
        self._file.flush()
        line = self._file.readline()
        if not line:
            raise DlvError(f"{method}: dlv closed the connection")
        reply = json.loads(line)
        assert reply["id"] == self._id, reply
        if reply.get("error"):
            raise DlvError(f"{method}: {reply['error']}")
        return reply["result"]

    def close(self) -> None:
        self._file.close()
        self._sock.close()


def connect_in_namespace(ns: str, port: int, timeout: float) -> socket.socket:
    """A TCP connection to 127.0.0.1:``port`` of network namespace ``ns``: made by a thread that
    joins the namespace (setns applies to the calling thread only) and ends right after."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    made: list[socket.socket | BaseException] = []

    def work() -> None:
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)
            made.append(socket.create_connection(("127.0.0.1", port), timeout=timeout))
        except BaseException as exc:
            made.append(exc)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    if isinstance(made[0], BaseException):
        raise made[0]
    return made[0]


# How much of a variable dlv loads (an IDE sends its own): whole strings, one level deep.
LOAD = {
    "FollowPointers": True,
    "MaxVariableRecurse": 1,
    "MaxStringLen": 1024,
    "MaxArrayValues": 64,
    "MaxStructFields": -1,
}


def dlv_headless(c: NamespaceCluster, programs: Programs) -> list[str]:
    """docs/debugging.md "dlv": the one dlv command both the JSON-RPC and the DAP test run."""
    dlv = [programs["dlv"], "exec", "--headless", "--listen", f"127.0.0.1:{DLV_PORT}", "--api-version", "2"]
    return ktrace_run(c, "notify", *dlv, "--accept-multiclient", programs["goclient"], "--", URL)


def stop_unless_ended(proc: subprocess.Popen[str]) -> None:
    """Kill ktrace if a test left it running (its guardian then kills the program's tree)."""
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def test_dlv_headless_breakpoint_after_the_request(cluster: NamespaceCluster, programs: Programs) -> None:
    """`ktrace run --backend notify -- dlv exec --headless ... PROG -- URL`, driven over dlv's
    JSON-RPC API as GoLand's "Go Remote" does: a breakpoint, continue, the response in the
    variables, continue to the end."""
    c = cluster
    argv = dlv_headless(c, programs)
    proc = c.popen_laptop(argv)
    try:
        assert read_line(proc, 30) == f"API server listening at: 127.0.0.1:{DLV_PORT}"
        dlv = Dlv(connect_in_namespace(c.laptop, DLV_PORT, timeout=30))
        try:
            bp = dlv.call("CreateBreakpoint", Breakpoint={"functionName": "main.gotResponse"})["Breakpoint"]
            state = dlv.call("Command", name="continue")["State"]
            assert not state.get("exited"), state
            thread = state["currentThread"]
            assert thread["breakPoint"]["id"] == bp["id"], thread
            assert thread["function"]["name"] == "main.gotResponse", thread
            scope = {"GoroutineID": -1, "Frame": 0}
            body = dlv.call("Eval", Scope=scope, Expr="body", Cfg=LOAD)["Variable"]
            assert body["value"].startswith(HELLO), body
            args = {v["name"]: v["value"] for v in dlv.call("ListFunctionArgs", Scope=scope, Cfg=LOAD)["Args"]}
            assert (args["url"], args["status"]) == (URL, "200"), args
            local = {v["name"]: v["value"] for v in dlv.call("ListLocalVars", Scope=scope, Cfg=LOAD)["Variables"]}
            assert local["reply"] == body["value"], local
            frames = dlv.call("Stacktrace", Id=thread["goroutineID"], Depth=10)["Locations"]
            assert [f["function"]["name"] for f in frames][:2] == ["main.gotResponse", "main.get"], frames
            state = dlv.call("Command", name="continue")["State"]
            assert state.get("exited") and state.get("exitStatus") == 0, state
            dlv.call("Detach", Kill=True)  # the program is gone already: this ends dlv
        finally:
            dlv.close()
        out, err = proc.communicate(timeout=30)
    finally:
        stop_unless_ended(proc)
    assert proc.returncode == 0, (out, err)
    assert f"ok 1/1 {body['value'].strip()}" in out, out


class Dap:
    """A client of the Debug Adapter Protocol, which dlv's headless server also speaks (Delve
    1.7.3+) and VS Code's Go extension uses ("debugAdapter": "dlv-dap"): messages framed by a
    Content-Length header; responses carry the request's seq, events come in between."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._file = sock.makefile("rwb")
        self._seq = 0
        self.events: list[dict[str, Any]] = []

    def _read(self) -> dict[str, Any]:
        length = None
        while True:
            line = self._file.readline()
            if not line:
                raise DlvError("dlv closed the DAP connection")
            if line == b"\r\n":
                break
            name, _, value = line.decode().partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        assert length is not None, "a DAP message without Content-Length"
        message: dict[str, Any] = json.loads(self._file.read(length))
        return message

    def request(self, command: str, **arguments: Any) -> Any:
        self._seq += 1
        body = json.dumps({"seq": self._seq, "type": "request", "command": command, "arguments": arguments})
        self._file.write(f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
        self._file.flush()
        while True:
            message = self._read()
            if message["type"] == "event":
                self.events.append(message)
            elif message["type"] == "response" and message["request_seq"] == self._seq:
                if not message["success"]:
                    raise DlvError(f"{command}: {message.get('message')} {message.get('body')}")
                return message.get("body", {})

    def event(self, name: str) -> dict[str, Any]:
        """The next event ``name`` (one that came in with a response counts)."""
        while True:
            for i, event in enumerate(self.events):
                if event["event"] == name:
                    return self.events.pop(i)
            message = self._read()
            if message["type"] == "event":
                self.events.append(message)

    def close(self) -> None:
        self._file.close()
        self._sock.close()


GOCLIENT_SOURCE = pathlib.Path(__file__).resolve().parent / "programs" / "goclient"


def test_dlv_headless_serves_vs_code_over_dap(cluster: NamespaceCluster, programs: Programs) -> None:
    """The same dlv command, attached to as VS Code does with docs/debugging.md's launch.json
    (dlv-dap, attach, mode remote; substitutePath because the fixture is built with -trimpath):
    a line breakpoint in the source file after the request, its variables, the end."""
    c = cluster
    main_go = GOCLIENT_SOURCE / "main.go"
    lines = main_go.read_text().splitlines()
    line = (
        lines.index("\treturn reply", lines.index("func gotResponse(url string, status int, body string) string {")) + 1
    )
    proc = c.popen_laptop(dlv_headless(c, programs))
    try:
        assert read_line(proc, 30) == f"API server listening at: 127.0.0.1:{DLV_PORT}"
        dap = Dap(connect_in_namespace(c.laptop, DLV_PORT, timeout=30))
        try:
            dap.request("initialize", clientID="vscode", adapterID="go", linesStartAt1=True, pathFormat="path")
            dap.request(
                "attach",
                request="attach",
                mode="remote",
                substitutePath=[{"from": str(GOCLIENT_SOURCE), "to": "ktrace.test/goclient"}],
            )
            dap.event("initialized")
            (bp,) = dap.request("setBreakpoints", source={"path": str(main_go)}, breakpoints=[{"line": line}])[
                "breakpoints"
            ]
            assert bp["verified"], bp
            dap.request("configurationDone")  # a remote session runs on from here
            stopped = dap.event("stopped")["body"]
            assert stopped["reason"] == "breakpoint" and stopped["hitBreakpointIds"] == [bp["id"]], stopped
            frames = dap.request("stackTrace", threadId=stopped["threadId"], levels=5)["stackFrames"]
            assert [f["name"] for f in frames][:2] == ["main.gotResponse", "main.get"], frames
            assert (frames[0]["source"]["path"], frames[0]["line"]) == (str(main_go), line), frames[0]
            (scope, *_) = dap.request("scopes", frameId=frames[0]["id"])["scopes"]
            shown = {
                v["name"]: v["value"]
                for v in dap.request("variables", variablesReference=scope["variablesReference"])["variables"]
            }
            assert (shown["url"], shown["status"]) == (json.dumps(URL), "200"), shown
            body = json.loads(
                dap.request("evaluate", expression="body", frameId=frames[0]["id"], context="hover")["result"]
            )
            assert body.startswith(HELLO), body
            dap.request("continue", threadId=stopped["threadId"])
            assert dap.event("exited")["body"]["exitCode"] == 0
            dap.event("terminated")
            dap.request("disconnect", terminateDebuggee=True)  # ends dlv, as VS Code's stop button
        finally:
            dap.close()
        out, err = proc.communicate(timeout=30)
    finally:
        stop_unless_ended(proc)
    assert proc.returncode == 0, (out, err)
    assert f"ok 1/1 {body.strip()}" in out, out


def test_ctrl_c_in_dlvs_terminal_reaches_the_program_not_dlv(cluster: NamespaceCluster, programs: Programs) -> None:
    """docs/debugging.md: in a terminal, dlv makes the program the foreground process group, so
    Ctrl-C interrupts the program (dlv then delivers SIGINT to it at the next continue) while
    dlv and ktrace stay: the session ends from the client."""
    c = cluster
    master, slave = os.openpty()
    # setsid -c: a session of its own whose controlling terminal is stdin (the pty), as a shell's.
    proc = subprocess.Popen(
        ["setsid", "-c", *TERMINAL_JOB, *c.netns_argv(c.laptop), *dlv_headless(c, programs)],
        env=c.laptop_env(),
        stdin=slave,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    os.close(slave)
    try:
        assert read_line(proc, 30) == f"API server listening at: 127.0.0.1:{DLV_PORT}"
        # dlv says it listens before it has started the program and handed it the terminal.
        wait_until(lambda: os.tcgetpgrp(master) != proc.pid, 20, "dlv giving the program the terminal")
        os.write(master, b"\x03")  # Ctrl-C: the kernel signals the terminal's foreground group
        dlv = Dlv(connect_in_namespace(c.laptop, DLV_PORT, timeout=30))
        try:
            state = dlv.call("Command", name="continue")["State"]
            assert state.get("exited") and state.get("exitStatus") == -signal.SIGINT, state
            dlv.call("Detach", Kill=True)
        finally:
            dlv.close()
        out, err = proc.communicate(timeout=30)
    finally:
        stop_unless_ended(proc)
        os.close(master)
    assert proc.returncode == 0, (out, err)
    assert "ok 1/1" not in out, out


# --- gdb -p: attaching to a program ktrace started ------------------------------------------


def threads_blocked_in(pid: int) -> set[int]:
    """The syscalls the threads of process ``pid`` sleep in."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return set()
    return {nr for nr in (blocked_in(int(tid)) for tid in tids) if nr is not None}


def test_gdb_attaches_and_detaches_and_the_program_keeps_its_reach(
    cluster: NamespaceCluster, programs: Programs
) -> None:
    """docs/debugging.md "gdb -p": attach, backtrace, detach; the program's next request (a new
    lookup and connection) still goes through the cluster."""
    c = cluster
    proc = c.popen_laptop(ktrace_run(c, "notify", programs["goclient"], "-pause", URL), stdin=subprocess.PIPE)
    try:
        first = read_line(proc, 30)
        assert first.startswith(f"first ok {HELLO}"), first
        waiting, pid = read_line(proc, 30).split()
        assert waiting == "waiting", waiting
        wait_until(lambda: SYS_READ in threads_blocked_in(int(pid)), 20, "the program waiting in read(2)")
        g = c.run_laptop(["gdb", "-p", pid, "-batch", "-ex", "thread apply all bt", "-ex", "detach"], timeout=30)
        assert g.returncode == 0, g
        # The thread that waits for stdin, with the program's own frames above the read.
        assert re.search(r"main\.waitForLine .*\n.* main\.pauseBetween ", g.stdout), g.stdout
        assert f"[Inferior 1 (process {pid}) detached]" in g.stdout, g.stdout
        assert proc.stdin is not None
        proc.stdin.write("\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=30)
    finally:
        stop_unless_ended(proc)
    assert proc.returncode == 0, (out, err)
    second = out.strip()
    assert second.startswith(f"second ok {HELLO}"), (out, err)
    assert you_are(second) != you_are(first), "the second request reused the first connection"


def test_gdb_p_cannot_attach_under_the_ptrace_backend(cluster: NamespaceCluster, programs: Programs) -> None:
    """docs/debugging.md "gdb -p": under --backend ptrace ktrace holds the program's ptrace slot."""
    c = cluster
    proc = c.popen_laptop(ktrace_run(c, "ptrace", programs["goclient"], "-pause", URL), stdin=subprocess.PIPE)
    try:
        assert read_line(proc, 30).startswith(f"first ok {HELLO}")
        pid = read_line(proc, 30).split()[1]
        g = c.run_laptop(["gdb", "-p", pid, "-batch", "-ex", "thread apply all bt", "-ex", "detach"], timeout=30)
        assert "ptrace: Operation not permitted." in g.stderr + g.stdout, g
        assert proc.stdin is not None
        proc.stdin.write("\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=30)
    finally:
        stop_unless_ended(proc)
    assert proc.returncode == 0 and out.startswith(f"second ok {HELLO}"), (out, err)


def test_gdb_attach_while_connect_waits_in_ktrace(cluster: NamespaceCluster, programs: Programs) -> None:
    """An attach stops the program while a blocking connect() waits for the agent's dial: the
    connect still ends as it would have without gdb, after one dial (the report names one)."""
    c = cluster
    argv = ktrace_run(c, "notify", programs["cconnect"], c.blackhole_v4, "80", connect_timeout=3)
    proc = c.popen_laptop(argv)
    try:
        connect = syscalls.number("connect")
        waiting: list[int] = []

        def program_in_connect() -> bool:
            waiting[:] = [pid for pid in descendants(proc.pid) if blocked_in(pid) == connect]
            return bool(waiting)

        wait_until(program_in_connect, 20, "the program waiting in its connect()")
        pid = str(waiting[0])
        g = c.run_laptop(["gdb", "-p", pid, "-batch", "-ex", "bt", "-ex", "detach"], timeout=30)
        assert g.returncode == 0, g
        assert re.search(r"in connect \(\)", g.stdout), g.stdout
        assert f"[Inferior 1 (process {pid}) detached]" in g.stdout, g.stdout
        out, err = proc.communicate(timeout=30)
    finally:
        stop_unless_ended(proc)
    assert (proc.returncode, out.strip()) == (1, "error ETIMEDOUT"), (out, err)
    assert len(re.findall(rf"connect {re.escape(c.blackhole_v4)}:80 -> ETIMEDOUT", err)) == 1, err


# --- the backend a debugger gets ------------------------------------------------------------


@pytest.mark.parametrize("tool", ["gdb", "strace"])
def test_under_the_ptrace_backend_ktrace_points_to_notify(
    tool: str, cluster: NamespaceCluster, programs: Programs, tmp_path: pathlib.Path
) -> None:
    c = cluster
    cmd = {
        "gdb": [*GDB_TO_MAIN, programs["goclient"], URL],
        "strace": ["strace", "-f", "-o", str(tmp_path / "trace"), programs["goclient"], URL],
    }[tool]
    r = c.run_laptop(ktrace_run(c, "ptrace", *cmd), timeout=50)
    assert r.returncode != 0, r
    assert "ok 1/1" not in r.stdout, r
    warning = ktrace_lines(r.stderr)
    assert len(warning) == 1, r.stderr
    assert warning[0].startswith(f"ktrace: warning: {tool} cannot trace"), warning
    assert "--backend notify" in warning[0] and "docs/debugging.md" in warning[0], warning


def test_auto_gives_a_debugger_the_notify_backend(cluster: NamespaceCluster, programs: Programs) -> None:
    """docs/debugging.md: `ktrace run -- gdb ...` without --backend works where notify can run."""
    c = cluster
    r = c.run_laptop(
        ktrace_run(c, None, *GDB_TO_MAIN, programs["goclient"], URL), timeout=50, env=without_backend_setting()
    )
    assert r.returncode == 0, r
    assert re.search(r"hit Breakpoint 1, main\.main \(\)", r.stdout), r.stdout
    assert f"ok 1/1 {HELLO}" in r.stdout, r
    assert not ktrace_lines(r.stderr), r.stderr


# --- ktrace itself under a tracer -------------------------------------------------------------


@pytest.mark.parametrize("backend", ["notify", "ptrace", "auto"])
def test_ktrace_under_strace(
    backend: str, cluster: NamespaceCluster, programs: Programs, tmp_path: pathlib.Path
) -> None:
    """docs/debugging.md "ktrace itself under strace": `strace -f -o FILE ktrace run --backend
    notify -- PROG URL` works, and so does `auto`, which sees ktrace is traced and picks notify;
    under ptrace ktrace cannot seize a program strace traces already, and its one line says who
    holds ptrace and what to use instead."""
    c = cluster
    trace = tmp_path / "ktrace.strace"
    r = c.run_laptop(["strace", "-f", "-o", str(trace), *ktrace_run(c, backend, programs["goclient"], URL)], timeout=50)
    if backend in ("notify", "auto"):
        assert r.returncode == 0, r
        assert r.stdout.startswith(f"ok 1/1 {HELLO}"), r
        assert re.search(rf"connect\(\d+, \{{sa_family=AF_INET, sin_port=htons\({c.hello_port}\)", trace.read_text())
        return
    assert r.returncode == 125, r
    assert "ok 1/1" not in r.stdout, r
    (line,) = [line for line in r.stderr.splitlines() if line.startswith("ktrace:")]
    assert re.fullmatch(
        r"ktrace: cannot trace the program: ptrace failed: Operation not permitted \(hint: strace \(pid \d+\) "
        r"traces the program already \(ktrace runs under it\): --backend notify needs no ptrace\)",
        line,
    ), line
