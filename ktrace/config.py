"""Settings of ``ktrace run`` from flags, ``KTRACE_*`` environment variables and ``ktrace.toml``.

Precedence, key by key: flags > environment > file > defaults. A list (``local``,
``remote``) given at a higher level replaces the lower one's; it is not merged.

The file is ``-f FILE`` (``KTRACE_CONFIG``), else ``ktrace.toml`` in the working
directory if there is one. Its keys are the long flag names (``connect-timeout =
5``); an unknown key is an error that names it. Environment variables are
``KTRACE_`` + the key in upper case with ``_`` for ``-`` (lists: comma-separated);
other ``KTRACE_*`` variables are not settings and are ignored.

Other parts of ktrace add their keys with ``register`` (the Kubernetes options).
Pure except for reading the file.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

CONFIG_FILE = "ktrace.toml"
CONFIG_ENV = "KTRACE_CONFIG"


class ConfigError(ValueError):
    """A bad setting; ``str()`` names the key and where it came from."""


Parser = Callable[[Any], Any]


@dataclass(frozen=True)
class Key:
    name: str  # as in ktrace.toml and the long flag: "connect-timeout"
    parse: Parser  # file value (TOML type) or environment string -> value; raises ValueError
    help: str = ""

    @property
    def env(self) -> str:
        return "KTRACE_" + self.name.upper().replace("-", "_")

    @property
    def dest(self) -> str:
        """The attribute name (argparse dest, RunOptions field)."""
        return self.name.replace("-", "_")


def text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("must be a non-empty string")
    return value


def positive_number(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("must be a positive number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError("must be a positive number") from None
    if not number > 0:
        raise ValueError("must be a positive number")
    return number


def boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def text_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return [item.strip() for item in value if item.strip()]
    raise ValueError("must be a list of strings")


def choice(*choices: str) -> Parser:
    def parse(value: Any) -> str:
        if not isinstance(value, str) or value.strip().lower() not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return value.strip().lower()

    return parse


KEYS: dict[str, Key] = {}


def register(*keys: Key) -> None:
    for key in keys:
        KEYS[key.name] = key


register(
    Key("agent", text, "the agent: unix:/path.sock, HOST:PORT or local"),
    Key("token-file", text, "file whose first line is the agent's session token"),
    Key("connect-timeout", positive_number, "seconds the agent tries to connect"),
    Key("hosts", choice("local", "cluster"), "whose /etc/hosts the program reads"),
    Key("local", text_list, "rules for destinations that stay on this machine"),
    Key("remote", text_list, "rules for destinations that go through the cluster"),
    Key("log-json", text, "file to write one JSON object per network event to"),
    Key("output", choice("quiet", "failures", "all"), "what to show on stderr while the program runs"),
    Key("hint-namespaces", text_list, "namespaces to look in for a same-named service"),
    Key("backend", choice("auto", "notify", "ptrace"), "how the program's syscalls are intercepted"),
    Key("dns-cache", boolean, "answer a DNS question asked again within its TTL without asking the cluster"),
)


@dataclass(frozen=True)
class Setting:
    value: Any
    source: str  # "--connect-timeout", "KTRACE_CONNECT_TIMEOUT", "ktrace.toml", "default"


@dataclass(frozen=True)
class Settings:
    values: Mapping[str, Setting]
    file: str | None  # the config file read, if any

    def get(self, name: str, default: Any = None) -> Any:
        setting = self.values.get(name)
        return setting.value if setting is not None else default

    def source(self, name: str) -> str | None:
        setting = self.values.get(name)
        return setting.source if setting is not None else None


def _unknown(name: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(name, list(KEYS), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else f" (known keys: {', '.join(sorted(KEYS))})"
    return ConfigError(f"{where}: unknown key {name!r}{hint}")


def find_file(explicit: str | None, env: Mapping[str, str], cwd: str) -> str | None:
    path = explicit or env.get(CONFIG_ENV) or None
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path} does not exist")
        return path
    default = os.path.join(cwd, CONFIG_FILE)
    return default if os.path.isfile(default) else None


def read_file(path: str) -> dict[str, Setting]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    where = os.path.basename(path)
    found: dict[str, Setting] = {}
    for name, raw in data.items():
        key = KEYS.get(name)
        if key is None:
            raise _unknown(name, path)
        try:
            found[name] = Setting(key.parse(raw), where)
        except ValueError as exc:
            raise ConfigError(f"{path}: {name} {exc}, not {raw!r}") from None
    return found


def read_env(env: Mapping[str, str]) -> dict[str, Setting]:
    found: dict[str, Setting] = {}
    for key in KEYS.values():
        raw = env.get(key.env)
        if raw is None or raw == "":
            continue
        try:
            found[key.name] = Setting(key.parse(raw), key.env)
        except ValueError as exc:
            raise ConfigError(f"{key.env} {exc}, not {raw!r}") from None
    return found


def load(
    flags: Mapping[str, Any],
    env: Mapping[str, str],
    cwd: str,
    config_file: str | None = None,
) -> Settings:
    """Merge the three sources. ``flags``: key name -> value, only for flags given."""
    path = find_file(config_file, env, cwd)
    values: dict[str, Setting] = read_file(path) if path is not None else {}
    values.update(read_env(env))
    for name, value in flags.items():
        if name not in KEYS:
            raise _unknown(name, "flags")
        if value is not None:
            values[name] = Setting(value, "--" + name)
    return Settings(values, path)
