"""End-to-end: under `ktrace run`, programs resolve names as a pod would and reach UDP services.

Every program runs in the laptop namespace, whose resolv.conf names 127.0.0.1 where nothing
listens and which has no route anywhere: without ktrace no cluster name resolves (checked for
each client). Under ktrace the program reads the agent's resolv.conf (the cluster's dnsmasq at
10.96.0.10, a pod's search list, ndots:5) and its queries travel through the agent.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from fixture_programs import Programs
from nscluster import AGENT_POD_IP, AGENT_POD_NAME, LARGE_ANSWER, NamespaceCluster

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

HELLO_V4 = "10.96.1.10"
HELLO_V6 = "fd00:96::1:10"
HELLO = "hello from cluster, you are "


def both(
    c: NamespaceCluster, argv: list[str], *, ktrace_opts: tuple[str, ...] = (), timeout: float = 60
) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    """(without ktrace, with ktrace), both run in the laptop namespace."""
    without = c.run_laptop(argv, timeout=timeout)
    cmd = c.ktrace_argv(*argv)
    split = cmd.index("--")
    traced = c.run_laptop([*cmd[:split], *ktrace_opts, *cmd[split:]], timeout=timeout)
    return without, traced


@dataclass(frozen=True)
class Lookup:
    argv: Callable[[Programs], list[str]]
    expected: Callable[[str], bool]


def _go(name: str) -> Callable[[Programs], list[str]]:
    return lambda p: [p["goclient"], "-resolve", name]


LOOKUPS = {
    # Go's own resolver (static binary, no libc): reads resolv.conf itself, queries over UDP.
    "go-short-name": Lookup(_go("hello"), lambda out: out.strip() == f"addrs {HELLO_V4} {HELLO_V6}"),
    "go-fqdn": Lookup(
        _go("hello.default.svc.cluster.local."), lambda out: out.strip() == f"addrs {HELLO_V4} {HELLO_V6}"
    ),
    "go-other-namespace": Lookup(_go("echo.other-ns"), lambda out: out.strip() == "addrs 10.96.1.11"),
    "go-aaaa-only": Lookup(_go("hello6"), lambda out: out.strip() == f"addrs {HELLO_V6}"),
    "go-stripped-short-name": Lookup(
        lambda p: [p["goclient-stripped"], "-resolve", "hello"],
        lambda out: out.strip() == f"addrs {HELLO_V4} {HELLO_V6}",
    ),
    # glibc: getent, Python's getaddrinfo, curl (resolve and connect).
    "glibc-getent-hosts": Lookup(
        lambda p: ["getent", "hosts", "hello"],
        lambda out: (
            out.split()[:2]
            in ([HELLO_V6, "hello.default.svc.cluster.local"], [HELLO_V4, "hello.default.svc.cluster.local"])
        ),
    ),
    "glibc-getent-ahostsv4-other-ns": Lookup(
        lambda p: ["getent", "ahostsv4", "hello.other-ns"],
        lambda out: out.split()[:3] == [HELLO_V4, "STREAM", "hello.other-ns.svc.cluster.local"],
    ),
    "python-getaddrinfo": Lookup(
        lambda p: [
            sys.executable,
            "-c",
            "import socket; print(sorted({a[4][0] for a in socket.getaddrinfo('hello', 8080)}))",
        ],
        lambda out: out.strip() == repr(sorted([HELLO_V4, HELLO_V6])),
    ),
    "curl-short-name": Lookup(
        lambda p: ["curl", "-sS", "-4", "--max-time", "30", "http://hello:8080/"], lambda out: out.startswith(HELLO)
    ),
    # musl, static: its own resolver sends A and AAAA in parallel and checks the answer's source.
    "musl-static-resolve-and-connect": Lookup(
        lambda p: [p["mresolve"], "hello", "8080"], lambda out: f"addr {HELLO_V4}:8080" in out and HELLO in out
    ),
    # dig / nslookup (bind9's own resolver library).
    "dig-fqdn": Lookup(
        lambda p: ["dig", "+short", "+tries=1", "+time=5", "hello.default.svc.cluster.local", "A"],
        lambda out: out.strip() == HELLO_V4,
    ),
    "dig-search-list": Lookup(
        lambda p: ["dig", "+short", "+search", "+tries=1", "+time=5", "echo.other-ns", "A"],
        lambda out: out.strip() == "10.96.1.11",
    ),
    "nslookup-short-name": Lookup(
        lambda p: ["nslookup", "-timeout=5", "hello"],
        lambda out: "Name:\thello.default.svc.cluster.local" in out and HELLO_V4 in out,
    ),
}


@pytest.mark.parametrize("name", sorted(LOOKUPS))
def test_resolves_cluster_names(name: str, ktrace_cluster: NamespaceCluster, programs: Programs) -> None:
    lookup = LOOKUPS[name]
    without, traced = both(ktrace_cluster, lookup.argv(programs))
    assert not lookup.expected(without.stdout), f"resolved on the laptop without ktrace: {without}"
    assert traced.returncode == 0, traced
    assert lookup.expected(traced.stdout), traced
    assert "Traceback" not in traced.stderr


def test_nxdomain_is_nxdomain_not_a_timeout(ktrace_cluster: NamespaceCluster, programs: Programs) -> None:
    c = ktrace_cluster
    _, dig = both(c, ["dig", "+tries=1", "+time=5", "nosuch.default.svc.cluster.local"])
    assert "status: NXDOMAIN" in dig.stdout, dig
    _, go = both(c, [programs["goclient"], "-resolve", "nosuch"])
    assert go.stdout.startswith("error ") and "no such host" in go.stdout, go
    # getaddrinfo: EAI_NONAME (the name does not exist), not EAI_AGAIN (no answer).
    script = (
        "import socket\ntry:\n socket.getaddrinfo('nosuch', 80)\nexcept socket.gaierror as e:\n"
        " print(e.errno == socket.EAI_NONAME, e)"
    )
    _, py = both(c, [sys.executable, "-c", script])
    assert py.stdout.startswith("True"), py


def test_other_answers_reach_the_program_unchanged(ktrace_cluster: NamespaceCluster) -> None:
    """The cluster's DNS server refuses names outside cluster.local (it has no upstream):
    the program sees REFUSED, exactly what a pod of this cluster would see."""
    _, dig = both(ktrace_cluster, ["dig", "+tries=1", "+time=5", "example.org"])
    assert "status: REFUSED" in dig.stdout, dig


def test_truncated_answer_is_retried_over_tcp_and_arrives_complete(ktrace_cluster: NamespaceCluster) -> None:
    c = ktrace_cluster
    traced = c.run_laptop([*c.ktrace_argv("dig", "+tries=1", "+time=5", "big.default.svc.cluster.local")], timeout=60)
    assert "Truncated, retrying in TCP mode" in traced.stdout, traced
    answers = [
        line
        for line in traced.stdout.splitlines()
        if line.startswith("big.default.svc.cluster.local.") and "\tA\t" in line
    ]
    assert len(answers) == LARGE_ANSWER, traced.stdout
    # glibc does the same switch to TCP by itself.
    getent = c.run_laptop(c.ktrace_argv("getent", "ahostsv4", "big"), timeout=60)
    assert len({line.split()[0] for line in getent.stdout.splitlines()}) == LARGE_ANSWER, getent


def test_dns_map_records_answers_over_udp_and_tcp(ktrace_cluster: NamespaceCluster) -> None:
    c = ktrace_cluster
    cmd = c.ktrace_argv("sh", "-c", "getent hosts hello && dig +tries=1 +time=5 big.default.svc.cluster.local")
    traced = c.run_laptop([cmd[0], "--debug", *cmd[1:]], timeout=60)
    assert traced.returncode == 0, traced
    assert (
        "dns answer hello.default.svc.cluster.local -> [IPv6Address('fd00:96::1:10')]" in traced.stderr
        or "dns answer hello.default.svc.cluster.local -> [IPv4Address('10.96.1.10')]" in traced.stderr
    ), traced.stderr
    big = [line for line in traced.stderr.splitlines() if "dns answer big.default.svc.cluster.local" in line]
    assert any(line.count("IPv4Address") == LARGE_ANSWER for line in big), big  # the TCP answer


NSCD = r"""
import os, socket, sys
os.makedirs("/var/run/nscd", exist_ok=True)
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind("/var/run/nscd/socket")
srv.listen(8)
srv.setblocking(False)
result = subprocess.run(sys.argv[1:], capture_output=True, text=True)
accepted = 0
while True:
    try:
        srv.accept()[0].close()
        accepted += 1
    except BlockingIOError:
        break
