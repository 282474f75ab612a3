"""Listen addresses and the policy on who may listen where, without a token.

``unix:/path`` or ``HOST:PORT`` / ``[V6]:PORT``. Pure but for ``claim_unix_path``, which looks
at what is at a Unix socket path before the agent binds it.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import ipaddress
import os
import socket
import stat
from dataclasses import dataclass


class ConfigError(Exception):
    """A bad command line or configuration: reported as one line, exit status 2."""


@dataclass(frozen=True)
class ListenAddress:
    unix_path: str | None = None
    host: str = ""
    port: int = 0

    @property
    def is_unix(self) -> bool:
        return self.unix_path is not None

    def is_loopback(self) -> bool:
        """True for unix sockets and TCP on a loopback address (or ``localhost``)."""
        if self.unix_path is not None:
            return True
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False  # a name that could resolve anywhere

    def grpc_target(self) -> str:
        """The string ``grpc.aio.Server.add_insecure_port`` takes."""
        if self.unix_path is not None:
            return f"unix:{self.unix_path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_listen(text: str) -> ListenAddress:
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if path.startswith("//"):
            path = path[2:]  # unix:///abs/path is the URI spelling of unix:/abs/path
        if not path:
            raise ConfigError(f"--listen {text!r}: empty unix socket path")
        return ListenAddress(unix_path=path)
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ConfigError(f"--listen {text!r}: expected [IPv6]:PORT")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ConfigError(f"--listen {text!r}: expected unix:/path, HOST:PORT or [IPv6]:PORT")
        if ":" in host:
            raise ConfigError(f"--listen {text!r}: put IPv6 addresses in brackets, [addr]:port")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"--listen {text!r}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 0xFFFF:
        raise ConfigError(f"--listen {text!r}: port {port} out of range")
    return ListenAddress(host=host, port=port)


def claim_unix_path(path: str) -> None:
    """Make ``path`` free for the agent's socket, or say why it is not.

    gRPC removes whatever socket is at the path before it binds, so without this a second agent
    would silently take the path of a running one (and its clients, with another token or none).
    A socket nobody accepts on (ECONNREFUSED: its listener died without removing it, e.g. after
    ``kill -9``) is stale and removed; one where a connect succeeds, or finds the backlog full
    (EAGAIN), is in use. Anything else at the path is left alone. Another process could still
    take the path between this check and the bind; two agents started at the same instant are
    not told apart.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConfigError(f"--listen unix:{path}: cannot check the path: {exc.strerror or exc}") from None
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"--listen unix:{path}: the path exists and is not a socket; not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        result = probe.connect_ex(path)
    finally:
        probe.close()
    if result == errno.ECONNREFUSED:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise ConfigError(f"--listen unix:{path}: cannot remove the stale socket: {exc.strerror or exc}") from None
        return
    if result in (0, errno.EAGAIN, errno.EINPROGRESS):
        raise ConfigError(
            f"--listen unix:{path}: another process listens on this socket (an agent still running?); "
            "stop it first or choose another path"
        )
    if result == errno.ENOENT:
        return  # removed meanwhile
    raise ConfigError(f"--listen unix:{path}: cannot check the socket: {os.strerror(result)}")


def check_policy(listen: ListenAddress, token: str | None, token_sha256: str | None = None) -> None:
    """Anyone who can reach the agent can make it dial: off-loopback it needs a token."""
    if token is None and token_sha256 is None and not listen.is_loopback():
        raise ConfigError(
            f"refusing to listen on non-loopback address {listen.grpc_target()} without a token "
            "(use --token-file or --token-sha256, or listen on 127.0.0.1 / a unix socket)"
        )


def parse_token_sha256(text: str) -> bytes:
    """The SHA-256 of the session token, as 64 hex digits (``--token-sha256``)."""
    try:
        digest = bytes.fromhex(text)
    except ValueError:
        digest = b""
    if len(digest) != hashlib.sha256().digest_size:
        raise ConfigError(f"--token-sha256 wants 64 hex digits, got {len(text)} characters")
    return digest


def read_token_file(path: str) -> str:
    """The token is the first line of the file, stripped; an empty token is an error."""
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read token file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"token file {path} is not UTF-8 text") from None
    if not first:
        raise ConfigError(f"token file {path} is empty (the token is its first line)")
    return first


_BEARER = b"Bearer "


class TokenCheck:
    """Checks ``authorization: Bearer <token>`` metadata in constant time.

    The expected token is known either as itself or only as its SHA-256: an agent
    started from a pod spec gets the hash, so whoever can read the spec cannot use
    the agent. Either way the comparison is of SHA-256 digests, whose length does
    not depend on what the client sent.
    """

    def __init__(self, token: str | None, token_sha256: bytes | None = None) -> None:
        if token is not None and token_sha256 is not None:
            raise ConfigError("give the token or its SHA-256, not both")
        if token is not None:
            token_sha256 = hashlib.sha256(token.encode()).digest()
        self._expected = token_sha256

    @property
    def enabled(self) -> bool:
        return self._expected is not None

    def accepts(self, metadata: object) -> bool:
        if self._expected is None:
            return True
        presented: bytes | None = None
        if metadata is not None:
            for key, value in metadata:  # type: ignore[attr-defined]
                if key == "authorization":
                    presented = value.encode() if isinstance(value, str) else bytes(value)
                    break
        if presented is None or not presented.startswith(_BEARER):
            return False
        return hmac.compare_digest(hashlib.sha256(presented[len(_BEARER) :]).digest(), self._expected)
