"""End-to-end: `ktrace run`'s process contract: exit statuses, signals, job control, io_uring.

The CLI contract: the program's exit status; 128+N when it died of signal N; 126/127 when
the command cannot be executed / is not found; 125 with one line on stderr for ktrace's own
failures. Signals sent to ktrace reach the program; if ktrace is killed, so is the program.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import tempfile

import pytest
from e2e_helpers import proc_state, read_line, wait_exited, wait_until
from fixture_programs import Programs
from nscluster import NamespaceCluster

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

# The handler writes with os.write: print() there could run inside the "ready" print's flush
# (CPython checks for signals between its raw writes, with the buffer's lock held) and fail
# with "reentrant call", if the signal comes within microseconds of that line.
TRAP = """
import os, signal, sys
def handler(signum, frame):
    os.write(1, b"got " + signal.Signals(signum).name.encode() + b"\\n")
    os._exit(40 + signum % 10)
signal.signal(signal.SIGINT, handler)
signal.signal(signal.SIGTERM, handler)
print("ready", os.getpid(), flush=True)
while True:
    signal.pause()
"""

STOPPABLE = """
import os, sys, urllib.request
print("ready", os.getpid(), flush=True)
sys.stdin.readline()
for _ in range(5):
    print(urllib.request.urlopen(sys.argv[1], timeout=30).read().decode().strip(), flush=True)