print("nscd connections", accepted)
print(result.stdout, end="")
"""


def test_nscd_socket_is_refused_so_glibc_asks_the_cluster(ktrace_cluster: NamespaceCluster) -> None:
    """A local nscd would answer from this machine's view. In a private mount namespace (so the
    machine's /var/run is untouched) a listener stands for nscd; under ktrace glibc must not reach it."""
    c = ktrace_cluster
    script = "import subprocess\n" + NSCD
    # unshare -m: a private mount namespace with a tmpfs over /var/run/nscd.
    wrapper = [
        "unshare",
        "-m",
        "sh",
        "-c",
        'mkdir -p /var/run/nscd && mount -t tmpfs none /var/run/nscd && exec "$@"',
        "sh",
    ]
    traced = c.run_laptop(
        [*wrapper, sys.executable, "-c", script, *c.ktrace_argv("getent", "hosts", "hello")], timeout=60
    )
    assert traced.stdout.splitlines()[0] == "nscd connections 0", traced
    assert "hello.default.svc.cluster.local" in traced.stdout, traced
    # Without ktrace glibc does connect to it (the listener is real).
    plain = c.run_laptop([*wrapper, sys.executable, "-c", script, "getent", "hosts", "hello"], timeout=60)
    assert plain.stdout.splitlines()[0] != "nscd connections 0", plain


