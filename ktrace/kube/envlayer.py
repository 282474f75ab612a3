"""The program's environment under ``--target``: the pod's laid over the local one (pure).

Which of the pod's variables apply:

* ``--no-env``: none; the program gets the local environment unchanged;
* ``--env-exclude PATTERN``: matching names keep their local value (or stay unset);
* ``--env-include PATTERN``: matching names take the pod's value even if they describe the machine;
* else names that describe this machine (``MACHINE_VARIABLES``) keep their local value;
* every other variable the pod has is set to the pod's value.

And one local variable is removed, since the pod has none and it would hide the pod's own
credentials from the program: ``KUBECONFIG`` (client-go, controller-runtime and kubectl then use
the in-cluster configuration: ``KUBERNETES_SERVICE_HOST`` and the service-account token).
``--env-exclude KUBECONFIG`` keeps it. Patterns are shell globs on names, case-sensitive;
exclude wins over include.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# Names (globs) that describe this machine or this user's session rather than the program's
# configuration: the pod's values would break the local session (a PATH of the image's
# directories, a HOME that does not exist here) or describe a terminal that is not there.
MACHINE_VARIABLES: tuple[str, ...] = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "PWD",
    "OLDPWD",
    "SHLVL",
    "_",
    "TERM",
    "TERMINFO",
    "COLORTERM",
    "COLUMNS",
    "LINES",
    "DISPLAY",
    "WAYLAND_DISPLAY",
    "XAUTHORITY",
    "XDG_*",
    "DBUS_SESSION_BUS_ADDRESS",
    "SSH_*",
    "GPG_AGENT_INFO",
    "LANG",
    "LANGUAGE",
    "LC_*",
    "TZ",
    "TMPDIR",
    "MAIL",
    "EDITOR",
    "VISUAL",
    "PAGER",
    "SUDO_*",
    "LS_COLORS",
)
# Local variables the program does not get under --target (the pod has none of them).
REMOVED_VARIABLES: tuple[str, ...] = ("KUBECONFIG",)


@dataclass(frozen=True)
class EnvChoice:
    """``--no-env``, ``--env-include``, ``--env-exclude``."""

    use_pod: bool = True
    include: Sequence[str] = ()
    exclude: Sequence[str] = ()


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


@dataclass(frozen=True)
class Overlay:
    """What ``--target`` changes in the local environment."""

    set: dict[str, str]
    removed: tuple[str, ...]

    def apply(self, local: Mapping[str, str]) -> dict[str, str]:
        env = {k: v for k, v in local.items() if k not in self.removed}
        env.update(self.set)
        return env


def overlay(pod: Mapping[str, str], choice: EnvChoice) -> Overlay:
    """The pod's variables the program gets, and the local ones it loses."""
    if not choice.use_pod:
        return Overlay({}, ())
    chosen = {
        name: value
        for name, value in pod.items()
        if not _matches(name, choice.exclude)
        and (_matches(name, choice.include) or not _matches(name, MACHINE_VARIABLES))
    }
    removed = tuple(name for name in REMOVED_VARIABLES if name not in chosen and not _matches(name, choice.exclude))
    return Overlay(chosen, removed)


def program_env(local: Mapping[str, str], pod: Mapping[str, str], choice: EnvChoice) -> dict[str, str]:
    return overlay(pod, choice).apply(local)


# -- `ktrace env` ----------------------------------------------------------------------------------

_PLAIN = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-.,:/@%+=")


def dotenv_value(value: str) -> str:
    """A value as dotenv readers (docker compose, python-dotenv, VS Code, IntelliJ's EnvFile) read it
    back: bare when plain, single-quoted (literal) when it can be, else double-quoted with escapes."""
    if value and all(ch in _PLAIN for ch in value):
        return value
    if "'" not in value and "\n" not in value and "\r" not in value:
        return f"'{value}'"
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


def render(result: Overlay, fmt: str) -> str:
    """``dotenv``: ``NAME=value`` lines, sorted, and a comment naming the local variables the program
    loses; ``json``: one object, name to value."""
    if fmt == "json":
        return json.dumps(dict(sorted(result.set.items())), indent=2, ensure_ascii=False) + "\n"
    lines = [f"{name}={dotenv_value(value)}" for name, value in sorted(result.set.items())]
    if result.removed:
        lines.append(f"# not passed on from this machine: {' '.join(result.removed)}")
    return "".join(line + "\n" for line in lines)