"""


def _ready_pid(proc: subprocess.Popen[str]) -> int:
    word, pid = read_line(proc, timeout=30).split()
    assert word == "ready"
    return int(pid)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_to_ktrace_reaches_the_program(sig: signal.Signals, ktrace_cluster: NamespaceCluster) -> None:
    proc = ktrace_cluster.popen_laptop(ktrace_cluster.ktrace_argv(sys.executable, "-c", TRAP))
    try:
        program = _ready_pid(proc)
        assert program != proc.pid
        os.kill(proc.pid, sig)
        out, err = proc.communicate(timeout=30)
        assert out.strip() == f"got {sig.name}", (out, err)
        assert proc.returncode == 40 + sig % 10
    finally:
        proc.kill()
        proc.communicate()


def test_kill9_of_ktrace_kills_the_program(ktrace_cluster: NamespaceCluster) -> None:
    proc = ktrace_cluster.popen_laptop(ktrace_cluster.ktrace_argv(sys.executable, "-c", TRAP))
    try:
        program = _ready_pid(proc)
        assert program != proc.pid, "the program must be a process of its own, traced by ktrace"
        assert proc_state(program) not in (None, "Z")
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
        wait_exited(program, timeout=10)
    finally:
        proc.kill()
        proc.communicate()


def test_sigstop_sigcont_of_the_program(ktrace_cluster: NamespaceCluster) -> None:
    c = ktrace_cluster
    proc = c.popen_laptop(c.ktrace_argv(sys.executable, "-c", STOPPABLE, c.hello_url), stdin=subprocess.PIPE)
    try:
        program = _ready_pid(proc)
        os.kill(program, signal.SIGSTOP)
        wait_until(lambda: proc_state(program) in ("T", "t"), 10, "the program to stop")
        assert proc_state(proc.pid) not in ("T", "t", None, "Z"), "ktrace itself stopped or died"
        os.kill(program, signal.SIGCONT)
        wait_until(lambda: proc_state(program) not in ("T", "t"), 10, "the program to continue")
        out, err = proc.communicate("go\n", timeout=60)
        assert proc.returncode == 0, (out, err)
        assert out.count("hello from cluster, you are ") == 5, out
    finally:
        proc.kill()
        proc.communicate()


def test_io_uring_setup_fails_with_enosys(ktrace_cluster: NamespaceCluster, programs: Programs) -> None:
    c = ktrace_cluster
    native = c.run_laptop([programs["iouring"]], timeout=30)
    assert native.stdout.strip() == "ok", native
    traced = c.run_laptop(c.ktrace_argv(programs["iouring"]), timeout=30)
    assert traced.stdout.strip() == "ENOSYS", traced
    assert traced.returncode == 1


def test_speculation_mitigations_are_the_programs(ktrace_cluster: NamespaceCluster) -> None:
    # A seccomp filter installed without SECCOMP_FILTER_FLAG_SPEC_ALLOW turns the Speculative
    # Store Bypass mitigation on where the kernel runs with spec_store_bypass_disable=seccomp
    # (the default before 5.16), slowing the whole program. This VM's CPU reports the bug as
    # unmitigable ("vulnerable" either way), so here the test only guards the comparison;
    # on such a kernel it fails without the flag.
    c = ktrace_cluster
    show = ["grep", "^Speculation", "/proc/self/status"]
    native = c.run_laptop(show, timeout=30)
    traced = c.run_laptop(c.ktrace_argv(*show), timeout=60)
    assert native.returncode == 0 and native.stdout.strip(), native
    assert traced.returncode == 0, traced
    assert traced.stdout == native.stdout


@pytest.mark.parametrize(
    ("script", "status"),
    [
        ("exit 0", 0),
        ("exit 3", 3),
        ("kill -USR1 $$", 128 + signal.SIGUSR1),
        ("kill -KILL $$", 128 + signal.SIGKILL),
    ],
)
def test_exit_status_is_the_programs(script: str, status: int, ktrace_cluster: NamespaceCluster) -> None:
    # Reaching the cluster first shows the program really ran under ktrace.
    c = ktrace_cluster
    reach = f"curl -sf -o /dev/null --max-time 30 {c.hello_url} || exit 99; "
    r = c.run_laptop(c.ktrace_argv("sh", "-c", reach + script), timeout=60)
    assert r.returncode == status, r


def test_command_not_found_is_127(ktrace_cluster: NamespaceCluster) -> None:
    for cmd in ("ktrace-no-such-command", "/nonexistent/ktrace-no-such-program"):
        r = ktrace_cluster.run_laptop(ktrace_cluster.ktrace_argv(cmd), timeout=60)
        assert r.returncode == 127, r


def test_command_not_executable_is_126(ktrace_cluster: NamespaceCluster) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        plain = os.path.join(tmp, "not-executable")
        with open(plain, "w") as f:
            f.write("#!/bin/sh\necho ran\n")
        os.chmod(plain, stat.S_IRUSR | stat.S_IWUSR)
        for cmd in (plain, tmp):
            r = ktrace_cluster.run_laptop(ktrace_cluster.ktrace_argv(cmd), timeout=60)
            assert r.returncode == 126, r
            assert "ran" not in r.stdout


def _one_line_error(r: subprocess.CompletedProcess[str]) -> None:
    assert r.returncode == 125, r
    assert "ran" not in r.stdout, "the program ran although ktrace failed"
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ktrace:"), r.stderr
    assert "Traceback" not in r.stderr


def test_unreachable_agent_is_125_with_one_line(ktrace_cluster: NamespaceCluster) -> None:
    argv = ["ktrace", "run", "--agent", "unix:/nonexistent/ktrace-agent.sock", "--", "sh", "-c", "echo ran"]
    argv[0] = ktrace_cluster.ktrace_argv()[0]
    _one_line_error(ktrace_cluster.run_laptop(argv, timeout=60))


def test_wrong_token_is_125_with_one_line(ktrace_cluster: NamespaceCluster) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".token") as token:
        token.write("not-the-token\n")
        token.flush()
        argv = ktrace_cluster.ktrace_argv("sh", "-c", "echo ran")
        argv[argv.index("--token-file") + 1] = token.name
        _one_line_error(ktrace_cluster.run_laptop(argv, timeout=60))


def test_many_short_lived_vfork_children(ktrace_cluster: NamespaceCluster, programs: Programs) -> None:
    """Go's os/exec starts children with a vfork-like clone; /bin/true then exits at once, often
    before ktrace has read the parent's fork event. ktrace must neither wait for such a child
    forever nor lose count of the live ones."""
    c = ktrace_cluster
    script = 'for i in $(seq 60); do "$1" -exec /bin/true || exit 1; done; echo all done'
    traced = c.run_laptop(c.ktrace_argv("sh", "-c", script, "sh", programs["goclient"]), timeout=100)
    assert traced.returncode == 0, traced
    assert traced.stdout.strip().endswith("all done"), traced


EXEC_FROM_THREAD = """
import os, sys, threading
def run():
    # execve from a thread that is not the leader: the kernel gives it the leader's id and
    # the other threads vanish without an exit report.
    os.execv(sys.argv[1], sys.argv[1:])