def test_hosts_file_is_local_by_default_and_the_agents_on_request(ktrace_cluster: NamespaceCluster) -> None:
    c = ktrace_cluster
    local = c.run_laptop(c.ktrace_argv("getent", "hosts", AGENT_POD_NAME), timeout=60)
    assert local.returncode != 0 and AGENT_POD_IP not in local.stdout, local
    localhost = c.run_laptop(c.ktrace_argv("getent", "ahostsv4", "localhost"), timeout=60)
    assert localhost.stdout.split()[:1] == ["127.0.0.1"], localhost
    _, cluster = both(c, ["getent", "hosts", AGENT_POD_NAME], ktrace_opts=("--hosts", "cluster"))
    assert cluster.stdout.split() == [AGENT_POD_IP, AGENT_POD_NAME], cluster


# --- UDP -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "host"),
    [
        ("connected", "10.96.1.11"),
        ("sendto", "10.96.1.11"),
        ("mmsg", "10.96.1.11"),
        ("cmmsg", "10.96.1.11"),
        ("sendto", "fd00:96::1:11"),
        ("connected", "fd00:96::1:11"),
    ],
)
def test_udp_echo_with_faithful_sources(
    mode: str, host: str, ktrace_cluster: NamespaceCluster, programs: Programs
) -> None:
    c = ktrace_cluster
    count = 5
    without, traced = both(c, [programs["cudp"], mode, host, "7", str(count)])
    assert without.returncode != 0 and "reply" not in without.stdout, without
    assert traced.returncode == 0, traced
    peer = f"{host}:7"  # cudp prints addr:port, brackets or not
    replies = [line.split(" ", 2) for line in traced.stdout.splitlines() if line.startswith("reply ")]
    assert len(replies) == (count if "mmsg" in mode else 1), traced.stdout
    assert {source for _, source, _ in replies} == {peer}, traced.stdout
    if mode in ("connected", "cmmsg"):
        assert f"peer {peer}" in traced.stdout.splitlines(), traced.stdout


