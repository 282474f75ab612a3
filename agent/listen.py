"""Listen addresses and the policy on who may listen where, without a token.

``unix:/path`` or ``HOST:PORT`` / ``[V6]:PORT``. Pure: no sockets here.
"""

from __future__ import annotations

import hmac
import ipaddress
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


def check_policy(listen: ListenAddress, token: str | None) -> None:
    """Anyone who can reach the agent can make it dial: off-loopback it needs a token."""
    if token is None and not listen.is_loopback():
        raise ConfigError(
            f"refusing to listen on non-loopback address {listen.grpc_target()} without a token "
            "(use --token-file, or listen on 127.0.0.1 / a unix socket)"
        )


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


class TokenCheck:
    """Checks ``authorization: Bearer <token>`` metadata in constant time."""

    def __init__(self, token: str | None) -> None:
        self._expected = f"Bearer {token}".encode() if token is not None else None

    @property
    def enabled(self) -> bool:
        return self._expected is not None

    def accepts(self, metadata: object) -> bool:
        if self._expected is None:
            return True
        presented = b""
        if metadata is not None:
            for key, value in metadata:  # type: ignore[attr-defined]
                if key == "authorization":
                    presented = value.encode() if isinstance(value, str) else bytes(value)
                    break
        return hmac.compare_digest(presented, self._expected)
