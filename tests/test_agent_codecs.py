"""Pure parts of the agent: listen addresses, policy, tokens, kernel tables, error queues (the wire's
codec and errno names: test_wire_codec.py)."""

from __future__ import annotations

import hashlib
import ipaddress
import pathlib

import pytest
from ktrace_agent import host_info
from ktrace_agent.listen import (
    ConfigError,
    ListenAddress,
    TokenCheck,
    check_policy,
    parse_listen,
    parse_token_sha256,
    read_token_file,
)


@pytest.mark.parametrize(
    ("text", "expected", "loopback"),
    [
        ("unix:/tmp/a.sock", ListenAddress(unix_path="/tmp/a.sock"), True),
        ("unix:///tmp/a.sock", ListenAddress(unix_path="/tmp/a.sock"), True),
        ("127.0.0.1:0", ListenAddress(host="127.0.0.1", port=0), True),
        ("127.8.9.1:5000", ListenAddress(host="127.8.9.1", port=5000), True),
        ("localhost:80", ListenAddress(host="localhost", port=80), True),
        ("[::1]:7", ListenAddress(host="::1", port=7), True),
        ("0.0.0.0:7000", ListenAddress(host="0.0.0.0", port=7000), False),
        ("[::]:7000", ListenAddress(host="::", port=7000), False),
        ("10.1.2.3:1", ListenAddress(host="10.1.2.3", port=1), False),
        ("agent.example:1", ListenAddress(host="agent.example", port=1), False),
    ],
)
def test_parse_listen(text: str, expected: ListenAddress, loopback: bool) -> None:
    parsed = parse_listen(text)
    assert parsed == expected
    assert parsed.is_loopback() is loopback


@pytest.mark.parametrize("text", ["unix:", "1.2.3.4", ":80", "[::1]80", "::1:80", "h:port", "h:70000"])
def test_parse_listen_rejects(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_listen(text)


def test_policy_needs_token_off_loopback() -> None:
    with pytest.raises(ConfigError, match="without a token"):
        check_policy(parse_listen("0.0.0.0:1"), None)
    check_policy(parse_listen("0.0.0.0:1"), "t")
    check_policy(parse_listen("127.0.0.1:1"), None)
    check_policy(parse_listen("unix:/x"), None)


def test_token_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "token"
    path.write_text("  abc  \nsecond line\n")
    assert read_token_file(str(path)) == "abc"
    path.write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        read_token_file(str(path))
    with pytest.raises(ConfigError, match="cannot read"):
        read_token_file(str(tmp_path / "missing"))


def test_token_check() -> None:
    check = TokenCheck("abc")
    assert check.accepts([("authorization", "Bearer abc")])
    assert not check.accepts([("authorization", "Bearer abd")])
    assert not check.accepts([("authorization", "abc")])
    assert not check.accepts([])
    assert not check.accepts(None)
    assert TokenCheck(None).accepts(None)


def test_token_check_by_sha256() -> None:
    digest = hashlib.sha256(b"abc").digest()
    check = TokenCheck(None, digest)
    assert check.enabled
    assert check.accepts([("authorization", "Bearer abc")])
    assert check.accepts([("authorization", b"Bearer abc")])
    assert not check.accepts([("authorization", "Bearer " + digest.hex())])  # the hash is not the token
    assert not check.accepts([("authorization", "Bearer abcd")])
    assert not check.accepts([("authorization", "bearer abc")])
    assert not check.accepts([("x-other", "Bearer abc")])
    assert not check.accepts(None)
    with pytest.raises(ConfigError, match="not both"):
        TokenCheck("abc", digest)


def test_parse_token_sha256() -> None:
    digest = hashlib.sha256(b"t").digest()
    assert parse_token_sha256(digest.hex()) == digest
    assert parse_token_sha256(digest.hex().upper()) == digest
    for bad in ("", "abc", digest.hex()[:-2], digest.hex() + "00", "zz" * 32):
        with pytest.raises(ConfigError, match="64 hex digits"):
            parse_token_sha256(bad)
    # A hash is as good as a token for listening off loopback.
    check_policy(parse_listen("0.0.0.0:1"), None, digest.hex())


FIB_TRIE = """Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 10.0.0.0/24 2 0 2
        |-- 10.0.0.0
           /24 link UNICAST
        |-- 10.0.0.7
           /32 host LOCAL
     +-- 127.0.0.0/8 2 0 2
        |-- 127.0.0.1
           /32 host LOCAL
Local:
  +-- 0.0.0.0/0 3 0 5
        |-- 10.0.0.7
           /32 host LOCAL
        |-- 192.0.2.9
           /32 host LOCAL
"""

IF_INET6 = """00000000000000000000000000000001 01 80 10 80       lo
fe800000000000000000000000000001 02 40 20 80     eth0
fd000000000000000000000000000002 02 40 00 80     eth0
garbage
"""


def test_parse_fib_trie() -> None:
    assert host_info.parse_fib_trie(FIB_TRIE) == [
        ipaddress.ip_address("10.0.0.7"),
        ipaddress.ip_address("192.0.2.9"),
    ]


def test_parse_if_inet6() -> None:
    assert host_info.parse_if_inet6(IF_INET6) == [ipaddress.ip_address("fd00::2")]


def test_gather_reads_overridden_files(tmp_path: pathlib.Path) -> None:
    (tmp_path / "resolv").write_text("nameserver 10.96.0.10\n")
    (tmp_path / "hosts").write_text("10.0.0.1 db\n")
    info = host_info.gather(str(tmp_path / "resolv"), str(tmp_path / "hosts"))
    assert info.resolv_conf == "nameserver 10.96.0.10\n"
    assert info.hosts == "10.0.0.1 db\n"
    assert all(not ip.is_loopback for ip in info.addresses)


def test_extended_errno_from_error_queue_control_messages() -> None:
    import socket
    import struct

    from ktrace_agent.udp_socket import IP_RECVERR, IPV6_RECVERR, extended_errno

    # struct sock_extended_err: ee_errno, ee_origin, ee_type, ee_code, ee_pad, ee_info, ee_data
    err = struct.pack("=IBBBBII", 111, 2, 3, 3, 0, 0, 0)
    assert extended_errno([(socket.IPPROTO_IP, IP_RECVERR, err)]) == 111
    assert extended_errno([(socket.IPPROTO_IPV6, IPV6_RECVERR, err)]) == 111
    assert extended_errno([(socket.IPPROTO_IP, IP_RECVERR, b"\x01")]) is None  # truncated
    assert extended_errno([(socket.SOL_SOCKET, 1, err)]) is None
    assert extended_errno([]) is None