UDP_LIFECYCLE = r"""
import socket, sys
echo = (sys.argv[1], 7)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(10)
s.connect(echo)
s.send(b"connected send")
print("1", s.recv(100).decode(), s.getpeername())
s.connect(("127.0.0.1", 9))               # re-connect to a local address: stays local
print("2", s.getpeername())
s.connect(echo)                           # and back to the cluster
s.send(b"reconnected")
print("3", s.recv(100).decode(), s.getpeername())
import ctypes, os, struct
libc = ctypes.CDLL(None, use_errno=True)
unspec = struct.pack("=H14x", socket.AF_UNSPEC)
print("4 disconnect", libc.connect(s.fileno(), unspec, len(unspec)))
try:
    s.getpeername()
except OSError as e:
    print("5 not connected", e.errno == 107)
s.sendto(b"after disconnect", echo)
data, source = s.recvfrom(100)
print("6", data.decode(), source)
msg = s.sendmsg([b"via ", b"sendmsg"], [], 0, echo)
data, anc, flags, source = s.recvmsg(100)
print("7", data.decode(), source)
s.connect(echo)
os.write(s.fileno(), b"plain write")
import select
select.select([s], [], [], 10)
print("8", os.read(s.fileno(), 100).decode())
"""


def test_udp_socket_lifecycle(ktrace_cluster: NamespaceCluster) -> None:
    """connect, re-connect (local, then remote again), disconnect with AF_UNSPEC, sendto,
    sendmsg/recvmsg, and plain write()/read() on a connected socket."""
    c = ktrace_cluster
    traced = c.run_laptop(c.ktrace_argv(sys.executable, "-c", UDP_LIFECYCLE, c.echo_v4), timeout=60)
    assert traced.returncode == 0, traced
    lines = traced.stdout.splitlines()
    echo = "('10.96.1.11', 7)"
    assert lines == [
        f"1 connected send {echo}",
        "2 ('127.0.0.1', 9)",
        f"3 reconnected {echo}",
        "4 disconnect 0",
        "5 not connected True",
        f"6 after disconnect {echo}",
        f"7 via sendmsg {echo}",
        "8 plain write",
    ], traced


MIXED_SENDMMSG = r"""
import ctypes, socket, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
local = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
local.bind(("127.0.0.1", 0))
local.settimeout(10)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(10)
named = sys.argv[2] == "named"
if not named:
    s.connect(local.getsockname())
payloads = [b"to the local peer", b"to the cluster"]
buffers = [ctypes.create_string_buffer(p, len(p)) for p in payloads]
iovecs = ctypes.create_string_buffer(32)
for i, b in enumerate(buffers):
    struct.pack_into("=QQ", iovecs, 16 * i, ctypes.addressof(b), len(b))
def sockaddr(ip, port):
    raw = struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + socket.inet_aton(ip) + bytes(8)
    return ctypes.create_string_buffer(raw, len(raw))
echo = sockaddr(sys.argv[1], 7)
peer = sockaddr(*local.getsockname())
vec = ctypes.create_string_buffer(128)
# The first message names the local peer ("named") or nothing (it goes to the connected peer),
# the second names the echo in the cluster.
first_name = (ctypes.addressof(peer), 16) if named else (0, 0)
struct.pack_into("=QI4xQQQQi", vec, 0, *first_name, ctypes.addressof(iovecs), 1, 0, 0, 0)
struct.pack_into("=QI4xQQQQi", vec, 64, ctypes.addressof(echo), 16, ctypes.addressof(iovecs) + 16, 1, 0, 0, 0)
sent = libc.sendmmsg(s.fileno(), vec, 2, 0)
print("sent", sent, [struct.unpack_from("=I", vec, 64 * i + 56)[0] for i in range(2)])
s.sendto(b"end", local.getsockname())
got = []
while not got or got[-1] != b"end":
    got.append(local.recv(100))
print("local peer got", got)
if named:
    print("reply", s.recvfrom(100))
"""


@pytest.mark.parametrize("first", ["connected", "named"])
def test_sendmmsg_mixing_a_local_and_a_cluster_destination(first: str, ktrace_cluster: NamespaceCluster) -> None:
    """sendmmsg of a message for a local peer (the connected one, or named) and one naming a
    cluster address: each goes to its own, the local one from here, the other through the agent."""
    c = ktrace_cluster
    without, traced = both(c, [sys.executable, "-c", MIXED_SENDMMSG, c.echo_v4, first])
    assert without.stdout.startswith("sent 1 [17, 0]"), without  # no route to the cluster from here
    assert traced.returncode == 0, traced
    expected = ["sent 2 [17, 14]", "local peer got [b'to the local peer', b'end']"]
    if first == "named":
        expected.append(f"reply (b'to the cluster', ('{c.echo_v4}', 7))")
    assert traced.stdout.splitlines() == expected, traced