threading.Thread(target=run).start()
threading.Event().wait()
"""

POSIX_SPAWN = """
import os, sys
pid = os.posix_spawn(sys.argv[1], sys.argv[1:], {})  # glibc: clone(CLONE_VM|CLONE_VFORK), empty environment
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.parametrize("launcher", ["exec-from-thread", "posix_spawn"])
def test_programs_started_in_unusual_ways_are_traced(
    launcher: str, ktrace_cluster: NamespaceCluster, programs: Programs
) -> None:
    c = ktrace_cluster
    script = EXEC_FROM_THREAD if launcher == "exec-from-thread" else POSIX_SPAWN
    argv = [sys.executable, "-c", script, programs["cconnect"], c.hello_v4, str(c.hello_port)]
    without = c.run_laptop(argv, timeout=30)
    assert without.stdout.strip() == "error ENETUNREACH", without
    traced = c.run_laptop(c.ktrace_argv(*argv), timeout=60)
    assert traced.returncode == 0, traced
    assert "hello from cluster, you are " in traced.stdout, traced


def test_a_child_made_untraced_does_not_outlive_a_killed_ktrace(
    ktrace_cluster: NamespaceCluster, programs: Programs
) -> None:
    """clone(CLONE_UNTRACED) would make a child ptrace's EXITKILL does not reach (ktrace clears
    the flag); under notify the guardian ends it. kill -9 of ktrace ends the program and it."""
    c = ktrace_cluster
    proc = c.popen_laptop(c.ktrace_argv(programs["cuntraced"]), stdin=subprocess.PIPE)
    try:
        line = read_line(proc, 30)
        assert line.startswith("child "), line
        child = int(line.split()[1])
        assert proc_state(child) is not None
        proc.kill()  # SIGKILL to ktrace itself: nothing of ktrace's runs after it
        proc.wait(timeout=30)
        wait_exited(child, 30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


ORPHAN = r"""
import errno, os, signal, socket, sys
if os.fork():
    signal.pause()  # the program: dies with its guardian (PR_SET_PDEATHSIG)
print("ready", os.getpid(), flush=True)  # its child, which nothing kills then
sys.stdin.readline()  # ktrace and the guardian are killed meanwhile
s = socket.socket()
err = s.connect_ex((sys.argv[1], int(sys.argv[2])))
print("connect", errno.errorcode.get(err, "OK"), flush=True)  # open() would fail too: every stopped call does
"""


def test_notify_a_program_left_without_ktrace_and_guardian_cannot_connect_directly(
    ns_cluster: NamespaceCluster,
) -> None:
    """The worst case under notify: ktrace and the guardian both killed at once, so nothing is left
    to end the program's children (the program itself dies with its guardian). The filter's
    listener is gone with ktrace: every call it would have stopped fails with ENOSYS, so a child's
    connect never leaves this machine directly (which would say ENETUNREACH on the laptop side,
    which has no route)."""
    c = ns_cluster
    c.backend = "notify"
    argv = c.ktrace_argv(sys.executable, "-c", ORPHAN, c.hello_v4, str(c.hello_port))
    proc = c.popen_laptop(argv, stdin=subprocess.PIPE)
    try:
        child = _ready_pid(proc)
        program = _parent_of(child)
        guardian = _parent_of(program)
        assert proc.pid not in (program, guardian) and _parent_of(guardian) == proc.pid
        os.kill(proc.pid, signal.SIGKILL)
        os.kill(guardian, signal.SIGKILL)
        proc.wait(timeout=10)
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert read_line(proc, 30) == "connect ENOSYS"
        wait_exited(child, timeout=30)
    finally:
        c.backend = None
        proc.kill()
        proc.communicate()


def _parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])