FASTOPEN = r"""
import socket, sys
s = socket.socket()
if sys.argv[2] == "timeout":
    s.settimeout(20)  # a non-blocking descriptor under Python's own waits
try:
    sent = s.sendto(b"GET / HTTP/1.0\r\n\r\n", socket.MSG_FASTOPEN, (sys.argv[1], 8080))
except OSError as exc:
    print("error", exc.errno)
    sys.exit(0)
reply = b""
while chunk := s.recv(4096):
    reply += chunk
print(sent, s.getpeername(), reply.decode().split("\r\n\r\n", 1)[1].split(",")[0])
"""


@pytest.mark.parametrize("mode", ["blocking", "timeout"])
def test_sendto_msg_fastopen_is_a_connect_as_in_the_pod(mode: str, ktrace_cluster: NamespaceCluster) -> None:
    """Without a cookie for the server, a pod's kernel sends the data after the handshake: a
    blocking sendto() returns its length once connected; a non-blocking one says EINPROGRESS
    (and the program sends again). ktrace gives the same answer, through the cluster."""
    c = ktrace_cluster
    argv = [sys.executable, "-c", FASTOPEN, c.hello_v4, mode]
    without, traced = both(c, argv)
    in_pod = c.run_cluster(argv, timeout=60)
    assert without.returncode != 0 or without.stdout.startswith("error"), without
    assert in_pod.returncode == 0, in_pod
    assert traced.returncode == 0, traced
    assert traced.stdout == in_pod.stdout, (traced, in_pod)
    if mode == "blocking":
        assert traced.stdout.startswith(f"18 ('{c.hello_v4}', 8080) {HELLO.split(',', maxsplit=1)[0]}"), traced
    else:
        assert traced.stdout.strip() == f"error {errno.EINPROGRESS}", traced


FLOOD = r"""
import os, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setblocking(False)
payload = os.urandom(8000)
sent = 0
for i in range(int(sys.argv[2])):
    try:
        s.sendto(payload, (sys.argv[1], 9))
        sent += 1
    except BlockingIOError:
        pass
status = open(f"/proc/{os.getppid()}/status").read()
print("sent", sent * len(payload))
print("ktrace", [line for line in status.splitlines() if line.startswith("VmHWM")][0].split()[1])
"""


def test_udp_flood_does_not_grow_memory_without_limit(ktrace_cluster: NamespaceCluster) -> None:
    """400 MB of datagrams to a cluster address that never answers: ktrace (the program's parent)
    must drop what it cannot forward, as a full socket buffer would, not buffer it."""
    c = ktrace_cluster
    traced = c.run_laptop(c.ktrace_argv(sys.executable, "-c", FLOOD, c.blackhole_v4, "50000"), timeout=110)
    assert traced.returncode == 0, traced
    values = dict(line.split() for line in traced.stdout.splitlines())
    sent_mb, peak_mb = int(values["sent"]) >> 20, int(values["ktrace"]) >> 10
    assert sent_mb >= 300, traced.stdout
    assert peak_mb < 200, f"ktrace peaked at {peak_mb} MB while the program sent {sent_mb} MB"


def test_laptop_env_has_no_resolver_without_ktrace(ns_cluster: NamespaceCluster) -> None:
    """The premise of every test above: the laptop's own resolv.conf leads nowhere."""
    r = ns_cluster.run_laptop(["cat", "/etc/resolv.conf"], timeout=10)
    assert r.stdout.split() == ["nameserver", "127.0.0.1"]
    assert os.path.exists(f"/etc/netns/{ns_cluster.laptop}/resolv.conf")


REFUSED_UDP = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(10)
s.connect((sys.argv[1], 53))
for attempt in (1, 2):
    s.send(b"anyone there?")
    try:
        print(attempt, "reply", s.recv(100))
    except ConnectionRefusedError:
        print(attempt, "ECONNREFUSED")
    except OSError as e:
        print(attempt, "error", e)
"""


def test_port_unreachable_is_econnrefused_on_a_connected_udp_socket(ktrace_cluster: NamespaceCluster) -> None:
    """Nothing listens on UDP at the refused address: in the cluster the kernel answers with a port
    unreachable and a connected socket fails with ECONNREFUSED at once (resolvers then try the next
    server). Under ktrace the program must see the same, not a timeout."""
    c = ktrace_cluster
    in_cluster = c.run_cluster([sys.executable, "-c", REFUSED_UDP, c.refused_v4], timeout=60)
    assert in_cluster.stdout.splitlines() == ["1 ECONNREFUSED", "2 ECONNREFUSED"], in_cluster
    traced = c.run_laptop(c.ktrace_argv(sys.executable, "-c", REFUSED_UDP, c.refused_v4), timeout=60)
    assert traced.stdout.splitlines() == in_cluster.stdout.splitlines(), traced
    dig = c.run_laptop(c.ktrace_argv("dig", "+tries=1", "+time=5", f"@{c.refused_v4}", "hello"), timeout=60)
    assert "connection refused" in dig.stdout, dig


RECVFROM_WAYS = r"""
import ctypes, errno, select, socket, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
echo = (sys.argv[1], 7)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect(echo)
def ready():
    assert select.select([s], [], [], 10)[0]
s.send(b"peeked"); ready()
print("peek", s.recvfrom(100, socket.MSG_PEEK), s.recvfrom(100))
s.send(b"longer than four"); ready()
print("trunc", s.recvfrom_into(bytearray(4), 4, socket.MSG_TRUNC))
s.send(b"cut"); ready()
print("small buffer", s.recvfrom(2))
s.send(b"short name"); ready()
buf, name, size = ctypes.create_string_buffer(100), ctypes.create_string_buffer(16), ctypes.c_uint32(6)
got = libc.recvfrom(s.fileno(), buf, 100, 0, name, ctypes.byref(size))
print("short name", got, buf.value, name.raw[:6].hex(), name.raw[6:].hex(), size.value)
s.send(b"no name"); ready()
print("no name", libc.recvfrom(s.fileno(), buf, 100, 0, None, None), buf.value)
class Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
class Msghdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32), ("iov", ctypes.c_void_p),
                ("iovlen", ctypes.c_size_t), ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]
s.send(b"recvmsg short name"); ready()  # recvmsg: the source is rewritten at the syscall's exit
name = ctypes.create_string_buffer(16)
iov = Iovec(ctypes.cast(buf, ctypes.c_void_p), 100)
msg = Msghdr(ctypes.cast(name, ctypes.c_void_p), 6, ctypes.cast(ctypes.pointer(iov), ctypes.c_void_p), 1, None, 0, 0)
got = libc.recvmsg(s.fileno(), ctypes.byref(msg), 0)
print("recvmsg short name", got, buf.value, name.raw[:6].hex(), name.raw[6:].hex(), msg.namelen)
s.setblocking(False)
try:
    s.recvfrom(100)
except BlockingIOError as e:
    print("nothing queued", errno.errorcode[e.errno])
s.send(b"dontwait"); ready()
print("dontwait", s.recvfrom(100, socket.MSG_DONTWAIT))
s.setblocking(True)
s.settimeout(10)
s.send(b"waited for")  # the answer is not there yet: the call blocks in the kernel
print("blocking", s.recvfrom(100))
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.sendto(b"unconnected", echo)
assert select.select([u], [], [], 10)[0]
print("unconnected", u.recvfrom(100))
"""


def test_recvfrom_under_ktrace_is_the_kernels(ktrace_cluster: NamespaceCluster) -> None:
    """recvfrom() on a relayed socket, done by ktrace at the syscall's entry when a datagram is
    queued (else by the kernel, its source rewritten at the exit): flags, short buffers for
    data and name (at entry, and recvmsg's at exit), no name, nothing queued, blocking; same
    output as in the cluster."""
    c = ktrace_cluster
    in_cluster = c.run_cluster([sys.executable, "-c", RECVFROM_WAYS, c.echo_v4], timeout=60)
    assert in_cluster.returncode == 0, in_cluster
    lines = in_cluster.stdout.splitlines()
    echo = f"('{c.echo_v4}', 7)"
    assert lines[0] == f"peek (b'peeked', {echo}) (b'peeked', {echo})", lines
    assert lines[1] == f"trunc (16, {echo})", lines
    assert lines[6] == "nothing queued EAGAIN", lines
    traced = c.run_laptop(c.ktrace_argv(sys.executable, "-c", RECVFROM_WAYS, c.echo_v4), timeout=60)
    assert traced.returncode == 0, traced
    assert traced.stdout.splitlines() == lines, traced


OPEN_WAYS = r"""
import ctypes, os, struct
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def read_fd(fd):
    data = os.read(fd, 4096).decode()
    os.close(fd)
    return data.split()[:2]
print("open", read_fd(os.open("/etc/resolv.conf", os.O_RDONLY)))
etc = os.open("/etc", os.O_RDONLY | os.O_DIRECTORY)
print("openat-dirfd", read_fd(os.open("resolv.conf", os.O_RDONLY, dir_fd=etc)))
os.chdir("/etc")
print("relative", read_fd(os.open("./resolv.conf", os.O_RDONLY)))
print("dotdot", read_fd(os.open("/etc/../etc//resolv.conf", os.O_RDONLY)))
how = struct.pack("=QQQ", os.O_RDONLY, 0, 0)  # struct open_how: flags, mode, resolve
fd = libc.syscall(437, -100, b"/etc/resolv.conf", how, len(how))  # openat2(AT_FDCWD, ...)
print("openat2", read_fd(fd) if fd >= 0 else ("errno", ctypes.get_errno()))
"""


def test_every_way_of_opening_resolv_conf_sees_the_cluster(ktrace_cluster: NamespaceCluster) -> None:
    c = ktrace_cluster
    traced = c.run_laptop(c.ktrace_argv(sys.executable, "-c", OPEN_WAYS), timeout=60)
    assert traced.returncode == 0, traced
    expected = ["nameserver", c.dns_v4]
    seen = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in traced.stdout.splitlines()}
    assert seen == {way: repr(expected) for way in ("open", "openat-dirfd", "relative", "dotdot", "openat2")}, traced
    plain = c.run_laptop([sys.executable, "-c", OPEN_WAYS], timeout=60)
    assert "10.96.0.10" not in plain.stdout, plain


PING_SOCKET = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
s.settimeout(5)
echo_request = bytes([8, 0, 0, 0, 0, 1, 0, 1])
try:
    s.sendto(echo_request, (sys.argv[1], 0))
    print("reply from", s.recvfrom(100)[1][0])
except OSError as e:
    print("error", __import__("errno").errorcode[e.errno])
try:
    s.connect((sys.argv[1], 0))
    print("connected")
except OSError as e:
    print("error", __import__("errno").errorcode[e.errno])
"""


def test_icmp_to_the_cluster_fails_instead_of_leaving_from_here(ktrace_cluster: NamespaceCluster) -> None:
    """An ICMP ping socket is SOCK_DGRAM too, but the tunnel carries only TCP and UDP: a ping to a
    cluster address must fail (ENETUNREACH) rather than be sent from this machine, or worse through
    a UDP relay to the laptop's own loopback (which would answer it)."""
    c = ktrace_cluster
    # Ping sockets need the caller's group in ping_group_range: set it in the test's own namespace.
    c.run_laptop(["sysctl", "-q", "-w", "net.ipv4.ping_group_range=0 2147483647"], timeout=10)
    traced = c.run_laptop(c.ktrace_argv(sys.executable, "-c", PING_SOCKET, c.hello_v4), timeout=60)
    assert traced.stdout.splitlines() == ["error ENETUNREACH", "error ENETUNREACH"], traced
    assert traced.stderr.count("ktrace carries only TCP and UDP") == 1, traced.stderr
    local = c.run_laptop(c.ktrace_argv(sys.executable, "-c", PING_SOCKET, "127.0.0.1"), timeout=60)
    assert local.stdout.splitlines() == ["reply from 127.0.0.1", "connected"], local
